"""A minimal safetensors reader and writer over numpy memory maps.

Our own reader (rather than `safetensors.numpy`) because numpy has no bfloat16: we view the bytes
as `ml_dtypes.bfloat16` and convert one tensor at a time, so loading an 8B model never holds a
second full copy. The format: 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets}}, then the raw bytes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsFile:
    """Lazy access to the tensors of one `.safetensors` file."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise ValueError(f"{path}: truncated safetensors file (header of {n} bytes)")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", {}) or {}
        self.header = header
        self._data_start = 8 + n
        for name, info in header.items():
            self._check_entry(name, info, size)
        self._mmap = np.memmap(path, dtype=np.uint8, mode="r") if size else None

    def _check_entry(self, name: str, info: object, size: int) -> None:
        """A tensor's header entry, checked before anything is read or allocated: offsets that
        lie in the file and hold exactly its shape's bytes."""
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise ValueError(f"{where}: header entry needs dtype, shape and data_offsets")
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{where} has unsupported dtype {info['dtype']}")
        shape, offsets = info["shape"], info["data_offsets"]
        ints = lambda xs: isinstance(xs, list) and all(  # noqa: E731
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in xs)
        if not ints(shape) or not ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
            raise ValueError(f"{where}: bad shape {shape!r} or data_offsets {offsets!r}")
        end = self._data_start + offsets[1]
        if end > size:
            raise ValueError(f"{self.path}: truncated safetensors file: tensor {name!r} ends at "
                             f"byte {end} of {size}")
        want = math.prod(shape) * np.dtype(_DTYPES[info["dtype"]]).itemsize
        if offsets[1] - offsets[0] != want:
            raise ValueError(f"{where}: data_offsets {offsets} hold {offsets[1] - offsets[0]} "
                             f"bytes, its shape {shape} needs {want}")

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy view of the file (no copy)."""
        info = self.header[name]
        start, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        buf = self._mmap[self._data_start + start: self._data_start + end]
        return buf.view(dtype).reshape(info["shape"])


def save_file(tensors: Mapping[str, np.ndarray], path: str,
              metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors (numpy arrays, bfloat16 included) to `path` atomically."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in _NAMES:
            raise ValueError(f"{path}: cannot write tensor {name!r} of dtype {arr.dtype}")
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())
    os.replace(tmp, path)


def save_sharded(tensors: Iterable[tuple[str, np.ndarray]], directory: str,
                 max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write `model.safetensors`, or numbered shards plus an index when over `max_shard_bytes`."""
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in tensors:
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, "model.safetensors"))
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    total = 0
    for fname, shard in zip(names, shards, strict=True):
        save_file(shard, os.path.join(directory, fname))
        for key, arr in shard.items():
            weight_map[key] = fname
            total += arr.nbytes
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names


class SafetensorsDir:
    """All tensors of a Hugging Face directory: one file or an index over shards."""

    def __init__(self, directory: str):
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no 'weight_map' object")
            for name, fname in weight_map.items():
                self.where[name] = os.path.join(directory, fname)
        elif os.path.exists(single):
            for name in SafetensorsFile(single).header:
                self.where[name] = single
        else:
            raise FileNotFoundError(
                f"{directory}: no model.safetensors or model.safetensors.index.json")

    def _file(self, path: str) -> SafetensorsFile:
        if path not in self.files:
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path}: shard listed in the index is missing")
            self.files[path] = SafetensorsFile(path)
        return self.files[path]

    def keys(self) -> list[str]:
        return list(self.where)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(self.where[name]).shape(name)

    def get(self, name: str) -> np.ndarray:
        f = self._file(self.where[name])
        if name not in f.header:
            raise ValueError(f"{f.path}: tensor {name!r} listed in the index is not in the file")
        return f.get(name)
