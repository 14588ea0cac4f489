"""Tests for catjax.cat.selection's parsing of the model's own pick (the self-selection baseline)."""

from __future__ import annotations

import pytest

from catjax.cat.selection import parse_choice


@pytest.mark.parametrize(("text", "expected"), [
    ("<choice>3</choice>", 2),
    ("After comparing them, <CHOICE> 1 </CHOICE>.", 0),
    ("2", 1),
    ("  8 is the best one", 7),
    ("2 candidates are close, but <choice>3</choice>", 2),  # the tag wins over a leading number
    ("<choice>9</choice>", None),  # out of range
    ("<choice>0</choice>", None),
    ("\u0663", None),  # an Arabic-Indic three is not an ASCII digit
    ("<choice>\u0663</choice>", None),
    ("The third one.", None),
    ("", None),
    ("x" * 3000 + "<choice>2</choice>", None),  # only the reply's start is read
])
def test_parse_choice(text: str, expected: int | None) -> None:
    assert parse_choice(text, 8) == expected
