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

from sft_jax.hf.config import ModelFileError

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
    """Header index of one .safetensors file; reads one tensor at a time into host numpy.

    The header is checked against the file size when opened, so a truncated download or copy
    fails before training (as ModelFileError naming the file) rather than when its last tensor
    is read, or with a struct/JSON traceback."""

    def __init__(self, path: str):
        self.path = path
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            size = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
            if size is None or 8 + size > file_size:
                raise ModelFileError(
                    f"{path}: truncated or not a safetensors file ({file_size} bytes, "
                    "shorter than its header says)"
                )
            try:
                header = json.loads(f.read(size))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ModelFileError(f"{path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise ModelFileError(f"{path}: corrupt safetensors header (not a JSON object)")
        header.pop("__metadata__", None)
        self.entries: dict[str, dict] = header
        self._data_start = 8 + size
        data_end = max((_data_end(path, k, e) for k, e in header.items()), default=0)
        if self._data_start + data_end > file_size:
            raise ModelFileError(
                f"{path}: truncated: its header describes {self._data_start + data_end} bytes "
                f"but the file has {file_size} (an incomplete download or copy?)"
            )

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def dtype(self, key: str) -> np.dtype:
        name = self.entries[key]["dtype"]
        if name not in DTYPES:
            raise ValueError(f"{self.path}: tensor '{key}' has unsupported dtype {name}")
        return DTYPES[name]

    def get(self, key: str) -> np.ndarray:
        entry = self.entries[key]
        if entry["dtype"] not in DTYPES:
            raise ValueError(f"{self.path}: tensor '{key}' has unsupported dtype {entry['dtype']}")
        dtype, shape = DTYPES[entry["dtype"]], tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        count = math.prod(shape)
        if end - begin != count * dtype.itemsize:
            raise ModelFileError(f"{self.path}: tensor '{key}' has a corrupt header entry")
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            data = np.fromfile(f, dtype=dtype, count=count)
        if data.size != count:
            raise ModelFileError(f"{self.path}: tensor '{key}' is truncated")
        return data.reshape(shape)


def _data_end(path: str, key: str, entry: object) -> int:
    """Where a header entry's bytes end (relative to the data section); ModelFileError when the
    entry is not {dtype, shape, data_offsets} with sane offsets."""
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    valid = (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(x, int) for x in offsets)
        and 0 <= offsets[0] <= offsets[1]
        and isinstance(entry.get("shape"), list)
    )
    if not valid:
        raise ModelFileError(f"{path}: tensor '{key}' has a corrupt header entry")
    return offsets[1]


class Checkpoint:
    """All tensors of a HF model directory, single-file or sharded, by key."""

    def __init__(self, path: str):
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.exists(index):
            weight_map = _read_weight_map(index)
            self.name = index
            files = {
                name: SafetensorsFile(os.path.join(path, name)) for name in set(weight_map.values())
            }
            self.files = {key: files[name] for key, name in weight_map.items()}
            for name, file in files.items():  # the index must describe the shards truthfully
                for key in file.entries:
                    if weight_map.get(key) != name:
                        raise ModelFileError(
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
            raise ModelFileError(
                f"{file.path}: tensor '{key}' has shape {shape}, expected {expected_shape}"
            )
        return file.get(key)


def _read_weight_map(index: str) -> dict[str, str]:
    """The `weight_map` of a sharded checkpoint's index; ModelFileError when it has none."""
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise ModelFileError(f"{index}: not a JSON object with a 'weight_map' ({e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelFileError(f"{index}: 'weight_map' must map tensor names to shard file names")
    return weight_map


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
            tensor = np.asarray(produce(key), dtype=dtype, order="C")  # 0-d stays 0-d
            if tensor.shape != tuple(shape):
                raise ValueError(f"tensor '{key}' has shape {tensor.shape}, expected {shape}")
            f.write(tensor.tobytes())
