"""encode/decode against the reference libraries on a few hundred varied texts."""

from __future__ import annotations

import unicodedata

import pytest

from catjax import text
from tests.text.conftest import shared_file, space_before_numeral

SPECIAL_TEXTS = ["<|im_start|>user\nhi<|im_end|>\n", "a<|endoftext|>b <think>x</think>",
                 "<bos><start_of_turn>user\nhi<end_of_turn>\n<eos>",
                 "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"]


def test_corpus_is_varied(corpus):
    assert len(corpus) >= 300
    assert any("\\frac" in t for t in corpus) and any("🙂" in t for t in corpus)
    assert any(not t.isascii() for t in corpus) and any("   " in t for t in corpus)


# -- Qwen 3 (tokenizer.json) -----------------------------------------------------------------

def test_qwen3_matches_tokenizers_and_transformers(qwen3_tok, qwen3_dir, qwen3_hf, corpus):
    import tokenizers

    raw = tokenizers.Tokenizer.from_file(str(qwen3_dir / "tokenizer.json"))
    ours = [qwen3_tok.encode(t) for t in corpus]
    assert ours == [e.ids for e in raw.encode_batch(corpus, add_special_tokens=False)]
    assert ours == qwen3_hf(corpus, add_special_tokens=False)["input_ids"]
    assert [qwen3_tok.encode(t, add_bos=True) for t in corpus[:5]] == ours[:5]  # no BOS


def test_qwen3_special_strings(qwen3_tok, qwen3_hf):
    for s in SPECIAL_TEXTS:
        # Recognised: transformers' default. As text: its split_special_tokens=True.
        assert qwen3_tok.encode(s, allow_special=True) == qwen3_hf(
            s, add_special_tokens=False)["input_ids"]
        assert qwen3_tok.encode(s) == qwen3_hf(
            s, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    ids = qwen3_tok.encode("<|im_end|>")
    assert 151645 not in ids and qwen3_tok.encode("<|im_end|>", allow_special=True) == [151645]
    assert qwen3_tok.encode("<think>") == [151667]  # not special: always whole, as in transformers


def test_qwen3_round_trip(qwen3_tok, corpus):
    for t in corpus:  # the tokenizer normalises to NFC
        assert qwen3_tok.decode(qwen3_tok.encode(t)) == unicodedata.normalize("NFC", t)
    ids = qwen3_tok.encode("<|im_start|>user\nhi<|im_end|><think>", allow_special=True)
    assert qwen3_tok.decode(ids) == "user\nhi<think>"
    assert qwen3_tok.decode(ids, skip_special=False) == "<|im_start|>user\nhi<|im_end|><think>"


# -- Llama 3.1 (tiktoken ranks) ---------------------------------------------------------------

def test_llama3_matches_meta_tokenizer(llama3_tok, llama3_reference, corpus):
    for t in corpus:
        assert llama3_tok.encode(t) == llama3_reference.encode(t, bos=False, eos=False), t
    t = corpus[100]
    assert llama3_tok.encode(t, add_bos=True) == llama3_reference.encode(t, bos=True, eos=False)


def test_llama3_special_strings(llama3_tok, llama3_reference):
    for s in SPECIAL_TEXTS:
        assert llama3_tok.encode(s, allow_special=True) == llama3_reference.encode(
            s, bos=False, eos=False, allowed_special="all")
        assert llama3_tok.encode(s) == llama3_reference.encode(s, bos=False, eos=False)
    assert llama3_tok.encode("<|eot_id|>", allow_special=True) == [128009]
    assert 128009 not in llama3_tok.encode("<|eot_id|>")


def test_llama3_round_trip(llama3_tok, llama3_reference, corpus):
    for t in corpus:
        ids = llama3_tok.encode(t)
        assert llama3_tok.decode(ids) == t == llama3_reference.decode(ids)
    ids = llama3_tok.encode("<|begin_of_text|>hi<|eot_id|>", allow_special=True)
    assert llama3_tok.decode(ids) == "hi"
    assert llama3_tok.decode(ids, skip_special=False) == "<|begin_of_text|>hi<|eot_id|>"


def test_llama3_split_regex_is_metas(llama3_reference):
    from catjax.text.tiktoken_backend import LLAMA3_SPLIT

    assert llama3_reference.pat_str == LLAMA3_SPLIT


def test_other_ranks_file_matches_tiktoken(llama3_reference):
    """A ranks file of another size gets the Llama 3 split and specials after its ranks."""
    import base64

    import tiktoken

    path = shared_file("tokenizers/torchtune_test_assets/tiktoken_small.model")
    lines = [ln.split() for ln in path.read_text().splitlines() if ln]
    ranks = {base64.b64decode(a): int(b) for a, b in lines}
    tok = text.load_tokenizer(path)
    names = list(llama3_reference.special_tokens)
    ref = tiktoken.Encoding("ref", pat_str=llama3_reference.pat_str, mergeable_ranks=ranks,
                            special_tokens={n: len(ranks) + k for k, n in enumerate(names)})
    for s in ["Hello world! 1234", "  spaces\n\nand lines", "ünïcödé", "", *SPECIAL_TEXTS]:
        assert tok.encode(s) == ref.encode_ordinary(s)
        assert tok.encode(s, allow_special=True) == ref.encode(s, allowed_special="all")


# -- Gemma 3 (sentencepiece) ------------------------------------------------------------------

def test_gemma3_matches_sentencepiece(gemma3_tok, gemma3_model, corpus):
    import sentencepiece as spm

    ref = spm.SentencePieceProcessor(model_file=str(gemma3_model))
    assert [gemma3_tok.encode(t) for t in corpus] == ref.encode(corpus)
    assert gemma3_tok.encode("hi", add_bos=True) == [2, *ref.encode("hi")]


def test_gemma3_special_strings(gemma3_tok, gemma3_model):
    import sentencepiece as spm

    ref = spm.SentencePieceProcessor(model_file=str(gemma3_model))
    s = "<bos><start_of_turn>user\nhi <eos> there<end_of_turn>\n"
    # Control pieces are text to sentencepiece; user-defined ones (<start_of_turn>) always whole.
    assert gemma3_tok.encode(s) == ref.encode(s)
    assert gemma3_tok.encode(s, allow_special=True) == (
        [2] + ref.encode("<start_of_turn>user\nhi ") + [1] + ref.encode(" there<end_of_turn>\n"))


def test_gemma3_round_trip(gemma3_tok, corpus):
    for t in corpus:  # identity normaliser + byte fallback: exact
        assert gemma3_tok.decode(gemma3_tok.encode(t)) == t
    ids = gemma3_tok.encode("<bos><start_of_turn>model\nok<end_of_turn>", allow_special=True)
    assert gemma3_tok.decode(ids) == "model\nok"
    assert (gemma3_tok.decode(ids, skip_special=False)
            == "<bos><start_of_turn>model\nok<end_of_turn>")


@pytest.mark.parametrize("name", ["test_model.model", "test_ja_model.model"])
def test_small_sentencepiece_models(name, corpus):
    import sentencepiece as spm

    path = shared_file(f"tokenizers/sentencepiece_test/{name}")
    tok, ref = text.load_tokenizer(path), spm.SentencePieceProcessor(model_file=str(path))
    assert [tok.encode(t) for t in corpus] == ref.encode(corpus)
    for t in corpus:  # decode drops <unk> (sentencepiece writes " ⁇ " for it)
        ids = ref.encode(t)
        assert tok.decode(ids) == ref.decode([i for i in ids if i != ref.unk_id()])


# -- SmolLM2 (GGUF) ---------------------------------------------------------------------------

def test_smollm2_matches_transformers(smollm2_tok, smollm2_hf, smollm2_fixed, corpus):
    ours = [smollm2_tok.encode(t, allow_special=True) for t in corpus]
    assert ours == [e.ids for e in smollm2_fixed.encode_batch(corpus, add_special_tokens=False)]
    # transformers' own GGUF conversion drops SmolLM2's digit split; it differs only where
    # whitespace precedes a numeral ("  15", " ½").
    plain = smollm2_hf(corpus, add_special_tokens=False)["input_ids"]
    differing = [t for t, a, b in zip(corpus, ours, plain, strict=True) if a != b]
    assert all(space_before_numeral(t) for t in differing)
    assert len(differing) < len(corpus) // 10


def test_smollm2_round_trip(smollm2_tok, corpus):
    for t in corpus:
        assert smollm2_tok.decode(smollm2_tok.encode(t)) == t
    ids = smollm2_tok.encode("<|im_start|>user\nhi<|im_end|>", allow_special=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert smollm2_tok.decode(ids) == "user\nhi"
