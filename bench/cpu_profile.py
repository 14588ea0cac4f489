"""Where one sampler call's time goes on the CPU, by model operation.

    .venv/bin/python bench/cpu_profile.py --model bench/.models/tiny_qwen3 \
        --call synthesis_prefill [--new-tokens 64] [--repeats 5] [--top 25]

A `jax.profiler` trace of `--repeats` calls, each XLA:CPU kernel named by what it computes.
XLA names a fused kernel after its root instruction, which misleads: the kernel that runs a
query projection and Qwen 3's query norm is called "reduce_sum". So each kernel is labelled by the
einsums of the dots inside it (their JAX source names, e.g. `btd,df->btf` and the output shape),
or, without a dot, by its root's source op. The compiled HLO comes from XLA's own dump of the
program (`--xla_dump_to`, set in `main` before JAX starts its CPU client).

Calls, on the synthesis task's workload (`bench/ours.py --task synthesis`: 4 questions, G=8
rollouts of N tokens, the anchor's 4 synthesis prompts): `synthesis` (greedy, N new tokens),
`synthesis_prefill` (1 new token: the prefill and one draw), `rollout` (one more rollout per
question, T 1) and `rollout_prefill`.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import ours  # noqa: E402

from catjax import sampling  # noqa: E402

CALLS = ("synthesis", "synthesis_prefill", "rollout", "rollout_prefill")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\(")
# A loop or branch returns a tuple (spaces in its shape); its own events are the control alone.
_CONTROL = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = \(.*\) (while|conditional|call)\(")


def parse_hlo(text: str) -> dict[str, str]:
    """Instruction name -> label: the dots a fusion computes ("spec shape", joined by " + "),
    else its root's source op (the last two parts of its op_name) and opcode; loops and
    branches "while (control)"."""
    comps: dict[str, list[str]] = {}
    name = None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY )?%([\w.\-]+) ", line)
        if head and line.rstrip().endswith("{"):
            name = head.group(1)
            comps[name] = []
        elif name and line.strip() != "}":
            comps[name].append(line)

    def source(line: str) -> str:
        op = re.search(r'op_name="([^"]+)"', line)
        return "/".join(op.group(1).split("/")[-2:]) if op else "?"

    def dot_label(line: str, shape: str) -> str:  # "btd,df->btf f32[512,768]"
        parts = source(line).split("/")
        spec = parts[-2] if len(parts) > 1 and parts[-1] == "dot_general" else parts[-1]
        return f"{spec} {shape.split('{')[0]}"

    def dots(comp: str, seen: set[str]) -> list[str]:
        out = []
        for line in comps.get(comp, ()):
            m = _INSTR.match(line)
            if not m:
                continue
            if m.group(3) == "dot":
                out.append(dot_label(line, m.group(2)))
            for callee in re.findall(r"calls=%([\w.\-]+)", line):
                if callee not in seen:
                    seen.add(callee)
                    out += dots(callee, seen)
        return out

    labels = {}
    for lines in comps.values():
        for line in lines:
            m = _INSTR.match(line)
            if not m:
                if control := _CONTROL.match(line):
                    labels[control.group(1)] = f"{control.group(2)} (control)"
                continue
            callee = re.search(r"calls=%([\w.\-]+)", line)
            found = dots(callee.group(1), set()) if callee and m.group(3) == "fusion" else []
            if m.group(3) == "dot":
                found = [dot_label(line, m.group(2))]
            labels[m.group(1)] = (" + ".join(sorted(set(found))) if found
                                  else f"{source(line)} ({m.group(3)})")
    return labels


def build_calls(m, new_tokens: int) -> dict:
    """The four calls of the synthesis task's workload (see the module docstring)."""
    prompts, _, syn = ours.synthesis_workload(m, new_tokens)
    n = new_tokens

    def call(ps, steps, temperature):
        return lambda: sampling.sample(m.cfg, m.params, ps, rng=jax.random.key(1),
                                       temperature=temperature, max_new_tokens=steps,
                                       stop_ids=(), pad_id=m.tokenizer.pad_id, logprobs=False)
    return {"synthesis": call(syn, n, 0.0), "synthesis_prefill": call(syn, 1, 0.0),
            "rollout": call(prompts, n, 1.0), "rollout_prefill": call(prompts, 1, 1.0)}


def dump_programs() -> str:
    """A new folder XLA dumps every compiled program's HLO into; call before JAX computes."""
    dump = tempfile.mkdtemp(prefix="catjax-hlo-")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump} "
                               "--xla_dump_hlo_as_text --xla_dump_hlo_pass_re=NONE").strip()
    return dump


def profile(fn, repeats: int, dump: str) -> tuple[dict[str, float], float, str]:
    """Kernel name -> ms per call, wall ms per call, and the compiled program's HLO text (the
    one sampler program `fn`'s first call compiles into `dump`)."""
    pattern = f"{dump}/*jit__sample.cpu_after_optimizations.txt"
    before = set(glob.glob(pattern))
    jax.block_until_ready(fn())  # compiles (dumping the program)
    new = sorted(set(glob.glob(pattern)) - before)
    if len(new) != 1:
        raise SystemExit(f"cpu_profile: expected one new sampler program, found {len(new)}")
    trace_dir = tempfile.mkdtemp(prefix="catjax-trace-")
    with jax.profiler.trace(trace_dir):
        t0 = time.perf_counter()
        for _ in range(repeats):
            jax.block_until_ready(fn())
        wall = (time.perf_counter() - t0) / repeats
    with open(new[0]) as f:
        hlo = f.read()
    module = re.search(r"^HloModule (\S+?),", hlo, re.M).group(1)
    path = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]
    per_kernel: dict[str, float] = collections.Counter()
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    shutil.rmtree(trace_dir, ignore_errors=True)
    for ev in events:
        args = ev.get("args", {})
        if ev.get("ph") == "X" and args.get("hlo_module") == module and "hlo_op" in args:
            per_kernel[args["hlo_op"]] += ev["dur"] / 1e3 / repeats
    return per_kernel, wall * 1e3, hlo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--call", choices=CALLS, default="synthesis_prefill")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    dump = dump_programs()
    try:
        m = ours.load(args.model)
        per_kernel, wall_ms, hlo = profile(build_calls(m, args.new_tokens)[args.call],
                                           args.repeats, dump)
    except (OSError, ValueError) as e:  # a missing or unreadable model: one line
        raise SystemExit(f"cpu_profile: --model {args.model}: {e}") from None
    finally:
        shutil.rmtree(dump, ignore_errors=True)
    labels = parse_hlo(hlo)
    by_label: dict[str, float] = collections.Counter()
    for kernel, ms in per_kernel.items():
        by_label[labels.get(kernel, kernel)] += ms
    total = sum(by_label.values())
    print(f"{args.call}: {wall_ms:.1f} ms a call (the mean of {args.repeats} traced calls); "
          f"its kernels {total:.1f} ms (the cores overlap some)")
    for label, ms in by_label.most_common(args.top):
        print(f"{ms:9.2f} ms {ms / total:6.1%}  {label[:140]}")
    print(json.dumps({"call": args.call, "wall_ms": wall_ms, "kernels_ms": total,
                      "top": [(k, round(v, 3)) for k, v in by_label.most_common(args.top)],
                      "model": os.path.basename(args.model.rstrip("/")),
                      "new_tokens": args.new_tokens, "jax": jax.__version__,
                      "share_without_dots": float(np.round(sum(
                          v for k, v in by_label.items() if k.endswith(")")) / total, 3))}))


if __name__ == "__main__":
    main()
