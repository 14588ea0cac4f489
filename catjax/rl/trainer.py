"""CaT-RL: the GRPO trainer. One readable loop, one donated, jitted update.

Each step: a batch of questions (this process's shard) -> one CaT round (policy rollouts, the
frozen anchor's synthesis, rewards) -> GRPO loss against the anchor -> an Optax AdamW update.
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
from tqdm import tqdm

from catjax import checkpoint, data, metrics, models, parallel, sampling
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
    kl_estimator: str = "k3"
    advantage: str = "grpo"
    scale: str = "group"
    loss_agg: str = "seq_mean_token_mean"
    num_iterations: int = 1
    micro_batch: int = 0  # rows per gradient micro-batch; 0 = all rows at once

    def __post_init__(self):
        if self.kl_mode not in ("reward", "loss", "none"):
            raise ValueError(f"rl.kl_mode={self.kl_mode!r}: use 'reward', 'loss' or 'none'")
        if self.advantage not in grpo.ADVANTAGES:
            raise ValueError(f"rl.advantage={self.advantage!r}: choose from {sorted(grpo.ADVANTAGES)}")
        if self.loss_agg not in grpo.LOSS_AGGREGATIONS:
            raise ValueError(f"rl.loss_agg={self.loss_agg!r}: choose from "
                             f"{sorted(grpo.LOSS_AGGREGATIONS)}")
        if self.num_iterations < 1:
            raise ValueError(f"rl.num_iterations={self.num_iterations} must be >= 1")


def make_optimizer(oc: Any, total_steps: int) -> optax.GradientTransformation:
    if oc.schedule == "constant":
        lr = optax.constant_schedule(oc.lr) if not oc.warmup_steps else optax.join_schedules(
            [optax.linear_schedule(0.0, oc.lr, oc.warmup_steps), optax.constant_schedule(oc.lr)],
            [oc.warmup_steps])
    elif oc.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, oc.lr, max(oc.warmup_steps, 1), total_steps)
    else:
        raise ValueError(f"optimizer.schedule={oc.schedule!r}: use 'constant' or 'cosine'")
    return optax.chain(optax.clip_by_global_norm(oc.clip_norm),
                       optax.adamw(lr, b1=oc.b1, b2=oc.b2, weight_decay=oc.weight_decay))


# --- the training batch ----------------------------------------------------------------------

def build_batch(res: cat_round.RoundResult, num_rollouts: int, pad_id: int) -> dict[str, np.ndarray]:
    """Prompt + completion rows for the loss: right-padded prompt [P], then the completion [N].

    `positions` skip the prompt padding and `key_mask` hides it, so every row sees exactly the
    sequence the sampler produced. `pred_index[r, j]` is where the logits for completion token
    j are read (the prompt's last token for j = 0).
    """
    out = res.rollouts
    comp = np.asarray(out.tokens)
    lengths = np.asarray(out.lengths)
    r, n = comp.shape
    prompt_len = np.repeat(np.asarray([len(p) for p in res.prompt_ids], np.int32), num_rollouts)
    width = sampling.bucket_length(int(prompt_len.max()))
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
                rewards=np.asarray(res.rewards, np.float32),
                behaviour_logprobs=np.asarray(out.model_logprobs, np.float32))


def completion_logprobs(cfg: ModelConfig, params: Params, batch: dict) -> jax.Array:
    """float32 log-probs [R, N] of the completion tokens; logits only at the scored positions."""
    hidden = models.hidden_states(cfg, params, batch["tokens"], positions_bt=batch["positions"],
                                  mask_bt=batch["key_mask"])
    hidden = jnp.take_along_axis(hidden, batch["pred_index"][..., None], axis=1)
    logits = models.logits_from_hidden(cfg, params, hidden)
    logp = jax.nn.log_softmax(logits, axis=-1)
    ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    lp = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    return lp, ent


@functools.partial(jax.jit, static_argnames=("cfg", "rl", "opt"), donate_argnums=(1, 2))
def train_step(cfg: ModelConfig, params: Params, opt_state: Any, anchor: Params, batch: dict, *,
               rl: RLConfig, opt: optax.GradientTransformation):
    """GRPO update(s) on one batch of rollouts. Non-finite loss or gradients: skipped."""
    mask = batch["mask"]
    ref_lp, _ = completion_logprobs(cfg, jax.lax.stop_gradient(anchor), batch)
    ref_lp = jax.lax.stop_gradient(ref_lp)
    old_lp = batch["behaviour_logprobs"]
    rewards = batch["rewards"]
    if rl.kl_mode == "reward":
        rewards = grpo.kl_penalized_rewards(rewards, old_lp, ref_lp, mask, rl.kl_coef,
                                            rl.kl_estimator)
    adv = grpo.advantages(rewards, rl.num_rollouts, rl.advantage, rl.scale)
    rows = mask.shape[0]
    mb = rl.micro_batch or rows
    if rows % mb:
        raise ValueError(f"rl.micro_batch={mb} does not divide the {rows} rollout rows")
    chunks = jax.tree.map(lambda x: x.reshape(rows // mb, mb, *x.shape[1:]),
                          dict(batch, adv=adv, ref_lp=ref_lp, old_lp=old_lp))
    loss_kw = dict(epsilon=rl.epsilon, epsilon_high=rl.epsilon_high, loss_agg=rl.loss_agg,
                   kl_coef=rl.kl_coef if rl.kl_mode == "loss" else 0.0,
                   kl_estimator=rl.kl_estimator, max_tokens=mask.shape[1])

    def micro(p, mbatch):
        lp, ent = completion_logprobs(cfg, p, mbatch)
        num, den, mets = grpo.policy_loss_terms(
            lp, mbatch["old_lp"], mbatch["adv"], mbatch["mask"], ref_logprobs_rt=mbatch["ref_lp"],
            **loss_kw)
        m = mbatch["mask"]
        mets = dict(mets, entropy=(jnp.sum(ent * m), jnp.sum(m)),
                    logprob_gap=(jnp.sum(jnp.abs(lp - mbatch["old_lp"]) * m), jnp.sum(m)))
        return num, (den, mets)

    def one_iteration(carry, _):
        params, opt_state = carry
        def acc(c, mbatch):
            g, den, mets = c
            (_, (d, m)), gi = jax.value_and_grad(micro, has_aux=True)(params, mbatch)
            g = jax.tree.map(jnp.add, g, gi)
            return (g, den + d, grpo.sum_metrics(mets, m)), None
        zeros = jax.tree.map(jnp.zeros_like, params)
        first = jax.tree.map(lambda x: x[0], chunks)
        _, (d0, m0) = jax.eval_shape(micro, params, first)
        m_zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m0)
        (grads, den, mets), _ = jax.lax.scan(acc, (zeros, jnp.float32(0.0), m_zero), chunks)
        grads = jax.tree.map(lambda g: g / jnp.maximum(den, 1.0), grads)
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
    mets["kl_ref"] = (jnp.sum(grpo.KL_ESTIMATORS["k3"](old_lp, ref_lp) * mask), jnp.sum(mask))
    return params, opt_state, mets


# --- the loop --------------------------------------------------------------------------------

def _round_metrics(res: cat_round.RoundResult, g: int) -> dict[str, float]:
    r = res.rewards.reshape(-1, g)
    lengths = np.asarray(res.rollouts.lengths)
    out = {"reward_mean": float(r.mean()), "reward_std": float(r.std()),
           "frac_reward_zero_std": float(np.mean(r.std(-1) == 0)),
           "response_length": float(lengths.mean()),
           **{f"round/{k}": v for k, v in res.metrics.items()}}
    gold = [(rec, rec.get("gold")) for rec in res.records]
    if res.records and "reference_answer" in res.records[0] and all(gd is not None for _, gd in gold):
        from catjax.cat import answers

        out["reward_accuracy"] = float(np.mean([
            rec["reference_answer"] is not None and answers.equivalent(rec["reference_answer"], gd)
            for rec, gd in gold]))
        out["rollout_accuracy"] = float(np.mean([
            a is not None and answers.equivalent(a, gd)
            for rec, gd in gold for a in rec["rollout_answers"]]))
        maj = [answers.majority_vote(rec["rollout_answers"]) for rec, _ in gold]
        out["synthesis_vs_majority_disagree"] = float(np.mean([
            m is not None and rec["reference_answer"] is not None
            and answers.normalize(m) != answers.normalize(rec["reference_answer"])
            for (rec, _), m in zip(gold, maj, strict=True)]))
    return out


def train(config: Any, workdir: str, policy: cat_round.Model | None = None,
          judge: Any = None) -> dict:
    """The CaT-RL job behind `python -m catjax.main --config=configs/cat_rl.py`."""
    from catjax import loading

    rc = loading.round_config(config.round)
    rl = RLConfig(num_rollouts=rc.num_rollouts, **dict(config.rl))
    mesh = parallel.make_mesh(**dict(config.mesh))
    rows, dp = config.batch_size * rl.num_rollouts, parallel.data_parallel_size(mesh)
    if rows % dp:
        raise ValueError(f"config.batch_size*num_rollouts={rows} does not split over the mesh's "
                         f"{dp} data-parallel devices")
    if rl.micro_batch and rows % rl.micro_batch:
        raise ValueError(f"config.rl.micro_batch={rl.micro_batch} does not divide the {rows} "
                         "rollout rows of a step")
    if policy is None:
        policy = loading.load_model(config.model)
    cfg = policy.cfg.replace(remat=bool(config.get("remat", False)))
    tok = policy.tokenizer
    params = _shard_params(cfg, policy.params, mesh)
    # The frozen anchor: the initial weights, kept as their own arrays (the policy's are
    # donated to the update).
    anchor = jax.tree.map(jnp.copy, params)
    if rc.task == "freeform" and judge is None:
        judge = loading.make_judge(config.judge, cat_round.Model(cfg, anchor, tok))
    opt = make_optimizer(config.optimizer, config.steps)
    opt_state = jax.jit(opt.init)(params)

    examples = data.load(config.data.name, split=config.data.split,
                         path=config.data.get("path"), limit=config.data.get("limit"))
    examples = data.shard(examples, jax.process_index(), jax.process_count())
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
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
        writer.truncate_after(start)
        print(f"resumed from step {start}")
    is_preempted = checkpoint.install_preemption_handler()
    rng = jax.random.key(config.seed)
    batches = data.batches(examples, config.batch_size, config.seed, start_step=start)
    last: dict = {}
    with tqdm(total=config.steps, initial=start, desc="cat-rl", unit="step",
              disable=jax.process_index() != 0) as bar:
        for step in range(start, config.steps):
            t0 = time.perf_counter()
            batch_examples = next(batches)
            key = jax.random.fold_in(rng, step)
            res = cat_round.run_round(cat_round.Model(cfg, params, tok),
                                      cat_round.Model(cfg, anchor, tok), batch_examples, key, rc,
                                      judge)
            t_round = time.perf_counter() - t0
            batch = build_batch(res, rl.num_rollouts, tok.pad_id)
            batch = {k: jax.device_put(v, parallel.batch_sharding(mesh, v.ndim))
                     for k, v in batch.items()}
            params, opt_state, mets = train_step(cfg, params, opt_state, anchor, batch, rl=rl,
                                                 opt=opt)
            mets = {k: float(s) / max(float(c), 1e-9) for k, (s, c) in jax.device_get(mets).items()}
            dt = time.perf_counter() - t0
            gen_tokens = float(np.asarray(res.rollouts.lengths).sum())
            # Update FLOPs: forward + backward (3x forward) per iteration, plus the anchor's
            # forward; remat adds one more forward. Padding counts: it is computed too.
            seq = batch["tokens"].shape[1]
            fwd = batch["tokens"].size * models.num_flops_per_token(cfg, seq // 2)
            update_flops = fwd * (1 + rl.num_iterations * (4 if cfg.remat else 3))
            t_update = dt - t_round
            last = {**mets, **_round_metrics(res, rl.num_rollouts), "step_time_s": dt,
                    "round_time_s": t_round, "tokens_per_s": gen_tokens / max(t_round, 1e-9),
                    "update_tflops_per_s": update_flops / max(t_update, 1e-9) / 1e12}
            if config.get("peak_tflops_per_device"):
                last["mfu"] = last["update_tflops_per_s"] / (
                    config.peak_tflops_per_device * jax.device_count())
            writer.write(step + 1, last)
            ckpt.save(step + 1, {"params": params, "opt_state": opt_state, "anchor": anchor},
                      meta={"step": step + 1}, force=step + 1 == config.steps or is_preempted())
            bar.set_postfix(reward=f"{last['reward_mean']:.3f}", kl=f"{last.get('kl_ref', 0):.2e}")
            bar.update(1)
            if is_preempted():
                ckpt.wait()
                print(f"preempted: saved step {step + 1}, exiting")
                break
    ckpt.wait()
    ckpt.close()
    writer.close()
    if jax.process_index() == 0 and os.path.exists(writer.path):
        metrics.plot_curves(writer.path, os.path.join(workdir, "curves.png"),
                            ("reward_mean", "reward_accuracy", "rollout_accuracy", "kl_ref",
                             "loss", "response_length"))
        if config.get("export", True):
            models.save_pretrained(cfg.replace(remat=False), params, os.path.join(workdir, "export"))
    return {"params": params, "metrics": last}


def _shard_params(cfg: ModelConfig, params: Params, mesh) -> Params:
    shardings = parallel.param_shardings(models.param_shapes(cfg), models.logical_axes(cfg), mesh)
    return jax.device_put(params, shardings)
