"""The demo job (configs/demo.py): CaT on real weights, then the learning proof, with a summary.

Each part is an ordinary job (`evaluate.run`, `trainer.train`) with its own subdirectory, so a
rerun resumes each one where it stopped and reuses finished ones.
"""

from __future__ import annotations

import os
import time
from typing import Any

from catjax import evaluate, loading, metrics, storage
from catjax.rl import trainer

PARTS = ("1_smollm2_eval", "2_smollm2_rl", "3_toy_before", "4_toy_rl", "5_toy_after")


def _banner(text: str) -> None:
    print(f"\n{'=' * 78}\n{text}\n{'=' * 78}", flush=True)


def run(config: Any, workdir: str) -> dict:
    t0 = time.perf_counter()
    d = {p: os.path.join(workdir, p) for p in PARTS}
    _banner("Part one: CaT at test time on real weights (SmolLM2-135M-Instruct, arithmetic)")
    smollm2 = loading.load_model(config.smollm2_eval.model)  # loaded once for both jobs
    s1 = evaluate.run(config.smollm2_eval, d["1_smollm2_eval"], policy=smollm2)
    _banner("Part one: CaT-RL on SmolLM2 (rewards from the anchor's synthesis, no labels)")
    r2 = trainer.train(config.smollm2_rl, d["2_smollm2_rl"], policy=smollm2)
    _show_curve(d["2_smollm2_rl"], ("reward_mean", "rollout_accuracy", "kl_ref"))
    print(f"exported policy: {os.path.join(d['2_smollm2_rl'], 'export')}")
    _banner("Part two: the learning proof (synthetic task, toy model): before CaT-RL")
    s3 = evaluate.run(config.toy_before, d["3_toy_before"])
    _banner("Part two: CaT-RL on the toy model (no labels; held-out accuracy vs gold logged)")
    r4 = trainer.train(config.toy_rl, d["4_toy_rl"])
    _show_curve(d["4_toy_rl"], ("heldout_accuracy", "reward_mean"))
    _banner("Part two: after CaT-RL (same questions, same seed)")
    after = config.toy_after
    with after.unlocked():
        after.model.params_from = os.path.join(d["4_toy_rl"], "checkpoints")
    s5 = evaluate.run(after, d["5_toy_after"])

    _banner("Summary")
    print("part one, SmolLM2-135M on 8 arithmetic questions, G=4 (accuracy vs gold):")
    print("  " + "  ".join(f"{m} {v['mean']:.3f}" for m, v in s1["accuracy"].items()))
    print(f"  CaT-RL: reward {_first_last(d['2_smollm2_rl'], 'reward_mean')}; "
          f"policy exported to {os.path.join(d['2_smollm2_rl'], 'export')}")
    print(f"part two, toy model on {s3['num_questions']} held-out questions, G=8 "
          "(accuracy vs gold, 95% CI):")
    print(f"  {'':<12}{'before':>22}{'after CaT-RL':>22}")
    for m in ("single", "majority", "min_ppl", "synthesis"):
        if m in s3["accuracy"] and m in s5["accuracy"]:
            print(f"  {m:<12}{_ci(s3['accuracy'][m]):>22}{_ci(s5['accuracy'][m]):>22}")
    print(f"  held-out single-sample accuracy during CaT-RL ({config.toy_rl.eval_data.limit} questions): "
          f"{_first_last(d['4_toy_rl'], 'heldout_accuracy')}")
    print(f"  plots: {os.path.join(d['4_toy_rl'], 'curves.png')}, "
          f"{os.path.join(d['3_toy_before'], 'accuracy_vs_g.png')}")
    print(f"total time: {time.perf_counter() - t0:.0f} s")
    return {"smollm2_eval": s1, "smollm2_rl": r2["metrics"], "toy_before": s3,
            "toy_rl": r4["metrics"], "toy_after": s5}


def _ci(v: dict) -> str:
    return f"{v['mean']:.3f} [{v['mean'] - 1.96 * v['se']:.3f}, {v['mean'] + 1.96 * v['se']:.3f}]"


def _rows(workdir: str) -> list[dict]:
    wd = storage.Workdir(workdir)  # a gs:// workdir: the bucket's copy, fetched into a mirror
    rows = metrics.read(wd.file("metrics.jsonl")) if wd.pull("metrics.jsonl") else []
    wd.close()
    return rows


def _first_last(workdir: str, key: str) -> str:
    vals = [(r["step"], r[key]) for r in _rows(workdir) if key in r]
    return " -> ".join(f"{v:.3f} (step {s})" for s, v in (vals[:1] + vals[-1:])) if vals else "n/a"


def _show_curve(workdir: str, keys: tuple[str, ...]) -> None:
    """The logged curve as a small text table (the PNG is in the workdir)."""
    rows = [r for r in _rows(workdir) if any(k in r for k in keys)]
    print(f"{'step':>6}" + "".join(f"{k:>20}" for k in keys))
    for r in rows:
        print(f"{r['step']:>6}" + "".join(f"{r[k]:>20.3f}" if k in r else f"{'':>20}" for k in keys))
    print(f"curves: {os.path.join(workdir, 'curves.png')}")
