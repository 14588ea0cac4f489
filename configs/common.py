"""Shared pieces of the config files: argument parsing, model sampling defaults, eval base."""

import ml_collections

# The paper's sampling settings per model family (Gemma 3, Qwen 3, Llama 3.1).
SAMPLING = {
    "gemma3_4b": dict(temperature=1.0, top_k=64, top_p=0.95),
    "qwen3_4b": dict(temperature=0.7, top_k=20, top_p=0.8),
    "llama31_8b": dict(temperature=0.7, top_k=50, top_p=0.9),
    "smollm2": dict(temperature=0.7, top_k=50, top_p=0.9),
    # The toy model's noise is its policy: sample it as trained, untruncated.
    "toy": dict(temperature=1.0, top_k=0, top_p=1.0),
}


def parse_arg(arg: str, **defaults):
    """`key=value,key2=value2` -> dict, typed like the defaults; unknown keys are an error."""
    out = dict(defaults)
    for item in filter(None, (a.strip() for a in (arg or "").split(","))):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"config arg {key!r} is unknown; known: {sorted(defaults)}")
        kind = type(defaults[key])
        out[key] = (value.lower() in ("1", "true", "yes", "")) if kind is bool else kind(value)
    return out


def round_section(model: str, g: int) -> ml_collections.ConfigDict:
    s = SAMPLING.get(model, SAMPLING["smollm2"])
    return ml_collections.ConfigDict(dict(
        task="math", num_rollouts=g, max_new_tokens=1536, synthesis_max_new_tokens=1536,
        anchor_temperature=0.0, anchor_draft_tokens=0, reward_mode="exact", extract_modes=("boxed",),
        rubric_min_items=5, rubric_retries=2, length_penalty_tokens=0,
        prompt_overflow="truncate",  # prompts over the context: "truncate" (counted) | "reject"
        chat_kwargs={"no_think": True} if model.startswith("qwen3") else {}, **s))


def eval_base(args) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.job = "evaluate"
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(init=args["model"], tokenizer="", dtype="",
                                             chat_format=""))
    c.data = ml_collections.ConfigDict(dict(name="math500", split="test", path="",
                                            limit=args["n"]))
    c.round = round_section(args["model"], args["g"])
    c.eval = ml_collections.ConfigDict(dict(
        batch_size=4, g_values=(1, 2, 4, 8),
        baselines=("majority", "min_ppl", "self_select", "mutual"), gold_compare="equivalent"))
    c.judge = ml_collections.ConfigDict(dict(kind="local", init="", base_url="", model=""))
    # This host's chips: weights on each (data), rows split over them. A model too big for one
    # chip: data=1, fsdp=-1 (weights split too, gathered layer by layer).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    return c


def train_sections(c: ml_collections.ConfigDict, lr: float) -> None:
    """The CaT-RL trainer's policy-optimisation, optimizer, mesh and checkpoint sections (the
    paper's GRPO settings: clip 0.2, reward-level k3 KL 1e-3, AdamW constant lr)."""
    c.rl = ml_collections.ConfigDict(dict(
        epsilon=0.2, epsilon_high=None, kl_coef=1e-3, kl_mode="reward", tied_groups="kl",
        kl_estimator="k3", advantage="grpo", scale="group", loss_agg="seq_mean_token_mean", num_iterations=1,
        micro_batch=0, logprob_chunk=128))
    c.optimizer = ml_collections.ConfigDict(dict(
        lr=lr, schedule="constant", warmup_steps=0, b1=0.9, b2=0.999, weight_decay=0.0,
        clip_norm=1.0))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    # directory: "" = WORKDIR/checkpoints; or e.g. gs://BUCKET/ckpt with a local workdir.
    c.checkpoint = ml_collections.ConfigDict(dict(every=50, keep=3, directory=""))
