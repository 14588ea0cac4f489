"""Supervised training of the toy model (the learning proof's starting point), resumable.

    python -m catjax.main --config=configs/toy_sft.py --workdir=runs/toy_sft

Each step draws policy examples (question -> noisy solution) and synthesis examples (noisy
rollouts -> correct solution) from the toy task's train split (`catjax/toy.py`), as a pure
function of (seed, step), and takes one jitted, donated AdamW step on the token-mean cross
entropy of the targets (float32 log-softmax). Checkpoints and metrics go to the workdir; the
result is exported as a Hugging Face directory with its tokenizer (`WORKDIR/export`), which is
what `catjax/data_files/toy_model/` holds.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import os
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from catjax import checkpoint, metrics, models, sampling, storage, toy
from catjax.cat import answers
from catjax.datasets import toy as toy_data
from catjax.models import ModelConfig, Params

POLICY_LEN = 32  # longest policy prompt + solution + end token
SYNTHESIS_LEN = 224  # eight rollouts, separators, markers, solution, end token


def token_nll(cfg: ModelConfig, params: Params, tokens_bt: jax.Array, mask_bt: jax.Array):
    """(sum of target-token negative log-likelihoods, number of target tokens)."""
    hidden = models.hidden_states(cfg, params, tokens_bt[:, :-1])
    logp, _ = models.token_logprobs(cfg, params, hidden, tokens_bt[:, 1:])
    return -jnp.sum(logp * mask_bt), jnp.sum(mask_bt)


@functools.partial(jax.jit, static_argnames=("cfg", "opt"), donate_argnums=(1, 2))
def sft_step(cfg: ModelConfig, params: Params, opt_state: Any, batches: tuple, *,
             opt: optax.GradientTransformation):
    def loss_fn(p):
        sums = [token_nll(cfg, p, t, m) for t, m in batches]
        total, count = sum(s for s, _ in sums), sum(c for _, c in sums)
        return total / count, [s / c for s, c in sums]

    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {
        "loss": loss, "loss_policy": parts[0], "loss_synthesis": parts[1],
        "grad_norm": optax.global_norm(grads)}


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """What one step's examples look like (picklable, for data workers)."""

    policy_batch: int
    synthesis_batch: int
    task: toy_data.ToyTask  # the policy's noise: its solutions and the anchor's usual rollouts
    hard_task: toy_data.ToyTask  # noisier rollouts for a share of the synthesis examples
    hard_fraction: float


def step_batches(tok, train_questions: list[str], seed: int, step: int, spec: BatchSpec) -> tuple:
    """The step's two padded batches, a pure function of (seed, step)."""
    rng = np.random.default_rng([seed, step])
    pick = lambda n: [train_questions[i] for i in rng.integers(0, len(train_questions), n)]
    policy = [toy.policy_example(tok, q, rng, spec.task) for q in pick(spec.policy_batch)]
    # Synthesis over G = 8 rollouts half of the time, else 1..7, so any G works at test time.
    # Some rollout sets are noisier than the policy's: copying any one rollout then fails, and
    # only reading across them (which operand most rollouts used, which steps agree) works.
    n = spec.synthesis_batch
    gs = np.where(rng.random(n) < 0.5, 8, rng.integers(1, 8, n))
    hard = rng.random(n) < spec.hard_fraction
    synthesis = [toy.synthesis_example(tok, q, int(g), rng, spec.hard_task if h else spec.task)
                 for q, g, h in zip(pick(n), gs, hard, strict=True)]
    return (toy.pad_batch(policy, POLICY_LEN, tok.pad_id),
            toy.pad_batch(synthesis, SYNTHESIS_LEN, tok.pad_id))


_WORKER: dict = {}


def _worker_init(tok_dir: str, train_questions: list[str], seed: int, spec: BatchSpec) -> None:
    _WORKER.update(tok=toy.load_tokenizer(tok_dir), q=train_questions, seed=seed, spec=spec)


def _worker_batches(step: int) -> tuple:
    w = _WORKER
    return step_batches(w["tok"], w["q"], w["seed"], step, w["spec"])


def batch_stream(tok_dir: str, train_questions: list[str], seed: int, spec: BatchSpec, start: int,
                 stop: int, workers: int = 0) -> Iterator[tuple]:
    """The batches of steps start..stop-1 in order; `workers` > 0 builds them in processes ahead
    of the device (the host's Python is the bottleneck on an accelerator). Same batches either way."""
    if workers <= 0:
        tok = toy.load_tokenizer(tok_dir)
        for step in range(start, stop):
            yield step_batches(tok, train_questions, seed, step, spec)
        return
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
            initargs=(tok_dir, train_questions, seed, spec)) as pool:
        pending = collections.deque(pool.submit(_worker_batches, s)
                                    for s in range(start, min(start + 4 * workers, stop)))
        nxt = start + len(pending)
        while pending:
            out = pending.popleft().result()
            if nxt < stop:
                pending.append(pool.submit(_worker_batches, nxt))
                nxt += 1
            yield out


def quick_eval(cfg: ModelConfig, params: Params, tok, questions: list[str], seed: int,
               task: toy_data.ToyTask) -> dict[str, float]:
    """Greedy and temperature-1 accuracy as the policy, greedy accuracy as the anchor (over eight
    noisy rollouts from the task's own process): progress numbers for the log."""
    gold = [str(toy_data.answer(q)) for q in questions]
    prompts_p = [toy.policy_example(tok, q, np.random.default_rng(0), task)[0] for q in questions]
    rng = np.random.default_rng(seed)
    prompts_s = [toy.synthesis_example(tok, q, 8, rng, task)[0] for q in questions]
    out = {}
    for name, ids, temp in (("greedy", prompts_p, 0.0), ("sampled", prompts_p, 1.0),
                            ("synthesis", prompts_s, 0.0)):
        res = sampling.sample(cfg, params, ids, num_samples=1, max_new_tokens=POLICY_LEN,
                              rng=jax.random.key(seed), temperature=temp, stop_ids=tok.eos_ids,
                              pad_id=tok.pad_id, logprobs=False)
        texts = [tok.decode(c) for c in sampling.completions(res)]
        out[f"accuracy_{name}"] = float(np.mean([answers.extract_boxed(t) == g
                                                 for t, g in zip(texts, gold, strict=True)]))
    return out


def run(config: Any, workdir: str) -> dict:
    """The supervised job behind `configs/toy_sft.py`."""
    task = toy_data.ToyTask(**dict(config.task))
    wd = storage.Workdir(workdir)  # gs://: a local mirror, uploaded at the end
    export = wd.file("export")  # read back locally (tokenizer, data workers)
    toy.write_tokenizer(export)
    tok = toy.load_tokenizer(export)
    cfg = toy.model_config(**dict(config.get("model", {})))
    params = models.init_params(cfg, jax.random.key(config.seed))
    warmup = min(config.warmup_steps, config.steps // 2)  # short smoke runs still decay
    sched = optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup, max(config.steps, warmup + 1),
                                               end_value=config.lr * 0.1)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
    opt_state = jax.jit(opt.init)(params)
    # checkpoint_every=0: no checkpoints (a short run, or a machine without a writable store).
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=2,
                                   save_interval_steps=config.checkpoint_every) \
        if config.checkpoint_every else None
    writer = metrics.MetricWriter(workdir)
    start = 0
    if ckpt is not None and ckpt.latest_step() is not None:
        state, meta = ckpt.restore(abstract_state=jax.eval_shape(
            lambda: {"params": params, "opt_state": opt_state}))
        params, opt_state, start = state["params"], state["opt_state"], int(meta["step"])
        writer.truncate_after(start)
    train_q = toy_data.questions("train", toy_data.TRAIN_SIZE, task)
    spec = BatchSpec(config.policy_batch, config.synthesis_batch, task,
                     toy_data.ToyTask(**{**dict(config.task), **dict(config.hard_synthesis_noise)}),
                     config.hard_synthesis_fraction)
    eval_q = toy_data.questions("test", config.eval_questions, task)
    last: dict = {}
    with ckpt or contextlib.nullcontext(), \
            tqdm(total=config.steps, initial=start, desc="toy-sft", unit="step") as bar:
        stream = batch_stream(export, train_q, config.seed, spec, start, config.steps,
                              config.get("data_workers", 0))
        for step in range(start, config.steps):
            t0 = time.perf_counter()
            params, opt_state, mets = sft_step(cfg, params, opt_state, next(stream), opt=opt)
            last = {k: float(v) for k, v in jax.device_get(mets).items()}
            last["step_time_s"] = time.perf_counter() - t0
            if config.eval_questions and ((step + 1) % config.eval_every == 0
                                          or step + 1 == config.steps):
                last.update(quick_eval(cfg, params, tok, eval_q, config.seed, task))
            writer.write(step + 1, last)
            if ckpt is not None:
                ckpt.save(step + 1, {"params": params, "opt_state": opt_state},
                          meta={"step": step + 1}, force=step + 1 == config.steps)
            bar.set_postfix(loss=f"{last['loss']:.3f}")
            bar.update(1)
    writer.close()
    models.save_pretrained(cfg, params, export)
    metrics.plot_curves(writer.path, wd.file("curves.png"),
                        ("loss_policy", "loss_synthesis", "accuracy_greedy", "accuracy_sampled",
                         "accuracy_synthesis"))
    wd.push("export", "curves.png")
    print({k: round(v, 4) for k, v in last.items()})
    return {"params": params, "metrics": last}
