"""Read the key/value metadata at the head of a GGUF file, and nothing else.

`gguf.GGUFReader` maps and indexes every tensor (seconds for a 100 MB file); a tokenizer needs
only the metadata, which sits before the tensor table, so we parse just that.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

MAGIC = b"GGUF"

# GGUF value type -> struct format (little-endian prefix added on use).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_STRING, _ARRAY = 8, 9


class _Stream:
    def __init__(self, f: BinaryIO, endian: str, where: str):
        self.f, self.e, self.where = f, endian, where

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise ValueError(f"{self.where}: GGUF metadata is truncated")
        return b

    def scalar(self, code: str) -> Any:
        return struct.unpack(self.e + code, self.read(struct.calcsize(code)))[0]

    def string(self) -> str:
        return self.read(self.scalar("Q")).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.scalar("I"), self.scalar("Q")
            if itype in _SCALARS:  # one unpack for the whole array: vocabularies are 100k+ long
                code = _SCALARS[itype]
                data = self.read(count * struct.calcsize(code))
                return list(struct.unpack(f"{self.e}{count}{code}", data))
            return [self.value(itype) for _ in range(count)]
        raise ValueError(f"{self.where}: unknown GGUF value type {vtype}")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """All metadata key/values of a GGUF file (versions 2 and 3, either byte order)."""
    where = str(path)
    with open(path, "rb") as f:
        if f.read(4) != MAGIC:
            raise ValueError(f"{where}: not a GGUF file (no GGUF magic)")
        raw = f.read(4)
        endian = "<" if struct.unpack("<I", raw)[0] < 0x10000 else ">"
        version = struct.unpack(endian + "I", raw)[0]
        if version < 2:
            raise ValueError(f"{where}: GGUF version {version} is too old (need 2 or later)")
        s = _Stream(f, endian, where)
        s.scalar("Q")  # tensor count: not needed
        n_kv = s.scalar("Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = s.string()
            meta[key] = s.value(s.scalar("I"))
    return meta
