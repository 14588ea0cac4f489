"""Supervised recipe for the learning proof's toy model (the one shipped in catjax/data_files).

    python -m catjax.main --config=configs/toy_sft.py --workdir=runs/toy_sft

Trains the ~0.8M-parameter toy decoder from scratch on the synthetic arithmetic task: as a policy
on noisy worked solutions (so its samples make independent step errors) and as an anchor on
synthesis prompts (flawed rollouts -> correct solution). See catjax/toy.py.
"""

import ml_collections


def get_config(arg: str = ""):
    del arg
    c = ml_collections.ConfigDict()
    c.job = "sft"
    c.seed = 0
    c.steps = 6000
    c.lr = 3e-3
    c.warmup_steps = 100
    c.policy_batch = 64
    c.synthesis_batch = 32
    c.eval_every = 1000
    c.eval_questions = 200
    c.checkpoint_every = 500
    # The task's noise: how often a step's result slips by 1-3 or its operand is miscopied.
    c.task = ml_collections.ConfigDict(dict(num_steps=4, max_operand=9, slip_prob=0.18,
                                            miscopy_prob=0.07))
    # A share of the anchor's synthesis examples read noisier rollouts than the policy writes.
    c.hard_synthesis_fraction = 0.5
    c.hard_synthesis_noise = ml_collections.ConfigDict(dict(slip_prob=0.3, miscopy_prob=0.25))
    c.model = ml_collections.ConfigDict(dict(hidden_size=192, num_layers=4, num_heads=6,
                                             num_kv_heads=2, head_dim=32, mlp_dim=512))
    c.data_workers = 0  # > 0: build batches in that many processes (for accelerators)
    return c
