"""The tokenizer embedded in a GGUF file, rebuilt as a Hugging Face `tokenizers.Tokenizer`.

A GGUF stores llama.cpp's view of the tokenizer: the vocabulary, the merges, a type per token
and the name of the pre-tokenizer (`tokenizer.ggml.pre`). We support byte-level BPE vocabularies
(`tokenizer.ggml.model == "gpt2"`), and split text with the regexes llama.cpp uses for each
pre-tokenizer name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from catjax.gguf_file import read_metadata
from catjax.text.hf_backend import HFTokenizer
from catjax.text.tiktoken_backend import LLAMA3_SPLIT

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGIT = r"\p{N}"  # one numeral per piece

# tokenizer.ggml.pre -> the regexes applied in turn (as llama.cpp's llama-vocab does).
PRE_SPLITS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("default", "gpt2", "gpt-2"), (_GPT2_SPLIT,)),
    # Vocabularies trained with every digit apart (SmolLM, StarCoder): digits first.
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell"),
                    (_DIGIT, _GPT2_SPLIT)),
    **dict.fromkeys(("llama3", "llama-bpe", "llama-v3", "smaug-bpe", "dbrx", "falcon3"),
                    (LLAMA3_SPLIT,)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), (_QWEN2_SPLIT,)),
}

# llama.cpp token types.
_CONTROL, _USER_DEFINED = 3, 4


def load_gguf_tokenizer(path: str | Path) -> HFTokenizer:
    meta = read_metadata(path)
    return HFTokenizer(build_backend(meta, str(path)), str(path), _config(meta),
                       extra_eos=_extra_eos(meta))


def build_backend(meta: dict[str, Any], where: str) -> Any:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{where}: GGUF tokenizer model {kind!r} is not supported (only "
                         "byte-level BPE 'gpt2'); load the model's own tokenizer files instead")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_SPLITS:
        raise ValueError(f"{where}: GGUF pre-tokenizer {pre!r} is not supported "
                         f"({', '.join(sorted(PRE_SPLITS))})")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", ())]
    vocab = {t: i for i, t in enumerate(tokens)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    # Control tokens (<|im_end|>) are special; user-defined ones (<think>) are matched whole but
    # kept when decoding: the split transformers and llama.cpp make.
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types, strict=True) if ty == _CONTROL])
    tk.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, ty in zip(tokens, types, strict=True) if ty == _USER_DEFINED])
    return tk


def _config(meta: dict[str, Any]) -> dict[str, Any]:
    """tokenizer_config.json-style fields from the GGUF metadata."""
    tokens = meta["tokenizer.ggml.tokens"]
    cfg: dict[str, Any] = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("pad_token", "padding_token_id"), ("unk_token", "unknown_token_id")):
        i = meta.get(f"tokenizer.ggml.{key}")
        cfg[name] = tokens[i] if i is not None and 0 <= i < len(tokens) else None
    if "tokenizer.ggml.add_bos_token" in meta:
        cfg["add_bos_token"] = bool(meta["tokenizer.ggml.add_bos_token"])
    if "tokenizer.chat_template" in meta:
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    return cfg


def _extra_eos(meta: dict[str, Any]) -> list[int]:
    keys = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    return [meta[k] for k in keys if isinstance(meta.get(k), int)]
