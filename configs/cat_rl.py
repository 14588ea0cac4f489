"""CaT-RL: GRPO with rewards from the frozen anchor's synthesis (no labels used in training).

    # the paper's setting on a TPU VM (Qwen 3 4B, MATH-500, test-time training as in TTRL):
    python -m catjax.main --config=configs/cat_rl.py:model=qwen3_4b,task=math500 \\
        --config.model.init=gs://BUCKET/Qwen3-4B --workdir=gs://BUCKET/runs/qwen3_math500
    # a CPU smoke run with a tiny random model:
    python -m catjax.main --config=configs/cat_rl.py:model=tiny,runlocal --workdir=/tmp/cat_rl

arg: model=gemma3_4b|qwen3_4b|llama31_8b|smollm2|tiny, task=math500|gsm8k|healthbench, runlocal.
The paper's defaults: G 8, AdamW lr 5e-7 constant, KL 1e-3 (reward-level), max tokens
1536 (MATH-500) / 1024 (HealthBench), each model's sampling parameters, /no_think for Qwen 3.
Gold answers, where a set has them, are logged as reward/rollout accuracy and never trained on.
"""

import ml_collections

from configs import common

MAX_TOKENS = {"math500": 1536, "gsm8k": 1024, "healthbench": 1024}


def get_config(arg: str = ""):
    args = common.parse_arg(arg, model="tiny", task="math500", runlocal=False)
    model, task = args["model"], args["task"]
    if task not in MAX_TOKENS:
        raise ValueError(f"config arg task={task!r}: use one of {sorted(MAX_TOKENS)}")
    c = ml_collections.ConfigDict()
    c.job = "train"
    c.seed = 0
    c.steps = 1000
    c.batch_size = 32  # questions per step over all processes (x G rollouts)
    c.remat = True
    c.export = True
    c.peak_tflops_per_device = 0.0  # e.g. 197 (v5e bf16), 459 (v5p): logs an MFU estimate
    if model == "tiny":
        # A random tiny Qwen 3 over SmolLM2's vocabulary and chat format (CPU smoke runs).
        c.model = ml_collections.ConfigDict(dict(init="random:tiny_qwen3", tokenizer="smollm2",
                                                 dtype="", chat_format="", vocab_size=49_152,
                                                 params_from=""))
    else:
        c.model = ml_collections.ConfigDict(dict(
            init="smollm2" if model == "smollm2" else f"gs://YOUR_BUCKET/{model}",
            tokenizer="", dtype="bfloat16" if model != "smollm2" else "", chat_format=""))
    # A catjax checkpoint to start from (e.g. another run's WORKDIR/checkpoints); the
    # architecture and tokenizer still come from model.init.
    c.model.params_from = ""
    c.data = ml_collections.ConfigDict(dict(
        name=task, split="test", path="", limit=None if task != "gsm8k" else 500))
    c.round = common.round_section(model, 8)
    c.round.max_new_tokens = c.round.synthesis_max_new_tokens = MAX_TOKENS[task]
    if task == "healthbench":
        c.round.task = "freeform"
        c.round.length_penalty_tokens = 750
    if task == "gsm8k":
        c.round.extract_modes = ("boxed", "gsm8k", "answer_is", "last_number")
    common.train_sections(c, lr=5e-7)
    c.judge = ml_collections.ConfigDict(dict(kind="local", init="", base_url="", model=""))
    if args["runlocal"]:
        c.steps = 3
        c.batch_size = 2
        c.data.limit = 8
        c.round.num_rollouts = 4
        c.round.max_new_tokens = c.round.synthesis_max_new_tokens = 24
        c.optimizer.lr = 1e-3
        c.checkpoint.every = 1
        c.remat = False
    return c
