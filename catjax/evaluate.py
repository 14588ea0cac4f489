"""The test-time job: G rollouts, anchor synthesis and every selection baseline, scored vs gold.

Writes to the workdir: `records.jsonl` (one record per question, appended batch by batch, so a
rerun resumes where it stopped), `summary.json`, `accuracy_vs_g.png`, and prints a table.
A gs:// workdir: the files are written to a local mirror and uploaded as they are written
(records after every batch); a rerun reads records.jsonl back from the bucket.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from catjax import data, parallel, storage
from catjax.cat import answers, selection
from catjax.cat import round as cat_round
from catjax.cat.judges import Judge

_log = logging.getLogger(__name__)

METHODS = ("single", "majority", "min_ppl", "self_select", "mutual", "synthesis")


def _read_done(path: str) -> dict[str, dict]:
    """Records of the questions already evaluated. A last line cut short (the job killed, or
    the disk full, while writing it) is dropped from the file, so that the rerun redoes that
    question and appends whole lines; any other bad line is a one-line error naming it."""
    done: dict[str, dict] = {}
    if not os.path.exists(path):
        return done
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    if lines[-1]:  # no newline at the end: a torn write; keep the whole lines before it
        with open(path, "r+b") as f:
            f.truncate(len(data) - len(lines[-1]))
        _log.warning("evaluate: %s ended in a partial record; dropped, that question is redone", path)
    for number, line in enumerate(lines[:-1], 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            done[rec["id"]] = rec
        except (ValueError, KeyError, TypeError) as e:
            why = f"missing field {e}" if isinstance(e, KeyError) else "not a JSON record"
            raise ValueError(f"{path}:{number}: {why}; delete that line (or the file) to redo "
                             "its question") from None
    return done


def evaluate_batch(policy: cat_round.Model, examples: Sequence[Any], rng: jax.Array,
                   rc: cat_round.RoundConfig, baselines: Sequence[str], g_values: Sequence[int],
                   judge: Judge | None = None) -> list[dict]:
    """One CaT round (policy = anchor, as at test time) plus the baselines, per question."""
    k_round, k_sel, k_sub = jax.random.split(rng, 3)
    res = cat_round.run_round(policy, policy, examples, k_round, rc, judge,
                              rollout_logprobs="min_ppl" in baselines)
    g = rc.num_rollouts
    groups = [r["rollouts"] for r in res.records]
    picks: dict[str, list[int]] = {"single": selection.single_sample(len(examples))}
    if "min_ppl" in baselines:
        picks["min_ppl"] = selection.min_perplexity(np.asarray(res.rollouts.model_logprobs),
                                                   np.asarray(res.rollouts.lengths), g)
    if "self_select" in baselines:
        picks["self_select"], _ = selection.self_select(
            policy.cfg, policy.params, policy.tokenizer, groups, k_sel, rc)
    if "mutual" in baselines and g > 1:
        picks["mutual"] = selection.mutual_predictability(policy.cfg, policy.params,
                                                          policy.tokenizer, groups)
    # Synthesis over the first G' rollouts, for accuracy as a function of G.
    sub_refs: dict[int, list[str]] = {}
    for gv in sorted(set(g_values)):
        if gv < g:
            sub_refs[gv] = cat_round.synthesize(policy, [grp[:gv] for grp in groups], rc.task,
                                                jax.random.fold_in(k_sub, gv), rc)
    for i, rec in enumerate(res.records):
        rec["picks"] = {m: p[i] for m, p in picks.items()}
        if rc.task == "math":
            rec["synthesis_at_g"] = {
                str(gv): answers.extract_answer(refs[i], rc.extract_modes)[0]
                for gv, refs in sub_refs.items()}
    return res.records


def score_math(rec: dict, g_values: Sequence[int], gold_mode: str = "equivalent") -> dict:
    """Correctness vs gold of every method for one math record (gold never reaches training)."""
    gold = rec["gold"]
    ok = lambda a: bool(a is not None and (answers.equivalent(a, gold) if gold_mode == "equivalent"
                                           else answers.normalize(a) == answers.normalize(gold)))
    roll_ok = [ok(a) for a in rec["rollout_answers"]]
    out = {m: roll_ok[i] for m, i in rec["picks"].items()}
    maj = answers.majority_vote(rec["rollout_answers"])
    out["majority"] = ok(maj)
    out["synthesis"] = ok(rec["reference_answer"])
    out["rollout_mean"] = float(np.mean(roll_ok))
    out["all_rollouts_wrong"] = not any(roll_ok)
    out["synthesis_disagrees_with_majority"] = (
        rec["reference_answer"] is not None and maj is not None
        and answers.normalize(rec["reference_answer"]) != answers.normalize(maj))
    at_g = {}
    for gv in g_values:
        sub = rec["rollout_answers"][:gv]
        syn = rec["reference_answer"] if gv >= len(rec["rollout_answers"]) else \
            rec.get("synthesis_at_g", {}).get(str(gv))
        at_g[str(gv)] = {"single": roll_ok[0], "majority": ok(answers.majority_vote(sub)),
                         "synthesis": ok(syn)}
    out["at_g"] = at_g
    return out


def score_healthbench(recs: Sequence[dict], examples: Sequence[Any], judge: Judge) -> list[dict]:
    """HealthBench scoring of each method's response: met points over positive points.

    Each (response, physician criterion) pair goes to the judge as `[points] criterion`, as the
    benchmark's grader sees it. Per example the score may be negative; the summary clips the
    mean to [0, 1], as simple-evals does.
    """
    pairs, index = [], []
    for k, (rec, ex) in enumerate(zip(recs, examples, strict=True)):
        responses = {m: rec["rollouts"][i] for m, i in rec["picks"].items()}
        responses["synthesis"] = rec["synthesis"]
        for m, text in responses.items():
            for j, item in enumerate(ex.rubrics):
                pairs.append((f"[{item['points']}] {item['criterion']}", text))
                index.append((k, m, j))
    verdicts = judge.judge(pairs)
    met: dict[tuple[int, str], float] = {}
    for (k, m, j), v in zip(index, verdicts, strict=True):
        if v.met:
            met[(k, m)] = met.get((k, m), 0.0) + examples[k].rubrics[j]["points"]
    out = []
    for k, (rec, ex) in enumerate(zip(recs, examples, strict=True)):
        positive = sum(r["points"] for r in ex.rubrics if r["points"] > 0) or 1.0
        methods = [*rec["picks"], "synthesis"]
        out.append({m: met.get((k, m), 0.0) / positive for m in methods})
    return out


def summarize_scores(scores: Sequence[dict], methods: Sequence[str]) -> dict:
    summary: dict[str, Any] = {"num_questions": len(scores), "score": {}}
    for m in methods:
        vals = [s[m] for s in scores if m in s]
        if vals:
            mean, se = _mean_se(vals)
            summary["score"][m] = {"mean": min(max(mean, 0.0), 1.0), "se": se}
    return summary


def _mean_se(xs: Sequence[float]) -> tuple[float, float]:
    xs = np.asarray(xs, np.float64)
    if xs.size == 0:
        return float("nan"), float("nan")
    return float(xs.mean()), float(xs.std(ddof=1) / math.sqrt(xs.size)) if xs.size > 1 else 0.0


def summarize(scores: Sequence[dict], methods: Sequence[str], g_values: Sequence[int]) -> dict:
    summary: dict[str, Any] = {"num_questions": len(scores), "accuracy": {}}
    for m in methods:
        vals = [float(s[m]) for s in scores if m in s]
        if vals:
            mean, se = _mean_se(vals)
            summary["accuracy"][m] = {"mean": mean, "se": se}
    summary["rollout_accuracy"] = _mean_se([s["rollout_mean"] for s in scores])[0]
    dis = [s for s in scores if s["synthesis_disagrees_with_majority"]]
    summary["synthesis_disagrees_with_majority"] = len(dis) / max(len(scores), 1)
    summary["synthesis_right_when_disagreeing"] = (
        float(np.mean([s["synthesis"] for s in dis])) if dis else None)
    wrong = [s for s in scores if s["all_rollouts_wrong"]]
    summary["all_rollouts_wrong"] = len(wrong) / max(len(scores), 1)
    summary["synthesis_right_when_all_wrong"] = (
        float(np.mean([s["synthesis"] for s in wrong])) if wrong else None)
    summary["accuracy_vs_g"] = {
        str(gv): {m: _mean_se([float(s["at_g"][str(gv)][m]) for s in scores])[0]
                  for m in ("single", "majority", "synthesis")} for gv in g_values}
    return summary


def format_table(summary: dict) -> str:
    lines = [f"{'method':<14}{'accuracy':>10}{'± se':>8}", "-" * 32]
    for m, v in summary["accuracy"].items():
        lines.append(f"{m:<14}{v['mean']:>10.3f}{v['se']:>8.3f}")
    lines.append("-" * 32)
    lines.append(f"questions: {summary['num_questions']}; mean rollout accuracy "
                 f"{summary['rollout_accuracy']:.3f}")
    lines.append(f"synthesis disagrees with majority on {summary['synthesis_disagrees_with_majority']:.1%}"
                 f" of questions; right when it does: {summary['synthesis_right_when_disagreeing']}")
    lines.append(f"all rollouts wrong on {summary['all_rollouts_wrong']:.1%}; synthesis right then: "
                 f"{summary['synthesis_right_when_all_wrong']}")
    return "\n".join(lines)


def plot_accuracy_vs_g(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gs = sorted(int(g) for g in summary["accuracy_vs_g"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m in ("single", "majority", "synthesis"):
        ax.plot(gs, [summary["accuracy_vs_g"][str(g)][m] for g in gs], marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_xticks(gs, [str(g) for g in gs])
    ax.set_xlabel("rollouts G")
    ax.set_ylabel("accuracy vs gold")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# What a question's record depends on; `eval.batch_size` only groups the work.
_RECORD_INPUTS = ("model", "round", "data", "eval", "judge", "seed")


def _record_inputs(config: Any) -> dict:
    out = {}
    for key in _RECORD_INPUTS:
        value = config.get(key)
        out[key] = value.to_dict() if hasattr(value, "to_dict") else value
    if isinstance(out.get("eval"), dict):
        out["eval"].pop("batch_size", None)
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def _check_same_inputs(wd: storage.Workdir, config: Any, has_records: bool) -> None:
    """Records made under another model, G, dataset or seed would be reused as if they were
    this run's (nothing would be sampled again): refused in one line, before any weights load.
    The inputs are kept in `record_inputs.json` beside the records."""
    path, want = wd.file("record_inputs.json"), _record_inputs(config)
    if has_records and wd.pull("record_inputs.json"):
        with open(path) as f:
            had = json.load(f)
        if had != want:
            differ = sorted(k for k in set(had) | set(want) if had.get(k) != want.get(k))
            raise ValueError(f"{wd.url('records.jsonl')} was written with another config "
                             f"({', '.join(differ)} differ): use a new workdir, or delete the "
                             "records to redo them")
    with open(path, "w") as f:
        json.dump(want, f, indent=1, sort_keys=True)
    wd.push("record_inputs.json")


def run(config: Any, workdir: str, policy: cat_round.Model | None = None,
        judge: Judge | None = None) -> dict:
    """The evaluation job behind `python -m catjax.main --config=configs/eval_*.py`."""
    from catjax import loading

    wd = storage.Workdir(workdir)
    os.makedirs(wd.local, exist_ok=True)
    # gs://: resume from the bucket's records (fails fast, before any weights).
    has_records = wd.pull("records.jsonl")
    rc = loading.round_config(config.round)  # config errors first, then a workdir mismatch
    # This host's chips (each process of a multi-host run evaluates on its own).
    mesh = parallel.make_mesh(**dict(config.get("mesh") or {}), devices=jax.local_devices())
    _check_same_inputs(wd, config, has_records)
    if policy is None:
        policy = loading.on_mesh(loading.load_model(config.model, seed=config.seed), mesh)
    if rc.task == "freeform" and judge is None:
        judge = loading.make_judge(config.judge, policy, config.seed, mesh)
    examples = data.load(config.data.name, split=config.data.split, path=config.data.get("path"),
                         limit=config.data.limit)
    g_values = [g for g in config.eval.g_values if g <= rc.num_rollouts]
    rec_path = wd.file("records.jsonl")
    # Process 0 keeps the records (its file, pushed to gs://); the others learn which
    # questions are done from it, so that every process cuts the same batches.
    procs, me = jax.process_count(), jax.process_index()
    done = _read_done(rec_path) if me == 0 else {}
    if procs > 1:  # a collective: every process calls it
        ids = parallel.allgather_json(sorted(done))[0]
        done = done if me == 0 else dict.fromkeys(ids)
    position = {ex.id: i for i, ex in enumerate(examples)}
    todo = [ex for ex in examples if ex.id not in done]
    bs = config.eval.batch_size
    rng = jax.random.key(config.seed)
    batches = [todo[i:i + bs] for i in range(0, len(todo), bs)]
    # Several processes (the hosts of a slice): batch j is process j % P's, on its own chips;
    # after each turn process 0 gets every record (one small all-gather). The batches and their
    # keys do not depend on P: the records are those of one process.
    records_file = open(rec_path, "a") if me == 0 else contextlib.nullcontext()  # noqa: SIM115
    with records_file as f, tqdm(total=len(examples), initial=len(examples) - len(todo),
                                 desc="evaluate", unit="q", disable=me != 0) as bar:
        for turn in range(0, len(batches), procs):
            mine = batches[turn + me] if turn + me < len(batches) else []
            # Keyed by the question's position in the set: a resumed run draws the same samples.
            recs = evaluate_batch(policy, mine, jax.random.fold_in(rng, position[mine[0].id]), rc,
                                  config.eval.baselines, g_values, judge) if mine else []
            recs = [r for part in parallel.allgather_json(recs) for r in part]
            bar.update(len(recs))
            if me != 0:
                continue
            # One write per turn, then to disk: a kill between writes leaves whole batches; a
            # write cut short, a torn last line, which the rerun drops.
            f.write("".join(json.dumps(rec) + "\n" for rec in recs))
            f.flush()
            os.fsync(f.fileno())
            done.update((rec["id"], rec) for rec in recs)
            wd.push("records.jsonl")
    if me != 0:  # process 0 scores, summarises and writes the outputs
        return {}
    recs = [done[ex.id] for ex in examples]
    if rc.task == "freeform":
        methods = ["single", *[m for m in METHODS[1:] if m in config.eval.baselines
                               and m != "majority"], "synthesis"]
        summary = summarize_scores(score_healthbench(recs, examples, judge), methods)
        with open(wd.file("summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        wd.push("summary.json")
        for m, v in summary["score"].items():
            print(f"{m:<14}{v['mean']:>10.3f}{v['se']:>8.3f}")
        return summary
    methods = ["single", *[m for m in METHODS[1:] if m in config.eval.baselines or m in
                           ("majority", "synthesis")]]
    scores = [score_math(r, g_values, config.eval.gold_compare) for r in recs]
    summary = summarize(scores, methods, g_values)
    summary["config"] = {"model": str(config.model.init), "num_rollouts": rc.num_rollouts,
                         "data": config.data.name, "extract_modes": list(rc.extract_modes)}
    with open(wd.file("summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(wd.file("scores.jsonl"), "w") as f:
        for r, s in zip(recs, scores, strict=True):
            f.write(json.dumps({"id": r["id"], **s}) + "\n")
    plot_accuracy_vs_g(summary, wd.file("accuracy_vs_g.png"))
    wd.push("summary.json", "scores.jsonl", "accuracy_vs_g.png")
    print(format_table(summary))
    _print_example(recs[0])
    return summary


def _print_example(rec: dict, width: int = 160) -> None:
    clip = lambda s: " ".join(str(s).split())[:width]
    print(f"\nexample question: {clip(rec['question'])}")
    print(f"gold: {rec.get('gold')}")
    for j, (a, r) in enumerate(zip(rec["rollout_answers"], rec["rewards"], strict=True)):
        print(f"  rollout {j}: answer={a!s:<12} reward={r:.0f}  | {clip(rec['rollouts'][j])[:100]}")
    print(f"  synthesis: answer={rec['reference_answer']}  | {clip(rec['synthesis'])[:120]}")
