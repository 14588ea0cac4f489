"""Train the shipped toy model (configs/toy_sft.py) on a GPU machine, where catjax's own
dependencies may be partly missing: no checkpoints, no plot if matplotlib is absent.

    python3 bench/toy_sft_gpu.py OUT_DIR [steps] [key=value ...]   # DATA_WORKERS=6

The export (OUT_DIR/export) is what catjax/data_files/toy_model/ holds; the same config runs on
a CPU with `python -m catjax.main --config=configs/toy_sft.py` (slower, same recipe).
"""

import os
import sys

sys.path.insert(0, os.getcwd())
sys.path.insert(1, os.path.join(os.getcwd(), ".cache", "gpu_site"))  # ml_collections, if carried

import jax  # noqa: E402

from catjax import metrics, sft  # noqa: E402
from configs import toy_sft  # noqa: E402

try:
    import matplotlib  # noqa: F401
except ImportError:
    metrics.plot_curves = lambda *a, **k: None

def main() -> None:
    print(f"python {sys.version.split()[0]}, jax {jax.__version__}, devices {jax.devices()}", flush=True)
    config = toy_sft.get_config()
    config.checkpoint_every = 0
    config.data_workers = int(os.environ.get("DATA_WORKERS", "6"))
    if len(sys.argv) > 2:
        config.steps = int(sys.argv[2])
    for item in sys.argv[3:]:  # dotted overrides: model.hidden_size=192
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = type(node[leaf])(value)
    sft.run(config, sys.argv[1])


if __name__ == "__main__":  # data workers are spawned: they re-import this file
    main()
