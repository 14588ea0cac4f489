"""JSONL readers for MATH, GSM8K and HealthBench into one record type, and `load` by name.

Readers are strict: a bad row raises `ValueError("<file>:<line>: ...")` naming the field, because a
silently skipped question changes a benchmark score and a silently empty one wastes a rollout group.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from catjax import storage

DATA_FILES = Path(__file__).resolve().parent.parent / "data_files"

# HealthBench may not be redistributed with the package, so its default file is found, not shipped:
# $CATJAX_HEALTHBENCH if set, else the shared sample beside the repository (../shared from the repo root).
HEALTHBENCH_ENV = "CATJAX_HEALTHBENCH"
SHARED_HEALTHBENCH = (
    Path(__file__).resolve().parents[2].parent / "shared" / "data" / "healthbench" / "oss_eval_sample30.jsonl"
)

_SHIPPED: dict[tuple[str, str], str] = {
    ("math500", "test"): "math500/test.jsonl",
    ("gsm8k", "test"): "gsm8k/test.jsonl",
    ("gsm8k", "train"): "gsm8k/train.jsonl",
}
_NAME_FORMAT = {"math500": "math", "gsm8k": "gsm8k", "healthbench": "healthbench"}
_ROLES = ("system", "developer", "user", "assistant")
_GSM8K_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclasses.dataclass(frozen=True)
class Example:
    """One question for the policy.

    `answer` is the gold answer (MATH, GSM8K) or ideal completion (HealthBench) for evaluation only;
    training never reads it. `messages` is the chat to send as is (HealthBench); empty for math, where
    the caller builds the prompt from `question`. `rubrics` holds HealthBench's physician rubric items
    as dicts {"criterion": str, "points": int, "tags": list[str]}. `meta` holds non-gold attributes only
    (worked solutions and reference completions are left out so nothing gold-bearing rides along).
    """

    id: str
    question: str
    messages: tuple[dict[str, str], ...] = ()
    answer: str | None = None
    rubrics: tuple[dict[str, Any], ...] = ()
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


def local_path(path: str | os.PathLike[str]) -> str:
    """A local file for `path`, fetching gs:// URLs into the cache first."""
    path = str(path)
    return storage.download(path) if storage.is_gcs(path) else path


def _rows(path: str | os.PathLike[str]) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """Yields (line number, "file:line", object) for each JSONL row."""
    name = str(path)
    with open(local_path(name), "rb") as f:
        raw = f.read().removeprefix(codecs.BOM_UTF8)
    if not raw.strip():
        raise ValueError(f"{name}: empty file, no records")
    # Split on b"\n" only: str.splitlines() would also split on U+2028 etc., which JSON allows raw in strings.
    lines = raw.split(b"\n")
    while not lines[-1].strip():  # trailing blank lines are an editor's newline, not a missing record
        lines.pop()
    for no, line in enumerate(lines, 1):
        where = f"{name}:{no}"
        if not line.strip():
            raise ValueError(f"{where}: blank line (JSONL has one record per line)")
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON: {e.msg} at column {e.colno}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield no, where, row


def _field(
    row: Mapping[str, Any],
    key: str,
    kind: type | tuple[type, ...],
    where: str,
    label: str | None = None,
    *,
    optional: bool = False,
    allow_empty: bool = False,
) -> Any:
    """row[key], checked: present (unless optional, when missing or null gives None), of `kind`, and
    not empty or blank (unless allow_empty). `label` is the field's path for messages: rubrics[3].points."""
    label = label or key
    if key not in row or (optional and row[key] is None):
        if optional:
            return None
        raise ValueError(f"{where}: missing field {label!r}")
    value = row[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int subclass; True is never a valid point value or level.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ValueError(f"{where}: field {label!r} must be {names}, got {type(value).__name__}")
    if (
        not allow_empty
        and isinstance(value, str | list | dict)
        and not (value.strip() if isinstance(value, str) else value)
    ):
        raise ValueError(f"{where}: field {label!r} is empty")
    return value


def _level(value: int | str) -> int | str:
    """MATH-500 stores 3, the full MATH set "Level 3": both become 3 (MATH also has "Level ?", kept)."""
    if isinstance(value, str) and (m := re.fullmatch(r"Level (\d+)", value.strip())):
        return int(m.group(1))
    return value


def _math_answer(row: Mapping[str, Any], where: str, required: bool) -> str | None:
    """The gold `answer`: a string, or a JSON number (AMC 23 stores 27.0: read as "27").
    Missing, null or blank is an error when `required`, else None (CaT-RL never reads gold;
    MATH's train split has a row whose answer is empty)."""
    value = row.get("answer")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: field 'answer' is {value}, not a finite number")
        # Positional, never 1e-05: the graders compare text and simple numbers.
        return np.format_float_positional(value, trim="-")
    if not required and (value is None or (isinstance(value, str) and not value.strip())):
        return None
    return _field(row, "answer", str, where)


def read_math(path: str | os.PathLike[str], require_answers: bool = True) -> list[Example]:
    """MATH-500 / MATH JSONL: `problem`, `answer` (string or number; see `_math_answer`);
    `unique_id`, `subject` (MATH: `type`), `level` optional."""
    out = []
    stem = Path(str(path)).stem
    for no, where, row in _rows(path):
        meta: dict[str, Any] = {}
        subject = _field(row, "subject", str, where, optional=True) or _field(
            row, "type", str, where, optional=True
        )
        if subject is not None:
            meta["subject"] = subject
        level = _field(row, "level", (int, str), where, optional=True)
        if level is not None:
            meta["level"] = _level(level)
        uid = _field(row, "unique_id", str, where, optional=True)
        out.append(
            Example(
                id=uid or f"math/{stem}/{no - 1}",
                question=_field(row, "problem", str, where),
                answer=_math_answer(row, where, require_answers),
                meta=meta,
            )
        )
    return out


def gsm8k_gold(solution: str) -> str:
    """The gold number after GSM8K's final "#### ", without thousands commas: "#### 1,000" -> "1000"."""
    _, marker, tail = solution.rpartition("####")
    if not marker:
        raise ValueError("no '####' gold marker")
    gold = tail.strip().replace(",", "")
    if not _GSM8K_NUMBER.fullmatch(gold):
        raise ValueError(f"gold after '####' is not a number: {tail.strip()!r}")
    return gold


def read_gsm8k(path: str | os.PathLike[str], require_answers: bool = True) -> list[Example]:
    """GSM8K JSONL: `question`, and `answer` = worked solution ending "#### <gold>" (only the gold
    kept; without `require_answers`, a missing, empty or unmarked one is None)."""
    out = []
    stem = Path(str(path)).stem
    for no, where, row in _rows(path):
        question = _field(row, "question", str, where)
        solution = _field(row, "answer", str, where, optional=not require_answers,
                          allow_empty=not require_answers)
        try:
            gold = gsm8k_gold(solution) if solution else None
        except ValueError as e:
            if require_answers:
                raise ValueError(f"{where}: field 'answer': {e}") from None
            gold = None
        out.append(Example(id=f"gsm8k/{stem}/{no - 1}", question=question, answer=gold))
    return out


def _message(raw: Any, where: str, label: str) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: field {label!r} must be dict, got {type(raw).__name__}")
    role = _field(raw, "role", str, where, f"{label}.role")
    if role not in _ROLES:
        raise ValueError(f"{where}: field '{label}.role' is {role!r}, expected one of {_ROLES}")
    return {"role": role, "content": _field(raw, "content", str, where, f"{label}.content", allow_empty=True)}


def _rubric(raw: Any, where: str, label: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: field {label!r} must be dict, got {type(raw).__name__}")
    tags = _field(raw, "tags", list, where, f"{label}.tags", allow_empty=True)
    for i, tag in enumerate(tags):
        if not isinstance(tag, str):
            raise ValueError(f"{where}: field '{label}.tags[{i}]' must be str, got {type(tag).__name__}")
    return {
        "criterion": _field(raw, "criterion", str, where, f"{label}.criterion"),
        "points": _field(raw, "points", int, where, f"{label}.points"),
        "tags": list(tags),
    }


def read_healthbench(path: str | os.PathLike[str], require_answers: bool = True) -> list[Example]:
    """HealthBench JSONL (see shared/data/healthbench/FORMAT.md): `prompt_id`, `prompt` (chat ending with
    a user turn), `rubrics`; optional `example_tags`, `ideal_completions_data`, `canary`. (Its
    ideal completion is always optional: `require_answers` is for the math readers.)"""
    out = []
    for _, where, row in _rows(path):
        prompt_id = _field(row, "prompt_id", str, where)
        prompt = _field(row, "prompt", list, where)
        messages = tuple(_message(m, where, f"prompt[{i}]") for i, m in enumerate(prompt))
        last = messages[-1]
        if last["role"] != "user" or not last["content"].strip():
            raise ValueError(f"{where}: field 'prompt' must end with a non-empty user turn")
        rubrics = tuple(
            _rubric(r, where, f"rubrics[{i}]") for i, r in enumerate(_field(row, "rubrics", list, where))
        )
        meta: dict[str, Any] = {}
        tags = _field(row, "example_tags", list, where, optional=True, allow_empty=True)
        if tags is not None:
            if not all(isinstance(t, str) for t in tags):
                raise ValueError(f"{where}: field 'example_tags' must be a list of str")
            meta["example_tags"] = list(tags)
        answer = None
        ideal = _field(row, "ideal_completions_data", dict, where, optional=True, allow_empty=True)
        if ideal:
            label = "ideal_completions_data.ideal_completion"
            answer = _field(ideal, "ideal_completion", str, where, label, optional=True, allow_empty=True)
            answer = answer or None  # "" would not survive the TFDS round trip as distinct from None
            group = _field(ideal, "ideal_completions_group", str, where, optional=True)
            if group is not None:
                meta["ideal_completions_group"] = group
        canary = _field(row, "canary", str, where, optional=True)
        if canary is not None:  # kept so anything exported from these records still carries the marker
            meta["canary"] = canary
        out.append(
            Example(
                id=prompt_id,
                question=last["content"],
                messages=messages,
                answer=answer,
                rubrics=rubrics,
                meta=meta,
            )
        )
    return out


READERS: dict[str, Callable[..., list[Example]]] = {
    "math": read_math,
    "gsm8k": read_gsm8k,
    "healthbench": read_healthbench,
}
NAMES = (*_NAME_FORMAT, "toy", "arith")  # toy, arith: generated in code (catjax/datasets/toy.py)


def healthbench_default_path() -> str | None:
    """$CATJAX_HEALTHBENCH, else the shared 30-example sample if it exists, else None."""
    if env := os.environ.get(HEALTHBENCH_ENV):
        return env
    return str(SHARED_HEALTHBENCH) if SHARED_HEALTHBENCH.exists() else None


def resolve(name: str, split: str = "test", path: str | os.PathLike[str] | None = None) -> tuple[str, str]:
    """(format, file) for a named set. `path` overrides the file (needed for HealthBench unless the
    default exists; then `split` is only a label); "" means none, as in configs."""
    if name not in _NAME_FORMAT:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(NAMES)} (or give a path and format=)")
    fmt = _NAME_FORMAT[name]
    if path:
        return fmt, str(path)
    if name == "healthbench":
        default = healthbench_default_path()
        if default is None:
            raise ValueError(
                f"HealthBench is not shipped: pass path= (local or gs://) or set ${HEALTHBENCH_ENV}"
            )
        if split != "test":
            raise ValueError(f"the default HealthBench file is a test sample; split={split!r} needs path=")
        return fmt, default
    if (name, split) not in _SHIPPED:
        splits = sorted(s for n, s in _SHIPPED if n == name)
        raise ValueError(f"{name} has no split {split!r}; shipped: {splits}")
    return fmt, str(DATA_FILES / _SHIPPED[name, split])


def load(
    name_or_path: str | os.PathLike[str],
    split: str = "test",
    limit: int | None = None,
    *,
    format: str | None = None,
    path: str | os.PathLike[str] | None = None,
    require_answers: bool = True,
) -> list[Example]:
    """Examples of a named set ("math500", "gsm8k", "healthbench") or of a JSONL file with format=
    ("math", "gsm8k", "healthbench"), local or gs://. `limit` keeps the first records in file order
    (the whole file is still validated). `require_answers=False` (training, which never reads
    gold) takes math rows without a gold answer, as `answer=None`, instead of refusing the file."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if str(name_or_path) in ("toy", "arith"):
        from catjax.datasets import toy

        return toy.load(split, limit) if name_or_path == "toy" else toy.arithmetic(split, limit)
    if str(name_or_path) in _NAME_FORMAT:
        fmt, file = resolve(str(name_or_path), split, path)
        if format is not None and format != fmt:
            raise ValueError(f"{name_or_path} is in {fmt!r} format, not {format!r}")
    else:
        if format not in READERS:
            raise ValueError(
                f"{name_or_path}: not a known dataset name ({', '.join(NAMES)}); for a file pass "
                f"format= one of {sorted(READERS)}"
            )
        if path:
            raise ValueError("path= is for named sets; the file is already given")
        fmt, file = format, str(name_or_path)
    examples = READERS[fmt](file, require_answers=require_answers)
    _check_unique_ids(examples, file)
    return examples if limit is None else examples[:limit]


def _check_unique_ids(examples: list[Example], file: str) -> None:
    """Results are kept by id (an evaluation's records, its resume): two records with one id
    would lose one question's result and count the other's twice."""
    first: dict[str, int] = {}
    for i, ex in enumerate(examples, 1):
        if ex.id in first:
            raise ValueError(f"{file}: records {first[ex.id]} and {i} share the id {ex.id!r}; "
                             "ids must be unique")
        first[ex.id] = i
