"""The learning proof: CaT on a synthetic task with a tiny model trained from scratch for it.

    # CaT-RL from the shipped toy model (no labels used; held-out accuracy vs gold is logged):
    python -m catjax.main --config=configs/toy.py --workdir=runs/toy_rl
    # test-time synthesis vs single sample and majority vote on the 500 held-out questions:
    python -m catjax.main --config=configs/toy.py:mode=eval --workdir=runs/toy_eval

The task (catjax/datasets/toy.py) is chained one-digit additions and subtractions whose worked
solutions show every intermediate result; the model (catjax/toy.py, ~0.8M parameters, shipped in
catjax/data_files/toy_model, rebuilt by configs/toy_sft.py) samples independent step errors as a
policy and reconciles flawed rollouts as an anchor. The task is synthetic: it shows the paper's
mechanism in miniature, not its numbers.

arg: mode=train|eval, g (rollouts per question), steps.
"""

import ml_collections

from configs import common


def get_config(arg: str = ""):
    args = common.parse_arg(arg, mode="train", g=8, steps=40)
    if args["mode"] not in ("train", "eval"):
        raise ValueError(f"config arg mode={args['mode']!r}: use 'train' or 'eval'")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(init="toy", tokenizer="", dtype="", chat_format="",
                                             params_from=""))
    c.round = common.round_section("toy", args["g"])
    c.round.prompt_style = "toy"
    c.round.max_new_tokens = c.round.synthesis_max_new_tokens = 32
    c.judge = ml_collections.ConfigDict(dict(kind="local", init="", base_url="", model=""))
    if args["mode"] == "eval":
        c.job = "evaluate"
        c.data = ml_collections.ConfigDict(dict(name="toy", split="test", path="", limit=500))
        c.eval = ml_collections.ConfigDict(dict(
            batch_size=100, g_values=(1, 2, 4, 8), baselines=("majority", "min_ppl"),
            gold_compare="exact"))
        return c
    c.job = "train"
    c.steps = args["steps"]
    c.batch_size = 16  # questions per step over all processes (x G rollouts)
    c.remat = False
    c.export = True
    c.peak_tflops_per_device = 0.0
    c.data = ml_collections.ConfigDict(dict(name="toy", split="train", path="", limit=None))
    # Held-out single-sample accuracy vs gold: logged every `eval_every` steps, never trained on.
    c.eval_data = ml_collections.ConfigDict(dict(name="toy", split="test", path="", limit=500))
    c.eval_every = 5
    common.train_sections(c, lr=3e-4)  # a model trained from scratch takes a larger step
    c.checkpoint.every, c.checkpoint.keep = 10, 2
    return c
