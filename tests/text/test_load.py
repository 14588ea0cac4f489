"""load_tokenizer: which backend each file gets, ids of the special tokens, clear errors."""

from __future__ import annotations

import shutil

import pytest

from catjax import text
from tests.text.conftest import shared_file


def test_backend_per_file_kind(qwen3_tok, gemma3_tok, llama3_tok, smollm2_tok):
    assert isinstance(qwen3_tok, text.HFTokenizer)
    assert isinstance(smollm2_tok, text.HFTokenizer)  # rebuilt from GGUF metadata
    assert isinstance(gemma3_tok, text.SentencePieceTokenizer)
    assert isinstance(llama3_tok, text.TiktokenTokenizer)
    for tok in (qwen3_tok, gemma3_tok, llama3_tok, smollm2_tok):
        assert isinstance(tok, text.Tokenizer)


def test_directory_and_file_paths(qwen3_dir, tmp_path, smollm2_gguf, gemma3_model):
    assert isinstance(text.load_tokenizer(qwen3_dir / "tokenizer.json"), text.HFTokenizer)
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "model.gguf").symlink_to(smollm2_gguf)
    assert text.load_tokenizer(tmp_path / "g").vocab_size == 49152
    (tmp_path / "s").mkdir()
    shutil.copy(gemma3_model, tmp_path / "s" / "tokenizer.model")
    assert isinstance(text.load_tokenizer(tmp_path / "s"), text.SentencePieceTokenizer)


def test_small_reference_files():
    tt = text.load_tokenizer(shared_file("tokenizers/torchtune_test_assets/tiktoken_small.model"))
    assert isinstance(tt, text.TiktokenTokenizer)
    assert tt.vocab_size == 2000 + 256 and tt.bos_id == 2000
    sp = text.load_tokenizer(shared_file("tokenizers/sentencepiece_test/test_model.model"))
    assert isinstance(sp, text.SentencePieceTokenizer) and sp.vocab_size == 1000


def test_special_ids(qwen3_tok, gemma3_tok, llama3_tok, smollm2_tok):
    # Qwen 3: no BOS; a turn ends with <|im_end|>, a document with <|endoftext|>.
    assert qwen3_tok.bos_id is None and qwen3_tok.pad_id == 151643
    assert set(qwen3_tok.eos_ids) == {151645, 151643} and qwen3_tok.eos_ids[0] == 151645
    assert qwen3_tok.vocab_size == 151669
    assert (gemma3_tok.bos_id, gemma3_tok.pad_id, set(gemma3_tok.eos_ids)) == (2, 0, {1, 106})
    assert gemma3_tok.vocab_size == 262144
    assert llama3_tok.bos_id == 128000 and llama3_tok.pad_id == 128004
    assert set(llama3_tok.eos_ids) == {128001, 128008, 128009}
    assert llama3_tok.vocab_size == 128256
    # SmolLM2's GGUF says add_bos_token=False: its chat template writes <|im_start|> itself.
    assert smollm2_tok.bos_id is None and smollm2_tok.pad_id == 2
    assert set(smollm2_tok.eos_ids) == {2, 0}


def test_llama3_special_tokens_match_meta(llama3_tok, llama3_reference):
    assert llama3_tok.specials == llama3_reference.special_tokens
    named = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|start_header_id|>": 128006,
             "<|end_header_id|>": 128007, "<|eom_id|>": 128008, "<|eot_id|>": 128009,
             "<|python_tag|>": 128010, "<|reserved_special_token_0|>": 128002,
             "<|reserved_special_token_245|>": 128255}
    assert {k: llama3_tok.token_to_id(k) for k in named} == named
    assert llama3_tok.id_to_token(128009) == "<|eot_id|>"


def test_token_lookup(qwen3_tok, gemma3_tok):
    assert qwen3_tok.token_to_id("<|im_start|>") == 151644
    assert qwen3_tok.token_to_id("no such token at all") is None
    assert gemma3_tok.token_to_id("<start_of_turn>") == 105
    assert gemma3_tok.id_to_token(106) == "<end_of_turn>"
    assert gemma3_tok.token_to_id("no such piece") is None
    assert gemma3_tok.token_to_id("<unk>") == 3


def test_unrecognised_file_names_the_path(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00\x01\x02 definitely not a tokenizer")
    with pytest.raises(ValueError, match=f"{junk}: not a tokenizer file"):
        text.load_tokenizer(junk)
    with pytest.raises(FileNotFoundError, match="missing.model"):
        text.load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(ValueError, match="no tokenizer.json or tokenizer.model"):
        text.load_tokenizer(tmp_path)


def test_corrupt_files_name_the_path(tmp_path):
    bad_json = tmp_path / "tokenizer.json"
    bad_json.write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match="tokenizer.json: not a tokenizers JSON file"):
        text.load_tokenizer(bad_json)
    bad_ranks = tmp_path / "ranks.model"
    bad_ranks.write_text("IQ== 0\nIg== 1\nIw== 5\n")
    with pytest.raises(ValueError, match="ranks.model: tiktoken ranks are not 0..2"):
        text.load_tokenizer(bad_ranks)
    bad_sp = tmp_path / "sp.model"
    bad_sp.write_bytes(b"\x0a\x05trunc")
    with pytest.raises(ValueError, match="sp.model: not a sentencepiece model"):
        text.load_tokenizer(bad_sp)


def test_chat_format_choice(qwen3_dir, qwen3_tok, gemma3_tok, llama3_tok, smollm2_tok):
    assert qwen3_tok.chat_format == "template"  # tokenizer_config.json carries one
    assert smollm2_tok.chat_format == "template"  # the GGUF carries one
    assert gemma3_tok.chat_format == "gemma3"
    assert llama3_tok.chat_format == "llama3"
    assert text.load_tokenizer(qwen3_dir, chat_format="qwen3").chat_format == "qwen3"
    with pytest.raises(ValueError, match="unknown chat format 'vicuna'"):
        text.load_tokenizer(qwen3_dir, chat_format="vicuna")
    sp = text.load_tokenizer(shared_file("tokenizers/sentencepiece_test/test_model.model"))
    with pytest.raises(ValueError, match="test_model.model: no chat template"):
        sp.chat([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="carry no chat template"):
        sp.chat_format = "template"
