"""Tests for catjax.cat.local_judge's choice of the yes/no tokens it compares."""

from __future__ import annotations

import pytest

from catjax.cat import prompts
from catjax.cat.local_judge import LocalJudge

SPACE = 1  # the piece a sentencepiece model with a dummy prefix puts before a text's first word


class DummyPrefixTokenizer:
    """One id per character, after a leading word-start piece, as sentencepiece encodes a text
    on its own: "yes" alone starts with the same piece as "no"."""

    pad_id = 0

    def encode(self, text: str) -> list[int]:
        return [SPACE] + [ord(c) for c in text]


def test_verdict_tokens_are_read_after_the_tag_not_from_the_word_alone():
    judge = LocalJudge(None, None, DummyPrefixTokenizer())
    assert judge.prefill == DummyPrefixTokenizer().encode(prompts.JUDGE_PREFILL)
    assert judge.yes_ids == sorted([ord("y"), ord("Y")])
    assert judge.no_ids == [ord("N"), ord("n")]


def test_yes_and_no_sharing_a_token_is_refused():
    class Same(DummyPrefixTokenizer):
        def encode(self, text: str) -> list[int]:
            return [SPACE] * len(text)

    with pytest.raises(ValueError, match="'yes' and 'no' the same first token"):
        LocalJudge(None, None, Same())
