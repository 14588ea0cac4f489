"""Test-time synthesis and baselines on HealthBench (free-form; rubric rewards, a judge).

    python -m catjax.main --config=configs/eval_healthbench.py:model=PATH,n=30 \\
        --config.data.path=healthbench.jsonl --config.judge.kind=http \\
        --config.judge.base_url=http://127.0.0.1:8000 --config.judge.model=JUDGE --workdir=runs/hb

Scores are HealthBench's (met points over positive points, mean clipped to [0, 1]), graded by
the configured judge (the paper used GPT-4o; `judge.kind=local` uses a catjax model). Paper:
synthesis +12% relative over a single sample.
"""

from configs import common


def get_config(arg: str = ""):
    args = common.parse_arg(arg, model="smollm2", n=30, g=8)
    config = common.eval_base(args)
    config.data.name = "healthbench"
    config.round.task = "freeform"
    config.round.max_new_tokens = config.round.synthesis_max_new_tokens = 1024
    config.eval.baselines = ("min_ppl", "self_select", "mutual")
    config.eval.g_values = ()
    return config
