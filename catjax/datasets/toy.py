"""The synthetic verifiable task behind the learning proof: chained additions and subtractions.

A question is a start number and a few one-digit steps, `37+8-5+9-2`; a solution writes every
intermediate result and boxes the last, `37+8=45,45-5=40,40+9=49,49-2=47 \\boxed{47}`. Every
value stays in 0..99, so each number is one token of the toy vocabulary (`catjax/toy.py`).

`noisy_solution` is how the supervised recipe teaches the policy to make *independent* mistakes:
each step slips (its result is off by 1-3) or miscopies its operand with a small probability, and
later steps carry the error on, as a person's arithmetic would. The same process also makes the
rollouts that the anchor learns to reconcile. Everything is a pure function of a seed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from catjax.datasets.records import Example

MAX_VALUE = 99
_SPLIT_SEEDS = {"train": 1, "test": 2}
TEST_SIZE = 500
TRAIN_SIZE = 50_000


@dataclasses.dataclass(frozen=True)
class ToyTask:
    num_steps: int = 4
    max_operand: int = 9
    slip_prob: float = 0.18  # a step's result is off by 1..3
    miscopy_prob: float = 0.07  # a step uses a different operand than the question's

    def __post_init__(self):
        # Operands are single digits: the question's text is parsed a character per operand.
        if not (isinstance(self.num_steps, int) and self.num_steps >= 1):
            raise ValueError(f"toy task num_steps={self.num_steps!r} must be an integer >= 1")
        if not (isinstance(self.max_operand, int) and 2 <= self.max_operand <= 9):
            raise ValueError(f"toy task max_operand={self.max_operand!r} must be in [2, 9]")
        for name in ("slip_prob", "miscopy_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"toy task {name}={getattr(self, name)!r} must be in [0, 1]")


def _steps(question: str) -> tuple[int, list[tuple[str, int]]]:
    """`37+8-5` -> (37, [('+', 8), ('-', 5)])."""
    i = 0
    while i < len(question) and question[i].isdigit():
        i += 1
    start, steps = int(question[:i]), []
    for j in range(i, len(question), 2):
        steps.append((question[j], int(question[j + 1])))
    return start, steps


def make_question(rng: np.random.Generator, task: ToyTask = ToyTask()) -> str:
    value = int(rng.integers(10, 90))
    parts = [str(value)]
    for _ in range(task.num_steps):
        b = int(rng.integers(1, task.max_operand + 1))
        op = "+" if rng.random() < 0.5 else "-"
        if not 0 <= (value + b if op == "+" else value - b) <= MAX_VALUE:
            op = "-" if op == "+" else "+"  # stay inside 0..99
        value = value + b if op == "+" else value - b
        parts.append(f"{op}{b}")
    return "".join(parts)


def answer(question: str) -> int:
    value, steps = _steps(question)
    for op, b in steps:
        value = value + b if op == "+" else value - b
    return value


def solution(question: str) -> str:
    """The correct worked solution."""
    return noisy_solution(question, np.random.default_rng(0), ToyTask(slip_prob=0.0, miscopy_prob=0.0))


def noisy_solution(question: str, rng: np.random.Generator, task: ToyTask = ToyTask()) -> str:
    """A worked solution with independent step errors that propagate (see the module doc)."""
    value, steps = _steps(question)
    out = []
    for op, b in steps:
        if rng.random() < task.miscopy_prob:
            b = int(rng.choice([x for x in range(1, task.max_operand + 1) if x != b]))
        result = value + b if op == "+" else value - b
        if rng.random() < task.slip_prob:
            result += int(rng.choice([-3, -2, -1, 1, 2, 3]))
        result = min(max(result, 0), MAX_VALUE)
        out.append(f"{value}{op}{b}={result}")
        value = result
    return ",".join(out) + f" \\boxed{{{value}}}"


def questions(split: str, n: int, task: ToyTask = ToyTask()) -> list[str]:
    """`n` distinct questions of a split; train never contains a test question."""
    if split not in _SPLIT_SEEDS:
        raise ValueError(f"toy dataset has no split {split!r}; use 'train' or 'test'")
    held_out = set(questions("test", TEST_SIZE, task)) if split == "train" else set()
    rng = np.random.default_rng([_SPLIT_SEEDS[split], task.num_steps, task.max_operand])
    seen: dict[str, None] = {}
    stale = 0  # draws since the last new question: a short task runs out, never loop for ever
    while len(seen) < n and stale <= 10_000 + n:
        q = make_question(rng, task)
        stale += 1
        if q not in held_out and q not in seen:
            seen[q] = None
            stale = 0
    if len(seen) == n:
        return list(seen)
    raise ValueError(f"toy task (num_steps={task.num_steps}, max_operand={task.max_operand}): only "
                     f"{len(seen)} distinct {split} questions found, {n} asked; use more steps or "
                     "a larger max_operand, or ask for fewer")


def load(split: str = "test", limit: int | None = None, task: ToyTask = ToyTask()) -> list[Example]:
    """The toy set as `Example`s: 500 test questions, 50,000 train questions."""
    n = TEST_SIZE if split == "test" else TRAIN_SIZE
    n = n if limit is None else min(n, limit)
    return [Example(id=f"toy-{split}-{i}", question=q, answer=str(answer(q)))
            for i, q in enumerate(questions(split, n, task))]


def arithmetic(split: str = "test", limit: int | None = None) -> list[Example]:
    """One-operation questions in English ("What is 14 + 7?"): a set on which a small chat
    model such as SmolLM2-135M does something measurable (the demo's part one)."""
    if split not in _SPLIT_SEEDS:
        raise ValueError(f"arith dataset has no split {split!r}; use 'train' or 'test'")
    rng = np.random.default_rng([_SPLIT_SEEDS[split], 7])
    out: list[Example] = []
    seen: set[str] = set()
    while len(out) < (limit if limit is not None else 200):
        if rng.random() < 0.5:
            a, b = (int(x) for x in rng.integers(2, 20, 2))
            q, ans = f"What is {a} + {b}?", a + b
        else:
            a, b = (int(x) for x in rng.integers(2, 10, 2))
            q, ans = f"What is {a} times {b}?", a * b
        if q not in seen:
            seen.add(q)
            out.append(Example(id=f"arith-{split}-{len(out)}", question=q, answer=str(ans)))
    return out
