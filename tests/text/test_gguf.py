"""GGUF tokenizers: one built from Qwen 3's vocabulary against Qwen 3's own tokenizer.json, and
the tokenizer kinds we refuse. (The file reader itself: tests/test_gguf_file.py.)"""

from __future__ import annotations

import json

import pytest

from catjax import text


def _write_gguf(path, endian=None, **fields):
    import gguf

    w = gguf.GGUFWriter(str(path), arch="llama",
                        endianess=endian if endian is not None else gguf.GGUFEndian.LITTLE)
    for key, (value, vtype) in fields.items():
        w.add_key_value(key, value, vtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def qwen3_as_gguf(qwen3_dir, tmp_path_factory):
    """Qwen 3's vocabulary, merges and added tokens written the way llama.cpp's converter does."""
    import gguf

    spec = json.loads((qwen3_dir / "tokenizer.json").read_text())
    tokens = list(spec["model"]["vocab"])
    assert [spec["model"]["vocab"][t] for t in tokens] == list(range(len(tokens)))
    types = [1] * len(tokens)
    for a in spec["added_tokens"]:
        assert a["id"] == len(tokens)
        tokens.append(a["content"])
        types.append(3 if a["special"] else 4)  # control / user-defined
    T = gguf.GGUFValueType
    config = json.loads((qwen3_dir / "tokenizer_config.json").read_text())
    return _write_gguf(
        tmp_path_factory.mktemp("gguf") / "qwen3.gguf",
        **{"tokenizer.ggml.model": ("gpt2", T.STRING), "tokenizer.ggml.pre": ("qwen2", T.STRING),
           "tokenizer.ggml.tokens": (tokens, T.ARRAY),
           "tokenizer.ggml.token_type": (types, T.ARRAY),
           "tokenizer.ggml.merges": ([" ".join(m) for m in spec["model"]["merges"]], T.ARRAY),
           "tokenizer.ggml.eos_token_id": (151645, T.UINT32),
           "tokenizer.ggml.padding_token_id": (151643, T.UINT32),
           "tokenizer.ggml.bos_token_id": (151643, T.UINT32),
           "tokenizer.ggml.add_bos_token": (False, T.BOOL),
           "tokenizer.chat_template": (config["chat_template"], T.STRING)})


def test_gguf_qwen2_pretokenizer_matches_tokenizer_json(qwen3_as_gguf, qwen3_tok, nfc_corpus):
    tok = text.load_tokenizer(qwen3_as_gguf)
    assert isinstance(tok, text.HFTokenizer) and tok.vocab_size == qwen3_tok.vocab_size
    # The GGUF has no NFC normaliser (llama.cpp applies none), hence the NFC texts.
    assert [tok.encode(t) for t in nfc_corpus] == [qwen3_tok.encode(t) for t in nfc_corpus]
    s = "<|im_start|>user\n<think>12</think><|im_end|>"
    assert tok.encode(s, allow_special=True) == qwen3_tok.encode(s, allow_special=True)
    assert tok.encode(s) == qwen3_tok.encode(s)
    assert tok.decode(tok.encode(s, allow_special=True)) == "user\n<think>12</think>"
    assert (tok.bos_id, tok.pad_id, tok.eos_ids) == (None, 151643, qwen3_tok.eos_ids)
    m = [{"role": "user", "content": "hi"}]
    assert tok.chat(m, enable_thinking=False) == qwen3_tok.chat(m, enable_thinking=False)


def test_unsupported_gguf_tokenizers(tmp_path):
    import gguf

    T = gguf.GGUFValueType
    spm = _write_gguf(tmp_path / "spm.gguf", **{"tokenizer.ggml.model": ("llama", T.STRING),
                                                "tokenizer.ggml.tokens": (["a"], T.ARRAY)})
    with pytest.raises(ValueError, match="spm.gguf: GGUF tokenizer model 'llama' is not"):
        text.load_tokenizer(spm)
    odd = _write_gguf(tmp_path / "odd.gguf", **{"tokenizer.ggml.model": ("gpt2", T.STRING),
                                                "tokenizer.ggml.pre": ("mystery", T.STRING),
                                                "tokenizer.ggml.tokens": (["a"], T.ARRAY)})
    with pytest.raises(ValueError, match="odd.gguf: GGUF pre-tokenizer 'mystery'"):
        text.load_tokenizer(odd)
