"""Reading a compiled program's text (`jit(f).lower(...).compile().as_text()`): which collectives
it holds, and the while loops around each. Plain text parsing, no JAX: benchmarks load this file
to read programs compiled by other trees."""

from __future__ import annotations

import re

_COLLECTIVE = re.compile(r"^\s*(?:ROOT )?%\S+ = (.+?) (all-gather|all-to-all|collective-permute|"
                         r"all-reduce|reduce-scatter|ragged-all-to-all)(-start)?\(", re.M)
_COMPUTATION_HEAD = re.compile(r"^(ENTRY )?%?([^\s(]+) .*\{\s*$", re.M)
_WHILE = re.compile(r"\bwhile\(.*?condition=%?([\w.\-]+), body=%?([\w.\-]+)")
_CALLED = re.compile(r"\b(?:calls|to_apply)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
# A loop's bound: the s32 scalar constant its condition compares the counter with.
_TRIPS = re.compile(r"\bs32\[\](?:\{[^}]*\})? constant\((\d+)\)")


def collectives(hlo_text: str, in_loops: bool = False) -> list[tuple[str, str]]:
    """(shape, op) of every cross-device collective in the program: what moves between devices.
    Combined collectives carry a tuple shape; asynchronous ones are counted at their start.

    `in_loops`: only those inside a while loop (a decode step, a layer of a scan), which run
    once per trip rather than once per call."""
    if not in_loops:
        return [(shape, op + (start or "")) for shape, op, start in _COLLECTIVE.findall(hlo_text)]
    return [(shape, op) for shape, op, trips in collectives_with_trips(hlo_text) if trips]


def collectives_by_depth(hlo_text: str) -> list[tuple[str, str, int]]:
    """`collectives` with how many while loops enclose each (0: once per call; for a sampler
    on the TPU's scan layout, 2: once per decode step and layer)."""
    return [(shape, op, len(trips)) for shape, op, trips in collectives_with_trips(hlo_text)]


def collectives_with_trips(hlo_text: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """`collectives` with the trip counts of the while loops around each, outermost first (a
    count read off the loop condition's constant: an upper bound for a loop that can stop early,
    such as the decode loop; 1 where there is none). Through the deepest chain of calls."""
    comps = _computations(hlo_text)
    texts = {name: text for name, _, text in comps}
    edges: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for name, _, text in comps:
        out = []
        for cond, body in _WHILE.findall(text):
            bounds = [int(t) for t in _TRIPS.findall(texts.get(cond, ""))]
            loop = (max(bounds) if bounds else 1,)
            out += [(cond, loop), (body, loop)]
        out += [(callee, ()) for callee in _CALLED.findall(text)]
        out += [(c.strip().lstrip("%"), ()) for group in _BRANCHES.findall(text)
                for c in group.split(",")]
        edges[name] = out
    trips: dict[str, tuple[int, ...]] = {name: () for name, entry, _ in comps if entry}
    todo = list(trips)
    while todo:  # the deepest nesting each computation is reached at (call graphs are acyclic)
        name = todo.pop()
        for callee, loop in edges.get(name, ()):
            here = trips[name] + loop
            if callee not in trips or len(trips[callee]) < len(here):
                trips[callee] = here
                todo.append(callee)
    return [(shape, op, trips.get(name, ())) for name, _, text in comps
            for shape, op in collectives(text)]


def _computations(hlo_text: str) -> list[tuple[str, bool, str]]:
    """(name, is the entry, text) of each computation of an HLO module's text."""
    heads = list(_COMPUTATION_HEAD.finditer(hlo_text))
    return [(m.group(2), bool(m.group(1)),
             hlo_text[m.end():heads[i + 1].start() if i + 1 < len(heads) else None])
            for i, m in enumerate(heads)]
