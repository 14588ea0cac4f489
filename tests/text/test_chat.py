"""Chat formats: files' templates against transformers' apply_chat_template, built-ins against
the published formats (and, for Gemma 3, its official template)."""

from __future__ import annotations

import datetime

import pytest

from catjax import text
from catjax.text import chat as chat_lib
from tests.text.conftest import space_before_numeral

SYSTEM = {"role": "system", "content": "You are a careful assistant. Answer briefly."}
USER = {"role": "user", "content": "What is $\\frac{1}{2} + \\frac{1}{3}$?"}

SYNTHETIC = [
    [USER],
    [SYSTEM, USER],
    [USER, {"role": "assistant", "content": "It is $\\frac{5}{6}$."},
     {"role": "user", "content": "  And times 2?  "}],
    # Reasoning kept only after the last user query; stripped from earlier assistant turns.
    [SYSTEM, USER, {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n5/6"},
     {"role": "user", "content": "thanks"}],
    [USER, {"role": "assistant", "content": "5/6", "reasoning_content": "common denominator"}],
    [USER, {"role": "assistant", "content": "5/6", "reasoning": "lcd", "tool_calls": None}],
    [USER, {"role": "assistant", "content": "<think>\nhmm\n</think>\n\n5/6"}],
    [USER, {"role": "assistant", "content": "Let me look."},
     {"role": "tool", "content": "0.8333"}, {"role": "tool", "content": "ok"}],
    [USER, {"role": "system", "content": "late system message"}],
    [{"role": "user", "content": "émoji 🙂 and 中文 and   spaces\n\n"}],
]


def _hf_ids(hf, messages, **kw) -> list[int]:
    out = hf.apply_chat_template(messages, tokenize=True, **kw)
    # transformers 5 returns a BatchEncoding; older versions a plain list.
    return list(out) if isinstance(out, list) else list(out["input_ids"])


def _hf_text(hf, messages, **kw) -> str:
    return hf.apply_chat_template(messages, tokenize=False, **kw)


@pytest.fixture(scope="module")
def chats(conversations):
    """HealthBench conversations (some with a system turn) plus hand-made edge cases."""
    return SYNTHETIC + conversations + [[SYSTEM, *c] for c in conversations[:20]]


# -- Qwen 3: tokenizer_config.json template ---------------------------------------------------

@pytest.mark.parametrize("kw", [{}, {"enable_thinking": False}, {"enable_thinking": True}],
                         ids=["default", "no-thinking", "thinking"])
def test_qwen3_template_matches_transformers(qwen3_tok, qwen3_hf, chats, kw):
    for m in chats:
        assert qwen3_tok.chat_text(m, **kw) == _hf_text(qwen3_hf, m, add_generation_prompt=True,
                                                         **kw)
        assert qwen3_tok.chat(m, **kw) == _hf_ids(qwen3_hf, m, add_generation_prompt=True, **kw)
    m = chats[2]
    assert qwen3_tok.chat(m, add_generation_prompt=False) == _hf_ids(qwen3_hf, m)


def test_qwen3_format_shape(qwen3_tok):
    assert qwen3_tok.chat_text([SYSTEM, USER], enable_thinking=False) == (
        f"<|im_start|>system\n{SYSTEM['content']}<|im_end|>\n"
        f"<|im_start|>user\n{USER['content']}<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    ids = qwen3_tok.chat([USER])
    assert ids[0] == 151644 and ids[-3:] == [151644, 77091, 198]  # <|im_start|>assistant\n


@pytest.fixture(scope="module")
def qwen3_builtin(qwen3_dir):
    return text.load_tokenizer(qwen3_dir, chat_format="qwen3")


@pytest.mark.parametrize("kw", [{}, {"enable_thinking": False}], ids=["default", "no-thinking"])
def test_qwen3_builtin_matches_official_template(qwen3_builtin, qwen3_tok, chats, kw):
    for m in chats:
        for gen in (True, False):
            assert qwen3_builtin.chat_text(m, gen, **kw) == qwen3_tok.chat_text(m, gen, **kw)


def test_no_think_prefix(qwen3_tok, qwen3_hf):
    m = [SYSTEM, USER, {"role": "assistant", "content": "5/6"}, {"role": "user", "content": "x2?"}]
    got = qwen3_tok.chat_text(m, no_think=True)
    assert "<|im_start|>user\n/no_think x2?<|im_end|>" in got
    assert got.count("/no_think") == 1  # only the last user message
    expected = [*m[:3], {"role": "user", "content": "/no_think x2?"}]
    assert qwen3_tok.chat(m, no_think=True) == _hf_ids(qwen3_hf, expected,
                                                       add_generation_prompt=True)
    assert m[3]["content"] == "x2?"  # the caller's messages are left alone
    assert text.NO_THINK == "/no_think"
    with pytest.raises(ValueError, match="no user message"):
        qwen3_tok.chat([SYSTEM], no_think=True)


# -- SmolLM2: the GGUF's template --------------------------------------------------------------

def test_smollm2_template_matches_transformers(smollm2_tok, smollm2_hf, smollm2_fixed, chats):
    for m in chats:
        rendered = _hf_text(smollm2_hf, m, add_generation_prompt=True)
        assert smollm2_tok.chat_text(m) == rendered
        ours = smollm2_tok.chat(m)
        assert ours == smollm2_fixed.encode(rendered, add_special_tokens=False).ids
        if not space_before_numeral(rendered):  # see test_smollm2_matches_transformers
            assert ours == _hf_ids(smollm2_hf, m, add_generation_prompt=True)
    # Its template adds a default system turn when the conversation has none.
    assert smollm2_tok.chat_text([USER]).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_chatml_builtin(smollm2_gguf):
    tok = text.load_tokenizer(smollm2_gguf, chat_format="chatml")
    assert tok.chat_text([SYSTEM, USER]) == (
        f"<|im_start|>system\n{SYSTEM['content']}<|im_end|>\n"
        f"<|im_start|>user\n{USER['content']}<|im_end|>\n<|im_start|>assistant\n")
    assert tok.chat([USER], add_generation_prompt=False)[-2:] == [2, 198]  # <|im_end|>\n


# -- Gemma 3: built-in format --------------------------------------------------------------------

def _alternates(m) -> bool:
    """user/assistant/user/... after an optional leading system message."""
    roles = [x["role"] for x in (m[1:] if m[0]["role"] == "system" else m)]
    return roles == ["user", "assistant"] * (len(roles) // 2) + ["user"] * (len(roles) % 2)


def _gemma3_expected(messages, add_generation_prompt=True) -> str:
    """Gemma 3's published format, written out by hand."""
    s, prefix = "<bos>", ""
    if messages[0]["role"] == "system":
        prefix, messages = messages[0]["content"] + "\n\n", messages[1:]
    for k, m in enumerate(messages):
        role = "model" if m["role"] == "assistant" else "user"
        first = prefix if k == 0 else ""
        s += f"<start_of_turn>{role}\n{first}{m['content'].strip()}<end_of_turn>\n"
    return s + ("<start_of_turn>model\n" if add_generation_prompt else "")


def test_gemma3_builtin_matches_published_format(gemma3_tok, gemma3_model, chats):
    import sentencepiece as spm

    ref = spm.SentencePieceProcessor(model_file=str(gemma3_model))
    alternating = [m for m in chats if _alternates(m)]
    assert len(alternating) > 100
    for m in alternating:
        expected = _gemma3_expected(m)
        assert gemma3_tok.chat_text(m) == expected
        # <start_of_turn> and friends are pieces sentencepiece always matches whole; <bos> is not.
        assert gemma3_tok.chat(m) == [2, *ref.encode(expected.removeprefix("<bos>"))]
    assert gemma3_tok.chat_text([USER], add_generation_prompt=False) == _gemma3_expected(
        [USER], False)


def test_gemma3_builtin_matches_official_template(gemma3_tok, gemma3_official_template, chats):
    from transformers.utils.chat_template_utils import render_jinja_template

    refused = 0
    for m in chats:
        try:
            official = chat_lib.render_template(gemma3_official_template, m, True,
                                                bos_token="<bos>")
        except chat_lib.ChatError:  # the built-in must refuse the same conversations
            with pytest.raises(ValueError, match="alternate"):
                gemma3_tok.chat_text(m)
            refused += 1
            continue
        hf = render_jinja_template([m], chat_template=gemma3_official_template,
                                   add_generation_prompt=True, bos_token="<bos>")[0][0]
        assert gemma3_tok.chat_text(m) == official == hf
    assert 0 < refused < 10


def test_gemma3_rejects_non_alternating(gemma3_tok):
    with pytest.raises(ValueError, match=r"tokenizer.gemma3: gemma3 chat format: roles must"):
        gemma3_tok.chat([USER, USER])


# -- Llama 3.1: built-in format -------------------------------------------------------------------

LLAMA_SYSTEM_HEAD = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                     "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n")


def test_llama3_builtin_matches_published_format(llama3_tok, llama3_reference):
    m = [{"role": "system", "content": "You are a helpful assistant"},
         {"role": "user", "content": "Answer who are you in the form of jeopardy?"}]
    expected = (LLAMA_SYSTEM_HEAD + "You are a helpful assistant<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\n"
                "Answer who are you in the form of jeopardy?<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert llama3_tok.chat_text(m) == expected
    ids = llama3_tok.chat(m)
    assert ids == llama3_reference.encode(expected, bos=False, eos=False, allowed_special="all")
    # The header-id layout, piece by piece, with Meta's tokenizer for the text between.
    enc = lambda s: llama3_reference.encode(s, bos=False, eos=False)  # noqa: E731
    by_hand = [128000, 128006, *enc("system"), 128007,
               *enc("\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
                    "You are a helpful assistant"), 128009,
               128006, *enc("user"), 128007,
               *enc("\n\nAnswer who are you in the form of jeopardy?"), 128009,
               128006, *enc("assistant"), 128007, *enc("\n\n")]
    assert ids == by_hand


def test_llama3_builtin_details(llama3_tok):
    # No system message: the date block still opens the conversation; contents are trimmed.
    m = [{"role": "user", "content": "  hi  "}, {"role": "assistant", "content": "hello\n"},
         {"role": "user", "content": "bye"}]
    assert llama3_tok.chat_text(m, add_generation_prompt=False) == (
        LLAMA_SYSTEM_HEAD + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nhello<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nbye<|eot_id|>")
    assert "Today Date: 01 Jan 2025" in llama3_tok.chat_text(m, date_string="01 Jan 2025")
    tool = llama3_tok.chat_text([USER, {"role": "tool", "content": " 42 "}])
    assert tool.endswith('<|start_header_id|>ipython<|end_header_id|>\n\n" 42 "<|eot_id|>'
                         "<|start_header_id|>assistant<|end_header_id|>\n\n")
    with pytest.raises(ValueError, match="tools and documents need the model's own"):
        llama3_tok.chat([USER], tools=[{"name": "calculator"}])


# -- template rendering details --------------------------------------------------------------------

def test_template_helpers():
    r = lambda src, **kw: chat_lib.render_template(src, [USER], True, **kw)  # noqa: E731
    assert r("{{ strftime_now('%Y') }}") == str(datetime.date.today().year)
    assert r("{{ {'a': 'é<>'} | tojson }}") == '{"a": "é<>"}'  # no HTML escaping, no \\u
    assert r("{% for m in messages %}{% generation %}{{ m.role }}{% endgeneration %}{% endfor %}"
             ) == "user"
    assert r("{% for i in [1, 2, 3] %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}"
             ) == "1"
    assert r("{% if tools is none %}none{% endif %}") == "none"
    assert r("{{ 'a string' is iterable }}") == "True"  # why Llama 3.1 quotes tool results
    assert r("  {% if true %}\nx{% endif %}") == "x"  # trim_blocks + lstrip_blocks
    with pytest.raises(chat_lib.ChatError, match="bad roles"):
        r("{{ raise_exception('bad roles') }}")
    with pytest.raises(chat_lib.ChatError):  # sandboxed and immutable
        r("{{ messages.append(1) }}")
    with pytest.raises(chat_lib.ChatError, match="does not parse"):
        r("{% if %}")


def test_chat_errors_name_the_file(qwen3_tok):
    with pytest.raises(ValueError, match="tokenizer.json: cannot format an empty conversation"):
        qwen3_tok.chat([])
    with pytest.raises(ValueError, match="tokenizer.json: chat messages must be dicts"):
        qwen3_tok.chat(["hello"])


def test_multimodal_text_parts(gemma3_tok):
    parts = {"role": "user", "content": [{"type": "text", "text": "Describe "},
                                         {"type": "text", "text": "this."}]}
    assert "<start_of_turn>user\nDescribe this.<end_of_turn>" in gemma3_tok.chat_text([parts])
