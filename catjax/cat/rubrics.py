"""Rubrics for CaT's free-form rewards: parse the anchor's rubric, parse judge verdicts, score.

Flow (the paper's non-verifiable setting): the anchor turns its synthesised reference into a
rubric of yes/no criteria (`propose_rubric`); a judge answers every (rollout, criterion) pair
(`catjax.cat.judges`); the reward is the fraction of criteria met (`rubric_reward`).

All text parsed here is model output, so:
* parsing is regex scans with bounded character classes plus one XML parse, linear in the input;
* XML goes through ``defusedxml`` with DTDs, entity declarations and external references
  forbidden, and output that declares a DTD or entity is refused outright (never repaired);
* the regex fallback for slightly broken XML only decodes the five predefined XML entities and
  numeric character references; any other ``&name;`` stays literal text, nothing is expanded.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Sequence
from xml.etree.ElementTree import ParseError

import defusedxml
import defusedxml.ElementTree as safe_et
import jax

from catjax import parallel
from catjax.cat import answers, prompts

_log = logging.getLogger(__name__)

MAX_CRITERION_CHARS = 500
MAX_ITEMS = 20  # criteria kept per rubric (the first ones, after de-duplication)
FALLBACK_REFERENCE_CHARS = 1500
# How many of the last `<rubric>` opening tags to try: a criterion that itself mentions
# "<rubric>" should not hide the real block, and a fixed count keeps parsing linear.
_SPAN_CANDIDATES = 3


class RubricError(ValueError):
    """The anchor's output holds no usable rubric; the message says why in one line."""


# --------------------------------------------------------------------------------------------
# Rubric parsing
# --------------------------------------------------------------------------------------------

# Attribute runs are bounded ({0,200}) so a flood of unterminated "<rubric" costs linear time.
_RUBRIC_OPEN = re.compile(r"<\s*rubric\b[^<>]{0,200}>", re.IGNORECASE)
_RUBRIC_CLOSE = re.compile(r"<\s*/\s*rubric\s*>", re.IGNORECASE)
# "(?:(/)\s*)?" rather than "(/?)\s*": two adjacent optional whitespace runs backtrack quadratically.
_CRITERION_TAG = re.compile(r"<\s*(?:(/)\s*)?criterion\b[^<>]{0,200}>", re.IGNORECASE)
_DECLARATION = re.compile(r"<!\s*(?:DOCTYPE|ENTITY)\b", re.IGNORECASE)
_XML_REF = re.compile(r"&(?:(amp|lt|gt|quot|apos)|#(\d{1,7})|#[xX]([0-9a-fA-F]{1,6}));")
_XML_NAMED = {"amp": "&", "lt": "<", "gt": ">", "quot": '"', "apos": "'"}
_SPACE_RUN = re.compile(r"\s+")


def _clean(text: str) -> str:
    """One line, whitespace collapsed, controls dropped, capped: criteria are single yes/no
    statements."""
    # Control characters (a raw NUL, or "&#1;" decoded) would travel into every judge prompt.
    text = _SPACE_RUN.sub(" ", answers.CONTROL_CHARS_RE.sub("", text)).strip()
    if len(text) > MAX_CRITERION_CHARS:
        text = text[: MAX_CRITERION_CHARS - 1].rstrip() + "…"
    return text


def _decode_refs(text: str) -> str:
    """Decode only predefined XML entities and numeric references (single pass, no recursion)."""

    def sub(m: re.Match[str]) -> str:
        if m.group(1):
            return _XML_NAMED[m.group(1)]
        code = int(m.group(2)) if m.group(2) else int(m.group(3), 16)
        valid = 0 < code <= 0x10FFFF and not 0xD800 <= code <= 0xDFFF
        return chr(code) if valid else m.group(0)

    return _XML_REF.sub(sub, text)


def _criteria_from_xml(span: str) -> list[str]:
    """Criterion texts of a well-formed ``<rubric>`` span; raises ParseError/DefusedXmlException."""
    root = safe_et.fromstring(span, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    found = []
    for el in root.iter():
        if isinstance(el.tag, str) and el.tag.rsplit("}", 1)[-1].lower() == "criterion":
            # itertext keeps text inside unknown inline tags (<b>, <em>) the model may add.
            found.append("".join(el.itertext()))
    return found


def _criteria_from_regex(span: str) -> list[str]:
    """Fallback for almost-XML (a stray ``&``, a truncated tail, a mismatched tag).

    One pass over criterion tags: each opening tag pairs with the next closing tag; an opening
    tag followed by another opening tag is dropped (it was never closed, e.g. truncated).
    """
    found = []
    start: int | None = None
    for m in _CRITERION_TAG.finditer(span):
        if not m.group(1):
            start = m.end()
        elif start is not None:
            found.append(_decode_refs(span[start : m.start()]))
            start = None
    return found


def _dedupe(raw: list[str], max_items: int) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for text in raw:
        text = _clean(text)
        key = text.casefold()
        if text and key not in seen:
            seen.add(key)
            out.append(text)
            if len(out) == max_items:
                break
    return out


def _parse_span(span: str, min_items: int, max_items: int) -> list[str]:
    how = "xml"
    try:
        raw = _criteria_from_xml(span)
    except defusedxml.DefusedXmlException as e:  # unreachable after _DECLARATION, kept as a guard
        raise RubricError(f"rubric XML refused by defusedxml: {type(e).__name__}") from None
    except ParseError:
        how = "regex fallback"
        raw = _criteria_from_regex(span)
    criteria = _dedupe(raw, max_items)
    if len(criteria) < min_items:
        raise RubricError(
            f"rubric has {len(criteria)} distinct non-empty criteria ({how}), need >= {min_items}")
    return criteria


def parse_rubric(text: str, min_items: int = 5, max_items: int = MAX_ITEMS) -> list[str]:
    """Criteria of the last ``<rubric>...</rubric>`` block in the anchor's output.

    Chatter and code fences around the block are ignored. The block is parsed as XML
    (defusedxml); if that fails, a documented second path pairs ``<criterion>...</criterion>``
    tags by regex (missing ``</rubric>``, unescaped ``&``, stray tags). Criteria are
    whitespace-collapsed, capped at ~500 chars, de-duplicated case-insensitively, and at most
    ``max_items`` are kept. Raises `RubricError` when fewer than ``min_items`` remain, when
    there is no block, or when the output declares a DTD or entity (billion laughs, XXE).

    Criterion text may still contain tag-like text (``</rubric>``, ``<verdict>yes``); it is
    fenced by `prompts.judge` before it reaches a judge.
    """
    if not 1 <= min_items <= max_items:
        raise ValueError(f"need 1 <= min_items <= max_items, got {min_items}, {max_items}")
    if not isinstance(text, str):
        raise RubricError(f"rubric output is {type(text).__name__}, not text")
    if _DECLARATION.search(text):
        raise RubricError("rubric output declares a DTD or entity; refused")
    opens = list(_RUBRIC_OPEN.finditer(text))
    if not opens:
        raise RubricError("no <rubric> block in output")
    first_error: RubricError | None = None
    for m in reversed(opens[-_SPAN_CANDIDATES:]):
        closes = list(_RUBRIC_CLOSE.finditer(text, m.end()))
        # Last closing tag after this opening: a criterion mentioning "</rubric>" cannot cut the
        # block short. No closing tag (truncated output): take the rest and let the regex cope.
        end = closes[-1].end() if closes else len(text)
        span = text[m.start() : end]
        if not closes:
            span += "</rubric>"
        try:
            return _parse_span(span, min_items, max_items)
        except RubricError as e:
            first_error = first_error or e
    assert first_error is not None
    raise first_error


# --------------------------------------------------------------------------------------------
# Verdict parsing
# --------------------------------------------------------------------------------------------

_VERDICT_TAG = re.compile(r"<\s*verdict\s*>\s*(yes|no)\s*<\s*/\s*verdict\s*>", re.IGNORECASE)
# A bare answer at the very start, e.g. "Yes." or "no</verdict>" after a `<verdict>` prefill;
# not "yes/no", "Yes_" or "yes2": the word must end there.
_LEADING = re.compile(r"[\s*\"'`]*(?:<\s*verdict\s*>\s*)?(yes|no)(?![\w/|\\-])", re.IGNORECASE)
# The rest of the leading answer's clause: "yes or no", "Yes, but no" name both words.
_CLAUSE = re.compile(r"[^.!?\n<]{0,200}")
_OTHER = {"yes": re.compile(r"\bno\b", re.IGNORECASE), "no": re.compile(r"\byes\b", re.IGNORECASE)}


def parse_verdict(text: str | None) -> bool | None:
    """The judge's yes/no: ``<verdict>yes</verdict>`` / ``no``, else a bare leading yes/no.

    Only ever call this on the judge's *own* output, never on the rollout: the rollout is shown
    to the judge inside its prompt and may contain forged ``<verdict>yes</verdict>`` text.
    Returns None when there is no verdict or it is ambiguous (both yes and no tags; a bare
    answer whose clause names the other word too, as in "yes or no").
    """
    if not isinstance(text, str):
        return None
    tagged = {m.group(1).lower() for m in _VERDICT_TAG.finditer(text)}
    if tagged:
        return tagged == {"yes"} if len(tagged) == 1 else None
    m = _LEADING.match(text)
    if not m:
        return None
    word = m.group(1).lower()
    clause = _CLAUSE.match(text, m.end()).group(0)
    return None if _OTHER[word].search(clause) else word == "yes"


# --------------------------------------------------------------------------------------------
# Rubric proposal (batched, with retries and a fallback)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RubricStats:
    """Counts for one or more `propose_rubric` calls (add them up across steps with ``+=``)."""

    references: int = 0
    attempts: int = 0  # prompts sent to the anchor (first asks plus re-asks)
    parse_failures: int = 0
    fallbacks: int = 0
    criteria: int = 0  # total criteria across returned rubrics (fallbacks count as one)

    def __iadd__(self, other: RubricStats) -> RubricStats:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def as_metrics(self, prefix: str = "") -> dict[str, float]:
        n = max(self.references, 1)
        return {
            f"{prefix}attempts": float(self.attempts),
            f"{prefix}parse_failures": float(self.parse_failures),
            f"{prefix}fallbacks": float(self.fallbacks),
            f"{prefix}fallback_rate": self.fallbacks / n,
            f"{prefix}mean_criteria": self.criteria / n,
        }


def fallback_rubric(reference: str) -> list[str]:
    """The paper's plain equivalence-judge baseline, used when no rubric could be parsed."""
    ref = reference.strip()
    if len(ref) > FALLBACK_REFERENCE_CHARS:
        ref = ref[:FALLBACK_REFERENCE_CHARS].rstrip() + " […]"
    return ["The reply reaches the same conclusions and recommendations as this reference:\n"
            + prompts.fence(ref)]


def propose_rubric(
    generate: Callable[[list[list[dict]]], list[str]],
    references: list[str],
    *,
    min_items: int = 5,
    retries: int = 2,
    collective: bool | None = None,
) -> tuple[list[list[str]], RubricStats]:
    """One rubric per reference from the anchor's sampler ``generate`` (batch of chats -> texts).

    Only references whose output failed to parse are re-asked, up to ``retries`` times, in one
    batch per round. Those still failing get `fallback_rubric` (a single equivalence criterion
    holding the fenced, truncated reference) and are counted in ``stats.fallbacks``.
    Exceptions raised by ``generate`` itself propagate: a broken sampler is not a parse failure.
    ``collective``: whether ``generate`` is one program over all processes, which must then
    ask the same number of times (default: whenever there are several processes).
    """
    if not 1 <= min_items <= MAX_ITEMS:  # before the anchor generates, not after
        raise ValueError(f"rubric min_items={min_items} must be in [1, {MAX_ITEMS}]")
    stats = RubricStats(references=len(references))
    rubrics: list[list[str] | None] = [None] * len(references)
    chats = [prompts.rubric_proposal(ref, min_items) for ref in references]
    pending = list(range(len(references)))
    last_error: dict[int, str] = {}
    if collective is None:
        collective = jax.process_count() > 1
    for _ in range(1 + max(retries, 0)):
        # A collective `generate`: all processes go on while any has failures.
        if not (parallel.process_any(bool(pending)) if collective else pending):
            break
        outputs = generate([chats[i] for i in pending])
        if len(outputs) != len(pending):
            raise ValueError(f"generate returned {len(outputs)} outputs for {len(pending)} prompts")
        stats.attempts += len(pending)
        failed = []
        for i, out in zip(pending, outputs, strict=True):
            try:
                rubrics[i] = parse_rubric(out, min_items=min_items)
            except RubricError as e:
                stats.parse_failures += 1
                last_error[i] = str(e)
                failed.append(i)
        pending = failed
    for i in pending:
        rubrics[i] = fallback_rubric(references[i])
        stats.fallbacks += 1
    if pending:
        _log.warning("rubric: %d/%d references fell back to the equivalence criterion "
                     "(last error: %s)", len(pending), len(references), last_error[pending[-1]])
    done = [r for r in rubrics if r is not None]
    stats.criteria = sum(len(r) for r in done)
    return done, stats


# --------------------------------------------------------------------------------------------
# Rewards
# --------------------------------------------------------------------------------------------


def rubric_reward(verdicts: Sequence[bool | None]) -> float:
    """Fraction of criteria met, in [0, 1].

    Only a verdict that ``is True`` counts as met: an unparsable verdict (None) or a judge
    error counts as *not met*, so garbage output can never award reward. No criteria -> 0.0.
    """
    if not verdicts:
        return 0.0
    return sum(1 for v in verdicts if v is True) / len(verdicts)


def length_penalty(num_tokens: int, limit: int = 750, penalty: float = -1.0) -> float:
    """Added to the rubric reward of a reply over ``limit`` tokens, its stop token not counted
    (the paper: -1 past 750 on HealthBench), so long replies still rank by their rubric score."""
    return penalty if num_tokens > limit else 0.0
