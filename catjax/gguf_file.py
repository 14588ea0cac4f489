"""GGUF files (llama.cpp): the key/value metadata, the tensor table, and each tensor's bytes.

We parse the header ourselves over one read-only memory map. `gguf.GGUFReader` builds a numpy
view for every metadata field and every array element: ~11 s for SmolLM2's 49k-token vocabulary
and merges, against ~0.2 s here. The `gguf` package still dequantises the quantised blocks.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"GGUF"

# GGUF value type -> struct format (the byte order prefix is added on use).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_STRING, _ARRAY = 8, 9
_MAX_NESTING = 4  # arrays of arrays: real files nest 2 deep at most
# ggml types stored as plain numpy arrays; every other type is blocks for `gguf.quants`.
_PLAIN = {0: np.float32, 1: np.float16, 28: np.float64}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order, outermost first (GGUF lists dimensions innermost first)
    ggml_type: int
    offset: int  # from the start of the file
    nbytes: int


class _Header:
    """A cursor over the memory-mapped header; every read past the end is one clear error."""

    def __init__(self, buf: Any, endian: str, where: str):
        self.buf, self.e, self.where, self.pos = buf, endian, where, 8
        self.section = "metadata"

    def truncated(self) -> ValueError:
        return ValueError(f"{self.where}: GGUF {self.section} is truncated")

    def many(self, code: str, count: int) -> tuple[Any, ...]:
        fmt = f"{self.e}{count}{code}"
        try:
            values = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise self.truncated() from None
        self.pos += struct.calcsize(fmt)
        return values

    def scalar(self, code: str) -> Any:
        return self.many(code, 1)[0]

    def string(self) -> str:
        n = self.scalar("Q")
        end = self.pos + n
        if end > len(self.buf):
            raise self.truncated()
        text = self.buf[self.pos:end].decode("utf-8", errors="replace")
        self.pos = end
        return text

    def value(self, vtype: int, depth: int = 0) -> Any:
        if depth >= _MAX_NESTING:  # a crafted header would otherwise end in a RecursionError
            raise ValueError(f"{self.where}: GGUF {self.section} nests arrays more than "
                             f"{_MAX_NESTING} deep")
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.scalar("I"), self.scalar("Q")
            if itype in _SCALARS:  # one unpack for the whole array: vocabularies are 100k+ long
                return list(self.many(_SCALARS[itype], count))
            if itype == _STRING:  # the vocabulary and merges: the hot loop of a tokenizer load
                return [self.string() for _ in range(count)]
            return [self.value(itype, depth + 1) for _ in range(count)]
        raise ValueError(f"{self.where}: unknown GGUF value type {vtype}")


class GGUFFile:
    """One GGUF file (versions 2 and 3, either byte order): `metadata`, `tensors` (name ->
    `TensorInfo`, in file order) and `array(name)`. Tensor bytes are read from the memory map
    only when asked for."""

    def __init__(self, path: str | Path, *, metadata_only: bool = False):
        self.path = where = str(path)
        with open(path, "rb") as f:
            if f.read(4) != MAGIC:
                raise ValueError(f"{where}: not a GGUF file (no GGUF magic)")
            raw = f.read(4)
            if len(raw) < 4:
                raise ValueError(f"{where}: GGUF metadata is truncated")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        endian = "<" if struct.unpack("<I", raw)[0] < 0x10000 else ">"
        self.version = struct.unpack(endian + "I", raw)[0]
        if self.version < 2:
            raise ValueError(f"{where}: GGUF version {self.version} is too old (need 2 or later)")
        self.big_endian = endian == ">"
        h = _Header(self._map, endian, where)
        n_tensors, n_kv = h.scalar("Q"), h.scalar("Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = h.string()
            self.metadata[key] = h.value(h.scalar("I"))
        self.tensors: dict[str, TensorInfo] = {}
        if metadata_only:
            return
        h.section = "tensor table"
        table = []
        for _ in range(n_tensors):
            name = h.string()
            dims = h.many("Q", h.scalar("I"))
            table.append((name, tuple(reversed(dims)), h.scalar("I"), h.scalar("Q")))
        align = self.metadata.get("general.alignment", 32)
        if isinstance(align, bool) or not isinstance(align, int) or align < 1:
            raise ValueError(f"{where}: GGUF general.alignment={align!r} must be a positive integer")
        data_start = -(-h.pos // align) * align
        for name, shape, ggml_type, offset in table:
            info = TensorInfo(name, shape, ggml_type, data_start + offset,
                              _nbytes(shape, ggml_type, where, name))
            if info.offset + info.nbytes > len(self._map):
                raise ValueError(f"{where}: tensor {name!r} runs past the end of the file "
                                 "(truncated download?)")
            self.tensors[name] = info

    def type_name(self, name: str) -> str:
        import gguf

        t = self.tensors[name].ggml_type
        try:
            return gguf.GGMLQuantizationType(t).name
        except ValueError:
            return f"type {t}"

    def array(self, name: str) -> np.ndarray:
        """The tensor as float32, dequantised; a new array (the map is never written)."""
        info = self.tensors[name]
        if info.ggml_type in _PLAIN:
            dtype = np.dtype(_PLAIN[info.ggml_type]).newbyteorder(">" if self.big_endian else "<")
            data = np.frombuffer(self._map, dtype, int(np.prod(info.shape)), info.offset)
            return data.reshape(info.shape).astype(np.float32)
        import gguf

        qtype = gguf.GGMLQuantizationType(info.ggml_type)
        if self.big_endian:  # block scales would need swapping field by field
            raise ValueError(f"{self.path}: tensor {name!r} is {qtype.name} in a big-endian "
                             "file; only float tensors are read from big-endian GGUF")
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rows = info.shape[:-1]
        data = np.frombuffer(self._map, np.uint8, info.nbytes, info.offset)
        try:
            out = gguf.quants.dequantize(data.reshape(*rows, info.shape[-1] // block * size), qtype)
        except NotImplementedError:
            raise ValueError(f"{self.path}: tensor {name!r} uses quantisation {qtype.name}, "
                             "which the gguf package cannot dequantise") from None
        return out.reshape(info.shape).astype(np.float32, copy=False)


def _nbytes(shape: tuple[int, ...], ggml_type: int, where: str, name: str) -> int:
    import gguf

    count = math.prod(shape)  # Python ints: a crafted shape must not wrap around in int64
    if ggml_type in _PLAIN:
        return count * np.dtype(_PLAIN[ggml_type]).itemsize
    try:
        qtype = gguf.GGMLQuantizationType(ggml_type)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise ValueError(f"{where}: tensor {name!r} has unknown ggml type {ggml_type}") from None
    if not shape or shape[-1] % block:
        raise ValueError(f"{where}: tensor {name!r} of shape {shape} does not split into "
                         f"{qtype.name} blocks of {block}")
    return count // block * size


def read_metadata(path: str | Path) -> dict[str, Any]:
    """All metadata key/values of a GGUF file, without its tensor table."""
    return GGUFFile(path, metadata_only=True).metadata
