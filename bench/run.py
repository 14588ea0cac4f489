"""catjax vs its peers, side by side on the same weights: the benchmark driver.

    bash bench/setup_peers.sh            # once: .venv-peers (transformers, TRL, Tunix)
    .venv/bin/python bench/run.py --quick # reduced set, under 10 minutes on 2 cores
    .venv/bin/python bench/run.py         # the full set

Every measurement runs in a fresh process: catjax's (`bench/ours.py`) in the project venv, the
peers' (`bench/peer_*.py`) in `.venv-peers`, one at a time, on the model files of
`workload.build_models` and the workload of `workload.py`. Ratios are computed here from
medians measured by this one invocation on this machine. Results go to `bench/results/`
(JSON, PNG) and a section of `bench/RESULTS.md`; the last stdout line is one JSON object with
every ratio (speed ratios: catjax faster when above 1).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import workload  # noqa: E402

OURS = [sys.executable, os.path.join(HERE, "ours.py")]
PEERS_PY = os.path.join(ROOT, ".venv-peers", "bin", "python")
SECTIONS = ("sampler", "rl", "synthesis", "scaling", "mfu")
MARK_BEGIN, MARK_END = "<!-- bench/run.py: begin -->", "<!-- bench/run.py: end -->"

# (model, new tokens, top-p values, repeats) per measurement; quick is the reduced set.
PLANS = {
    "quick": dict(
        sampler=[("tiny_qwen3", 128, (1.0,), 2)],
        sampler_tunix_top_p=(1.0,),  # Tunix sorts the vocabulary at top-p < 1: full run only
        rl=[("tiny_qwen3", 64, 2)],
        synthesis=[("tiny_qwen3", 64, 2)],
        scaling_g=("tiny_qwen3", 32, (1, 4, 16), 1),
        scaling_n=("tiny_qwen3", 4, (32, 128), 1, {}),
        mfu=[("tiny_qwen3", 64, 3, 0)],
    ),
    "full": dict(
        sampler=[("tiny_qwen3", 128, (1.0, 0.95), 3), ("tiny_qwen3", 512, (1.0,), 3),
                 ("smollm2", 128, (1.0, 0.95), 3)],
        sampler_tunix_top_p=(1.0, 0.95),
        rl=[("tiny_qwen3", 128, 3), ("smollm2", 128, 2)],
        synthesis=[("tiny_qwen3", 128, 3), ("smollm2", 128, 2)],
        scaling_g=("tiny_qwen3", 128, (1, 2, 4, 8, 16), 3),
        # Four micro-batches of 8 rows from N=512 up: N=1024 unsplit needs more than 24 GiB.
        scaling_n=("tiny_qwen3", 8, (128, 256, 512, 1024), 2, {512: 8, 1024: 8}),
        # SmolLM2 in two micro-batches of 16 rows: all 32 at once no longer fit 24 GiB here.
        mfu=[("tiny_qwen3", 128, 3, 0), ("smollm2", 128, 3, 16)],
    ),
}


def run_worker(cmd: list[str], log) -> dict:
    """Run one measurement process; its last stdout line is its JSON result."""
    t0 = time.perf_counter()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    log.write(f"$ {' '.join(cmd)}\n{proc.stderr[-4000:]}\n{proc.stdout[-4000:]}\n")
    log.flush()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{' '.join(cmd[1:])}: exit {proc.returncode}; "
                           f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    out = json.loads(lines[-1])
    out["wall_s"] = wall
    print(f"  {out.get('library'):<12} {out.get('task'):<9} {out.get('model'):<10} "
          f"median {out['median_s']:.2f}s [{out['min_s']:.2f}-{out['max_s']:.2f}]"
          + (f" {out['tokens_per_s']:.0f} tok/s" if "tokens_per_s" in out else "")
          + f" (process {wall:.0f}s)", flush=True)
    return out


def ours(task: str, model: str, n: int, repeats: int, log, **kw) -> dict:
    args = [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    return run_worker(OURS + ["--task", task, "--model", workload.model_dir(model),
                              "--new-tokens", str(n), "--repeats", str(repeats), *args], log)


def peer(lib: str, task: str, model: str, n: int, repeats: int, log, **kw) -> dict:
    args = [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    return run_worker([PEERS_PY, os.path.join(HERE, f"peer_{lib}.py"), "--task", task,
                       "--model", workload.model_dir(model), "--new-tokens", str(n),
                       "--repeats", str(repeats), *args], log)


def ratio(slow: dict, fast: dict) -> float:
    """Speed ratio from medians: above 1 when `fast` (catjax) takes less time."""
    return slow["median_s"] / fast["median_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the reduced set (under 10 minutes)")
    ap.add_argument("--no-peers", action="store_true", help="catjax only (no .venv-peers)")
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma-separated sections to run, of {','.join(SECTIONS)}")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    only = args.only.split(",")
    if set(only) - set(SECTIONS):
        sys.exit(f"bench/run.py: --only: unknown {sorted(set(only) - set(SECTIONS))}")
    mode = "quick" if args.quick else "full"
    if set(only) != set(SECTIONS):
        mode += "-" + "-".join(only)
    plan = PLANS["quick" if args.quick else "full"]
    if not args.no_peers and not os.path.exists(PEERS_PY):
        sys.exit(f"bench/run.py: {PEERS_PY} missing: run `bash bench/setup_peers.sh` first "
                 "(or pass --no-peers)")
    os.makedirs(args.out, exist_ok=True)
    from catjax import loading
    workload.build_models(loading.smollm2_path())
    started = time.perf_counter()
    res: dict = {"mode": mode, "sampler": [], "rl": [], "synthesis": [], "scaling_g": [],
                 "scaling_n": [], "mfu": []}
    ratios: dict[str, float] = {}
    with open(os.path.join(args.out, f"{mode}.log"), "w") as log:
        print("1. rollout sampling (4 prompts x G=8, exactly N new tokens)", flush=True)
        for model, n, top_ps, reps in plan["sampler"] if "sampler" in only else ():
            for tp in top_ps:
                row = {"model": model, "new_tokens": n, "top_p": tp,
                       "catjax": ours("sampler", model, n, reps, log, top_p=tp)}
                if not args.no_peers:
                    row["transformers"] = peer("transformers", "sampler", model, n, reps, log,
                                               top_p=tp)
                    if tp in plan["sampler_tunix_top_p"]:
                        row["tunix"] = peer("tunix", "sampler", model, n, reps, log, top_p=tp,
                                            temperature=workload.TEMPERATURE)
                res["sampler"].append(row)
        print("2. one RL iteration (generate, reward, update)", flush=True)
        for model, n, reps in plan["rl"] if "rl" in only else ():
            row = {"model": model, "new_tokens": n, "catjax": ours("rl", model, n, reps, log)}
            if not args.no_peers:
                row["trl"] = peer("trl", "rl", model, n, reps, log)
                row["tunix"] = peer("tunix", "rl", model, n, reps, log)
            res["rl"].append(row)
        print("3. the cost of CaT: synthesis vs one more rollout, judge per rollout", flush=True)
        for model, n, reps in plan["synthesis"] if "synthesis" in only else ():
            res["synthesis"].append(ours("synthesis", model, n, reps, log))
        print("4. scaling of one CaT-RL step in G and in generation length", flush=True)
        model, n, gs, reps = plan["scaling_g"]
        for g in gs if "scaling" in only else ():
            res["scaling_g"].append(ours("cat_step", model, n, reps, log, samples=g))
        model, g, ns, reps, micro = plan["scaling_n"]
        for n in ns if "scaling" in only else ():
            res["scaling_n"].append(ours("cat_step", model, n, reps, log, samples=g,
                                         micro_batch=micro.get(n, 0)))
        print("5. utilisation: the training step vs the measured matmul peak", flush=True)
        for model, n, reps, micro in plan["mfu"] if "mfu" in only else ():
            res["mfu"].append(ours("mfu", model, n, reps, log, micro_batch=micro))

    # --- ratios (the keys the issue names first) ---
    def first(rows, **match):
        for r in rows:
            if all(r.get(k) == v for k, v in match.items()):
                return r
        return None

    if not args.no_peers and res["sampler"]:
        # Against transformers: the real model at top-p 0.95 where measured (the full set),
        # else the first row.
        s = first(res["sampler"], model="smollm2", top_p=0.95) or res["sampler"][0]
        ratios["sampler_vs_transformers"] = ratio(s["transformers"], s["catjax"])
        # Against Tunix: the tiny model at top-p 1, Tunix's fastest setting (no vocabulary sort).
        s = first(res["sampler"], model="tiny_qwen3", top_p=1.0)
        ratios["sampler_vs_tunix"] = ratio(s["tunix"], s["catjax"])
        for r in res["sampler"]:
            for lib in ("transformers", "tunix"):
                if lib in r:
                    ratios[f"sampler_vs_{lib}_{r['model']}_n{r['new_tokens']}_p{r['top_p']}"] = \
                        ratio(r[lib], r["catjax"])
    if not args.no_peers and res["rl"]:
        r = res["rl"][0]
        ratios["rl_step_vs_trl"] = ratio(r["trl"], r["catjax"])
        ratios["rl_step_vs_tunix"] = ratio(r["tunix"], r["catjax"])
        for r in res["rl"][1:]:
            for lib in ("trl", "tunix"):
                ratios[f"rl_step_vs_{lib}_{r['model']}"] = ratio(r[lib], r["catjax"])
    if res["synthesis"]:
        ratios["synthesis_vs_rollout"] = res["synthesis"][0]["synthesis_vs_rollout"]
    for r in res["synthesis"]:
        ratios[f"synthesis_vs_rollout_{r['model']}"] = r["synthesis_vs_rollout"]
        ratios[f"synthesis_drafted_vs_rollout_{r['model']}"] = r["synthesis_drafted_vs_rollout"]
        ratios[f"judge_vs_rollout_{r['model']}"] = r["judge_vs_rollout_row"]
    g_rows = res["scaling_g"]
    if g_rows:
        ratios[f"step_time_g{g_rows[-1]['num_samples']}_over_g{g_rows[0]['num_samples']}"] = \
            g_rows[-1]["median_s"] / g_rows[0]["median_s"]
    if res["mfu"]:
        ratios["mfu"] = res["mfu"][0]["mfu"]
    for r in res["mfu"]:
        ratios[f"mfu_{r['model']}"] = r["mfu"]
    res["ratios"] = ratios
    res["elapsed_s"] = time.perf_counter() - started
    res["meta"] = meta()
    with open(os.path.join(args.out, f"{mode}.json"), "w") as f:
        json.dump(res, f, indent=1)
    pngs = plots(res, args.out, mode)
    write_markdown(res, pngs, mode)
    print(json.dumps({k: round(v, 4) for k, v in ratios.items()}))


def meta() -> dict:
    import jax

    def version(py: str, pkgs: str) -> dict:
        code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) "
                f"for p in {pkgs!r}.split(',')}}))")
        try:
            out = subprocess.run([py, "-c", code], capture_output=True, text=True, check=True)
            return json.loads(out.stdout)
        except (OSError, subprocess.CalledProcessError, json.JSONDecodeError):
            return {}
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "cpu": _cpu_name(), "jax_backend": jax.default_backend(),
        "catjax_env": version(sys.executable, "jax,jaxlib,flax,optax"),
        "peers_env": version(PEERS_PY, "torch,transformers,trl,google-tunix,jax,flax")
        if os.path.exists(PEERS_PY) else {},
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# --- report ----------------------------------------------------------------------------------

def plots(res: dict, out: str, mode: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if not res["scaling_g"] or not res["scaling_n"]:
        return paths + _sampler_plot(res, out, mode, plt)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, rows, key, label in ((axes[0], res["scaling_g"], "num_samples", "G (rollouts per question)"),
                                 (axes[1], res["scaling_n"], "new_tokens", "generation length N")):
        xs = [r[key] for r in rows]
        ax.plot(xs, [r["median_s"] for r in rows], "o-", label="step time (s)")
        lo = [r["min_s"] for r in rows]
        hi = [r["max_s"] for r in rows]
        ax.fill_between(xs, lo, hi, alpha=0.2)
        ax.plot(xs, [rows[0]["median_s"] * x / xs[0] for x in xs], "k:", label="linear from the first")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("seconds per CaT-RL step")
        ax2 = ax.twinx()
        ax2.plot(xs, [r["peak_rss_mb"] / 1024 for r in rows], "s--", color="tab:red",
                 label="peak memory (GiB)")
        ax2.set_ylabel("peak memory, GiB", color="tab:red")
        ax.legend(loc="upper left", fontsize=7)
    fig.suptitle(f"One CaT-RL step on {res['scaling_g'][0]['model']} (catjax, CPU)", fontsize=9)
    fig.tight_layout()
    paths.append(os.path.join(out, f"{mode}_scaling.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths + _sampler_plot(res, out, mode, plt)


def _sampler_plot(res: dict, out: str, mode: str, plt) -> list[str]:
    paths = []
    if any("transformers" in r for r in res["sampler"]):
        fig, ax = plt.subplots(figsize=(8, 3.2))
        labels, libs = [], ("catjax", "transformers", "tunix")
        for i, r in enumerate(res["sampler"]):
            labels.append(f"{r['model']}\nN={r['new_tokens']} p={r['top_p']}")
            for j, lib in enumerate(libs):
                if lib in r:
                    ax.bar(i + (j - 1) * 0.27, r[lib]["tokens_per_s"], 0.27,
                           color=f"C{j}", label=lib if i == 0 else None)
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_ylabel("generated tokens/s (32 rows)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(os.path.join(out, f"{mode}_sampler.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def _t(r: dict) -> str:
    return f"{r['median_s']:.2f} [{r['min_s']:.2f}-{r['max_s']:.2f}]"


def write_markdown(res: dict, pngs: list[str], mode: str) -> None:
    m = res["meta"]
    cmd = " ".join([".venv/bin/python bench/run.py", *sys.argv[1:]])
    lines = [MARK_BEGIN, f"## Peers side by side ({mode} set)", "",
             f"Command: `{cmd}` (after `bash bench/setup_peers.sh`), {m['date']}, "
             f"{res['elapsed_s'] / 60:.1f} minutes. Machine: {m['cpu']}, {m['machine']}.",
             f"catjax venv: {m['catjax_env']}; peers venv: {m['peers_env']}.",
             "Same weights on every side (float32 safetensors written once by "
             "`bench/workload.py`), same prompts, same G, same token budgets; every process "
             "measures one thing; medians [min-max] of the timed repeats, first call "
             "(compilation) apart.", ""]
    if any("transformers" in r for r in res["sampler"]):
        lines += ["### 1. Rollout sampling: 4 prompts x G=8 = 32 rows, exactly N new tokens, "
                  "T 0.7", "",
                  "| model | N | top-p | catjax tok/s | transformers tok/s | Tunix tok/s | "
                  "vs transformers | vs Tunix |", "|---|---|---|---|---|---|---|---|"]
        for r in res["sampler"]:
            c = r["catjax"]
            tr, tu = r.get("transformers"), r.get("tunix")
            lines.append(
                f"| {r['model']} | {r['new_tokens']} | {r['top_p']} | {c['tokens_per_s']:.0f} "
                f"(compile+first {c['first_s']:.0f} s) | "
                f"{tr['tokens_per_s']:.0f} | " + (f"{tu['tokens_per_s']:.0f} |" if tu else "- |")
                + f" {ratio(tr, c):.2f}x | " + (f"{ratio(tu, c):.2f}x |" if tu else "- |"))
    if res["rl"]:
        lines += ["", "### 2. One RL iteration: generate 32 rows, exact-match reward, one AdamW "
                  "update (beta 0)", "",
                  "| model | N | catjax s | TRL GRPOTrainer s | Tunix GRPOLearner s | vs TRL | "
                  "vs Tunix | generation share (catjax / TRL / Tunix) | peak RSS GiB (c/TRL/T) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in res["rl"]:
            c, tr, tu = r["catjax"], r["trl"], r["tunix"]
            share = " / ".join(f"{x.get('generation_fraction') or 0:.0%}" for x in (c, tr, tu))
            rss = " / ".join(f"{x['peak_rss_mb'] / 1024:.1f}" for x in (c, tr, tu))
            lines.append(f"| {r['model']} | {r['new_tokens']} | {_t(c)} | {_t(tr)} | {_t(tu)} | "
                         f"{ratio(tr, c):.2f}x | {ratio(tu, c):.2f}x | {share} | {rss} |")
    if res["synthesis"]:
        lines += ["", "### 3. The cost of CaT itself", "",
              "| model | N | synthesis over G=8 rollouts, 4 rows (s) | one more rollout, 4 rows (s) "
              "| ratio | drafted synthesis (s), passes / N | ratio | synthesis prompt tokens "
              "| judge: 5 criteria per rollout, s per rollout | judge / one rollout row |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["synthesis"]:
            lines.append(f"| {r['model']} | {r['new_tokens']} | {r['synthesis_s']:.2f} | "
                     f"{r['rollout_s']:.2f} | {r['synthesis_vs_rollout']:.2f} | "
                     f"{r['synthesis_drafted_s']:.2f}, {r['synthesis_drafted_passes']} / "
                     f"{r['new_tokens']} | {r['synthesis_drafted_vs_rollout']:.2f} | "
                     f"{min(r['synthesis_prompt_tokens'])}-{max(r['synthesis_prompt_tokens'])} | "
                     f"{r['judge_s_per_rollout']:.3f} | {r['judge_vs_rollout_row']:.2f} |")
    if res["scaling_g"] or res["scaling_n"]:
        lines += ["", "### 4. Scaling of one CaT-RL step (rollouts, synthesis, rewards, update with "
              "the anchor's KL)", "", "| G | N | step s | of which compiling, s (per timed step) "
              "| round share | peak RSS GiB |", "|---|---|---|---|---|---|"]
        for r in res["scaling_g"] + res["scaling_n"]:
            comp = " / ".join(f"{c:.2f}" for c in r.get("compile_s_in_timed", [])) or "-"
            lines.append(f"| {r['num_samples']} | {r['new_tokens']} | {_t(r)} | {comp} | "
                     f"{r['round_fraction']:.0%} | {r['peak_rss_mb'] / 1024:.2f} |")
    if res["mfu"]:
        lines += ["", "### 5. Utilisation of the training step (forward + backward + AdamW)", "",
              "| model | rows x tokens | step s (min) | matmul FLOPs run | achieved GFLOP/s | "
              "matmul peak GFLOP/s | MFU |", "|---|---|---|---|---|---|---|"]
        for r in res["mfu"]:
            micro = f" ({r['micro_batch']}-row micro-batches)" if r.get("micro_batch") else ""
            lines.append(f"| {r['model']} | {r['rows']} x {r['tokens_per_row']}{micro} | "
                         f"{r['step_s_min']:.2f} | "
                     f"{r['flops'] / 1e9:.0f} G | {r['achieved_flops_per_s'] / 1e9:.0f} | "
                     f"{r['matmul_peak_flops'] / 1e9:.0f} | {r['mfu']:.0%} |")
    lines += ["", "Ratios (last line of the command):", "", "```",
              json.dumps({k: round(v, 3) for k, v in res["ratios"].items()}), "```", ""]
    lines += [f"![{os.path.basename(p)}](results/{os.path.basename(p)})" for p in pngs]
    lines += [MARK_END]
    path = os.path.join(HERE, "RESULTS.md")
    text = "# Benchmark results\n"
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    section = "\n".join(lines) + "\n"
    begin, end = f"{MARK_BEGIN[:-4]} ({mode}) -->", f"{MARK_END[:-4]} ({mode}) -->"
    section = section.replace(MARK_BEGIN, begin).replace(MARK_END, end)
    if begin in text and end in text:
        text = text[:text.index(begin)] + section.rstrip("\n") + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
