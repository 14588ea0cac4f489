"""Test-time synthesis and baselines on GSM8K.

    python -m catjax.main --config=configs/eval_gsm8k.py:model=smollm2,n=20 --workdir=runs/eval_gsm8k

`arg` (comma-separated key=value): model (smollm2 | a HF dir | a .gguf | gs://...), n (questions),
g (rollouts). Gold answers are only used for scoring.
"""

from configs import common


def get_config(arg: str = ""):
    args = common.parse_arg(arg, model="smollm2", n=20, g=8)
    config = common.eval_base(args)
    config.data.name = "gsm8k"
    config.data.split = "test"
    # GSM8K answers are plain numbers; weak models rarely box them, so fall back in this order.
    config.round.extract_modes = ("boxed", "gsm8k", "answer_is", "last_number")
    config.round.reward_mode = "equivalent"
    config.round.max_new_tokens = 384
    config.round.synthesis_max_new_tokens = 384
    return config
