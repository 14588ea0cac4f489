"""Final-answer extraction, normalisation and equivalence for CaT's verifiable rewards.

Everything here takes untrusted model text. Rules of the house:
* extraction and normalisation are regex / single-pass scans, linear in the input;
* model text never reaches ``eval``, ``sympify`` or ``parse_expr`` in this process; numbers are
  read by a small hand-written parser, and symbolic checks go to math-verify (ANTLR LaTeX parser)
  in a separate, killable worker process (`catjax.cat.verify_worker`);
* every check is bounded: a wall-clock limit per symbolic call, input-size limits before that.

Public API: `extract_boxed`, `EXTRACTORS` (+ the `extract_*` functions), `extract_answer`,
`normalize`, `parse_number`, `looks_explosive`, `equivalent`, `verifiable_reward`,
`majority_vote`, `stats`, `reset_stats`, `worker_pid`, `shutdown`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from fractions import Fraction
from multiprocessing.connection import Connection
from typing import Literal

from catjax.cat import verify_worker

_log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# Brace scanning steps over escaped characters, so \{ \} (set braces) and \\ do not count.
_BRACE_TOKEN_RE = re.compile(r"\\.|[{}]", re.DOTALL)
_SPACES_RE = re.compile(r"\s*")
# `\boxed 5`: TeX takes one token; models mean "the word after it", so take up to space or $.
_BARE_TOKEN_RE = re.compile(r"[ \t]*([^\s$]+)")
# ... if it looks like an answer (a number, a sign, a macro, one letter): `\boxed as asked`
# is prose about the macro, not a box.
_BARE_ANSWER_RE = re.compile(r"[-+.(\\\d]|[A-Za-z](?![A-Za-z])")


def _balanced_group(text: str, open_pos: int) -> str | None:
    """Contents of the brace group opening at ``text[open_pos]``; None if it never closes."""
    depth = 0
    for m in _BRACE_TOKEN_RE.finditer(text, open_pos):
        tok = m.group()
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1 : m.start()]
    return None


def extract_boxed(text: str | None) -> str | None:
    """Contents of the last ``\\boxed{...}`` / ``\\fbox{...}`` (or ``\\boxed 5``) in ``text``.

    Boxes that hold no answer are passed over for the one before them: an empty ``\\boxed{}``
    and a bare ``\\boxed`` followed by a word ("put it in \\boxed as asked"). Returns None when
    there is no such box or the last brace box never closes (a truncated generation: an earlier
    box may be a superseded answer). Each brace scan stops at its group's end: linear time.
    """
    if not text:
        return None
    for box in reversed(list(_BOX_RE.finditer(text))):
        brace = _SPACES_RE.match(text, box.end()).end()
        if brace < len(text) and text[brace] == "{":
            content = _balanced_group(text, brace)
            if content is None:
                return None
            if content.strip():
                return content.strip()
            continue
        tok = _BARE_TOKEN_RE.match(text, box.end())
        if tok and _BARE_ANSWER_RE.match(tok.group(1)):
            return tok.group(1)
    return None


_GSM8K_RE = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS_RE = re.compile(
    r"(?:\bthe\s+(?:final\s+)?answer\s+is\b|\bfinal\s+answer\s*(?:is\b|:)|\banswer\s*:)"
    r"[ \t]*:?[ \t]*\**[ \t]*",
    re.IGNORECASE,
)
_MAX_PHRASE_ANSWER = 300  # "the answer is ..." tails longer than this are prose, not answers
# Sign only when the '-' is not a binary minus (`5-3` -> 3, `x = -3` -> -3, `-.5`). A plain
# `\frac{a}{b}` is one number, not its denominator.
_LAST_NUMBER_RE = re.compile(
    r"(?:(?<![\w)\]}.])-)?\\[dt]?frac\{\d+\}\{\d+\}"
    r"|(?:(?<![\w)\]}.])-)?(?<![\d.])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?(?![\d])"
    r"|(?:(?<![\w)\]}.])-)?(?<![\d.])\.\d+",
    re.ASCII,
)
_INLINE_MATH_RE = re.compile(r"^\$([^$]*)\$|^\\\((.*?)\\\)|^\\\[(.*?)\\\]")


def _last_match(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    last = None
    for last in pattern.finditer(text):  # noqa: B007 - we want the final match
        pass
    return last


def extract_gsm8k(text: str | None) -> str | None:
    """GSM8K's ``#### 42`` marker (the last one)."""
    m = _last_match(_GSM8K_RE, text or "")
    return (m.group(1).strip() or None) if m else None


def _trim_phrase_answer(tail: str) -> str | None:
    """Cut "the answer is <tail>" down to the answer itself."""
    tail = tail.strip().strip("*").strip()
    boxed = extract_boxed(tail)
    if boxed is not None:
        return boxed
    m = _INLINE_MATH_RE.match(tail)
    if m:  # "$5$. I hope it is correct." -> 5
        tail = next(g for g in m.groups() if g is not None)
    else:  # first sentence only: "12. So we are done" -> 12 (". " ends it, "3.5" does not)
        tail = re.split(r"\.(?:\s|$)", tail, maxsplit=1)[0]
    tail = tail.strip().strip("*").strip()
    return tail if 0 < len(tail) <= _MAX_PHRASE_ANSWER else None


def extract_answer_is(text: str | None) -> str | None:
    """The last "the answer is X" / "final answer: X" / "Answer: X" phrase."""
    text = text or ""
    m = _last_match(_ANSWER_IS_RE, text)  # phrase only, so "Final Answer: The answer is" works
    if m is None:
        return None
    end = text.find("\n", m.end())
    return _trim_phrase_answer(text[m.end() : end if end >= 0 else len(text)])


def extract_last_number(text: str | None) -> str | None:
    """The last number (integer, decimal, ``1,000``-style, or ``a/b``) in the text."""
    m = _last_match(_LAST_NUMBER_RE, text or "")
    return m.group() if m else None


EXTRACTORS: dict[str, Callable[[str | None], str | None]] = {
    "boxed": extract_boxed,
    "gsm8k": extract_gsm8k,
    "answer_is": extract_answer_is,
    "last_number": extract_last_number,
}


def extract_answer(
    text: str | None, modes: Sequence[str] = ("boxed", "answer_is", "last_number")
) -> tuple[str | None, str | None]:
    """First answer found by the extractors in ``modes`` order: ``(answer, mode)``.

    The mode is returned so callers can count how often each fallback fired.
    ``(None, None)`` when nothing matched. Unknown mode names raise KeyError.
    """
    extractors = [(mode, EXTRACTORS[mode]) for mode in modes]  # validate names up front
    for mode, fn in extractors:
        ans = fn(text)
        if ans is not None:
            return ans, mode
    return None, None


# --------------------------------------------------------------------------------------------
# Normalisation: a pipeline of small string rewrites; both sides of a comparison get the same.
# --------------------------------------------------------------------------------------------

# C0 control characters (NUL included) and DEL carry no meaning in an answer (nor in a rubric
# criterion, `rubrics` strips them too). Tab, newline and carriage return are not in it.
CONTROL_CHARS_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# Delimiters and spacing: `$`/`\$` (math mode, currency), `\( \) \[ \]`, thin spaces
# `\! \, \; \:` (dropped, but a space between two digits: `1\;2` is not 12; after a comma,
# with the spaces around them, see `_COMMA_THIN_RE`), wide spaces -> one space.
# `\\` (a matrix row break) is matched first so its second backslash is not misread.
_DELIM_SPACING_RE = re.compile(
    r"\\\\|\\[!,;:]|\\[()\[\]]|\\?\$|\\ |~|\\q?quad(?![A-Za-z])|\\(?:display|text)style(?![A-Za-z])"
)
# A thin space after a comma before a digit is a thousands separator's: `11,\! 111` -> `11,111`.
_COMMA_THIN_RE = re.compile(r",(?:[ ]*\\[!,;:])+[ ]*(?=\d)")
# `\left( ... \right)` -> `( ... )`; `\left.` / `\right.` are invisible delimiters.
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right|[Bb]igg?[lr]?)(?![A-Za-z])\s*\.?")
# Spelling variants of the same macro.
_MACRO_ALIASES = (
    (re.compile(r"\\[dtc]frac(?![A-Za-z])"), r"\\frac"),
    (re.compile(r"\\(begin|end)\{bmatrix\}"), r"\\\1{pmatrix}"),
    (re.compile(r"\\le(?![A-Za-z])"), r"\\leq"),
    (re.compile(r"\\ge(?![A-Za-z])"), r"\\geq"),
    (re.compile(r"\\ne(?![A-Za-z])"), r"\\neq"),
    (re.compile(r"\\varnothing(?![A-Za-z])"), r"\\emptyset"),
)
# Degrees: `90^\circ`, `90^{\circ}`, `90°`, `90\degree` all mean the number 90.
# (One whitespace run before the brace, one after: `\s*\{?\s*` would split a long run every way.)
_DEGREE_RE = re.compile(r"\^\s*(?:\{\s*)?\\circ\s*\}?|°|\\degree(?![A-Za-z])")
# Percent sign: `10\%` is graded as `10` (MATH gold answers drop it inconsistently).
_PERCENT_RE = re.compile(r"\\?%")

_UNIT_WORDS = (
    r"(?:square\s+|sq\.?\s*|cubic\s+)?(?:units?|cm|mm|km|m|meters?|metres?|centimeters?"
    r"|millimeters?|kilometers?|inch(?:es)?|in|feet|foot|ft|yards?|yd|miles?|mi|degrees?"
    r"|cents?|dollars?|seconds?|sec|s|minutes?|min|hours?|hrs?|days?|weeks?|years?|grams?|g"
    r"|kg|kilograms?|pounds?|lbs?|ounces?|oz|liters?|litres?|ml|mph|calories)"
)
_UNIT_TAIL = 80  # longest trailing unit phrase we look at, in characters
_POWER_SUFFIX = r"(?:\s*\^\s*\{?\s*[23]\s*\}?)?"
# Units in a \text-like box right after a number: `5.4 \text{ cents}`, `15\mbox{ cm}^2`,
# `\frac{270}7\text{ degrees}`. Only trailing, and only after a digit or a closing brace.
_TEXT_UNIT_RE = re.compile(
    r"(?<=[\d}])\s*\\(?:text|mbox|mathrm|textrm|textnormal)\s*\{\s*"
    + _UNIT_WORDS
    + r"\s*\}"
    + _POWER_SUFFIX
    + r"\s*\.?\s*$",
    re.IGNORECASE,
)
# Bare unit words after a number: `12 inches`, `5 dollars.` One-letter units (m, g, s) are
# skipped here because `3m` or `2s` may be an algebraic answer.
_PLAIN_UNIT_RE = re.compile(
    r"(?<=[\d}])\s*(?!(?:m|g|s|in|mi|min|sec)\b)" + _UNIT_WORDS + _POWER_SUFFIX + r"\s*\.?\s*$",
    re.IGNORECASE,
)
# `\text{Evelyn}` -> `Evelyn` (innermost groups; repeated a bounded number of times).
_TEXT_WRAP_RE = re.compile(
    r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mathit|mbox|operatorname)"
    r"\s*\{([^{}]*)\}"
)
_MAX_UNWRAP_PASSES = 4
# Multiple choice: `(C)` -> `C`.
_CHOICE_RE = re.compile(r"\(\s*([A-E])\s*\)")
# A single answer written as an assignment: `x = 5`, `y=2x+3`, `x \in [-2, 7]` keep the
# right-hand side. Not when another `=` follows (`x=1, y=2` is a system, not one answer).
# The right-hand side takes its own leading spaces (squeezed later): a `\s*` before it would
# split a long run every way once a later `=` fails the match.
_ASSIGN_RE = re.compile(r"\s*(?:[A-Za-z]|\\[A-Za-z]+)\s*(?:=|\\in(?![A-Za-z]))([^=]+)")
# Whitespace between two digits: dropped before a group of exactly three (`10 000`), else kept
# (`1 \quad 2` is two numbers, not 12): `_DIGIT_GAP` holds it through `_squeeze_whitespace`.
_DIGIT_GAP_RE = re.compile(r"(?<=\d)\s+(?=(\d{3}(?!\d))|\d)", re.ASCII)
_DIGIT_GAP = "\x00"  # control characters are stripped first, so it cannot come from the answer
# Whitespace: dropped, except between a control word and a letter (`\cot x` != `\cotx`).
_WHITESPACE_RE = re.compile(r"(\\[A-Za-z]+)?\s+(?=([A-Za-z])?)")
# Shorthand arguments: `\frac12` -> `\frac{1}{2}`, `\frac{270}7` -> `\frac{270}{7}`,
# `\sqrt2` -> `\sqrt{2}`. An argument is a brace group (one level of nesting), a control
# word, or one character.
_ARG = r"(\{(?:[^{}]|\{[^{}]*\})*\}|\\[A-Za-z]+|[^{}\\\s])"
_FRAC_ARGS_RE = re.compile(r"\\frac" + _ARG + _ARG)
_SQRT_ARG_RE = re.compile(r"\\sqrt(?![A-Za-z])" + r"(\\[A-Za-z]+|[^{}\\\s\[])")
# `x^{2}` -> `x^2`, `4210_{5}` -> `4210_5`: braces around one character are noise.
_SCRIPT_RE = re.compile(r"([\^_])\{([^{}\\])\}")
# Thousands separators, only when the whole answer is one number with no space after a comma:
# `1,000` -> `1000` but `(1,2)`, `1,-2`, `3, 5, 7` and the list `1, 234` are untouched.
_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", re.ASCII)
# `.5` -> `0.5`; `2.50` -> `2.5`; `5.0` / `5.00` -> `5`.
_LEADING_DOT_RE = re.compile(r"(?<![\d.])\.(?=\d)")
# (The zeros are stripped in Python: a lazy `(\d*?)0+` retries every split of a long fraction.)
_DECIMAL_RE = re.compile(r"(?<![\d.])(\d+)\.(\d+)(?![\d.])", re.ASCII)


def _strip_controls(s: str) -> str:
    return CONTROL_CHARS_RE.sub("", s.replace("\n", " ").replace("\t", " ").replace("\r", " "))


def _drop_delimiters_and_spacing(s: str) -> str:
    s = _COMMA_THIN_RE.sub(",", s)

    def repl(m: re.Match[str]) -> str:
        tok, text = m.group(), m.string
        if tok == "\\\\":
            return tok
        if tok[:2] in ("\\!", "\\,", "\\;", "\\:"):
            between_digits = (m.start() > 0 and text[m.start() - 1].isdigit()
                              and text[m.end():m.end() + 1].isdigit())
            return " " if between_digits else ""
        return "" if tok.endswith("$") else " "

    return _DELIM_SPACING_RE.sub(repl, s)


def _apply_aliases(s: str) -> str:
    for pattern, repl in _MACRO_ALIASES:
        s = pattern.sub(repl, s)
    return s


def _drop_units(s: str, pattern: re.Pattern[str]) -> str:
    # Units are trailing, so only the tail is searched (a whole-string search would try the
    # unit alternatives after every digit).
    head, tail = s[:-_UNIT_TAIL], s[-_UNIT_TAIL:]
    out = head + pattern.sub("", tail)
    return out if out.strip() else s  # never reduce an answer to nothing


def _unwrap_text(s: str) -> str:
    for _ in range(_MAX_UNWRAP_PASSES):
        out = _TEXT_WRAP_RE.sub(r"\1", s)
        if out == s:
            break
        s = out
    return s


def _drop_assignment(s: str) -> str:
    m = _ASSIGN_RE.fullmatch(s)
    return m.group(1) if m and m.group(1).strip() else s


def _keep_digit_gaps(s: str) -> str:
    return _DIGIT_GAP_RE.sub(lambda m: "" if m.group(1) else _DIGIT_GAP, s)


def _squeeze_whitespace(s: str) -> str:
    def repl(m: re.Match[str]) -> str:
        macro, letter = m.group(1), m.group(2)
        if macro is None:
            return ""
        return macro + " " if letter else macro

    return _WHITESPACE_RE.sub(repl, s)


def _braced(arg: str) -> str:
    return arg if arg.startswith("{") else "{" + arg + "}"


def _brace_shorthand(s: str) -> str:
    s = _FRAC_ARGS_RE.sub(lambda m: "\\frac" + _braced(m.group(1)) + _braced(m.group(2)), s)
    s = _SQRT_ARG_RE.sub(lambda m: "\\sqrt{" + m.group(1) + "}", s)
    return _SCRIPT_RE.sub(r"\1\2", s)


def _drop_thousands(s: str, grouped: bool) -> str:
    if not _THOUSANDS_RE.fullmatch(s):
        return s
    # A list that looks like one number keeps its spaces, so that its normal form stays a list.
    return s.replace(",", "") if grouped else s.replace(",", ", ")


def _drop_trailing_period(s: str) -> str:
    # One sentence-ending period; a trailing `...` (ellipsis) is left alone.
    return s[:-1] if s.endswith(".") and not s.endswith("..") else s


def _canonical_decimals(s: str) -> str:
    s = _LEADING_DOT_RE.sub("0.", s)

    def repl(m: re.Match[str]) -> str:
        frac = m.group(2).rstrip("0")
        return m.group(1) + ("." + frac if frac else "")

    return _DECIMAL_RE.sub(repl, s)


# Punctuation alone (`-`, `?`, `\text{,}`) is not an answer either: it would match itself.
_NO_ANSWER_RE = re.compile(r"[\s\-+?,.;:!'\"`*/|_~^=<>]*")
# Longer "answers" are not answers (a runaway generation, an attack): they normalise to "", so
# they never match, never win a vote, and cost O(1) here.
MAX_ANSWER_CHARS = 10_000


def normalize(ans: str | None) -> str:
    """Canonical string form of an answer, for exact matching and grouping.

    Rules (in order; each is commented where its regex is defined): control characters,
    `$`/delimiters/thin spaces, `\\left`/`\\right`, macro aliases (`\\dfrac` -> `\\frac`, ...),
    degree signs, percent signs, units after a number, `\\text{}`-style wrappers, `(C)` ->
    `C`, leading `x =` / `x \\in`, whitespace, `\\frac12`/`\\sqrt2` braces,
    a trailing period, thousands separators, and decimal spelling (`.5`, `2.50`, `5.0`).
    Linear-time regexes only. None, "", punctuation alone and answers over `MAX_ANSWER_CHARS`
    -> "" (never a match). Digits apart stay apart (`1 \\quad 2` -> `1 2`, not `12`)."""
    if not ans or len(ans) > MAX_ANSWER_CHARS:
        return ""
    s = _strip_controls(ans)
    s = _drop_delimiters_and_spacing(s)
    s = _LEFT_RIGHT_RE.sub("", s)
    s = _apply_aliases(s)
    s = _DEGREE_RE.sub("", s)
    s = _PERCENT_RE.sub("", s)
    s = _drop_units(s, _TEXT_UNIT_RE)
    s = _unwrap_text(s)
    s = _drop_units(s, _PLAIN_UNIT_RE)
    s = _CHOICE_RE.sub(r"\1", s) if _CHOICE_RE.fullmatch(s.strip()) else s
    s = _drop_assignment(s)
    grouped = ", " not in s  # `1, 234` is a list; `1,234` one number (below)
    s = _squeeze_whitespace(_keep_digit_gaps(s))
    s = _brace_shorthand(s)
    s = _drop_trailing_period(s)  # first: `1,000.` is the number 1000, then a full stop
    s = _drop_thousands(s, grouped)
    s = _canonical_decimals(s).replace(_DIGIT_GAP, " ")
    return "" if _NO_ANSWER_RE.fullmatch(s) else s


# --------------------------------------------------------------------------------------------
# Numeric comparison with a hand-written parser (no eval / sympify)
# --------------------------------------------------------------------------------------------

_NUMERIC_MAX_LEN = 100  # longer strings are not "plain numbers"; also bounds Fraction sizes
_DEC = r"\d+(?:\.\d+)?"
_PLAIN_NUMBER_RE = re.compile(rf"(-?)({_DEC})", re.ASCII)
_SLASH_NUMBER_RE = re.compile(rf"(-?)({_DEC})/({_DEC})", re.ASCII)
# `\frac{p}{q}`, `-\frac{p}{q}`, `\frac{-p}{q}` and mixed numbers `1\frac{4}{5}` (= 9/5, the
# MATH convention).
_FRAC_NUMBER_RE = re.compile(rf"(-?)(\d+)?\\frac\{{(-?)({_DEC})\}}\{{({_DEC})\}}", re.ASCII)
_REL_TOL = Fraction(1, 10**6)


def parse_number(s: str) -> Fraction | None:
    """Exact value of a *normalised* plain number / ``a/b`` / ``\\frac{p}{q}``, else None."""
    if len(s) > _NUMERIC_MAX_LEN:
        return None
    if m := _PLAIN_NUMBER_RE.fullmatch(s):
        value = Fraction(m.group(2))
    elif m := _SLASH_NUMBER_RE.fullmatch(s):
        den = Fraction(m.group(3))
        if den == 0:
            return None
        value = Fraction(m.group(2)) / den
    elif m := _FRAC_NUMBER_RE.fullmatch(s):
        whole, inner_sign, num, den = m.group(2), m.group(3), Fraction(m.group(4)), m.group(5)
        if Fraction(den) == 0 or (whole and inner_sign):
            return None
        value = num / Fraction(den) * (-1 if inner_sign else 1) + Fraction(whole or 0)
    else:
        return None
    return -value if m.group(1) else value


def _decimal_places(x: Fraction) -> int | None:
    """Digits after the point of `x`'s finite decimal expansion; None if it has none (1/3)."""
    d, twos, fives = x.denominator, 0, 0
    while d % 2 == 0:
        d, twos = d // 2, twos + 1
    while d % 5 == 0:
        d, fives = d // 5, fives + 1
    return max(twos, fives) if d == 1 else None


def _numbers_match(a: Fraction, b: Fraction) -> bool:
    """Equal, or within a relative 1e-6 (a rounded decimal of 1/3, float noise such as
    0.30000000000000004). Two finite decimals must also agree to the coarser one's last digit
    (differ by under half a unit there): 3.5000001 = 7/2, but 123456.7 != 123456.8 and
    1000001 != 1000000 (distinct integers never match, however large)."""
    if a == b:
        return True
    if abs(a - b) > _REL_TOL * max(abs(a), abs(b)):
        return False
    places = [_decimal_places(a), _decimal_places(b)]
    return None in places or abs(a - b) * 2 * 10 ** min(places) < 1


# --------------------------------------------------------------------------------------------
# Symbolic comparison in a killable worker process
# --------------------------------------------------------------------------------------------

# Answers longer than this skip the symbolic step: real final answers are short, and parse
# time / sympy blow-ups grow with length.
SYMBOLIC_MAX_LEN = 1000
_BACKOFF_AFTER, _BACKOFF_MAX_S = 3, 60.0  # failed starts in a row; longest pause (`_back_off`)
_STARTUP_TIMEOUT_S = 120.0  # first start imports sympy + math-verify (seconds, not minutes)

# Cheap screens for inputs that make sympy evaluate astronomically large numbers. The
# wall-clock limit catches whatever slips through; these just avoid paying for it.
_EXPLOSIVE_RES = (
    re.compile(r"\^\s*(?:\d+|[A-Za-z])\s*\^"),  # towers written flat: 9^9^9
    re.compile(r"\^\s*\{\s*\(?\s*[\d.]+\s*\)?\s*\^"),  # numeric exponent towers: 9^{9^{9}}
    re.compile(r"\^\s*\{?\s*[-+]?\s*\d{5,}"),  # exponents with 5+ digits: 2^{123456}
    re.compile(r"!\s*!\s*!"),  # stacked factorials
    # a factorial, Gamma or binomial of a factorial or Gamma: (12!)!, \Gamma(100!), \binom{9!}{3}
    re.compile(r"!\s*(?:\\right\s*)?[)\]}]+\s*!"),
    re.compile(r"\\(?:Gamma|[dt]?binom)\s*(?:\\left\s*)?[({][^(){}]*(?:!|\\Gamma)"),
)
_COMBINATORIAL_RE = re.compile(r"!|\\Gamma(?![A-Za-z])|\\binom|\\choose|\\dbinom|\\tbinom")
_BIG_LITERAL_RE = re.compile(r"\d{4,}|\^", re.ASCII)


# math-verify's parse time grows exponentially with bracket nesting (measured: ~0.5 s at
# depth 7, ~1.3 s at depth 10 for plain parentheses); MATH-500 golds never exceed depth 2.
MAX_SYMBOLIC_NESTING = 6
_BRACKET_TOKEN_RE = re.compile(r"\\.|[{}()\[\]]", re.DOTALL)


def _well_nested(s: str, max_depth: int = MAX_SYMBOLIC_NESTING) -> bool:
    """Braces balance (escaped ones aside) and no bracket nesting deeper than ``max_depth``.

    Parentheses and square brackets may mismatch each other (intervals like ``(3, 4]``).
    """
    depth = braces = 0
    for m in _BRACKET_TOKEN_RE.finditer(s):
        tok = m.group()
        if tok in "{([":
            depth += 1
            if depth > max_depth:
                return False
        elif tok in "})]":
            depth = max(depth - 1, 0)
        braces += (tok == "{") - (tok == "}")
        if braces < 0:
            return False
    return braces == 0


def looks_explosive(s: str) -> bool:
    """True for exponent towers, huge exponents, factorial-like functions of big inputs, and
    malformed or deeply nested brackets (slow to parse)."""
    if any(p.search(s) for p in _EXPLOSIVE_RES) or not _well_nested(s):
        return True
    # n! / Gamma / binomials are fine for small literals; with 1000+ or any power, refuse.
    return bool(_COMBINATORIAL_RE.search(s) and _BIG_LITERAL_RE.search(s))


# Numbers in another base (`52_8`): math-verify drops the subscript and would equate 52_8
# with 52, so such answers are only ever matched as strings.
_BASE_SUBSCRIPT_RE = re.compile(r"\d_\{?\d+\}?", re.ASCII)

_STAT_KEYS = (
    "calls",  # equivalent() calls
    "string_match",  # decided by normalised string equality
    "numeric",  # decided by the numeric parser (either way)
    "symbolic_calls",  # requests that reached the worker
    "symbolic_true",
    "skipped_too_long",  # symbolic step skipped: > SYMBOLIC_MAX_LEN chars
    "skipped_explosive",  # symbolic step skipped: looks_explosive() (towers, deep nesting, ...)
    "skipped_base",  # symbolic step skipped: a base-n numeral like 52_8
    "timeouts",  # worker killed for overrunning timeout_s
    "crashes",  # worker died while handling a request
    "worker_errors",  # worker raised (parse error, RecursionError, MemoryError, ...)
    "restarts",  # worker processes started after the first
    "start_failures",  # worker failed to come up
    "skipped_worker_down",  # symbolic step skipped: the worker failed to start, backing off
)


class _Stats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(_STAT_KEYS, 0)

    def bump(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def reset(self) -> None:
        with self._lock:
            self._counts = dict.fromkeys(_STAT_KEYS, 0)


_STATS = _Stats()


class _WorkerFailed(Exception):
    """The worker could not be started or died before answering."""


def _launch_worker() -> tuple[subprocess.Popen, Connection]:
    """Start `verify_worker` in a fresh interpreter, connected by a socketpair.

    A fresh ``python -m`` process rather than ``multiprocessing``'s spawn: spawn re-imports
    the caller's ``__main__`` in the child, which re-runs any unguarded training script (and
    imports JAX into the grader). Like spawn, nothing is forked from the (threaded, JAX-holding)
    parent. The child gets the parent's ``sys.path`` so it imports the same packages.
    """
    parent_sock, child_sock = socket.socketpair()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", verify_worker.__name__, str(child_sock.fileno())],
            pass_fds=(child_sock.fileno(),),
            stdin=subprocess.DEVNULL,
            env=env,
        )
    finally:
        child_sock.close()
    return proc, Connection(parent_sock.detach())


class _SymbolicWorker:
    """One long-lived math-verify process, used under a lock, replaced when it misbehaves."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._ready = False
        self._started_once = False
        self._next_id = 0
        self._failed_starts = 0  # in a row
        self._retry_at = 0.0  # time.monotonic() before which requests do not try to start one

    # -- lifecycle (all called with self._lock held) --

    def _start(self) -> None:
        if self._started_once:
            _STATS.bump("restarts")
        self._started_once = True
        self._proc, self._conn = _launch_worker()
        self._ready = False

    def _kill(self) -> None:
        proc, conn = self._proc, self._conn
        self._proc, self._conn, self._ready = None, None, False
        if proc is not None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        if conn is not None:
            conn.close()

    def _ensure_ready(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            _STATS.bump("crashes")  # died between requests (e.g. killed from outside)
            self._kill()
        if self._proc is None:
            self._start()
        if self._ready:
            return
        try:
            msg = self._conn.recv() if self._conn.poll(_STARTUP_TIMEOUT_S) else None
        except (EOFError, OSError):
            msg = None
        if not (isinstance(msg, tuple) and msg[:1] == ("ready",)):
            _STATS.bump("start_failures")
            _log.warning("answer-grader worker failed to start; symbolic checks return False")
            self._kill()
            raise _WorkerFailed("grader worker did not start")
        self._ready = True

    # -- requests --

    def request(self, op: str, a: str, b: str, timeout_s: float) -> bool:
        """Run one request; False on timeout / crash / error (counted in stats).

        Waiting for a (re)starting worker to finish its imports is not part of ``timeout_s``.
        """
        with self._lock:
            if time.monotonic() < self._retry_at:
                _STATS.bump("skipped_worker_down")
                return False
            try:
                self._ensure_ready()
            except (_WorkerFailed, OSError) as e:
                if isinstance(e, OSError):  # could not even launch the interpreter
                    _STATS.bump("start_failures")
                    self._kill()
                self._back_off()
                return False
            self._failed_starts = 0
            self._next_id += 1
            req_id = self._next_id
            try:
                self._conn.send((req_id, op, a, b))
                if not self._conn.poll(timeout_s):
                    _STATS.bump("timeouts")
                    self._restart()
                    return False
                got_id, result, error = self._conn.recv()
            except (EOFError, OSError):
                _STATS.bump("crashes")
                self._restart()
                return False
            if got_id != req_id:  # cannot happen with one request in flight; be safe
                self._kill()
                return False
            if error is not None:
                _STATS.bump("worker_errors")
            return bool(result)

    def _back_off(self) -> None:
        """After `_BACKOFF_AFTER` failed starts in a row, requests stop trying for a while (1 s,
        doubling to `_BACKOFF_MAX_S`): a worker that cannot start (a broken install, a hang on
        import) would otherwise cost every request a launch, or `_STARTUP_TIMEOUT_S`."""
        self._failed_starts += 1
        if self._failed_starts >= _BACKOFF_AFTER:
            wait = min(_BACKOFF_MAX_S, 2.0 ** (self._failed_starts - _BACKOFF_AFTER))
            self._retry_at = time.monotonic() + wait
            _log.warning("answer-grader worker failed to start %d times in a row; symbolic checks "
                         "return False for %.0f s", self._failed_starts, wait)

    def _restart(self) -> None:
        """Replace a hung or dead worker and warm the new one up while the caller moves on. A
        replacement that cannot launch (out of processes or file handles) is left for the next
        request's `_ensure_ready`, which counts it: this request is already answered (False)."""
        self._kill()
        try:
            self._start()
        except OSError:
            _STATS.bump("start_failures")
            self._kill()

    def pid(self) -> int | None:
        with self._lock:
            try:
                self._ensure_ready()
            except (_WorkerFailed, OSError):
                return None
            return self._proc.pid

    def shutdown(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(OSError):
                    self._conn.send(None)
            if self._proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=1)
            self._kill()


_WORKER = _SymbolicWorker()
atexit.register(_WORKER.shutdown)


def _symbolic_equivalent(candidate: str, reference: str, timeout_s: float) -> bool:
    """math-verify in the worker; no size/explosion screening (callers do that)."""
    _STATS.bump("symbolic_calls")
    ok = _WORKER.request("verify", candidate, reference, timeout_s)
    if ok:
        _STATS.bump("symbolic_true")
    return ok


def equivalent(a: str | None, b: str | None, *, timeout_s: float = 2.0) -> bool:
    """Whether answer ``a`` equals reference answer ``b`` mathematically.

    Three stages, cheapest first: normalised string equality; exact numeric comparison when
    both are plain numbers (`_numbers_match`: within a relative 1e-6, and two finite decimals
    also to the coarser one's last digit, so distinct integers never match);
    math-verify in the sandboxed worker, limited to ``timeout_s`` of wall time (on overrun the
    worker is killed and replaced and the answer is False). The symbolic stage is skipped (->
    False) for answers over `SYMBOLIC_MAX_LEN` characters, base-n numerals, and anything
    `looks_explosive`. ``b`` is passed to math-verify as the gold answer (its comparison is
    slightly asymmetric). Thread-safe; every outcome is counted in `stats`.
    """
    _STATS.bump("calls")
    na, nb = normalize(a), normalize(b)
    if not na or not nb:
        return False
    if na == nb:
        _STATS.bump("string_match")
        return True
    va, vb = parse_number(na), parse_number(nb)
    if va is not None and vb is not None:
        _STATS.bump("numeric")
        return _numbers_match(va, vb)
    if _BASE_SUBSCRIPT_RE.search(na) or _BASE_SUBSCRIPT_RE.search(nb):
        _STATS.bump("skipped_base")
        return False
    if len(na) > SYMBOLIC_MAX_LEN or len(nb) > SYMBOLIC_MAX_LEN:
        _STATS.bump("skipped_too_long")
        return False
    if looks_explosive(na) or looks_explosive(nb):
        _STATS.bump("skipped_explosive")
        return False
    return _symbolic_equivalent(na, nb, timeout_s)


def stats() -> dict[str, int]:
    """Counters since import (or `reset_stats`): calls, stage decisions, timeouts, crashes..."""
    return _STATS.snapshot()


def reset_stats() -> None:
    _STATS.reset()


def worker_pid() -> int | None:
    """PID of the symbolic worker (starting it if needed); None if it cannot start."""
    return _WORKER.pid()


def shutdown() -> None:
    """Stop the worker now (it is restarted on the next symbolic check). Also run at exit."""
    _WORKER.shutdown()


# --------------------------------------------------------------------------------------------
# Rewards and voting
# --------------------------------------------------------------------------------------------


def verifiable_reward(
    rollout_answer: str | None,
    reference_answer: str | None,
    mode: Literal["exact", "equivalent"] = "exact",
) -> float:
    """1.0 if the rollout's answer matches the reference, else 0.0 (also when either is None).

    "exact" is the paper's normalised string match; "equivalent" adds the numeric and
    symbolic stages of `equivalent`.
    """
    if rollout_answer is None or reference_answer is None:
        return 0.0
    if mode == "exact":
        na = normalize(rollout_answer)
        return float(bool(na) and na == normalize(reference_answer))
    if mode == "equivalent":
        return float(equivalent(rollout_answer, reference_answer))
    raise ValueError(f"unknown reward mode {mode!r}")


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """Most common answer by normalised form; ties go to the group seen first.

    Returns the first original spelling of the winning group; None if no answer is usable.
    """
    counts: dict[str, int] = {}
    first: dict[str, str] = {}
    for ans in answers:
        key = normalize(ans)
        if not key:
            continue
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, ans)
    if not counts:
        return None
    best = max(counts.values())
    return first[next(k for k, c in counts.items() if c == best)]
