"""safetensors files read and written one tensor at a time, bfloat16 included.

A small header-indexed reader and a streaming writer instead of `safetensors.numpy`: numpy has no
bfloat16 and safetensors' numpy backend refuses BF16 tensors, the dtype most current checkpoints
ship in (JAX's `ml_dtypes` has it). The writer lays out the header from shapes alone and then
streams each tensor's bytes, so exporting never holds more than one tensor per file in memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable

import jax.numpy as jnp
import numpy as np

DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(jnp.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class SafetensorsFile:
    """Header index of one .safetensors file; reads one tensor at a time into host numpy."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        self.entries: dict[str, dict] = header
        self._data_start = 8 + size

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def get(self, key: str) -> np.ndarray:
        entry = self.entries[key]
        if entry["dtype"] not in DTYPES:
            raise ValueError(f"{self.path}: tensor '{key}' has unsupported dtype {entry['dtype']}")
        dtype, shape = DTYPES[entry["dtype"]], tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        count = math.prod(shape)
        if end - begin != count * dtype.itemsize:
            raise ValueError(f"{self.path}: tensor '{key}' has a corrupt header entry")
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            data = np.fromfile(f, dtype=dtype, count=count)
        if data.size != count:
            raise ValueError(f"{self.path}: tensor '{key}' is truncated")
        return data.reshape(shape)


class Checkpoint:
    """All tensors of a HF model directory, single-file or sharded, by key."""

    def __init__(self, path: str):
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
            self.name = index
            files = {
                name: SafetensorsFile(os.path.join(path, name)) for name in set(weight_map.values())
            }
            self.files = {key: files[name] for key, name in weight_map.items()}
            for name, file in files.items():  # the index must describe the shards truthfully
                for key in file.entries:
                    if weight_map.get(key) != name:
                        raise ValueError(
                            f"{file.path}: tensor '{key}' is not mapped to it in {index}"
                        )
        elif os.path.exists(single):
            self.name = single
            file = SafetensorsFile(single)
            self.files = dict.fromkeys(file.entries, file)
        else:
            raise FileNotFoundError(
                f"{path}: neither model.safetensors nor {os.path.basename(index)}"
            )

    def get(self, key: str, expected_shape: tuple[int, ...]) -> np.ndarray:
        file = self.files[key]
        if file.shape(key) != expected_shape:
            shape = file.shape(key)
            raise ValueError(
                f"{file.path}: tensor '{key}' has shape {shape}, expected {expected_shape}"
            )
        return file.get(key)


def write_safetensors(
    path: str,
    entries: Iterable[tuple[str, tuple[int, ...], np.dtype]],
    produce: Callable[[str], np.ndarray],
    metadata: dict[str, str],
) -> None:
    """Writes `entries` (key, shape, dtype) in order; `produce(key)` returns each tensor when its
    bytes are due. The header is padded with spaces to 8 bytes, as the reference writer does."""
    entries = list(entries)
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for key, shape, dtype in entries:
        size = math.prod(shape) * np.dtype(dtype).itemsize
        header[key] = {
            "dtype": _NAMES[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, shape, dtype in entries:
            tensor = np.ascontiguousarray(produce(key), dtype=dtype)
            if tensor.shape != tuple(shape):
                raise ValueError(f"tensor '{key}' has shape {tensor.shape}, expected {shape}")
            f.write(tensor.tobytes())
