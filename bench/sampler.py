"""Rollout sampling throughput: catjax vs transformers `generate`, same weights and settings.

    .venv/bin/python bench/sampler.py [--repeats 3] [--new-tokens 128] [--models smollm2,tiny_qwen3]

4 prompts x G=8 samples = 32 rows, T 0.7, top-p 0.95 (no top-k), every row generates exactly
`--new-tokens` tokens (no stop token) so both sides do the same work. Both run float32 on the CPU.
Reports generated tokens/s (median, min-max over repeats; catjax's compile is timed separately)
and the ratio; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from catjax import loading, models, sampling  # noqa: E402

PROMPTS = [
    "What is 17 + 25? Answer briefly.",
    "Write one sentence about the sea.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
    "in May. How many clips did Natalia sell altogether in April and May?",
    "List three prime numbers.",
]


def tiny_qwen3(directory: str):
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(
        vocab_size=32_000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, head_dim=32, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, max_position_embeddings=2048)
    model = transformers.Qwen3ForCausalLM(cfg)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def load_pair(name: str, tmp: str):
    if name == "smollm2":
        path = loading.smollm2_path()
        ref = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    else:
        path = tiny_qwen3(os.path.join(tmp, name))
        ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    cfg, params = models.from_pretrained(path)
    return cfg, params, ref.eval()


def prompt_ids(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    # Byte-ish ids keep both models on the same inputs without a tokenizer dependency.
    return [rng.integers(100, min(vocab, 30_000), size=len(p.split()) * 2).tolist() for p in PROMPTS]


def time_catjax(cfg, params, prompts, g, n, repeats):
    kw = dict(num_samples=g, max_new_tokens=n, temperature=0.7, top_p=0.95, stop_ids=())
    t0 = time.perf_counter()
    jax.block_until_ready(sampling.sample(cfg, params, prompts, rng=jax.random.key(0), **kw).tokens)
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        out = sampling.sample(cfg, params, prompts, rng=jax.random.key(i + 1), **kw)
        jax.block_until_ready(out.tokens)
        times.append(time.perf_counter() - t0)
    assert int(np.asarray(out.lengths).min()) == n
    return times, compile_s


def time_transformers(model, prompts, g, n, repeats):
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as generate expects
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    times = []
    for i in range(repeats):
        torch.manual_seed(i)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=0.7,
                                 top_p=0.95, top_k=0, num_return_sequences=g, max_new_tokens=n,
                                 min_new_tokens=n, pad_token_id=0)
        times.append(time.perf_counter() - t0)
    assert out.shape[1] - width == n
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--models", default="smollm2,tiny_qwen3")
    args = ap.parse_args()
    g, n = args.samples, args.new_tokens
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            cfg, params, ref = load_pair(name, tmp)
            prompts = prompt_ids(cfg.vocab_size)
            rows = len(prompts) * g
            ours, compile_s = time_catjax(cfg, params, prompts, g, n, args.repeats)
            theirs = time_transformers(ref, prompts, g, n, args.repeats)
            tps = lambda ts, rows=rows: [rows * n / t for t in ts]  # noqa: E731
            r = {
                "catjax_tok_s": statistics.median(tps(ours)),
                "catjax_tok_s_range": [min(tps(ours)), max(tps(ours))],
                "catjax_compile_s": compile_s,
                "transformers_tok_s": statistics.median(tps(theirs)),
                "transformers_tok_s_range": [min(tps(theirs)), max(tps(theirs))],
            }
            r["ratio"] = r["catjax_tok_s"] / r["transformers_tok_s"]
            results[name] = r
            print(f"{name:<12} catjax {r['catjax_tok_s']:8.1f} tok/s "
                  f"[{r['catjax_tok_s_range'][0]:.1f}-{r['catjax_tok_s_range'][1]:.1f}] "
                  f"(compile {compile_s:.1f}s) | transformers {r['transformers_tok_s']:8.1f} tok/s "
                  f"[{r['transformers_tok_s_range'][0]:.1f}-{r['transformers_tok_s_range'][1]:.1f}]"
                  f" | ratio {r['ratio']:.2f}x", flush=True)
    summary = {"rows": len(PROMPTS) * g, "new_tokens": n, "repeats": args.repeats,
               "jax": jax.__version__, "torch": torch.__version__,
               "transformers": transformers.__version__,
               **{f"sampler_vs_transformers_{k}": v["ratio"] for k, v in results.items()},
               "results": results}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
