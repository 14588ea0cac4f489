"""catjax's side of the peer benchmarks (project venv); one task per process, JSON last.

    .venv/bin/python bench/ours.py --task sampler   --model DIR --new-tokens N [--top-p P]
    .venv/bin/python bench/ours.py --task rl        --model DIR --new-tokens N
    .venv/bin/python bench/ours.py --task synthesis --model DIR --new-tokens N
    .venv/bin/python bench/ours.py --task cat_step  --model DIR --new-tokens N --samples G
                                   [--micro-batch M]
    .venv/bin/python bench/ours.py --task mfu       --model DIR --new-tokens N [--micro-batch M]

Workloads are `workload.py`'s, the same as the peers'. One process per measurement, so peak
memory (ru_maxrss) is that measurement's own. Compilation is timed apart (`first_s`).
The host malloc is catjax's (`CATJAX_HOST_MALLOC`, default mimalloc: catjax.hostmem); each result
names the one in effect (`host_malloc`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from catjax import hostmem  # noqa: E402

# As `python -m catjax.main` does, before JAX is imported (may restart this process).
HOST_MALLOC = hostmem.configure(restart=__name__ == "__main__")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import workload  # noqa: E402

from catjax import drafting, models, sampling, text  # noqa: E402
from catjax.cat import round as cat_round  # noqa: E402
from catjax.cat import rubrics  # noqa: E402
from catjax.cat.local_judge import LocalJudge  # noqa: E402
from catjax.datasets.records import Example  # noqa: E402
from catjax.rl import trainer  # noqa: E402

DRAFT = 4  # tokens drafted per pass in the drafted synthesis (`sampling.sample(draft_tokens=)`)
# Seconds JAX spent tracing, lowering and compiling, so far (a listener on its own events).
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile_s = [0.0]


def _on_duration(event: str, duration_secs: float, **_) -> None:
    if event in _COMPILE_EVENTS:
        _compile_s[0] += duration_secs


jax.monitoring.register_event_duration_secs_listener(_on_duration)


def load(model_dir: str) -> cat_round.Model:
    cfg, params = models.from_pretrained(model_dir)
    return cat_round.Model(cfg, params, text.load_tokenizer(model_dir))


def question_ids(m: cat_round.Model) -> list[list[int]]:
    return [m.tokenizer.chat(workload.messages(q)) for q, _ in workload.QUESTIONS]


def block(out):
    return jax.block_until_ready(out)


def result(task: str, m: cat_round.Model, model_dir: str, times: list[float], first: float,
           **extra) -> dict:
    return {"library": "catjax", "jax": jax.__version__, "task": task,
            "model": os.path.basename(model_dir.rstrip("/")), "params": models.param_count(m.params),
            "times_s": times, "first_s": first, **workload.summary(times),
            "peak_rss_mb": workload.peak_rss_mb(), "host_malloc": HOST_MALLOC, **extra}


# --- 1. rollout sampling ---------------------------------------------------------------------

def task_sampler(m, args) -> dict:
    prompts, g, n = question_ids(m), workload.NUM_SAMPLES, args.new_tokens
    keys = iter(jax.random.split(jax.random.key(0), args.repeats + 1))
    # Tokens only, as CaT's rollouts (and transformers' generate, Tunix's sampler by default).
    kw = dict(num_samples=g, max_new_tokens=n, temperature=args.temperature, top_p=args.top_p,
              stop_ids=(), pad_id=m.tokenizer.pad_id, logprobs=False)

    def run():
        out = block(sampling.sample(m.cfg, m.params, prompts, rng=next(keys), **kw))
        assert int(np.asarray(out.lengths).min()) == n
    times, first = workload.timed(run, args.repeats)
    rows = len(prompts) * g
    return {"rows": rows, "new_tokens": n, "temperature": args.temperature, "top_p": args.top_p,
            "tokens_per_s": rows * n / workload.summary(times)["median_s"]}, times, first


# --- 2. one RL iteration (generate, reward, update), the peers' workload ----------------------

def _rl_setup():
    rl = trainer.RLConfig(num_rollouts=workload.RL["num_samples"], kl_mode="none",
                          temperature=workload.RL["temperature"],
                          epsilon=workload.RL["epsilon"])
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(workload.RL["lr"]))
    return rl, opt


def task_rl(m, args) -> dict:
    prompts, g, n = question_ids(m), workload.RL["num_samples"], args.new_tokens
    answers_ = [a for _, a in workload.QUESTIONS]
    rl, opt = _rl_setup()
    state = {"params": jax.tree.map(jnp.copy, m.params)}
    state["opt"] = opt.init(state["params"])
    keys = iter(jax.random.split(jax.random.key(0), args.repeats + 1))
    phases: list[float] = []

    def run():
        t0 = time.perf_counter()
        out = sampling.sample(m.cfg, state["params"], prompts, num_samples=g, max_new_tokens=n,
                              rng=next(keys), temperature=workload.RL["temperature"],
                              top_p=workload.RL["top_p"], stop_ids=(), pad_id=m.tokenizer.pad_id,
                              logprobs=False)
        texts = [m.tokenizer.decode(ids) for ids in sampling.completions(out)]
        rewards = np.asarray([workload.reward(t, answers_[i // g]) for i, t in enumerate(texts)],
                             np.float32)
        t_gen = time.perf_counter() - t0
        res = cat_round.RoundResult(out, prompts, rewards, [], {})
        batch = trainer.build_batch(res, g, m.tokenizer.pad_id)
        state["params"], state["opt"], mets = trainer.train_step(
            m.cfg, state["params"], state["opt"], state["params"], batch, rl=rl, opt=opt)
        block(mets)
        phases.append(t_gen / (time.perf_counter() - t0))
    times, first = workload.timed(run, args.repeats)
    return {"rows": len(prompts) * g, "new_tokens": n,
            "generation_fraction": float(np.median(phases[1:]))}, times, first


# --- 3. the cost of CaT: synthesis vs one more rollout; judge cost per rollout -----------------

def synthesis_workload(m, n: int) -> tuple[list[list[int]], list[str], list[list[int]]]:
    """The 4 question prompts, their G rollouts' texts (T 1, exactly `n` tokens each) and the
    anchor's synthesis prompt over each question's G rollouts."""
    prompts, g = question_ids(m), workload.NUM_SAMPLES
    rc = cat_round.RoundConfig(num_rollouts=g, max_new_tokens=n, synthesis_max_new_tokens=n)
    out = sampling.sample(m.cfg, m.params, prompts, num_samples=g, max_new_tokens=n,
                          rng=jax.random.key(0), temperature=1.0, stop_ids=(),
                          pad_id=m.tokenizer.pad_id, logprobs=False)
    texts = [m.tokenizer.decode(ids) for ids in sampling.completions(out)]
    budget = cat_round.prompt_budget(m.cfg, n)
    syn_prompts = [cat_round.synthesis_prompt(m.tokenizer, texts[i * g:(i + 1) * g], "math", rc,
                                              budget, m.cfg)[0] for i in range(len(prompts))]
    return prompts, texts, syn_prompts


def task_synthesis(m, args) -> dict:
    """Per question: one anchor synthesis over G rollouts vs one more rollout, both exactly N
    new tokens for the 4 questions (4 rows each). Then a local judge on 5 criteria x 32 rollouts."""
    g, n = workload.NUM_SAMPLES, args.new_tokens
    rc = cat_round.RoundConfig(num_rollouts=g, max_new_tokens=n, synthesis_max_new_tokens=n)
    prompts, texts, syn_prompts = synthesis_workload(m, n)
    groups = [texts[i * g:(i + 1) * g] for i in range(len(prompts))]
    kw = dict(num_samples=1, max_new_tokens=n, stop_ids=(), pad_id=m.tokenizer.pad_id,
              logprobs=False)
    keys = iter(jax.random.split(jax.random.key(1), 4 * (args.repeats + 1)))

    def synth():  # the anchor is greedy (RoundConfig.anchor_temperature = 0)
        block(sampling.sample(m.cfg, m.params, syn_prompts, rng=next(keys), temperature=0.0,
                              draft_tokens=rc.anchor_draft_tokens, **kw))

    def synth_drafted():  # the same tokens, checked DRAFT at a time (round.anchor_draft_tokens)
        block(sampling.sample(m.cfg, m.params, syn_prompts, rng=next(keys), temperature=0.0,
                              draft_tokens=DRAFT, **kw))

    def rollout():
        block(sampling.sample(m.cfg, m.params, prompts, rng=next(keys), temperature=1.0, **kw))

    # Alternate the two so that machine noise falls on both alike.
    t_syn, f_syn = workload.timed(synth, 1)
    t_roll, f_roll = workload.timed(rollout, 1)
    t_dr, f_dr = workload.timed(synth_drafted, 1)
    for _ in range(args.repeats - 1):
        t_syn += workload.timed(synth, 1, warmup=0)[0]
        t_roll += workload.timed(rollout, 1, warmup=0)[0]
        t_dr += workload.timed(synth_drafted, 1, warmup=0)[0]
    syn_s, roll_s, dr_s = (float(np.median(t)) for t in (t_syn, t_roll, t_dr))
    tokens, lengths = sampling.pad_prompts(syn_prompts, m.tokenizer.pad_id, None)
    _, passes = drafting.sample_drafted(
        m.cfg, m.params, jnp.asarray(tokens), jnp.asarray(lengths), num_samples=1,
        max_new_tokens=n, draft_tokens=DRAFT, stop_ids=(), pad_id=m.tokenizer.pad_id,
        cache_dtype=sampling.default_cache_dtype(m.cfg), mesh=None,
        unrolled=sampling.default_decode_layout() != "scan")

    # Judge: 5 criteria for every rollout, one forward pass per (criterion, rollout) pair.
    judge = LocalJudge(m.cfg, m.params, m.tokenizer, batch_size=32)
    items = [([f"The response states the final answer {a} clearly.",
               "The response shows its working step by step.",
               "The response does not contradict itself.",
               "The response is written in plain English.",
               *rubrics.fallback_rubric(groups[i // g][0])], texts[i])
             for i, a in enumerate(a for _, a in workload.QUESTIONS for _ in range(g))]
    j_times, j_first = workload.timed(lambda: judge.rewards(items), args.repeats)
    judge_s = float(np.median(j_times))
    per_rollout_gen = roll_s / len(prompts)  # one rollout row of N tokens, in a 4-row batch
    return {
        "new_tokens": n, "num_samples": g,
        "synthesis_prompt_tokens": [len(p) for p in syn_prompts],
        "question_prompt_tokens": [len(p) for p in prompts],
        "synthesis_s": syn_s, "synthesis_times_s": t_syn, "synthesis_first_s": f_syn,
        "rollout_s": roll_s, "rollout_times_s": t_roll, "rollout_first_s": f_roll,
        "synthesis_vs_rollout": syn_s / roll_s,
        "draft_tokens": DRAFT, "synthesis_drafted_s": dr_s, "synthesis_drafted_times_s": t_dr,
        "synthesis_drafted_first_s": f_dr, "synthesis_drafted_vs_rollout": dr_s / roll_s,
        "synthesis_drafted_passes": int(passes),
        "judge_pairs": sum(len(c) for c, _ in items), "judge_s": judge_s,
        "judge_first_s": j_first, "judge_s_per_rollout": judge_s / len(items),
        "judge_vs_rollout_row": judge_s / len(items) / per_rollout_gen,
    }, t_syn, f_syn


# --- 4. scaling: one CaT-RL step (rollouts, synthesis, rewards, update) -------------------------

def task_cat_step(m, args) -> dict:
    g, n = args.samples, args.new_tokens
    examples = [Example(id=str(i), question=q, answer=a) for i, (q, a) in enumerate(workload.QUESTIONS)]
    rc = cat_round.RoundConfig(num_rollouts=g, max_new_tokens=n, synthesis_max_new_tokens=n)
    # The paper's setting: KL to the anchor in the reward.
    rl = trainer.RLConfig(num_rollouts=g, micro_batch=args.micro_batch)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-6))
    anchor = m
    state = {"params": jax.tree.map(jnp.copy, m.params)}
    state["opt"] = opt.init(state["params"])
    keys = iter(jax.random.split(jax.random.key(0), args.repeats + 1))
    phases, compiling = [], []

    def run():
        c0 = _compile_s[0]
        t0 = time.perf_counter()
        policy = cat_round.Model(m.cfg, state["params"], m.tokenizer)
        res = cat_round.run_round(policy, anchor, examples, next(keys), rc)
        t_round = time.perf_counter() - t0
        batch = trainer.build_batch(res, g, m.tokenizer.pad_id)
        state["params"], state["opt"], mets = trainer.train_step(
            m.cfg, state["params"], state["opt"], anchor.params, batch, rl=rl, opt=opt)
        block(mets)
        phases.append(t_round / (time.perf_counter() - t0))
        compiling.append(_compile_s[0] - c0)
    times, first = workload.timed(run, args.repeats)
    # A timed step still compiles when its synthesis prompts fall in a new length bucket (a real
    # run does too, a handful of times); reported apart, not subtracted.
    return {"num_samples": g, "new_tokens": n, "rows": len(examples) * g,
            "micro_batch": args.micro_batch,
            "round_fraction": float(np.median(phases[1:])),
            "compile_s_in_timed": compiling[1:]}, times, first


# --- 5. utilisation: the training step's FLOP/s vs the measured matmul peak --------------------

def matmul_peak(dtype, size: int = 2048, repeats: int = 10) -> float:
    a = jnp.ones((size, size), dtype)
    f = jax.jit(lambda x: x @ x)
    times, _ = workload.timed(lambda: block(f(a)), repeats)
    return 2 * size**3 / min(times)


def matmul_flops(jaxpr) -> float:
    """FLOPs of every dot_general the program executes, loops counted by their trip count.

    XLA's cost analysis counts a while loop's body once (the layer scan, the chunked log-probs),
    so it undercounts; the jaxpr knows each scan's length. Recomputation under `jax.checkpoint`
    is counted, since it runs."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, _), (lb, _) = eqn.params["dimension_numbers"]
            a, b = (v.aval.shape for v in eqn.invars)
            contract = np.prod([a[i] for i in lc])
            batch = np.prod([a[i] for i in lb])
            m_ = np.prod(a) / contract / batch
            n_ = np.prod(b) / contract / batch
            total += 2.0 * batch * m_ * n_ * contract
            continue
        reps = eqn.params["length"] if name == "scan" else 1
        if name == "while":
            raise ValueError("matmul_flops: a while loop's trip count is unknown")
        for sub in _sub_jaxprs(eqn.params):
            total += reps * matmul_flops(sub)
    return total


def _sub_jaxprs(params: dict):
    for v in params.values():
        for x in (v if isinstance(v, tuple | list) else (v,)):
            if hasattr(x, "jaxpr") and hasattr(x, "consts"):  # ClosedJaxpr
                yield x.jaxpr
            elif hasattr(x, "eqns"):
                yield x


def task_mfu(m, args) -> dict:
    """Forward + backward + AdamW of the GRPO loss on 32 rows of prompt + N completion tokens.

    FLOPs: every matmul the step runs (`matmul_flops`: the layers over all positions, the output
    head at the completion positions, its recompute in the backward pass, attention). The peak
    is a 2048^3 `jnp.dot` in the model's dtype, measured in the same process before and after
    the steps: the faster of the two, since a shared machine's speed drifts (127-182 GFLOP/s
    between processes here)."""
    prompts, g, n = question_ids(m), workload.NUM_SAMPLES, args.new_tokens
    rl, opt = _rl_setup()
    rl = dataclasses.replace(rl, micro_batch=args.micro_batch,
                             logprob_chunk=args.logprob_chunk or rl.logprob_chunk)
    out = sampling.sample(m.cfg, m.params, prompts, num_samples=g, max_new_tokens=n,
                          rng=jax.random.key(0), temperature=1.0, stop_ids=(),
                          pad_id=m.tokenizer.pad_id, logprobs=False)
    rewards = np.tile(np.asarray([1, 0], np.float32), len(prompts) * g // 2)
    batch = trainer.build_batch(cat_round.RoundResult(out, prompts, rewards, [], {}), g,
                                m.tokenizer.pad_id)
    params = jax.tree.map(jnp.copy, m.params)
    opt_state = opt.init(params)
    step = trainer.train_step.lower(m.cfg, params, opt_state, params, batch, rl=rl,
                                    opt=opt).compile()
    cost = step.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    hlo_flops = float(cost.get("flops", 0.0))
    traced = jax.make_jaxpr(lambda p, o, b: trainer.train_step(m.cfg, p, o, p, b, rl=rl, opt=opt))
    flops = matmul_flops(traced(params, opt_state, batch).jaxpr)
    state = {"p": params, "o": opt_state}
    peak_before = matmul_peak(m.cfg.jnp_dtype)

    def run():
        state["p"], state["o"], mets = step(state["p"], state["o"], state["p"], batch)
        block(mets)
    times, first = workload.timed(run, args.repeats)
    t = min(times)
    rows, width = batch["tokens"].shape
    peak = max(peak_before, matmul_peak(m.cfg.jnp_dtype))
    return {"rows": rows, "tokens_per_row": width, "new_tokens": n, "flops": flops,
            "micro_batch": args.micro_batch, "logprob_chunk": rl.logprob_chunk,
            "xla_cost_flops": hlo_flops, "step_s_min": t, "matmul_peak_flops": peak,
            "achieved_flops_per_s": flops / t, "mfu": flops / t / peak}, times, first


TASKS = {"sampler": task_sampler, "rl": task_rl, "synthesis": task_synthesis,
         "cat_step": task_cat_step, "mfu": task_mfu}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", choices=sorted(TASKS), required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--new-tokens", type=int, required=True)
    ap.add_argument("--samples", type=int, default=workload.NUM_SAMPLES)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--micro-batch", type=int, default=0,
                    help="cat_step, mfu: rl.micro_batch (0: all rows at once)")
    ap.add_argument("--logprob-chunk", type=int, default=0,
                    help="mfu: rl.logprob_chunk, completion tokens scored at once (0: the default)")
    ap.add_argument("--temperature", type=float, default=workload.TEMPERATURE)
    ap.add_argument("--top-p", type=float, default=workload.TOP_P)
    args = ap.parse_args()
    m = load(args.model)
    extra, times, first = TASKS[args.task](m, args)
    workload.emit(result(args.task, m, args.model, times, first, **extra))


if __name__ == "__main__":
    main()
