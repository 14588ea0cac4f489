"""GPU checks (run by bench/gpu.sh on an NVIDIA machine; no network needed).

1. Decode throughput of a ~1B Qwen 3 config (random bf16 weights, bf16 KV cache) vs the
   HBM-bandwidth roofline (bytes read per step = weights + live cache; bandwidth measured here).
2. Training-step MFU: forward + backward of the same model vs the measured bf16 matmul peak.
3. catjax vs transformers `generate` on the same GPU and the same weights.
Prints a short table last and one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from catjax import models, sampling  # noqa: E402
from catjax.models import hf  # noqa: E402


def timeit(fn, repeats=5):
    jax.block_until_ready(fn())
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def main():
    dev = jax.devices()[0]
    print("device:", dev.device_kind, "jax", jax.__version__, flush=True)
    # Measured ceilings.
    x = jnp.ones((8192, 8192), jnp.bfloat16)
    mm = jax.jit(lambda a: a @ a)
    t = timeit(lambda: mm(x))
    peak = 2 * 8192**3 / t
    big = jnp.ones((1 << 30,), jnp.bfloat16)  # 2 GiB
    inc = jax.jit(lambda a: a + 1)
    t = timeit(lambda: inc(big))
    bw = 2 * big.nbytes / t  # read + write
    x = big = None  # free the buffers
    print(f"bf16 matmul peak {peak / 1e12:.0f} TFLOP/s, copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)

    cfg = models.get_preset("qwen3_4b").replace(num_layers=16, hidden_size=2048, mlp_dim=6144,
                                                num_heads=16, num_kv_heads=8, dtype="bfloat16",
                                                max_position=4096)
    params = models.init_params(cfg, jax.random.key(0))
    nbytes = sum(a.nbytes for a in jax.tree.leaves(params))
    print(f"model: {models.param_count(params) / 1e9:.2f}B params, {nbytes / 2**30:.2f} GiB", flush=True)

    rows = {}
    prompts = [list(np.random.default_rng(i).integers(100, 30000, 64)) for i in range(8)]
    for g, n in ((8, 256),):
        kw = dict(num_samples=g, max_new_tokens=n, temperature=0.7, top_p=0.95, stop_ids=())
        t = timeit(lambda kw=kw: sampling.sample(cfg, params, prompts, rng=jax.random.key(1), **kw).tokens,
                   repeats=3)
        r = len(prompts) * g
        tok_s = r * n / t
        # Roofline: every step reads all weights once plus the live KV cache (bf16).
        slots = 64 + n / 2  # mean live context over the run
        cache = 2 * cfg.num_layers * r * cfg.num_kv_heads * slots * cfg.head_dim * 2
        roof = r / ((nbytes + cache) / (bw / 2))  # bw/2: bytes read per second
        rows["decode"] = dict(rows=r, new_tokens=n, tok_s=tok_s, roofline_tok_s=roof,
                              frac_of_roofline=tok_s / roof)
        print(f"decode {r} rows x {n}: {tok_s:,.0f} tok/s = {tok_s / roof:.0%} of roofline "
              f"({roof:,.0f})", flush=True)

    # Training step: loss = mean log-prob of a [B, T] batch, forward + backward (+ AdamW-free).
    b, t_len = 8, 1024
    toks = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t_len)), jnp.int32)
    tcfg = cfg.replace(remat=True)

    def loss(p):
        logits = models.forward(tcfg, p, toks)
        return -jnp.mean(jax.nn.log_softmax(logits, -1)[..., 0])

    grad = jax.jit(jax.grad(loss))
    t = timeit(lambda: grad(params), repeats=3)
    flops = 3 * b * t_len * models.num_flops_per_token(cfg, t_len // 2)
    flops_remat = flops * 4 / 3  # the forward runs twice with remat
    rows["train"] = dict(tokens=b * t_len, step_s=t, mfu=flops / t / peak,
                         hfu=flops_remat / t / peak)
    print(f"train step {b}x{t_len}: {t * 1e3:.0f} ms, MFU {flops / t / peak:.1%} "
          f"(HW util with remat {flops_remat / t / peak:.1%})", flush=True)

    # catjax vs transformers generate, same weights.
    try:
        import torch
        import transformers
    except ImportError:
        torch = None
    if torch is not None and torch.cuda.is_available():
        with tempfile.TemporaryDirectory() as d:
            hf.save_hf_dir(cfg, params, d, dtype="bfloat16")
            del params
            ref = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).cuda().eval()
            cfg2, params2 = models.from_pretrained(d)
        g, n = 8, 128
        kw = dict(num_samples=g, max_new_tokens=n, temperature=0.7, top_p=0.95, stop_ids=())
        t_ours = timeit(
            lambda: sampling.sample(cfg2, params2, prompts[:4], rng=jax.random.key(2), **kw).tokens,
            repeats=3)
        ids = torch.tensor([p for p in prompts[:4]]).cuda()
        def gen():
            with torch.no_grad():
                out = ref.generate(ids, do_sample=True, temperature=0.7, top_p=0.95, top_k=0,
                                   num_return_sequences=g, max_new_tokens=n, min_new_tokens=n,
                                   pad_token_id=0)
            torch.cuda.synchronize()
            return out
        gen()
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            gen()
            ts.append(time.perf_counter() - t0)
        t_hf = float(np.median(ts))
        rows["vs_transformers"] = dict(catjax_tok_s=32 * n / t_ours, transformers_tok_s=32 * n / t_hf,
                                       ratio=t_hf / t_ours)
        print(f"sampler 4x8 rows x {n}: catjax {32 * n / t_ours:,.0f} tok/s, transformers "
              f"{32 * n / t_hf:,.0f} tok/s, ratio {t_hf / t_ours:.2f}x", flush=True)
    print("\n| check | figure |\n|---|---|")
    print(f"| bf16 matmul peak | {peak / 1e12:.0f} TFLOP/s |")
    print(f"| copy bandwidth | {bw / 1e12:.2f} TB/s |")
    if "decode" in rows:
        print(f"| decode vs roofline | {rows['decode']['frac_of_roofline']:.0%} |")
    print(f"| train MFU | {rows['train']['mfu']:.1%} |")
    if "vs_transformers" in rows:
        print(f"| sampler vs transformers | {rows['vs_transformers']['ratio']:.2f}x |")
    print(json.dumps({"device": dev.device_kind, "peak_tflops": peak / 1e12, "bw_tbs": bw / 1e12,
                      **rows}))


if __name__ == "__main__":
    main()
