"""GPU checks (run by bench/gpu.sh on an NVIDIA machine; no network needed).

1. Ceilings measured here: a bf16 matmul, a copy (read + write) and a read-only reduction.
2. Decode of a ~1B Qwen 3 config (random bf16 weights, bf16 KV cache) against the HBM roofline:
   bytes a step must read (every weight once plus the live cache) over the measured read
   bandwidth. The unrolled layer loops of `sampling.DECODE_LAYOUTS` are timed (per-row cache;
   shared prompt, rows or weights first), then the windows of the generated cache, cuBLAS for
   the GEMMs and the sampling settings; greedy calls with and without windows are profiled
   kernel by kernel; at 1024 new tokens, one loop against windows. The unrolled layout with its
   attention one Pallas kernel a layer (`decode_attention="pallas"`, live slots only, the GPU
   default) against XLA's ops, where their greedy tokens part and which side a float32 pass
   takes there, and that attention alone by block size against float32 attention.
3. What one draw costs at 64 x 152k logits (GPU time, 50 calls in one jit): top-k and the
   nucleus cut from one `lax.top_k` (a sort on GPUs) against the best blocks first
   (`sampling._top_k`), the threshold search, and each sampling setting.
4. CaT's own cost: one anchor synthesis over G = 8 rollouts against one more rollout.
5. Training-step MFU: forward + backward of the same model against the measured matmul peak.
6. catjax against transformers `generate` on the same GPU and weights.

Sections run in that order within `--budget-s` seconds; one that would not fit is skipped and
says so. Prints a table last, then one JSON line. `--tiny` runs the same code on a small model
(a dry run on a CPU).
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import sys
import tempfile
import time
import traceback
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from catjax import drafting, models, sampling  # noqa: E402
from catjax.models import hf  # noqa: E402

ROWS_PER_PROMPT = 8  # G


def timeit(fn, repeats=5):
    jax.block_until_ready(fn())
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


class Bench:
    def __init__(self, args):
        self.args = args
        self.deadline = time.monotonic() + args.budget_s
        self.rows: dict = {}
        self.calls: dict = {}
        self.out = os.environ.get("OUT") or tempfile.mkdtemp()
        os.makedirs(self.out, exist_ok=True)

    def run(self, name: str, need_s: float, fn) -> None:
        if name in self.args.skip:
            print(f"[{name}] skipped (--skip)", flush=True)
            return
        left = self.deadline - time.monotonic()
        if left < need_s:
            print(f"[{name}] skipped: {left:.0f} s of the budget left, needs ~{need_s:.0f}",
                  flush=True)
            return
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # one failed section must not lose the others' figures
            traceback.print_exc()
            self.rows[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
        print(f"[{name}] {time.perf_counter() - t0:.0f} s", flush=True)

    # --- 1 -------------------------------------------------------------------------------------
    def ceilings(self):
        n = 1024 if self.args.tiny else 8192
        mm, inc = jax.jit(lambda a: a @ a), jax.jit(lambda a: a + 1)
        total = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
        arrs = {"x": jnp.ones((n, n), jnp.bfloat16)}
        self.peak = 2 * n**3 / timeit(lambda: mm(arrs["x"]))
        size = (1 << 22) if self.args.tiny else (1 << 31)  # 4 GiB of bf16
        arrs["big"] = jnp.ones((size,), jnp.bfloat16)
        t_copy = timeit(lambda: inc(arrs["big"]))
        t_read = timeit(lambda: total(arrs["big"]))
        nbytes = arrs["big"].nbytes
        self.copy_bw, self.read_bw = 2 * nbytes / t_copy, nbytes / t_read
        arrs.clear()  # free the device buffers before the model
        self.rows["ceilings"] = dict(matmul_tflops=self.peak / 1e12, copy_tbs=self.copy_bw / 1e12,
                                     read_tbs=self.read_bw / 1e12)
        print(f"bf16 matmul {self.peak / 1e12:.0f} TFLOP/s; copy {self.copy_bw / 1e12:.2f} TB/s "
              f"(read + write); read-only reduction {self.read_bw / 1e12:.2f} TB/s", flush=True)

    # --- 2 -------------------------------------------------------------------------------------
    def build_model(self):
        if self.args.tiny:
            self.cfg = models.get_preset("qwen3_4b").replace(
                num_layers=2, hidden_size=128, mlp_dim=256, num_heads=4, num_kv_heads=2,
                head_dim=32, vocab_size=4096, dtype="bfloat16", max_position=4096)
        else:
            self.cfg = models.get_preset("qwen3_4b").replace(
                num_layers=16, hidden_size=2048, mlp_dim=6144, num_heads=16, num_kv_heads=8,
                dtype="bfloat16", max_position=4096)
        self.params = models.init_params(self.cfg, jax.random.key(0))
        self.nbytes = sum(a.nbytes for a in jax.tree.leaves(self.params))
        rng = np.random.default_rng(0)
        self.prompts = [list(rng.integers(100, self.cfg.vocab_size - 100, 64)) for _ in range(8)]
        print(f"model: {models.param_count(self.params) / 1e9:.3f}B params, "
              f"{self.nbytes / 2**30:.2f} GiB, vocabulary {self.cfg.vocab_size}", flush=True)

    def _decode(self, name, layout, sp=(0.7, 0, 0.95), window=None, options=None, n=None,
                attention="xla"):
        """Time one sampler call of 8 prompts x G rows x N tokens; `options`: XLA compiler
        options for this one program (compiled apart, through `_sample.lower`); `attention`:
        `sample(decode_attention=)`."""
        cfg, g, n = self.cfg, ROWS_PER_PROMPT, n or self.args.new_tokens
        window = sampling.default_decode_window(layout) if window is None else window
        attention = attention or sampling.default_decode_attention(cfg, layout)
        toks, lens = (jnp.asarray(x) for x in sampling.pad_prompts(self.prompts, 0))
        static = dict(sp=sampling.SamplingParams(*sp), num_samples=g, max_new_tokens=n,
                      stop_ids=(), pad_id=0, cache_dtype="bfloat16", mesh=None,
                      decode_layout=layout, decode_window=window, logprobs=False,
                      decode_attention=attention)
        key = jax.random.key(1)
        t0 = time.perf_counter()
        compiled = sampling._sample.lower(cfg, self.params, toks, lens, key, **static).compile(
            options)

        def call():
            return compiled(self.params, toks, lens, key).tokens

        jax.block_until_ready(call())
        first = time.perf_counter() - t0
        t = timeit(call, repeats=3)
        r, p, b = len(self.prompts) * g, toks.shape[1], len(self.prompts)
        # A step reads every weight once and, on average, the cache up to the middle of the
        # generation: each row's own copy of its prompt (the usual roofline), or each prompt
        # once for its G rows (what the shared-prompt layouts must read).
        slot = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2  # bytes, bf16 k + v
        live_rows = slot * r * (p + n / 2)
        live_shared = slot * (b * p + r * n / 2)
        roof_s = (self.nbytes + live_rows) / self.read_bw
        roof_shared_s = (self.nbytes + live_shared) / self.read_bw
        step = t / n
        row = dict(layout=layout, window=window, sampling=sp, options=options, rows=r,
                   attention=attention,
                   new_tokens=n, tok_s=r * n / t, step_ms=step * 1e3,
                   roofline_step_ms=roof_s * 1e3, frac_of_roofline=roof_s / step,
                   roofline_shared_step_ms=roof_shared_s * 1e3,
                   frac_of_shared_roofline=roof_shared_s / step,
                   achieved_read_tbs=(self.nbytes + live_rows) / step / 1e12, first_call_s=first)
        self.rows[name] = row
        print(f"{name}: {r} rows x {n}: {row['tok_s']:,.0f} tok/s, {step * 1e3:.3f} ms/step "
              f"(roofline {roof_s * 1e3:.3f} ms: {row['frac_of_roofline']:.0%}; prompts read "
              f"once {roof_shared_s * 1e3:.3f} ms: {row['frac_of_shared_roofline']:.0%}); "
              f"compile + first call {first:.1f} s", flush=True)
        return call

    def decode_layouts(self):
        """Sampled (T 0.7, top-p 0.95: flat rows on a random model take the threshold search)."""
        for layout in ("unrolled", "rows_first", "weights_first"):
            self._try(f"decode_{layout}", layout)
        timed = [k for k in ("unrolled", "rows_first", "weights_first")
                 if f"decode_{k}" in self.rows]
        self.best = min(timed, key=lambda k: self.rows[f"decode_{k}"]["step_ms"])
        print(f"faster layer loop for decode: {self.best}", flush=True)

    def decode_kernel(self):
        """The unrolled layout with each layer's attention one Pallas (Triton) kernel that reads
        only the live slots (`sample(decode_attention="pallas")`) against XLA's ops in the same
        run, and whether greedy tokens agree; then one layer's attention alone (`_attention_alone`)
        for the kernel's block sizes, warps, stages and splits, which set its defaults."""
        greedy, qwen = (0.0, 0, 1.0), (0.7, 20, 0.8)
        self._try("decode_default", sampling.default_decode_layout(), attention=None)
        self._try("decode_unrolled_pallas", "unrolled", attention="pallas")
        self._try("decode_unrolled_greedy", "unrolled", sp=greedy)
        self._try("decode_unrolled_pallas_greedy", "unrolled", sp=greedy, attention="pallas")
        g = ROWS_PER_PROMPT
        pair = [self.calls.get(k) for k in ("decode_unrolled_greedy", "decode_unrolled_pallas_greedy")]
        if all(pair):
            a, b = (np.asarray(c()) for c in pair)
            same = float(np.mean(np.all(a == b, axis=1)))
            # A prompt's G greedy rows are the same: its first row speaks for them.
            first = [int(np.argmax(x != y)) for x, y in zip(a[::g], b[::g], strict=True)
                     if np.any(x != y)]
            self.rows["pallas_greedy_agreement"] = dict(rows_identical=same, first_diffs=first[:8])
            print(f"greedy tokens, Pallas attention against XLA's: {same:.0%} of rows identical"
                  + (f"; each prompt's first difference at step {first}" if first else ""), flush=True)
            self._greedy_referee(a, b)
        long = 2 * self.args.new_tokens if self.args.tiny else 1024  # interpreted on a CPU: short
        self._try("decode_long_unrolled_pallas", "unrolled", sp=qwen, n=long, attention="pallas")
        n = self.args.new_tokens
        p = int(sampling.pad_prompts(self.prompts, 0)[0].shape[1])
        # Block size, warps, stages, splits (None: the rule).
        decode = [(bk, w, 2, None) for bk in (32, 64, 128) for w in (4, 8)]
        decode += [(64, 4, 1, None), (64, 4, 3, None), (64, 4, 2, 2)]
        self._attention_alone("attention_one_layer", len(self.prompts) * g, p + n, p + n // 2, decode)
        syn = 8 * n + 150  # a 4-question synthesis midway: few rows, many slots, splits matter
        self._attention_alone("attention_one_layer_synthesis", 4, syn + n, syn + n // 2,
                              [(64, 4, 2, None), (128, 4, 2, None), (64, 4, 2, 4), (64, 4, 2, 1)])

    def _greedy_referee(self, a, b):
        """Where the greedy tokens of XLA's attention (`a`) and the kernel's (`b`) first part,
        which of the two a float32 pass over the same weights and prefix prefers, and by how
        much: rounding flips near-ties only (a small gap, either side), a wrong kernel loses."""
        from catjax.models import decoder

        g, p = ROWS_PER_PROMPT, len(self.prompts[0])
        cfg32 = self.cfg.replace(dtype="float32")
        params32 = jax.tree.map(lambda x: x.astype(jnp.float32), self.params)
        rows = [i * g for i in range(len(self.prompts))]  # a prompt's G greedy rows are equal
        seqs = jnp.asarray([self.prompts[i] + list(a[r]) for i, r in enumerate(rows)], jnp.int32)
        with jax.default_matmul_precision("highest"):
            logits = jax.jit(functools.partial(decoder.forward, cfg32))(params32, seqs)
        cases = []
        for i, r in enumerate(rows):
            if np.array_equal(a[r], b[r]):
                continue
            d = int(np.argmax(a[r] != b[r]))
            row = np.asarray(logits[i, p + d - 1], np.float64)
            top2 = np.sort(row)[-2:]
            cases.append(dict(step=d, f32_prefers=("xla" if row[a[r, d]] > row[b[r, d]] else "pallas"),
                              gap=float(abs(row[a[r, d]] - row[b[r, d]])),
                              top2_gap=float(top2[1] - top2[0]),
                              f32_argmax_is_one_of_them=int(np.argmax(row)) in (a[r, d], b[r, d])))
        distinct = len({tuple(a[r]) for r in rows})
        self.rows["pallas_greedy_referee"] = dict(distinct_prompt_sequences=distinct, cases=cases)
        print(f"greedy referee: {distinct} distinct sequences over {len(rows)} prompts (XLA's); "
              + ("at the first difference float32 prefers " + ", ".join(
                  f"{c['f32_prefers']} by {c['gap']:.4f} of top-2 gap {c['top2_gap']:.4f} "
                  f"(step {c['step']})" for c in cases) if cases else "no differences"), flush=True)

    def _attention_alone(self, name, b, slots, live, cases):
        """One layer's decode attention, [b] rows with `live` of `slots` slots: XLA's ops
        (`decoder._attend`) against each kernel setting, GPU time per call from 48 calls in one
        program, each on a cache of its own, and each one's largest difference from float32
        attention of the same inputs (XLA's too)."""
        from catjax.models import decode_kernel, decoder

        cfg = self.cfg
        kv, h, rep = cfg.num_kv_heads, cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
        # A cache of its own for each call: read twice, a cache can come from L2, and XLA's
        # dot merger joins the GEMMs of calls that share an operand (run 2 of 2026-11-30 used
        # 13 caches for 48 calls: XLA's figure, 3.3 TB/s of live bytes, was that).
        calls = copies = 4 if self.args.tiny else 48  # interpreted on a CPU: few
        keys = iter(jax.random.split(jax.random.key(0), 1 + 2 * copies))
        qs = jax.random.normal(next(keys), (calls, b, kv, rep, h), jnp.bfloat16)
        ks, vs = ([jax.random.normal(next(keys), (b, kv, slots, h), jnp.bfloat16)
                   for _ in range(copies)] for _ in range(2))
        start, end = jnp.zeros(b, jnp.int32), jnp.full(b, live, jnp.int32)
        mask = jnp.arange(slots)[None, None] < live  # [1, 1, S]: every row at `live`

        def xla(q, k, v, start, end):
            out = decoder._attend(cfg, q.reshape(b, 1, kv * rep, h), k, v, mask)
            return out.reshape(b, kv, rep, h)

        def truth(q, k, v):
            s = jnp.einsum("bkrh,bksh->bkrs", q.astype(jnp.float32), k.astype(jnp.float32),
                           precision="highest") * cfg.attn_scale
            p = jax.nn.softmax(jnp.where(mask[:, None], s, -jnp.inf), axis=-1)
            return jnp.einsum("bkrs,bksh->bkrh", p, v.astype(jnp.float32), precision="highest")

        def us_per_call(fn):
            def loop(qs, ks, vs, start, end):
                acc = jnp.float32(0)
                for i in range(calls):  # a new query and the next cache each call
                    acc += fn(qs[i], ks[i % copies], vs[i % copies], start, end)[0, 0, 0, 0]
                return acc
            looped = jax.jit(loop)
            return timeit(lambda: looped(qs, ks, vs, start, end), 5) / calls * 1e6

        def err(fn):
            out = jax.jit(fn)(qs[0], ks[0], vs[0], start, end).astype(jnp.float32)
            return float(jnp.max(jnp.abs(out - ref)))

        ref = jax.jit(truth)(qs[0], ks[0], vs[0])
        out = {"xla_us": us_per_call(xla), "xla_maxdiff": err(xla)}
        for bk, warps, stages, splits in cases:
            def fn(q, k, v, start, end, bk=bk, w=warps, st=stages, sp=splits):
                return decode_kernel.decode_attention(q, k, v, start, end, scale=cfg.attn_scale,
                                                      block_k=bk, num_warps=w, num_stages=st,
                                                      splits=sp)
            key = f"pallas_block{bk}_warps{warps}_stages{stages}_splits{splits or 'rule'}"
            try:
                out[key + "_maxdiff"] = err(fn)
                out[key + "_us"] = us_per_call(fn)
            except Exception as e:  # one setting failing to compile must not lose the others
                out[key + "_error"] = f"{type(e).__name__}: {e}"[:200]
        nbytes = 2 * b * kv * live * h * 2  # keys and values a layer must read
        self.rows[name] = dict(out, live_bytes=nbytes, rows=b, slots=slots, live=live,
                               caches=copies, rule_splits=decode_kernel.num_splits(b, kv, slots))
        print(f"{name}: {b} rows at {live} of {slots} slots ({nbytes / 2**20:.1f} MiB live, "
              f"{copies} caches), us a call (TB/s of live bytes) [max |diff| from float32]: " +
              ", ".join(f"{k[:-3]} {t:.1f} ({nbytes / t / 1e6:.2f}) "
                        f"[{out.get(k[:-3] + '_maxdiff', float('nan')):.1e}]"
                        for k, t in out.items() if k.endswith("_us")), flush=True)

    def decode_variants(self):
        """The windows of a shared-prompt layout (0: one loop over all slots); on the faster
        layout cuBLAS in place of Triton GEMMs, and the sampling settings."""
        shared = self.best if self.best in ("rows_first", "weights_first") else "rows_first"
        for w in (0, 32, 64, 128):
            self._try(f"decode_{shared}_window{w}", shared, window=w)
        cublas = {"xla_gpu_enable_triton_gemm": False}
        self._try(f"decode_{self.best}_cublas", self.best, options=cublas)
        self._try("decode_greedy", self.best, sp=(0.0, 0, 1.0))
        self._try("decode_greedy_window0", self.best, sp=(0.0, 0, 1.0), window=0)
        self._try("decode_qwen3_config", self.best, sp=(0.7, 20, 0.8))  # configs/common.py

    def decode_long(self):
        """1024 new tokens, where the cache outweighs the weights: one loop over every slot
        against windows, the Qwen 3 configs' sampling."""
        for layout, w in (("unrolled", 0), ("rows_first", 0), ("rows_first", 64),
                          ("rows_first", 128)):
            self._try(f"decode_long_{layout}_window{w}", layout, sp=(0.7, 20, 0.8), window=w,
                      n=1024)

    def _try(self, name, *args, **kw):
        """One decode case; a failure is recorded and the next case runs."""
        try:
            self.calls[name] = self._decode(name, *args, **kw)
        except Exception as e:
            traceback.print_exc()
            self.rows[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]

    # --- 3 -------------------------------------------------------------------------------------
    def draw_costs(self):
        """GPU time of one call at 64 x vocabulary: 50 calls inside one jit, minus the loop."""
        v = self.cfg.vocab_size
        rng = np.random.default_rng(0)
        peaked = jnp.asarray(rng.normal(size=(64, v)).astype(np.float32) * 8)  # small nuclei
        flat = jnp.asarray(rng.normal(size=(64, v)).astype(np.float32) * 0.02)  # random model
        key = jax.random.key(0)

        def per_call_us(fn, x, n=50):
            def loop(x):
                def body(i, acc):
                    out = fn(x + i.astype(jnp.float32) * 1e-9)  # a new input every call
                    return acc + sum(jnp.sum(o.astype(jnp.float32)) for o in jax.tree.leaves(out))
                return jax.lax.fori_loop(0, n, body, jnp.float32(0))
            looped = jax.jit(loop)
            return timeit(lambda: looped(x), 5) / n * 1e6

        base = per_call_us(lambda a: a[:, :1], peaked)
        sps = {"top_p0.95": (0.7, 0, 0.95), "top_k20": (0.7, 20, 1.0),
               "top_k20_top_p0.8": (0.7, 20, 0.8), "top_p1": (0.7, 0, 1.0), "greedy": (0.0, 0, 1.0)}
        cases = {f"draw_{k}": (lambda a, sp=sp: sampling.draw(a, key, sampling.SamplingParams(*sp)))
                 for k, sp in sps.items()}
        cases["draw_top_p0.95_flat"] = cases["draw_top_p0.95"]
        for blk in (0, 32, 64, 128):  # 0: one lax.top_k over the row (a sort here)
            cases[f"top_k20_block{blk}"] = lambda a, blk=blk: sampling._top_k(a, 20, blk)[:2]
        for blk in (0, 16, 32):
            cases[f"nucleus_block{blk}"] = (
                lambda a, blk=blk: sampling._nucleus_mask(a / 0.7, 0.95, block=blk))
        for ways, passes in ((1, 24), (16, 6)):
            cases[f"threshold_search_{ways}x{passes}"] = (
                lambda a, w=ways, p=passes: sampling._nucleus_threshold(
                    jax.nn.softmax(a, -1), 0.95, w, p))
        out = {}
        for name, fn in cases.items():
            out[name + "_us"] = per_call_us(fn, flat if name.endswith("flat") else peaked) - base
        self.rows["draw"] = out
        print("GPU time per call at 64 x vocabulary (us): " +
              ", ".join(f"{k[:-3]} {v:.0f}" for k, v in out.items()), flush=True)

    def profile(self):
        """Greedy calls of the faster layout with and without windows, and of the Pallas attention
        (or the first call timed), traced; device time summed by kernel."""
        from jax.profiler import ProfileData
        names = [k for k in ("decode_greedy", "decode_greedy_window0",
                             "decode_unrolled_pallas_greedy") if k in self.calls]
        report = {}
        for name in names or [f"decode_{self.best}"]:
            d = tempfile.mkdtemp()
            jax.profiler.start_trace(d)
            jax.block_until_ready(self.calls[name]())
            jax.profiler.stop_trace()
            path = sorted(glob.glob(f"{d}/**/*.xplane.pb", recursive=True))[-1]
            report[name] = self._kernel_summary(ProfileData.from_file(path), name)
        self.rows["profile_top_ms"] = report
        with open(os.path.join(self.out, "profile_summary.json"), "w") as f:
            json.dump(report, f, indent=1)

    def _kernel_summary(self, data, name):
        steps = self.args.new_tokens
        out = {}
        for plane in data.planes:
            if "GPU" not in plane.name and not self.args.tiny:
                continue
            for line in plane.lines:
                if "Stream" not in line.name and not (self.args.tiny and "XLA Ops" in line.name):
                    continue
                tot, count = defaultdict(float), 0
                for ev in line.events:
                    tot[ev.name] += ev.duration_ns
                    count += 1
                items = sorted(tot.items(), key=lambda kv: -kv[1])
                total = sum(v for _, v in items)
                if total == 0:
                    continue
                print(f"profile {name} {line.name}: {total / 1e6 / steps:.3f} ms a decode step "
                      f"in {count / steps:.0f} kernels; top (ms a step, share):", flush=True)
                for k, ns in items[:22]:
                    print(f"   {ns / 1e6 / steps:8.4f}  {ns / total:6.1%}  {k[:100]}")
                out[line.name] = dict(kernels_per_step=count / steps,
                                      top=[(k, ns / 1e6) for k, ns in items[:40]])
        return out

    # --- 4 -------------------------------------------------------------------------------------
    def _one(self, prompts, temperature, **kw):
        """One N-token row per prompt, with `sample`'s defaults unless `kw` says otherwise."""
        return sampling.sample(self.cfg, self.params, prompts, num_samples=1,
                               max_new_tokens=self.args.new_tokens, stop_ids=(),
                               rng=jax.random.key(2), temperature=temperature, logprobs=False,
                               **kw).tokens

    def synthesis(self):
        """Per question: the anchor reads G x N rollout tokens (plus ~150 of instructions) and
        writes N greedily, against one more N-token rollout of the 64-token question. Token ids
        are random: the cost depends on lengths only."""
        cfg, n, g = self.cfg, self.args.new_tokens, ROWS_PER_PROMPT
        rng = np.random.default_rng(1)
        for questions in (4, 32):
            syn = [list(rng.integers(100, cfg.vocab_size - 100, g * n + 150))
                   for _ in range(questions)]
            qs = (self.prompts * 4)[:questions]
            t_syn = timeit(lambda syn=syn: self._one(syn, 0.0), 3)
            t_roll = timeit(lambda qs=qs: self._one(qs, 1.0), 3)
            self.rows[f"synthesis_{questions}q"] = dict(
                synthesis_s=t_syn, rollout_s=t_roll, synthesis_vs_rollout=t_syn / t_roll,
                synthesis_prompt_tokens=len(syn[0]))
            print(f"synthesis vs one more rollout, {questions} questions, N={n}: {t_syn:.3f} vs "
                  f"{t_roll:.3f} s = {t_syn / t_roll:.2f}x", flush=True)
            if questions != 4:
                continue
            # Drafted (`sampling.sample(draft_tokens=4)`): the same tokens in fewer passes; what
            # a pass over 5 tokens a row costs against a plain step decides its default here.
            tokens, lengths = sampling.pad_prompts(syn, 0, None)
            kw = dict(num_samples=1, max_new_tokens=n, draft_tokens=4, stop_ids=(), pad_id=0,
                      cache_dtype=sampling.default_cache_dtype(cfg), mesh=None, unrolled=True)
            passes = int(drafting.sample_drafted(cfg, self.params, jnp.asarray(tokens),
                                                 jnp.asarray(lengths), **kw)[1])
            t_dr = timeit(lambda syn=syn: self._one(syn, 0.0, draft_tokens=4,
                                                    decode_layout="unrolled"), 3)
            self.rows[f"synthesis_{questions}q"].update(
                drafted_s=t_dr, drafted_passes=passes, drafted_vs_rollout=t_dr / t_roll)
            print(f"  drafted (4 a pass): {t_dr:.3f} s in {passes} passes for {n} tokens = "
                  f"{t_dr / t_roll:.2f}x one more rollout", flush=True)
            # XLA's attention in the faster of its layouts (GPUs default to the Pallas kernel).
            t_x = timeit(lambda syn=syn: self._one(syn, 0.0, decode_layout=self.best,
                                                   decode_attention="xla"), 3)
            self.rows[f"synthesis_{questions}q"].update(xla_s=t_x, xla_vs_rollout=t_x / t_roll,
                                                        xla_layout=self.best)
            print(f"  {self.best} with XLA's attention: {t_x:.3f} s = {t_x / t_roll:.2f}x one "
                  f"more rollout", flush=True)

    # --- 5 -------------------------------------------------------------------------------------
    def train(self):
        cfg = self.cfg
        b, t_len = (2, 128) if self.args.tiny else (8, 1024)
        toks = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t_len)),
                           jnp.int32)
        tcfg = cfg.replace(remat=True)

        def loss(p):
            logits = models.forward(tcfg, p, toks)
            return -jnp.mean(jax.nn.log_softmax(logits, -1)[..., 0])

        grad = jax.jit(jax.grad(loss))
        t = timeit(lambda: grad(self.params), repeats=3)
        flops = 3 * b * t_len * models.num_flops_per_token(cfg, t_len // 2)
        self.rows["train"] = dict(tokens=b * t_len, step_s=t, mfu=flops / t / self.peak,
                                  hfu=flops * 4 / 3 / t / self.peak)
        print(f"train step {b}x{t_len}: {t * 1e3:.0f} ms, MFU {flops / t / self.peak:.1%} "
              f"(with the remat forward {flops * 4 / 3 / t / self.peak:.1%})", flush=True)

    # --- 6 -------------------------------------------------------------------------------------
    def vs_transformers(self):
        import torch
        import transformers
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        if dev == "cpu" and not self.args.tiny:
            print("[vs_transformers] no CUDA torch here", flush=True)
            return
        with tempfile.TemporaryDirectory() as d:
            hf.save_hf_dir(self.cfg, self.params, d, dtype="bfloat16")
            ref = transformers.AutoModelForCausalLM.from_pretrained(
                d, dtype=torch.bfloat16).to(dev).eval()
            cfg2, loaded = models.from_pretrained(d)
        g, n = ROWS_PER_PROMPT, 128
        kw = dict(num_samples=g, max_new_tokens=n, temperature=0.7, top_p=0.95, stop_ids=(),
                  logprobs=False)  # `sample`'s own layout and attention: what users run
        held = {"params": loaded}
        t_ours = timeit(lambda: sampling.sample(cfg2, held["params"], self.prompts[:4],
                                                rng=jax.random.key(2), **kw).tokens, repeats=3)
        held.clear()
        ids = torch.tensor(self.prompts[:4]).to(dev)

        def gen():
            with torch.no_grad():
                out = ref.generate(ids, do_sample=True, temperature=0.7, top_p=0.95, top_k=0,
                                   num_return_sequences=g, max_new_tokens=n, min_new_tokens=n,
                                   pad_token_id=0)
            if dev == "cuda":
                torch.cuda.synchronize()
            return out

        gen()
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            gen()
            ts.append(time.perf_counter() - t0)
        t_hf = float(np.median(ts))
        rows = 4 * g
        self.rows["vs_transformers"] = dict(catjax_tok_s=rows * n / t_ours,
                                            transformers_tok_s=rows * n / t_hf, ratio=t_hf / t_ours)
        print(f"sampler 4x8 rows x {n}: catjax {rows * n / t_ours:,.0f} tok/s, transformers "
              f"{rows * n / t_hf:,.0f} tok/s: {t_hf / t_ours:.2f}x", flush=True)

    def table(self):
        r = self.rows
        print("\n| check | figure |\n|---|---|")
        if "ceilings" in r:
            c = r["ceilings"]
            print(f"| bf16 matmul peak | {c['matmul_tflops']:.0f} TFLOP/s |")
            print(f"| bandwidth: copy (read + write) / read-only | {c['copy_tbs']:.2f} / "
                  f"{c['read_tbs']:.2f} TB/s |")
        for k in (k for k in r if k.startswith("decode_") and not k.endswith("_error")):
            print(f"| {k} | {r[k]['tok_s']:,.0f} tok/s, {r[k]['step_ms']:.3f} ms/step = "
                  f"{r[k]['frac_of_roofline']:.0%} of the roofline ("
                  f"{r[k]['frac_of_shared_roofline']:.0%} with prompts read once) |")
        for k in ("synthesis_4q", "synthesis_32q"):
            if k in r:
                print(f"| {k} vs one more rollout | {r[k]['synthesis_vs_rollout']:.2f}x |")
                if "xla_vs_rollout" in r[k]:
                    print(f"| {k} with XLA's attention ({r[k]['xla_layout']}) vs one more rollout | "
                          f"{r[k]['xla_vs_rollout']:.2f}x |")
                if "drafted_vs_rollout" in r[k]:
                    print(f"| {k} drafted ({r[k]['drafted_passes']} passes) vs one more rollout | "
                          f"{r[k]['drafted_vs_rollout']:.2f}x |")
        if "pallas_greedy_agreement" in r:
            print(f"| greedy rows identical, Pallas vs XLA attention | "
                  f"{r['pallas_greedy_agreement']['rows_identical']:.0%} |")
        for name in ("attention_one_layer", "attention_one_layer_synthesis"):
            a = r.get(name, {})
            timed = [k for k in a if k.startswith("pallas") and k.endswith("_us")]
            if timed:
                best = min(timed, key=a.get)
                print(f"| {name}: XLA / best kernel ({best[7:-3]}) | {a['xla_us']:.1f} / "
                      f"{a[best]:.1f} us a call |")
        if "train" in r:
            print(f"| train MFU | {r['train']['mfu']:.1%} |")
        if "vs_transformers" in r:
            print(f"| sampler vs transformers | {r['vs_transformers']['ratio']:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=450.0)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--tiny", action="store_true", help="a small model: a dry run on a CPU")
    ap.add_argument("--skip", default="", type=lambda v: set(filter(None, v.split(","))),
                    help="sections to leave out, comma-separated (e.g. draw_costs,train)")
    args = ap.parse_args()
    dev = jax.devices()[0]
    print("device:", dev.device_kind, "| jax", jax.__version__, flush=True)
    b = Bench(args)
    b.run("ceilings", 0, b.ceilings)
    b.run("model", 0, b.build_model)
    b.run("decode_layouts", 0, b.decode_layouts)
    if not hasattr(b, "best"):
        b.best = "unrolled"
    b.run("decode_kernel", 150, b.decode_kernel)
    b.run("decode_variants", 100, b.decode_variants)
    b.run("decode_long", 120, b.decode_long)
    b.run("draw_costs", 30, b.draw_costs)
    if b.calls:
        b.run("profile", 40, b.profile)
    b.run("synthesis", 120, b.synthesis)
    b.run("train", 60, b.train)
    b.run("vs_transformers", 60, b.vs_transformers)
    b.table()
    print(json.dumps({"device": dev.device_kind, **{k: v for k, v in b.rows.items()
                                                  if k != "profile_top_ms"}}))


if __name__ == "__main__":
    main()
