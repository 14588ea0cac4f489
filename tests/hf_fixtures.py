"""Tiny random `transformers` models of each family, written to disk (float32, eager attention)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-6,
            max_position_embeddings=512)


def hf_config(family: str, **overrides):
    kw = dict(BASE)
    if family == "llama":
        kw.update(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 32},
                  tie_word_embeddings=False)
        kw.update(overrides)
        return transformers.LlamaConfig(**kw)
    if family == "qwen3":
        kw.update(rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                  tie_word_embeddings=True)
        kw.update(overrides)
        return transformers.Qwen3Config(**kw)
    if family == "gemma3":
        kw.update(sliding_window=8, query_pre_attn_scalar=20, sliding_window_pattern=3,
                  num_hidden_layers=4,
                  rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                      "rope_theta": 1_000_000.0},
                                   "sliding_attention": {"rope_type": "default",
                                                         "rope_theta": 10_000.0}})
        kw.update(overrides)
        return transformers.Gemma3TextConfig(**kw)
    raise ValueError(family)


def make_hf_model(family: str, directory: str, seed: int = 0, **overrides):
    """Build, randomise (norms included: Gemma's zero init would hide a w vs 1+w bug), save."""
    torch.manual_seed(seed)
    cfg = hf_config(family, **overrides)
    cls = {"llama": transformers.LlamaForCausalLM, "qwen3": transformers.Qwen3ForCausalLM,
           "gemma3": transformers.Gemma3ForCausalLM}[family]
    cfg._attn_implementation = "eager"
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (0.0 if family == "gemma3" else 1.0))
            else:
                p.copy_(torch.randn_like(p) * 0.08)
    model.save_pretrained(directory, safe_serialization=True)
    return model


def hf_logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def hf_greedy(model, prompt: list[int], max_new_tokens: int, stop: int) -> list[int]:
    """`transformers`' greedy continuation of `prompt`, the stop token kept, no padding after it."""
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=stop, pad_token_id=0)[0, len(prompt):].tolist()
    while ref and ref[-1] == 0 and stop in ref:  # transformers pads after eos
        ref.pop()
    return ref
