"""Tests for catjax.cat.answers: extraction, normalisation, equivalence, the sandboxed worker."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from fractions import Fraction
from pathlib import Path

import pytest

from catjax.cat import answers, verify_worker
from catjax.cat.answers import (
    EXTRACTORS,
    equivalent,
    extract_answer,
    extract_boxed,
    majority_vote,
    normalize,
    verifiable_reward,
)

REPO = Path(__file__).resolve().parents[2]
# The shipped copy; the shared one is the same file, for checkouts without data_files.
MATH500 = REPO / "catjax" / "data_files" / "math500" / "test.jsonl"  # shipped with the package
GSM8K = REPO / "catjax" / "data_files" / "gsm8k" / "test.jsonl"
HOSTILE = REPO / "tests" / "data" / "hostile_answers.jsonl"


@pytest.fixture(scope="session")
def grader() -> int:
    """Start the symbolic worker once for the session; yields its pid."""
    pid = answers.worker_pid()
    assert pid is not None, "math-verify worker failed to start"
    return pid


def _math500_golds() -> list[str]:
    with MATH500.open() as f:
        return [json.loads(line)["answer"] for line in f]


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------

BOXED_CASES = [
    ("So the answer is $\\boxed{5}$.", "5"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not count
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
    ("first \\boxed{3} then \\boxed{4}", "4"),
    ("\\boxed{1} \\boxed{2} \\boxed{3}", "3"),
    ("\\fbox{7}", "7"),
    ("\\fbox{1} and finally \\boxed{2}", "2"),
    ("\\boxed{2} and finally \\fbox{1}", "1"),
    ("\\boxed 5", "5"),
    ("$\\boxed 5$.", "5"),
    ("\\boxed {5}", "5"),
    ("\\boxed{ 42 }", "42"),
    ("\\boxed{\\boxed{5}}", "5"),
    ("\\boxed{a}{b}", "a"),
    ("}}}\\boxed{5}", "5"),
    ("{{ \\boxed{5}", "5"),
    ("\\boxed{x^{2^{3}}}", "x^{2^{3}}"),
    ("\\boxed{\\text{(C)}}.", "\\text{(C)}"),
    ("no box here, just 42", None),
    ("", None),
    (None, None),
    ("\\boxed{5", None),  # truncated generation
    ("\\boxed{4} and then \\boxed{5", None),  # the *last* box is unbalanced
    ("\\boxed{{5}", None),
    ("\\boxed{}", None),
    ("\\boxed", None),
    ("\\boxedx{5}", None),  # a different macro
    # Boxes that hold no answer give way to the box before them.
    ("\\boxed{5}. (Formatted with \\boxed as asked.)", "5"),
    ("\\boxed{5}.\nNote: use \\boxed{} for answers.", "5"),
    ("\\boxed{ } \\boxed{}", None),
    ("\\boxed\n{9}", "9"),
    ("\\boxed A", "A"),
    ("\\boxed -3.", "-3."),
    ("\\boxed{6} and \\boxed{7", None),  # but a truncated last box still ends the search
]


@pytest.mark.parametrize(("text", "expected"), BOXED_CASES)
def test_extract_boxed(text: str | None, expected: str | None) -> None:
    assert extract_boxed(text) == expected


OTHER_EXTRACTOR_CASES = [
    ("gsm8k", "She has 3 + 4 = 7 apples.\n#### 7", "7"),
    ("gsm8k", "#### 1,000", "1,000"),
    ("gsm8k", "#### 3\nwait\n#### 4", "4"),
    ("gsm8k", "no marker 12", None),
    ("answer_is", "Thus the answer is 42.", "42"),
    (
        "answer_is",
        "Final Answer: The final answer is $\\frac{1}{2}$. I hope it is correct.",
        "\\frac{1}{2}",
    ),
    ("answer_is", "final answer: 3.5", "3.5"),
    ("answer_is", "**Final Answer:** 17", "17"),
    ("answer_is", "The answer is \\boxed{9} obviously", "9"),
    ("answer_is", "the answer is: (3, 4). Done.", "(3, 4)"),
    ("answer_is", "Answer: \\(x = 2\\)", "x = 2"),
    ("answer_is", "I have no idea", None),
    ("last_number", "3 apples and 1,234 pears", "1,234"),
    ("last_number", "so x = -3", "-3"),
    ("last_number", "5-3", "3"),
    ("last_number", "the ratio is 3/4", "3/4"),
    ("last_number", "it costs 2.5.", "2.5"),
    ("last_number", "about .5 of it", ".5"),
    ("last_number", "it drops by -.5", "-.5"),
    ("last_number", "so the probability is \\frac{1}{2}", "\\frac{1}{2}"),
    ("last_number", "x = -\\dfrac{3}{4}.", "-\\dfrac{3}{4}"),
    ("last_number", "\\frac{x}{2}", "2"),  # not a plain fraction
    ("last_number", "no digits", None),
    ("last_number", "\uff15 fullwidth is not a digit here", None),
]


@pytest.mark.parametrize(("mode", "text", "expected"), OTHER_EXTRACTOR_CASES)
def test_other_extractors(mode: str, text: str, expected: str | None) -> None:
    assert EXTRACTORS[mode](text) == expected


@pytest.mark.parametrize(
    ("text", "modes", "expected"),
    [
        ("\\boxed{5} and the answer is 6", ("boxed", "answer_is", "last_number"), ("5", "boxed")),
        ("the answer is 6, then 7", ("boxed", "answer_is", "last_number"), ("6, then 7", "answer_is")),
        ("we end with 7 cats", ("boxed", "answer_is", "last_number"), ("7", "last_number")),
        ("nothing at all", ("boxed", "answer_is", "last_number"), (None, None)),
        ("#### 8\n\\boxed{9}", ("gsm8k", "boxed"), ("8", "gsm8k")),
        ("#### 8\n\\boxed{9}", ("boxed",), ("9", "boxed")),
    ],
)
def test_extract_answer_reports_mode(text, modes, expected) -> None:
    assert extract_answer(text, modes=modes) == expected


def test_extract_answer_rejects_unknown_mode() -> None:
    with pytest.raises(KeyError):
        extract_answer("\\boxed{1}", modes=("boxed", "nope"))


def test_extract_boxed_is_linear_on_megabyte_input() -> None:
    text = "x " * 500_000 + "\\boxed{" + "{" * 10_000 + "7" + "}" * 10_000 + "}"
    t0 = time.monotonic()
    assert extract_boxed(text) == "{" * 10_000 + "7" + "}" * 10_000
    assert extract_boxed("\\boxed{" * 200_000) is None
    assert time.monotonic() - t0 < 2.0


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------

NORMALIZE_CASES = [
    (" 5 ", "5"),
    ("$5$", "5"),
    ("\\$36", "36"),
    ("\\$32,\\!348", "32348"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
    ("\\left\\{1,2\\right\\}", "\\{1,2\\}"),
    ("\\dfrac{17}{50}", "\\frac{17}{50}"),
    ("\\tfrac{1}{2}", "\\frac{1}{2}"),
    ("\\frac12", "\\frac{1}{2}"),
    ("\\frac 59", "\\frac{5}{9}"),
    ("\\frac9{19}", "\\frac{9}{19}"),
    ("\\frac{270}7\\text{ degrees}", "\\frac{270}{7}"),
    ("\\sqrt2", "\\sqrt{2}"),
    ("11\\sqrt2", "11\\sqrt{2}"),
    ("\\text{Evelyn}", "Evelyn"),
    ("\\mathrm{east}", "east"),
    ("\\mbox{even}", "even"),
    ("\\text{(C)}", "C"),
    ("10,\\!080", "10080"),
    ("11,\\! 111,\\! 111,\\! 100", "11111111100"),
    ("1,000", "1000"),
    ("1,000.50", "1000.5"),
    ("1,000.", "1000"),  # the full stop goes first, then the separator
    ("(1,2)", "(1,2)"),
    ("1,-2", "1,-2"),
    ("3, 5, 7", "3,5,7"),
    ("90^\\circ", "90"),
    ("90^{\\circ}", "90"),
    ("90\u00b0", "90"),
    ("10\\%", "10"),
    ("10%", "10"),
    ("5.4 \\text{ cents}", "5.4"),
    ("864 \\mbox{ inches}^2", "864"),
    ("15\\mbox{ cm}^2", "15"),
    ("12 inches", "12"),
    ("5 dollars.", "5"),
    ("2s", "2s"),  # one-letter "units" are left alone: could be algebra
    ("x=5", "5"),
    ("y = 2x + 3", "2x+3"),
    ("x \\in [-2,7]", "[-2,7]"),
    ("x=1, y=2", "x=1,y=2"),
    ("5x - 7y + 11z + 4 = 0", "5x-7y+11z+4=0"),
    ("\\cot x", "\\cot x"),
    ("x^{2}", "x^2"),
    ("4210_{5}", "4210_5"),
    ("5.0", "5"),
    ("5.00", "5"),
    ("2.50", "2.5"),
    (".5", "0.5"),
    (".0000672", "0.0000672"),
    ("\\$18.90", "18.9"),
    ("5.", "5"),
    ("1, 2, ...", "1,2,..."),
    ("\\begin{bmatrix} 1 \\\\ 2 \\end{bmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
    ("a \\le b", "a\\leq b"),
    ("\\displaystyle \\frac{1}{2}", "\\frac{1}{2}"),
    ("5\x00", "5"),
    # Separate numbers stay separate (a list, two numbers), and keep their normal form.
    ("1, 234", "1, 234"),
    ("x=1, 234", "1, 234"),
    ("-3, 500", "-3, 500"),
    ("1 \\quad 2", "1 2"),
    ("1\\;2", "1 2"),
    ("2 3", "2 3"),
    ("10\\,000", "10000"),
    ("1 000 000", "1000000"),
    ("12 345.5", "12345.5"),
    # Punctuation alone is no answer.
    ("-", ""),
    ("?", ""),
    ("\\text{,}", ""),
    ("\\{\\}", "\\{\\}"),
    ("", ""),
    (None, ""),
    ("7" * (answers.MAX_ANSWER_CHARS + 1), ""),
]


@pytest.mark.parametrize(("raw", "expected"), NORMALIZE_CASES)
def test_normalize(raw: str | None, expected: str) -> None:
    assert normalize(raw) == expected


@pytest.mark.parametrize("text", [
    "1." + "0" * 9990 + "1",  # a long fraction ending in a non-zero: every split was retried
    "x=" + " " * 9990 + "=",  # an assignment whose match fails at the end
    "90^" + " " * 9990 + "1",  # a degree sign that never comes
    "}." + "0" * 9990 + "1",
], ids=["trailing-zeros", "assignment", "degree", "brace-decimal"])
def test_normalize_is_linear_on_the_longest_answer(text: str) -> None:
    """Every rollout's answer is normalised: a 10k-character one must not take seconds (these
    took 0.5-3 s with backtracking patterns; linear ones take milliseconds)."""
    assert len(text) <= answers.MAX_ANSWER_CHARS
    t0 = time.monotonic()
    normalize(text)
    assert time.monotonic() - t0 < 0.25


def test_normalize_is_idempotent_on_math500() -> None:
    for gold in _math500_golds():
        once = normalize(gold)
        assert once, gold
        assert normalize(once) == once, gold


# --------------------------------------------------------------------------------------------
# Equivalence
# --------------------------------------------------------------------------------------------

# (candidate, reference): MATH-500 gold answers (reference side) in other valid spellings.
EQUIVALENT_PAIRS = [
    ("0.5", "\\frac{1}{2}"),
    ("\\dfrac12", "\\frac{1}{2}"),
    (".5", "0.5"),
    ("1/2", "\\frac12"),
    ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("(3,\\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("10", "10\\%"),
    ("5", "x=5"),
    ("[-2, 7]", "x \\in [-2,7]"),
    ("\\frac{\\sqrt2}{2}", "\\sqrt{2}/2"),
    ("14/3", "\\frac{14}{3}"),
    ("4.666667", "\\frac{14}{3}"),
    ("90", "90^\\circ"),
    ("90\u00b0", "90^\\circ"),
    ("\\sqrt{117}", "3\\sqrt{13}"),
    ("6-5i", "6 - 5i"),
    ("-2, 1", "1,-2"),
    ("7, 5, 3", "3, 5, 7"),
    ("11\\sqrt{2}", "11\\sqrt2"),
    ("\\frac{3}{4}\\sqrt{3}", "\\frac{3\\sqrt{3}}{4}"),
    ("\\frac{\\cos x}{\\sin x}", "\\cot x"),
    (
        "\\begin{pmatrix} -\\frac{1}{3} \\\\ \\frac{2}{3} \\\\ \\frac{5}{3} \\end{pmatrix}",
        "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}",
    ),
    ("\\left(3, 4\\right]", "(3,4]"),
    ("\\frac{4}{3}", "\\frac43"),
    ("1.3333333", "\\frac43"),
    ("1\\frac{1}{3}", "\\frac43"),
    ("C", "\\text{(C)}"),
    ("(C)", "\\text{(C)}"),
    ("10080", "10,\\!080"),
    ("10,080", "10,\\!080"),
    ("32348", "\\$32,\\!348"),
    ("\\$32348.00", "\\$32,\\!348"),
    ("\\frac{270}{7}", "\\frac{270}7\\text{ degrees}"),
    ("0.0000672", ".0000672"),
    ("6.72 \\times 10^{-5}", ".0000672"),
    ("-5x + 7y - 11z - 4 = 0", "5x - 7y + 11z + 4 = 0"),
    ("(2, \\infty)", "(2,\\infty)"),
    ("864", "864 \\mbox{ inches}^2"),
    ("1.8", "1\\frac{4}{5}"),
    ("\\frac{9}{5}", "1\\frac{4}{5}"),
    ("\\{-2, 1+\\sqrt5, 1-\\sqrt5\\}", "\\{1\\pm\\sqrt{5},-2\\}"),
    ("18.9", "\\$18.90"),
    ("2x+3", "y = 2x + 3"),
    ("y=3+2x", "y = 2x + 3"),
    ("137.5", "137 \\frac{1}{2}"),
    ("15", "15\\mbox{ cm}^2"),
    ("\\frac{1}{\\sqrt{3}}", "\\frac{\\sqrt{3}}{3}"),
    ("\\sqrt{20}", "2\\sqrt{5}"),
    ("-\\pi/6", "-\\frac{\\pi}{6}"),
    ("58500", "58,500"),
    ("-q+p", "p - q"),
    ("3x + x^3 - 6", "x^3+3x-6"),
    ("(b+2)(a+5)", "(a+5)(b+2)"),
    ("20000/\\pi", "\\frac{20000}{\\pi}"),
    ("[\\pi^2/8, 5\\pi^2/4]", "\\left[ \\frac{\\pi^2}{8}, \\frac{5 \\pi^2}{4} \\right]"),
    ("2(k+1)", "2k+2"),
    ("\\frac{x^9-1}{x-1}", "x^8 + x^7 + x^6 + x^5 + x^4 + x^3 + x^2 + x + 1"),
    ("4210_5", "4210_{5}"),
    ("(-\\infty,2)\\cup(3,\\infty)", "(-\\infty, 2) \\cup (3, \\infty)"),
    ("0.15", "\\frac{3}{20}"),
    ("3.5000001", "\\frac{7}{2}"),
    ("0.30000000000000004", "0.3"),  # float noise
    ("0.333333", "\\frac13"),
    ("\\pi", "\\pi"),
    ("1000", "1,000"),
    ("\\text{east}", "\\text{east}"),
]

NON_EQUIVALENT_PAIRS = [
    ("0.51", "\\frac12"),
    ("1000001", "1000000"),  # distinct integers never match within tolerance
    ("123456.7", "123456.8"),  # nor distinct decimals that differ in a written digit
    ("1234567.89", "1234567.8"),  # within 1e-6, but not to the coarser one's last digit
    ("0.33", "\\frac13"),
    ("(3,4)", "(3,4]"),
    ("(-2,7)", "[-2,7]"),
    ("-5", "x=5"),
    ("2", "\\sqrt{2}"),
    ("\\sqrt{6}", "2\\sqrt2"),
    ("1,2", "1,-2"),
    ("(2,1)", "(1,2)"),
    ("\\text{west}", "\\text{east}"),
    ("q-p", "p - q"),
    ("6+5i", "6 - 5i"),
    ("100", "10"),
    ("0.1", "10\\%"),  # the percent sign is dropped, not divided out
    ("1", "1,000"),
    ("3.14", "\\pi"),
    ("x^3", "x^2"),
    ("2x+4", "2x+3"),
    ("1\\frac{4}{6}", "\\frac{9}{5}"),
    ("", "5"),
    ("5", ""),
    ("B", "\\text{(C)}"),
    ("-\\infty", "\\infty"),
    ("54", "5.4"),
    ("1.24", "1.25"),
    ("3, 5", "3, 5, 7"),
    ("\\begin{pmatrix}2\\\\1\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
    ("y=2x-3", "y=2x+3"),
    ("52", "52_8"),  # base-8 numeral: math-verify would drop the subscript
    ("4210", "4210_{5}"),
    ("2000000", "2,000"),
    ("1", "\\frac{1}{0}"),
    ("-1", "e^{i\\pi}"),
    ("\uff15", "5"),  # fullwidth digit: no Unicode folding
    ("10^{10^{10}}", "1"),  # screened out before the worker
    ("9^9^9", "9"),
]


@pytest.mark.parametrize(("a", "b"), EQUIVALENT_PAIRS)
def test_equivalent_pairs(grader: int, a: str, b: str) -> None:
    assert equivalent(a, b)


@pytest.mark.parametrize(("a", "b"), NON_EQUIVALENT_PAIRS)
def test_non_equivalent_pairs(grader: int, a: str, b: str) -> None:
    assert not equivalent(a, b)


def test_equivalent_none_and_empty() -> None:
    assert not equivalent(None, "5")
    assert not equivalent("5", None)
    assert not equivalent(None, None)
    assert not equivalent("", "")
    assert not equivalent("$ $", " ")


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("5", Fraction(5)),
        ("-5", Fraction(-5)),
        ("0.25", Fraction(1, 4)),
        ("3/4", Fraction(3, 4)),
        ("-\\frac{3}{4}", Fraction(-3, 4)),
        ("\\frac{-3}{4}", Fraction(-3, 4)),
        ("1\\frac{4}{5}", Fraction(9, 5)),
        ("-1\\frac{1}{2}", Fraction(-3, 2)),
        ("\\frac{1.5}{3}", Fraction(1, 2)),
        ("\\frac{1}{0}", None),
        ("1/0", None),
        ("\\sqrt{2}", None),
        ("\uff15", None),  # int() would accept this; our parser must not
        ("1_000", None),  # Fraction() would accept this too
        ("9" * 200, None),  # too long to be a plain number
    ],
)
def test_parse_number(text: str, value: Fraction | None) -> None:
    assert answers.parse_number(text) == value


def test_math500_golds_extract_from_boxes() -> None:
    bad = [g for g in _math500_golds() if extract_boxed(f"so we get $\\boxed{{{g}}}$.") != g]
    assert not bad


def test_gsm8k_golds_extract_as_numbers() -> None:
    with GSM8K.open() as f:
        solutions = [json.loads(line)["answer"] for line in f]
    for sol in solutions:
        gold, mode = extract_answer(sol, modes=("gsm8k", "last_number"))
        assert mode == "gsm8k" and answers.parse_number(normalize(gold)) is not None, sol
        assert equivalent(extract_answer(sol, modes=("last_number",))[0], gold), sol


def test_math500_golds_equivalent_to_themselves() -> None:
    bad = [g for g in _math500_golds() if not equivalent(g, g)]
    assert not bad


def test_math500_golds_verify_symbolically(grader: int) -> None:
    """All 500 golds also go through the worker (bypassing the string stage) and match."""
    golds = _math500_golds()
    assert not [g for g in golds if answers.looks_explosive(normalize(g))]
    bad = [g for g in golds if not answers._symbolic_equivalent(normalize(g), normalize(g), 5.0)]
    assert not bad


def _respellings(gold: str) -> list[str]:
    """Other valid spellings of a MATH gold answer, generated mechanically."""
    out = [f"${gold}$", f"{gold}.", f" {gold} "]
    if m := re.fullmatch(r"(-?)\\[dt]?frac\{(\d+)\}\{(\d+)\}", gold):
        sign, p, q = m.groups()
        out += [f"{sign}{p}/{q}", f"{sign}\\dfrac{{{p}}}{{{q}}}"]
        value = Fraction(int(p), int(q))
        out.append(f"{sign}{float(value):.10f}")
        if len(p) == 1 and len(q) == 1:
            out.append(f"{sign}\\frac{p}{q}")
    if re.fullmatch(r"-?\d+", gold):
        out += [f"{gold}.0", f"{gold}.00"]
        if len(gold.lstrip("-")) > 3:
            out.append(f"{int(gold):,}")
    if re.fullmatch(r"\d+\^\\circ", gold):
        out += [gold.replace("^\\circ", ""), gold.replace("^\\circ", "^{\\circ}")]
    if gold.startswith("\\text{") and gold.endswith("}"):
        out.append(gold[6:-1])
    if "\\sqrt{" in gold:
        out.append(re.sub(r"\\sqrt\{(\d)\}", r"\\sqrt\1", gold))
    if gold.startswith("\\left"):
        out.append(gold.replace("\\left", "").replace("\\right", ""))
    return out


def test_math500_golds_respelled(grader: int) -> None:
    pairs = [(v, g) for g in _math500_golds() for v in _respellings(g)]
    assert len(pairs) > 1500
    bad = [(v, g) for v, g in pairs if not equivalent(v, g)]
    assert not bad


def test_math500_normalisation_merges_only_respellings(grader: int) -> None:
    """Distinct gold strings that share a normalised key must be the same number."""
    groups: dict[str, set[str]] = {}
    for gold in _math500_golds():
        groups.setdefault(normalize(gold), set()).add(gold)
    merged = [g for g in groups.values() if len(g) > 1]
    assert merged  # e.g. {"\\frac14", "\\frac{1}{4}"}
    for group in merged:  # math-verify on the raw strings is the independent judge
        first, *rest = sorted(group)
        assert all(answers._symbolic_equivalent(other, first, 5.0) for other in rest), group


# --------------------------------------------------------------------------------------------
# Rewards and voting
# --------------------------------------------------------------------------------------------


def test_verifiable_reward_exact() -> None:
    assert verifiable_reward("\\frac12", "\\dfrac{1}{2}") == 1.0
    assert verifiable_reward("x = 5", "5") == 1.0
    assert verifiable_reward("0.5", "\\frac12") == 0.0  # exact mode: no numeric stage
    assert verifiable_reward(None, "5") == 0.0
    assert verifiable_reward("5", None) == 0.0
    assert verifiable_reward("", "") == 0.0


def test_verifiable_reward_equivalent(grader: int) -> None:
    assert verifiable_reward("0.5", "\\frac12", mode="equivalent") == 1.0
    assert verifiable_reward("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}", mode="equivalent") == 1.0
    assert verifiable_reward("0.6", "\\frac12", mode="equivalent") == 0.0
    assert verifiable_reward(None, "\\frac12", mode="equivalent") == 0.0
    with pytest.raises(ValueError):
        verifiable_reward("1", "1", mode="fuzzy")  # type: ignore[arg-type]


def test_majority_vote() -> None:
    assert majority_vote(["\\frac12", "3", "\\dfrac{1}{2}", "3", "\\frac{1}{2}"]) == "\\frac12"
    assert majority_vote(["4", "5", "5.0", "4"]) == "4"  # tie: group seen first wins
    assert majority_vote([None, "", "7", None]) == "7"
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None
    assert majority_vote(["x=5", "5", "6"]) == "x=5"
    assert majority_vote(["-", "-", "5"]) == "5"  # punctuation is no answer


def test_separate_numbers_never_match_their_concatenation() -> None:
    for a, b in [("1 \\quad 2", "12"), ("1, 234", "1234"), ("1\\;2", "12"), ("-", "-")]:
        assert verifiable_reward(a, b, "exact") == 0.0
    assert verifiable_reward("1,234", "1234", "exact") == 1.0


# --------------------------------------------------------------------------------------------
# The worker: stats, timeouts, crashes, threads, sandbox
# --------------------------------------------------------------------------------------------


def test_stats_count_stages(grader: int) -> None:
    before = answers.stats()
    assert equivalent("\\frac12", "\\dfrac{1}{2}")  # string
    assert equivalent("0.5", "\\frac12")  # numeric
    assert equivalent("\\sqrt{8}", "2\\sqrt{2}")  # symbolic
    assert not equivalent("9^9^9^9", "1")  # screened
    assert not equivalent("1+" * 600 + "1", "1201")  # too long for the symbolic step
    after = answers.stats()
    delta = {k: after[k] - before[k] for k in after}
    assert delta["calls"] == 5
    assert delta["string_match"] == 1
    assert delta["numeric"] == 1
    assert delta["symbolic_calls"] == 1 and delta["symbolic_true"] == 1
    assert delta["skipped_explosive"] == 1
    assert delta["skipped_too_long"] == 1


def _assert_serving() -> None:
    assert equivalent("\\frac12", "0.5")
    assert equivalent("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}")  # needs the worker


def test_worker_replaced_after_hang(grader: int) -> None:
    before = answers.stats()
    pid = answers.worker_pid()
    t0 = time.monotonic()
    assert answers._WORKER.request("sleep", "30", "", timeout_s=0.5) is False
    assert time.monotonic() - t0 < 2.0
    assert answers.stats()["timeouts"] == before["timeouts"] + 1
    new_pid = answers.worker_pid()
    assert new_pid is not None and new_pid != pid
    _assert_serving()


def test_worker_that_cannot_be_replaced_is_a_false_answer_not_a_crash(grader, monkeypatch) -> None:
    """Out of processes (EMFILE, EAGAIN) when replacing a hung worker: the request is False and
    counted; once launching works again the next request gets a fresh worker."""
    def cannot_launch():
        raise OSError(24, "Too many open files")

    before = answers.stats()
    with monkeypatch.context() as m:
        m.setattr(answers, "_launch_worker", cannot_launch)
        assert answers._WORKER.request("sleep", "30", "", timeout_s=0.5) is False
        assert answers.stats()["start_failures"] == before["start_failures"] + 1
        assert answers._WORKER.request("ping", "", "", timeout_s=2.0) is False  # still none
        assert answers.stats()["start_failures"] == before["start_failures"] + 2
    _assert_serving()


def test_a_worker_that_keeps_failing_to_start_is_not_retried_on_every_request(
        grader, monkeypatch) -> None:
    """Three failed starts in a row: requests answer False at once for a while (counted), instead
    of each paying a launch (or the start-up timeout); after the pause one start is tried again."""
    launches = []

    def cannot_launch():
        launches.append(1)
        raise OSError(24, "Too many open files")

    answers._WORKER.shutdown()
    before = answers.stats()
    with monkeypatch.context() as m:
        m.setattr(answers, "_launch_worker", cannot_launch)
        for _ in range(answers._BACKOFF_AFTER + 2):
            assert answers._WORKER.request("ping", "", "", timeout_s=2.0) is False
        assert len(launches) == answers._BACKOFF_AFTER  # the last two did not try
        got = answers.stats()
        assert got["start_failures"] - before["start_failures"] == answers._BACKOFF_AFTER
        assert got["skipped_worker_down"] - before["skipped_worker_down"] == 2
        answers._WORKER._retry_at = 0.0  # the pause is over: one more try, still failing
        assert answers._WORKER.request("ping", "", "", timeout_s=2.0) is False
        assert len(launches) == answers._BACKOFF_AFTER + 1
        assert answers._WORKER._retry_at > time.monotonic() + 1.5  # now 2 s
    answers._WORKER._retry_at = 0.0
    _assert_serving()
    assert answers._WORKER._failed_starts == 0


def test_worker_replaced_after_real_math_hang(grader: int) -> None:
    """An input that really hangs sympy (screening bypassed) is cut off by the wall clock."""
    before = answers.stats()
    t0 = time.monotonic()
    assert answers._symbolic_equivalent("10^{10^{10}}", "1", timeout_s=0.5) is False
    assert time.monotonic() - t0 < 2.0
    assert answers.stats()["timeouts"] == before["timeouts"] + 1
    _assert_serving()


def test_worker_replaced_after_kill(grader: int) -> None:
    before = answers.stats()
    pid = answers.worker_pid()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while answers._WORKER._proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # wait until the death is observable, so the next call sees it
    _assert_serving()
    new_pid = answers.worker_pid()
    assert new_pid is not None and new_pid != pid
    after = answers.stats()
    assert after["crashes"] == before["crashes"] + 1
    assert after["restarts"] == before["restarts"] + 1


def test_worker_survives_shutdown(grader: int) -> None:
    answers.shutdown()
    _assert_serving()


def test_equivalent_from_threads(grader: int) -> None:
    answers.shutdown()  # so that a non-main thread has to start the worker
    pairs = [("\\sqrt{8}", "2\\sqrt{2}", True), ("\\sqrt{6}", "2\\sqrt{2}", False)] * 3
    pairs += [("0.5", "\\frac12", True), ("(b+2)(a+5)", "(a+5)(b+2)", True)] * 3
    results: dict[int, bool] = {}

    def run(i: int, a: str, b: str) -> None:
        results[i] = equivalent(a, b)

    threads = [threading.Thread(target=run, args=(i, a, b)) for i, (a, b, _) in enumerate(pairs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == {i: want for i, (_, _, want) in enumerate(pairs)}


def test_looks_explosive() -> None:
    explosive = ["9^9^9^9", "10^{10^{10}}", "9^{9^{9}}", "2^{(3^4)^5}", "2^{123456}", "1000000!"]
    nested = ["(100!)!", "((12)!)!", "\\Gamma(\\Gamma(100))", "\\Gamma(100!)", "\\binom{9!}{3}"]
    for s in [*explosive, *nested, "(10^{10})!", "9!!!!", "\\Gamma(10^{10})"]:
        assert answers.looks_explosive(s), s
    for s in ["x^2+y^2", "e^{x^2}", "2^{10}", "5!", "\\frac{(2n)!}{n!}", "x^{2}y^{3}", "2^{n^2}",
              "\\frac{100!}{98!}", "n!(n+1)!", "\\binom{10}{3}"]:
        assert not answers.looks_explosive(s), s


def test_worker_sandbox_is_installed(grader: int) -> None:
    assert answers._WORKER.request("probe", "", "", timeout_s=10.0) is True


@pytest.mark.parametrize(
    ("event", "args"),
    [
        ("os.system", (b"touch x",)),
        ("subprocess.Popen", ("touch", ["touch", "x"], None, None)),
        ("os.posix_spawn", ("touch", ["touch"], {})),
        ("socket.connect", (None, ("127.0.0.1", 80))),
        ("open", ("/tmp/x", "w", 0)),
        ("open", ("/tmp/x", None, os.O_WRONLY | os.O_CREAT)),
        ("compile", (b"__import__('os').system('x')", "<string>")),
        ("compile", ("lambda: 1", "<string>")),
    ],
)
def test_worker_audit_hook_blocks(event: str, args: tuple) -> None:
    with pytest.raises(PermissionError):
        verify_worker._audit_hook(event, args)


@pytest.mark.parametrize(
    ("event", "args"),
    [
        ("open", ("/usr/lib/python3/x.pyc", "r", 0)),
        ("compile", (b"Integer (12 )", "<string>")),  # sympy.Number("12") goes through eval
        ("compile", (b"from sympy import *", "<string>")),
        ("compile", (b"import os", "/site-packages/mod.py")),  # a real module import
    ],
)
def test_worker_audit_hook_allows(event: str, args: tuple) -> None:
    verify_worker._audit_hook(event, args)


# --------------------------------------------------------------------------------------------
# Hostile inputs
# --------------------------------------------------------------------------------------------

HOSTILE_REFS = ("5", "\\frac{1}{2}", "x^2+1")


def _hostile_cases() -> list[dict]:
    with HOSTILE.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _build(case: dict, canary: Path) -> str:
    text = case.get("prefix", "") + case["text"] * case.get("repeat", 1) + case.get("suffix", "")
    return text.replace("CANARY_PATH", str(canary))


def test_hostile_file_is_big_enough() -> None:
    cases = _hostile_cases()
    assert len(cases) >= 60
    assert len({c["id"] for c in cases}) == len(cases)
    assert sum("CANARY_PATH" in c["text"] for c in cases) >= 25
    # Every kind the guarantee names is there, several times over.
    kinds = {c["kind"] for c in cases}
    assert kinds == {"python_injection", "sympy_injection", "latex_macro", "blowup", "size",
                     "control_chars", "unicode_lookalike"}
    assert all(sum(c["kind"] == k for c in cases) >= 8 for k in kinds)
    built = [_build(c, Path("/x")) for c in cases]
    # file inclusion, macros, factorials, NUL bytes, look-alike digits and braces
    for needle in ("\\input", "\\include", "\\def", "\\newcommand", "!", "\x00", "\uff15", "\ufe5b"):
        assert any(needle in t for t in built), needle
    assert any(len(t) >= 1_000_000 for t in built)  # megabyte strings
    assert any("{" * 10_000 in t for t in built)  # 10,000-deep braces
    assert any(t.count("{") != t.count("}") for t in built)  # unbalanced braces


@pytest.mark.parametrize("case", _hostile_cases(), ids=lambda c: c["id"])
def test_hostile_answer(grader: int, case: dict, tmp_path: Path) -> None:
    canary = tmp_path / "CANARY"
    text = _build(case, canary)
    if "CANARY_PATH" in case["text"]:
        assert str(canary) in text
    t0 = time.monotonic()
    for fn in EXTRACTORS.values():
        fn(text)
    # No last-number fallback for the candidate: digits in tmp_path would leak into it.
    ans, _mode = extract_answer(text, modes=("boxed", "answer_is", "gsm8k"))
    candidate = text if ans is None else ans
    normalize(candidate)
    got = {ref: equivalent(candidate, ref) for ref in HOSTILE_REFS}
    if case.get("raw_symbolic") and len(text) <= answers.SYMBOLIC_MAX_LEN:
        # Also hand the untouched text straight to the worker: it must parse, not run, it.
        answers._symbolic_equivalent(text, "5", timeout_s=2.0)
    elapsed = time.monotonic() - t0
    assert elapsed < 3.0, f"{case['id']} took {elapsed:.2f}s"
    assert not canary.exists(), f"{case['id']} executed code"
    assert got == {ref: ref in case.get("equal_to", []) for ref in HOSTILE_REFS}
    # And the grader still serves: a check that needs the (possibly replaced) worker.
    assert answers._symbolic_equivalent("\\sqrt{8}", "2\\sqrt{2}", timeout_s=5.0)


def test_grader_still_serving_after_hostile_inputs(grader: int) -> None:
    _assert_serving()
    assert not equivalent("\\sqrt{6}", "2\\sqrt{2}")
