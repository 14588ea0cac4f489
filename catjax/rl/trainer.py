"""CaT-RL: the GRPO trainer. One readable loop, one donated, jitted update.

Each step: a batch of questions (this process's contiguous part of the global batch) -> one CaT
round (policy rollouts, the frozen anchor's synthesis, rewards) -> GRPO loss against the anchor ->
an Optax AdamW update. Several processes (multi-host) train exactly as one process would on the
same global batch; metrics and plots come from process 0, checkpoints from all.
Policy, anchor and (local) judge live in one process on one mesh: the sampler reads the very
arrays the optimizer updates, no weight copies. Randomness is `fold_in(seed, step)`, and the
data order is pure arithmetic of (seed, step), so a run resumed from step k continues exactly
as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from tqdm import tqdm

from catjax import checkpoint, data, faults, metrics, models, parallel, sampling
from catjax.cat import round as cat_round
from catjax.models import ModelConfig, Params
from catjax.rl import grpo


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """The policy-optimisation settings (static: part of the compiled update)."""

    num_rollouts: int = 8
    epsilon: float = 0.2
    epsilon_high: float | None = None
    kl_coef: float = 1e-3
    kl_mode: str = "reward"  # "reward" (the paper's table) | "loss" | "none"
    # With kl_mode="reward", a group whose task rewards tie: "kl" (verl's, the paper's) z-scores
    # its KL-penalised rewards like any group's, ranking its rollouts by their KL to the anchor
    # (a pull back to it; while the policy is still the anchor, only round-off); "zero" gives it
    # no advantage (the KL then only shifts split groups, by ~1e-5 of their spread).
    tied_groups: str = "kl"
    kl_estimator: str = "k3"
    advantage: str = "grpo"
    scale: str = "group"
    loss_agg: str = "seq_mean_token_mean"
    num_iterations: int = 1
    micro_batch: int = 0  # rows per gradient micro-batch; 0 = all rows at once
    logprob_chunk: int = 128  # completion tokens per row scored at once; 0 = all at once
    # The rollouts' sampling temperature (round.temperature; set by `from_config`): every
    # log-prob of the update is of softmax(logits / temperature), the distribution sampled.
    temperature: float = 1.0

    def __post_init__(self):
        # Every field is checked here, at start-up: a typo must not wait for the first compile,
        # minutes into a run (after the model has loaded and the first round has sampled).
        choices = {"kl_mode": ("reward", "loss", "none"), "tied_groups": ("kl", "zero"),
                   "advantage": sorted(grpo.ADVANTAGES),
                   "kl_estimator": sorted(grpo.KL_ESTIMATORS), "scale": list(grpo.SCALES),
                   "loss_agg": sorted(grpo.LOSS_AGGREGATIONS)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"config.rl.{name}={getattr(self, name)!r}: choose from {list(allowed)}")
        minimum = {"num_rollouts": 1, "num_iterations": 1, "micro_batch": 0, "logprob_chunk": 0}
        for name, lo in minimum.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"config.rl.{name}={v!r} must be an integer >= {lo}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, int | float) or \
                not 0 < self.temperature < float("inf"):
            raise ValueError(f"rl temperature={self.temperature!r} (round.temperature) must be > 0")
        for name in ("epsilon", "epsilon_high", "kl_coef"):
            v = getattr(self, name)
            if v is None and name == "epsilon_high":
                continue
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < float("inf"):
                raise ValueError(f"config.rl.{name}={v!r} must be a finite number >= 0")

    @classmethod
    def from_config(cls, rl: Any, num_rollouts: int, temperature: float = 1.0) -> RLConfig:
        """From `config.rl` (a ConfigDict or mapping) and the round's G and sampling temperature
        (0, greedy rollouts: the plain model's log-probs); unknown keys are one line naming them."""
        d = dict(rl)
        known = {f.name for f in dataclasses.fields(cls)} - {"num_rollouts", "temperature"}
        if unknown := sorted(set(d) - known):
            raise ValueError(f"config.rl: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(num_rollouts=num_rollouts, temperature=temperature or 1.0, **d)


def make_optimizer(oc: Any, total_steps: int,
                   updates_per_step: int = 1) -> optax.GradientTransformation:
    """Clipped AdamW on `oc.schedule`, whose steps (warm-up, `total_steps`) are training steps.

    A step may apply several optimizer updates (`rl.num_iterations` PPO epochs): they share the
    step's learning rate, so a cosine ends at the last step, not at `total_steps /
    updates_per_step`. (A skipped, non-finite update does not advance optax's count: the
    schedule then runs that many updates behind.)
    """
    _check_optimizer(oc)
    lr = _schedule(oc, total_steps)
    if updates_per_step != 1:
        per_update = lr
        lr = lambda count: per_update(count // updates_per_step)  # noqa: E731
    return optax.chain(optax.clip_by_global_norm(oc.clip_norm),
                       optax.adamw(lr, b1=oc.b1, b2=oc.b2, weight_decay=oc.weight_decay))


def _check_optimizer(oc: Any) -> None:
    """Values optax would take without complaint and then never learn with (a clip norm of 0
    zeroes every update; NaN where a gradient is exactly 0)."""
    checks = {"lr": oc.lr >= 0, "clip_norm": oc.clip_norm > 0, "warmup_steps": oc.warmup_steps >= 0,
              "b1": 0 <= oc.b1 < 1, "b2": 0 <= oc.b2 < 1, "weight_decay": oc.weight_decay >= 0}
    want = {"lr": ">= 0", "clip_norm": "> 0", "warmup_steps": ">= 0", "b1": "in [0, 1)",
            "b2": "in [0, 1)", "weight_decay": ">= 0"}
    for name, ok in checks.items():
        if not ok:
            raise ValueError(f"config.optimizer.{name}={getattr(oc, name)} must be {want[name]}")


def _schedule(oc: Any, total_steps: int) -> optax.Schedule:
    if oc.schedule == "constant":
        lr = optax.constant_schedule(oc.lr) if not oc.warmup_steps else optax.join_schedules(
            [optax.linear_schedule(0.0, oc.lr, oc.warmup_steps), optax.constant_schedule(oc.lr)],
            [oc.warmup_steps])
    elif oc.schedule == "cosine":
        lr = (optax.cosine_decay_schedule(oc.lr, max(total_steps, 1)) if not oc.warmup_steps else
              optax.warmup_cosine_decay_schedule(0.0, oc.lr, oc.warmup_steps, total_steps))
    else:
        raise ValueError(f"config.optimizer.schedule={oc.schedule!r}: use 'constant' or 'cosine'")
    return lr


# --- the training batch ----------------------------------------------------------------------

def build_batch(res: cat_round.RoundResult, num_rollouts: int, pad_id: int,
                width: int | None = None) -> dict[str, np.ndarray]:
    """Prompt + completion rows for the loss: right-padded prompt [P], then the completion [N].

    `positions` skip the prompt padding and `key_mask` hides it, so every row sees exactly the
    sequence the sampler produced. `pred_index[r, j]` is where the logits for completion token
    j are read (the prompt's last token for j = 0). `width` (default: the bucket of the longest
    prompt) must be the same on every process of a multi-process run.
    """
    out = res.rollouts
    comp = np.asarray(out.tokens)
    lengths = np.asarray(out.lengths)
    r, n = comp.shape
    prompt_len = np.repeat(np.asarray([len(p) for p in res.prompt_ids], np.int32), num_rollouts)
    width = width or sampling.bucket_length(int(prompt_len.max()))
    prompts = np.full((r, width), pad_id, np.int32)
    for i, p in enumerate(res.prompt_ids):
        prompts[i * num_rollouts:(i + 1) * num_rollouts, :len(p)] = p
    j = np.arange(n)[None, :]
    tokens = np.concatenate([prompts, comp], 1)
    positions = np.concatenate([np.broadcast_to(np.arange(width), (r, width)),
                                prompt_len[:, None] + j], 1).astype(np.int32)
    key_mask = np.concatenate([np.arange(width)[None] < prompt_len[:, None], j < lengths[:, None]], 1)
    pred_index = np.where(j == 0, prompt_len[:, None] - 1, width + j - 1).astype(np.int32)
    return dict(tokens=tokens, positions=positions, key_mask=key_mask, pred_index=pred_index,
                targets=comp, mask=(j < lengths[:, None]).astype(np.float32),
                rewards=np.asarray(res.rewards, np.float32))


def completion_logprobs(cfg: ModelConfig, params: Params, batch: dict, chunk: int = 0,
                        temperature: float = 1.0,
                        mesh: Mesh | None = None) -> tuple[jax.Array, jax.Array]:
    """float32 log-probs and entropies [R, N] of the completion tokens under softmax(logits /
    `temperature`); logits only at the scored positions, for `chunk` completion tokens of every
    row at a time (0: all N at once).

    Full-vocabulary float32 logits are the update's largest activation (~0.9 GiB per 1536-token
    row at a 152k vocabulary, times the log-softmax and its gradient): chunked, only [R, chunk, V]
    is live, and the backward pass recomputes a chunk's logits (`models.token_logprobs` keeps only
    per-position statistics between the passes) instead of storing them. The values are the
    unchunked ones; a remainder (chunk not dividing N) is one more, smaller chunk. `mesh`: the
    rows split over it; with an fsdp axis each layer's weights, and the head once, are gathered
    over it (`models.hidden_states`).
    """
    hidden = models.hidden_states(cfg, params, batch["tokens"], positions_bt=batch["positions"],
                                  mask_bt=batch["key_mask"], mesh=mesh)
    params = models.decoder.head_gathered(cfg, params, mesh)
    hidden = jnp.take_along_axis(hidden, batch["pred_index"][..., None], axis=1)

    if not chunk or chunk >= hidden.shape[1]:
        return models.token_logprobs(cfg, params, hidden, batch["targets"], temperature=temperature)
    score = functools.partial(models.token_logprobs, cfg, params, keep_logits=False,
                              temperature=temperature)

    # Chunks lead, rows stay the batch axis (sharded as before); lax.map runs the chunks one
    # after the other, and a remainder (chunk not dividing N) is one more, smaller call.
    rows, n = hidden.shape[:2]
    full = n // chunk * chunk
    lead = lambda a: jnp.swapaxes(a[:, :full].reshape(rows, n // chunk, chunk, *a.shape[2:]), 0, 1)
    lp, ent = jax.lax.map(lambda ht: score(*ht), (lead(hidden), lead(batch["targets"])))
    lp, ent = (jnp.swapaxes(a, 0, 1).reshape(rows, full) for a in (lp, ent))
    if full < n:
        lp_r, ent_r = score(hidden[:, full:], batch["targets"][:, full:])
        lp, ent = jnp.concatenate([lp, lp_r], 1), jnp.concatenate([ent, ent_r], 1)
    return lp, ent


@functools.partial(jax.jit, static_argnames=("cfg", "rl", "opt", "mesh"), donate_argnums=(1, 2))
def train_step(cfg: ModelConfig, params: Params, opt_state: Any, anchor: Params, batch: dict, *,
               rl: RLConfig, opt: optax.GradientTransformation, mesh: Mesh | None = None):
    """GRPO update(s) on one batch of rollouts. Non-finite loss or gradients: skipped.

    Every log-prob is at the sampling temperature (`rl.temperature`), and the behaviour
    log-probs are the policy's own before this step's update, recomputed here (as verl does),
    not the sampler's: those come from other kernels (a bf16 cache on accelerators), and in the
    reward-level KL (the default) a group whose task rewards tie is ranked by its KL alone, so
    their round-off, z-scored, became advantages of about +-1 while the policy was still the
    anchor. Here the policy and the anchor run one computation: equal weights, a KL of exactly 0.
    That is one more forward pass, saved when nothing needs the values before the gradient pass
    (one iteration without a reward-level KL: the pass reads its own, a ratio of exactly 1).
    `mesh`: the one params and batch lie on (`completion_logprobs`); the trainer passes its own.
    """
    mask = batch["mask"]
    rows = mask.shape[0]
    mb = rl.micro_batch or rows
    if rows % mb:
        raise ValueError(f"rl.micro_batch={mb} does not divide the {rows} rollout rows")
    # Micro-batch k holds rows k, k + n, k + 2n, ... (n micro-batches): with the rows split over
    # the devices in blocks, each micro-batch spans all of them. Contiguous micro-batches each lay
    # on a few devices, so the scan over them gathered the whole batch to every device, which then
    # computed every row's gradient (no data parallelism left, every row's activations on each).
    # The sums below do not depend on how the rows are grouped.
    n_micro = rows // mb
    split = lambda tree: jax.tree.map(
        lambda x: x.reshape(mb, n_micro, *x.shape[1:]).swapaxes(0, 1), tree)
    score = functools.partial(completion_logprobs, cfg, chunk=rl.logprob_chunk,
                              temperature=rl.temperature, mesh=mesh)

    def frozen_logprobs(p: Params) -> jax.Array:
        # Micro-batch by micro-batch too, so the update's peak memory scales with
        # rl.micro_batch, not with the batch.
        p = jax.lax.stop_gradient(p)
        lp = jax.lax.map(lambda b: score(p, b)[0], split(batch))  # [n_micro, mb, N]
        return jax.lax.stop_gradient(lp.swapaxes(0, 1).reshape(mask.shape))

    in_pass = rl.num_iterations == 1 and rl.kl_mode != "reward"
    old_lp = None if in_pass else frozen_logprobs(compute_params(cfg, params))
    # No KL term: the anchor's forward pass would only feed the kl_ref metric. Skipped.
    ref_lp = None if rl.kl_mode == "none" else frozen_logprobs(anchor)
    rewards = task_rewards = batch["rewards"]
    if rl.kl_mode == "reward":
        rewards = grpo.kl_penalized_rewards(rewards, old_lp, ref_lp, mask, rl.kl_coef,
                                            rl.kl_estimator)
    adv = grpo.advantages(rewards, rl.num_rollouts, rl.advantage, rl.scale,
                          task_rewards_r=task_rewards if rl.tied_groups == "zero" else None)
    chunks = split(dict(batch, adv=adv, **{k: v for k, v in (("old_lp", old_lp), ("ref_lp", ref_lp))
                                           if v is not None}))
    loss_kw = dict(epsilon=rl.epsilon, epsilon_high=rl.epsilon_high, loss_agg=rl.loss_agg,
                   kl_coef=rl.kl_coef if rl.kl_mode == "loss" else 0.0,
                   kl_estimator=rl.kl_estimator, max_tokens=mask.shape[1])

    def micro(p, mbatch):
        lp, ent = score(compute_params(cfg, p), mbatch)
        old = jax.lax.stop_gradient(lp) if in_pass else mbatch["old_lp"]
        # Without a KL term there is no reference: its "kl" metric is then (0, 0), not a
        # divergence from the behaviour log-probs under a reference's name.
        num, den, mets = grpo.policy_loss_terms(
            lp, old, mbatch["adv"], mbatch["mask"], ref_logprobs_rt=mbatch.get("ref_lp"),
            **loss_kw)
        m = mbatch["mask"]
        mets = dict(mets, entropy=(jnp.sum(ent * m), jnp.sum(m)),
                    logprob_gap=(jnp.sum(jnp.abs(lp - old) * m), jnp.sum(m)))
        return num, (den, mets)

    def one_iteration(carry, _):
        params, opt_state = carry
        def acc(c, mbatch):
            g, den, mets = c
            (_, (d, m)), gi = jax.value_and_grad(micro, has_aux=True)(params, mbatch)
            g = jax.tree.map(lambda a, b: a + b.astype(a.dtype), g, gi)
            return (g, den + d, grpo.sum_metrics(mets, m)), None
        # Micro-batch gradients add up in float32 (a bf16 running sum loses the low bits of every
        # addend), then are rounded once to the parameters' dtype, as an unsplit bf16 gradient is.
        # AdamW's moments stay in that dtype, opt.init's: float32 moments would double the
        # persistent optimizer state of a bf16 model and change its checkpoints.
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)),
                             params)
        first = jax.tree.map(lambda x: x[0], chunks)
        _, (d0, m0) = jax.eval_shape(micro, params, first)
        m_zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m0)
        (grads, den, mets), _ = jax.lax.scan(acc, (zeros, jnp.float32(0.0), m_zero), chunks)
        # Back to the parameters' dtype: float32 gradients would turn bf16 AdamW moments into
        # float32 and break the scan's carry types.
        grads = jax.tree.map(lambda g, p: (g / jnp.maximum(den, 1.0)).astype(p.dtype), grads, params)
        loss_sum = mets["loss"][0]
        gnorm = optax.global_norm(grads)
        finite = jnp.isfinite(gnorm) & jnp.isfinite(loss_sum)
        updates, new_opt = opt.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        params, opt_state = keep(new_params, params), keep(new_opt, opt_state)
        mets = dict(mets, grad_norm=(gnorm, jnp.float32(1.0)),
                    skipped=(1.0 - finite.astype(jnp.float32), jnp.float32(1.0)))
        return (params, opt_state), mets

    (params, opt_state), mets = jax.lax.scan(one_iteration, (params, opt_state), None,
                                            length=rl.num_iterations)
    mets = jax.tree.map(lambda x: x[-1], mets)
    if rl.kl_mode != "none" and old_lp is None:  # the one pass's own: its kl metric
        mets["kl_ref"] = mets["kl"]
    elif rl.kl_mode != "none":
        valid = mask > 0  # `where`, not `* mask`: a padded slot's log-probs may be -inf
        kl_k3 = grpo.KL_ESTIMATORS["k3"](jnp.where(valid, old_lp, 0.0), jnp.where(valid, ref_lp, 0.0))
        mets["kl_ref"] = (jnp.sum(jnp.where(valid, kl_k3, 0.0)), jnp.sum(mask))
    return params, opt_state, mets


# --- the loop --------------------------------------------------------------------------------

def _round_metrics(res: cat_round.RoundResult, g: int) -> dict[str, float]:
    r = res.rewards.reshape(-1, g)
    lengths = np.asarray(res.rollouts.lengths)
    out = {"reward_mean": float(r.mean()), "reward_std": float(r.std()),
           "frac_reward_zero_std": float(np.mean(r.std(-1) == 0)),
           "response_length": float(lengths.mean()),
           **{f"round/{k}": v for k, v in res.metrics.items()}}
    if not res.records or "reference_answer" not in res.records[0]:  # math rounds only
        return out
    from catjax.cat import answers

    maj = [answers.majority_vote(rec["rollout_answers"]) for rec in res.records]
    out["synthesis_vs_majority_disagree"] = float(np.mean([
        m is not None and rec["reference_answer"] is not None
        and answers.normalize(m) != answers.normalize(rec["reference_answer"])
        for rec, m in zip(res.records, maj, strict=True)]))
    # Monitoring only (the reward never sees gold): over the questions that have one.
    gold = [(rec, rec["gold"]) for rec in res.records if rec.get("gold") is not None]
    if gold:
        out["gold_questions"] = float(len(gold))
        out["reward_accuracy"] = float(np.mean([
            rec["reference_answer"] is not None and answers.equivalent(rec["reference_answer"], gd)
            for rec, gd in gold]))
        out["rollout_accuracy"] = float(np.mean([
            a is not None and answers.equivalent(a, gd)
            for rec, gd in gold for a in rec["rollout_answers"]]))
    return out


# Round metrics that are counts, not rates: the global batch's is the sum over processes.
_ROUND_COUNTS = ("round/prompt_truncated", "gold_questions")
_GOLD_RATES = ("reward_accuracy", "rollout_accuracy")  # per question with gold


def _merge_over_processes(local: dict[str, float], rewards: np.ndarray, g: int) -> dict[str, float]:
    """Round metrics of the global batch from each process's (a collective; identity alone).

    Every process holds as many questions, so the mean over processes of a per-question or
    per-rollout mean is the global mean (a count absent on a process is 0 there); counts
    (`_ROUND_COUNTS`) add up; the verdict rates, per judged pair, are weighted by each process's
    pairs, and the gold accuracies by its questions with gold; the reward statistics are
    recomputed from all rewards, in global row order.
    """
    if jax.process_count() == 1:
        return local
    everyone = parallel.allgather_json({"m": local, "r": np.asarray(rewards, np.float32).tolist()})
    out = {k: float((np.sum if k in _ROUND_COUNTS else np.mean)([e["m"].get(k, 0.0) for e in everyone]))
           for k in sorted(set().union(*(e["m"] for e in everyone)))}
    for rates, count in (([f"round/{k}" for k in cat_round.VERDICT_RATES], "round/judge_pairs"),
                         (_GOLD_RATES, "gold_questions")):
        weights = [e["m"].get(count, 0.0) for e in everyone]
        for rate in rates:
            if rate in out:
                out[rate] = float(sum(e["m"].get(rate, 0.0) * w
                                      for e, w in zip(everyone, weights, strict=True))
                                  / max(sum(weights), 1e-30))
    r = np.asarray([x for e in everyone for x in e["r"]], np.float32).reshape(-1, g)
    out.update(reward_mean=float(r.mean()), reward_std=float(r.std()),
               frac_reward_zero_std=float(np.mean(r.std(-1) == 0)))
    return out


def _heldout_examples(config: Any) -> list:
    ec = config.get("eval_data")
    if not ec or not ec.get("name"):
        return []
    return data.load(ec.name, split=ec.get("split", "test"), path=ec.get("path"),
                     limit=ec.get("limit"))


def heldout_metrics(policy: cat_round.Model, examples: list, rc: cat_round.RoundConfig,
                    seed: int) -> dict[str, float]:
    """Single-sample accuracy vs gold on held-out questions, sampled as the rollouts are.

    Gold is only logged, never trained on. The same key at every evaluation (common random
    numbers), so a change between evaluations is the policy's, not the draw's.
    """
    from catjax.cat import answers

    tok = policy.tokenizer
    prompt_ids = [cat_round.chat_ids(tok, cat_round.policy_prompt(ex, rc.task, rc.prompt_style),
                                     dict(rc.chat_kwargs)) for ex in examples]
    out = sampling.sample(policy.cfg, policy.params, prompt_ids, num_samples=1,
                          max_new_tokens=rc.max_new_tokens, rng=jax.random.key(seed + 1),
                          temperature=rc.temperature, top_k=rc.top_k, top_p=rc.top_p,
                          stop_ids=tok.eos_ids, pad_id=tok.pad_id, logprobs=False)
    texts = [tok.decode(c) for c in sampling.completions(out)]
    got = [answers.extract_answer(t, rc.extract_modes)[0] for t in texts]
    ok = [a is not None and answers.equivalent(a, ex.answer) for a, ex in zip(got, examples, strict=True)]
    return {"heldout_accuracy": float(np.mean(ok))}


def train(config: Any, workdir: str, policy: cat_round.Model | None = None,
          judge: Any = None) -> dict:
    """The CaT-RL job behind `python -m catjax.main --config=configs/cat_rl.py`."""
    from catjax import loading

    rc = loading.round_config(config.round)
    rl = RLConfig.from_config(config.rl, rc.num_rollouts, rc.temperature)
    opt = make_optimizer(config.optimizer, config.steps, rl.num_iterations)  # checks it, at start
    mesh = parallel.make_mesh(**dict(config.mesh))
    rows, dp = config.batch_size * rl.num_rollouts, parallel.data_parallel_size(mesh)
    if rows % dp:
        raise ValueError(f"config.batch_size*num_rollouts={rows} does not split over the mesh's "
                         f"{dp} data-parallel devices")
    if rl.micro_batch and rows % rl.micro_batch:
        raise ValueError(f"config.rl.micro_batch={rl.micro_batch} does not divide the {rows} "
                         "rollout rows of a step")
    if rl.micro_batch % dp:
        raise ValueError(f"config.rl.micro_batch={rl.micro_batch} is not a multiple of the mesh's "
                         f"{dp} data-parallel devices (each micro-batch is split over all of them)")
    if config.batch_size % jax.process_count():
        raise ValueError(f"config.batch_size={config.batch_size} (the global batch) does not split "
                         f"over {jax.process_count()} processes")
    # Data before weights: a bad data file stops in a second, not after loading a model.
    # Training never reads gold: a question without one is still a question (MATH's train split).
    examples = data.load(config.data.name, split=config.data.split,
                         path=config.data.get("path"), limit=config.data.get("limit"),
                         require_answers=False)
    no_gold = sum(ex.answer is None for ex in examples)
    if no_gold and config.round.get("task", "math") == "math" and jax.process_index() == 0:
        print(f"data: {no_gold} of {len(examples)} training questions have no gold answer (CaT "
              "needs none; the gold accuracies are logged over the others, gold_questions)")
    if len(examples) < config.batch_size:
        raise ValueError(f"config.data ({config.data.name}, limit={config.data.get('limit')}): "
                         f"{len(examples)} examples do not fill one batch of "
                         f"config.batch_size={config.batch_size}")
    if policy is None:
        policy = loading.load_model(config.model, seed=config.seed)
    cfg = policy.cfg.replace(remat=bool(config.get("remat", False)))
    tok = policy.tokenizer
    params = _shard_params(cfg, policy.params, mesh)
    # The frozen anchor: the initial weights, kept as their own arrays (the policy's are
    # donated to the update).
    anchor = jax.tree.map(jnp.copy, params)
    # Float32 master weights for a bf16 policy: an update of lr 5e-7 (the paper's) is below
    # bf16's resolution for any weight over ~1e-3, so bf16 weights would never move. The model
    # computes in cfg.dtype (a cast per step); optimizer state and checkpoints hold float32.
    master = jnp.dtype(config.get("master_dtype", "float32"))
    as_compute = lambda t: t  # noqa: E731  (same dtype: the arrays themselves, no copy per step)
    if jnp.dtype(cfg.dtype) != master:
        params = jax.jit(lambda t: jax.tree.map(lambda a: a.astype(master), t))(params)
        as_compute = jax.jit(functools.partial(compute_params, cfg))
    opt_shardings = _opt_shardings(opt, params, mesh)
    opt_state = jax.jit(opt.init, out_shardings=opt_shardings)(params)
    # The update keeps each state array's sharding: left to the compiler, outputs come back laid
    # out differently and the sampler and the update recompile at the next step.
    update = jax.jit(functools.partial(train_step, cfg, rl=rl, opt=opt, mesh=mesh),
                     donate_argnums=(0, 1),
                     out_shardings=(jax.tree.map(lambda p: p.sharding, params), opt_shardings,
                                    parallel.replicated(mesh)))

    ckpt = checkpoint.Checkpointer(config.checkpoint.get("directory") or os.path.join(workdir, "checkpoints"),
                                   max_to_keep=config.checkpoint.keep,
                                   save_interval_steps=config.checkpoint.every)
    writer = metrics.MetricWriter(workdir)
    start = 0
    if ckpt.latest_step() is not None:
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                                {"params": params, "opt_state": opt_state, "anchor": anchor})
        state, meta = ckpt.restore(abstract_state=abstract)
        params, opt_state, anchor = state["params"], state["opt_state"], state["anchor"]
        start = int(meta["step"])
        print(f"resumed from step {start}")
    # Rows past the checkpoint were written before a crash and are written again; with no
    # checkpoint, every row (the step-0 held-out row too) is from an attempt that starts over.
    writer.truncate_after(start if start else -1)
    # After the restore: a local judge built on the anchor reads the restored arrays (built
    # before, it would hold the pre-restore copy, a second anchor in device memory).
    if rc.task == "freeform" and judge is None:
        judge = loading.make_judge(config.judge, cat_round.Model(cfg, anchor, tok), config.seed)
    is_preempted = checkpoint.install_preemption_handler()
    rng = jax.random.key(config.seed)
    # The global batch of a step is fixed by (seed, step); this process reads only its part.
    batches = data.process_batches(examples, config.batch_size, config.seed, start_step=start,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count())
    heldout = _heldout_examples(config)
    eval_every = config.get("eval_every", 0) or config.steps
    if heldout and start == 0:
        writer.write(0, heldout_metrics(cat_round.Model(cfg, as_compute(params), tok), heldout, rc,
                                        config.seed))
    last: dict = {}
    preempted = False
    with ckpt, tqdm(total=config.steps, initial=start, desc="cat-rl", unit="step",
                    disable=jax.process_index() != 0) as bar:
        for step in range(start, config.steps):
            faults.set_step(step + 1)  # crash tests only (CATJAX_FAULT); a no-op otherwise
            t0 = time.perf_counter()
            batch_examples = next(batches)
            key = jax.random.fold_in(rng, step)
            res = cat_round.run_round(cat_round.Model(cfg, as_compute(params), tok),
                                      cat_round.Model(cfg, anchor, tok), batch_examples, key, rc,
                                      judge)
            t_round = time.perf_counter() - t0
            # One prompt width on every process (each holds only its prompts).
            width = sampling.bucket_length(parallel.process_max([max(map(len, res.prompt_ids))])[0])
            batch = build_batch(res, rl.num_rollouts, tok.pad_id, width)
            batch = {k: parallel.host_to_global(v, parallel.batch_sharding(mesh, v.ndim))
                     for k, v in batch.items()}
            params, opt_state, mets = update(params, opt_state, anchor, batch)
            faults.point("update", step + 1)
            mets = {k: float(s) / max(float(c), 1e-9) for k, (s, c) in jax.device_get(mets).items()}
            dt = time.perf_counter() - t0
            gen_tokens = float(np.asarray(res.rollouts.lengths).sum())
            # Update FLOPs: forward + backward (3x forward) per iteration, plus the anchor's
            # forward (skipped without a KL term) and the policy's before the update (see
            # train_step); remat adds one more forward. Padding counts: it is computed too.
            seq = batch["tokens"].shape[1]
            fwd = batch["tokens"].size * models.num_flops_per_token(cfg, seq // 2)
            frozen_passes = (rl.kl_mode != "none") + (rl.num_iterations > 1 or rl.kl_mode == "reward")
            update_flops = fwd * (frozen_passes + rl.num_iterations * (4 if cfg.remat else 3))
            t_update = dt - t_round
            round_mets = _merge_over_processes(_round_metrics(res, rl.num_rollouts), res.rewards,
                                               rl.num_rollouts)
            if jax.process_count() > 1:  # the tokens of every process's rollouts
                gen_tokens = round_mets["response_length"] * rows
            last = {**mets, **round_mets, "step_time_s": dt,
                    "round_time_s": t_round, "tokens_per_s": gen_tokens / max(t_round, 1e-9),
                    "update_tflops_per_s": update_flops / max(t_update, 1e-9) / 1e12}
            if config.get("peak_tflops_per_device"):
                last["mfu"] = last["update_tflops_per_s"] / (
                    config.peak_tflops_per_device * jax.device_count())
            if heldout and ((step + 1) % eval_every == 0 or step + 1 == config.steps):
                last.update(heldout_metrics(cat_round.Model(cfg, as_compute(params), tok), heldout, rc,
                                            config.seed))
            writer.write(step + 1, last)
            faults.point("checkpoint_write", step + 1)
            preempted = is_preempted()  # read once: a signal between two reads would skip the save
            ckpt.save(step + 1, {"params": params, "opt_state": opt_state, "anchor": anchor},
                      meta={"step": step + 1}, force=step + 1 == config.steps or preempted)
            bar.set_postfix(reward=f"{last['reward_mean']:.3f}", kl=f"{last.get('kl_ref', 0):.2e}")
            bar.update(1)
            if preempted:
                ckpt.wait()
                print(f"preempted: saved step {step + 1}, exiting")
                break
    is_preempted.uninstall()  # a later SIGTERM (in demo.run's next job, say) is not ours
    writer.close()
    # A preempted run resumes and exports at its end: no export of an unfinished model inside
    # the grace period (a kill mid-write would leave a partial export/).
    export = config.get("export", True) and not preempted
    if export and parallel.is_global(params):
        params_out = parallel.to_host(params)  # a collective: every process takes part
    else:
        params_out = params
    if jax.process_index() == 0 and os.path.exists(writer.path):
        metrics.plot_curves(writer.path, writer.workdir.file("curves.png"),
                            ("reward_mean", "heldout_accuracy", "reward_accuracy",
                             "rollout_accuracy", "kl_ref",
                             "loss", "response_length"))
        writer.workdir.push("curves.png")  # gs://: from the local mirror to the bucket
        if export:  # save_pretrained uploads a gs:// directory itself
            models.save_pretrained(cfg.replace(remat=False), params_out,
                                   os.path.join(workdir, "export"), dtype=cfg.dtype)
    return {"params": params, "metrics": last, "preempted": preempted}


def compute_params(cfg: ModelConfig, params: Params) -> Params:
    """The weights the model computes with: master weights cast to `cfg.dtype` (a no-op when
    they already are); gradients flow back through the cast to the master weights."""
    dtype = jnp.dtype(cfg.dtype)
    return jax.tree.map(lambda p: p if p.dtype == dtype else p.astype(dtype), params)


def _shard_params(cfg: ModelConfig, params: Params, mesh) -> Params:
    shardings = parallel.param_shardings(models.param_shapes(cfg), models.logical_axes(cfg), mesh)
    return jax.device_put(params, shardings)


def _opt_shardings(opt: optax.GradientTransformation, params: Params, mesh) -> Any:
    """Optimizer moments sharded like their parameters; the rest (step counts) replicated on the
    mesh. Left to jit, a constant such as Adam's count lands on one device, which other processes
    cannot address (and a checkpoint then restores it there)."""
    return optax.tree_utils.tree_map_params(
        opt, lambda _, sharding: sharding, jax.eval_shape(opt.init, params),
        jax.tree.map(lambda p: p.sharding, params),
        transform_non_params=lambda _: parallel.replicated(mesh))
