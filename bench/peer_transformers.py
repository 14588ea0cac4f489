"""Peer worker: Hugging Face `generate` throughput on the shared rollout workload.

    .venv-peers/bin/python bench/peer_transformers.py --task sampler --model DIR --new-tokens N

The 4 chat-templated questions, `num_return_sequences=8` each (32 rows), left-padded as
`generate` expects, float32 on the CPU, exactly N new tokens per row (`min_new_tokens=N`),
temperature/top-p as given and no top-k. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import transformers  # noqa: E402
import workload  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", choices=["sampler"], default="sampler")
    ap.add_argument("--model", required=True)
    ap.add_argument("--new-tokens", type=int, required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=workload.TEMPERATURE)
    ap.add_argument("--top-p", type=float, default=workload.TOP_P)
    args = ap.parse_args()
    n, g = args.new_tokens, workload.NUM_SAMPLES

    tok = transformers.AutoTokenizer.from_pretrained(args.model)
    tok.padding_side = "left"
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    texts = [tok.apply_chat_template(workload.messages(q), add_generation_prompt=True,
                                     tokenize=False) for q, _ in workload.QUESTIONS]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)

    def run():
        with torch.no_grad():
            out = model.generate(**batch, do_sample=True, temperature=args.temperature,
                                 top_p=args.top_p, top_k=0, num_return_sequences=g,
                                 max_new_tokens=n, min_new_tokens=n, pad_token_id=tok.pad_token_id)
        assert out.shape == (len(texts) * g, batch["input_ids"].shape[1] + n), out.shape
        return out

    times, first = workload.timed(run, args.repeats)
    rows = len(texts) * g
    workload.emit({
        "library": "transformers", "version": transformers.__version__,
        "torch": torch.__version__, "task": "sampler", "model": os.path.basename(args.model),
        "rows": rows, "new_tokens": n, "temperature": args.temperature, "top_p": args.top_p,
        "times_s": times, "first_s": first, **workload.summary(times),
        "tokens_per_s": rows * n / workload.summary(times)["median_s"],
        "peak_rss_mb": workload.peak_rss_mb(),
    })


if __name__ == "__main__":
    main()
