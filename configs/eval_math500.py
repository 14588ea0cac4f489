"""Test-time synthesis and baselines on MATH-500 (the paper's setting: G=8, boxed answers).

    python -m catjax.main --config=configs/eval_math500.py:model=PATH,n=500 --workdir=runs/math500

Paper (Qwen 3 4B): single 0.79, majority@8 0.81, synthesis@8 0.85.
"""

from configs import common


def get_config(arg: str = ""):
    args = common.parse_arg(arg, model="smollm2", n=500, g=8)
    config = common.eval_base(args)
    config.data.name = "math500"
    config.round.extract_modes = ("boxed",)
    return config
