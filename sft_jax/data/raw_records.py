"""Every record of a file list as a lazy, indexable sequence: `lazy_records(files)`.

Sharded reading (pipeline.py) and the tokenisation cache (cache.py) need the record count and the
positions of the whole file list, but parse only the records they select. Holding every record
(or every line's bytes) in a list made the first start cost the dataset's size in memory, plus
about 100 bytes of Python objects per record, so a dataset larger than host memory could not be
encoded at all. `RawRecords` holds per record only what finds it again:

* JSON Lines: one pass over each file notes every non-blank line's byte offset, length and line
  number in numpy arrays (16 bytes a record); a line is read back by seeking, and a selection is
  read in increasing order as few large reads (records close to each other share one read), so
  reading a shard costs a few reads per megabyte, also from an object store (`sft_jax.paths`).
* Parquet: the files' metadata gives each row group's row count without reading any data; a row
  group is read when one of its records is asked for, at most two are kept, and rows are turned
  into dicts `_BATCH` at a time.
* Saved Hugging Face datasets: their Arrow table is memory-mapped by `datasets`; rows are turned
  into dicts `_BATCH` at a time, as for Parquet.
* CSV and JSON list files are decoded whole when listed, as their readers (source.py) need the
  whole file to know where a record starts; each record is then held as a dict.

Items are what `source.decode_record` takes: raw JSON Lines bytes, or decoded records (dicts or
DataErrors), with the same "path:line" / "path:row N" sources, order and errors as
`source.iter_records`.
"""

from __future__ import annotations

import codecs
import contextlib
import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from sft_jax.data.source import (
    DataError,
    Record,
    drop_none,
    expand_files,
    is_json_lines,
    iter_records,
    load_hf_dataset,
)
from sft_jax.paths import is_url, isdir, open_binary

Item = tuple[str, bytes | Record]

_CHUNK = 1 << 20  # bytes read at a time while indexing a JSON Lines file
_SPAN = 1 << 22  # a read back covers records starting within one such window...
_GAP = 1 << 16  # ...and no more than this many unwanted bytes between two wanted records
_TAKE = 1 << 12  # records of an unordered selection read (and held) at a time
_READ = 1 << 16  # records of an increasing selection a segment reads at a time
_BATCH = 4096  # Arrow rows turned into dicts at a time
_GROUPS_KEPT = 2  # decoded Parquet row groups kept

# bytes.strip() removes exactly these: a line of only them is blank and not a record.
_NOT_SPACE = np.ones(256, bool)
_NOT_SPACE[list(b" \t\n\r\x0b\x0c")] = False


class RawRecords(Sequence[Item]):
    """The records of a file list in order: `records[i]` is (source, item), where item is raw
    JSON Lines bytes or a decoded record for `decode_record`. `take(positions)` reads many at
    once (the way to read a selection); iterating reads them all in order."""

    def __init__(self, segments: Sequence[Any]):
        self._segments = list(segments)
        self._starts = np.cumsum([0] + [s.count for s in self._segments], dtype=np.int64)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return list(self.take(range(len(self))[index]))
        i = int(index)
        if not -len(self) <= i < len(self):
            raise IndexError(f"record {i} of {len(self)}")
        return next(self.take([i % len(self)]))

    def __iter__(self) -> Iterator[Item]:
        for lo in range(0, len(self), _READ):
            yield from self._read_sorted(np.arange(lo, min(lo + _READ, len(self))))

    def take(self, positions: Iterable[int]) -> Iterator[Item]:
        """The records at `positions`, in the order given. An increasing selection is read as
        it goes; any other order is read `_TAKE` records at a time, each block in increasing
        order (so a shuffled selection does not cost one read per record either)."""
        positions = np.asarray(
            positions if isinstance(positions, np.ndarray | range) else list(positions),
            np.int64,
        ).reshape(-1)
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            bad = positions[(positions < 0) | (positions >= len(self))][0]
            raise IndexError(f"record {int(bad)} of {len(self)}")
        if positions.size < 2 or bool(np.all(positions[1:] > positions[:-1])):
            yield from self._read_sorted(positions)
            return
        for lo in range(0, len(positions), _TAKE):
            unique, inverse = np.unique(positions[lo : lo + _TAKE], return_inverse=True)
            items = list(self._read_sorted(unique))
            for k in inverse.tolist():
                yield items[k]

    def _read_sorted(self, positions: np.ndarray) -> Iterator[Item]:
        """The records at increasing `positions`, each segment's `_READ` at a time (what a
        segment turns into Python values at once is bounded, not the selection)."""
        bounds = np.searchsorted(positions, self._starts).tolist()
        for s, segment in enumerate(self._segments):
            for lo in range(bounds[s], bounds[s + 1], _READ):
                hi = min(lo + _READ, bounds[s + 1])
                yield from segment.read(positions[lo:hi] - self._starts[s])


def lazy_records(files: str) -> RawRecords:
    """Every record of `files` (comma-separated paths/globs) in order, read when asked for."""
    return RawRecords([_segment(path) for path in expand_files(files)])


def count_records(files: str) -> int:
    """len(lazy_records(files)) without keeping anything per record: JSON Lines files are
    scanned for non-blank lines, Parquet row counts come from the metadata."""
    total = 0
    for path in expand_files(files):
        if is_json_lines(path):
            total += JsonLines(path, keep=False).count
        elif isdir(path):
            total += load_hf_dataset(path).num_rows
        elif path.lower().endswith(".parquet"):
            with _parquet_file(path) as f:
                total += f.metadata.num_rows
        else:
            total += sum(1 for _ in iter_records(path))
    return total


def _segment(path: str) -> Any:
    if is_json_lines(path):
        return JsonLines(path)
    if isdir(path):
        table = load_hf_dataset(path)
        return ArrowRows(path, [table.num_rows], lambda _: table)
    if path.lower().endswith(".parquet"):
        with _parquet_file(path) as f:
            rows = [f.metadata.row_group(g).num_rows for g in range(f.metadata.num_row_groups)]
        return ArrowRows(path, rows, lambda g: _read_row_group(path, g))
    return Decoded(list(iter_records(path)))


class JsonLines:
    """One JSON Lines file's non-blank lines: offset, length and line number of each.

    Blank lines (only ASCII whitespace) are no record, and a UTF-8 byte order mark before the
    first line is not part of it, as `source.iter_records` reads the file. `keep=False` only
    counts them."""

    def __init__(self, path: str, keep: bool = True):
        self.path = path
        blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.count = 0
        for offsets, lengths, lines in _scan_lines(path):
            self.count += len(offsets)
            if keep:  # uint32 where they fit: concatenating keeps int64 only if a block needs it
                blocks.append((_compact(offsets), _compact(lengths), _compact(lines)))
        empty = np.zeros(0, np.uint32)
        self.offsets, self.lengths, self.lines = (
            np.concatenate([b[k] for b in blocks] or [empty]) for k in range(3)
        )

    def read(self, local: np.ndarray) -> Iterator[tuple[str, bytes]]:
        """The lines at `local` (increasing), as few reads as records close together allow."""
        offsets = self.offsets[local].astype(np.int64)
        ends = offsets + self.lengths[local]
        lines = self.lines[local].tolist()
        window = offsets // _SPAN
        cut = (offsets[1:] - ends[:-1] > _GAP) | (window[1:] != window[:-1])
        breaks = [0, *(np.flatnonzero(cut) + 1).tolist(), len(offsets)]
        offsets_list, ends_list = offsets.tolist(), ends.tolist()
        with open_binary(self.path) as f:
            for a, b in itertools.pairwise(breaks):
                start = offsets_list[a]
                f.seek(start)
                data = f.read(ends_list[b - 1] - start)
                for k in range(a, b):
                    raw = data[offsets_list[k] - start : ends_list[k] - start]
                    yield f"{self.path}:{lines[k]}", raw


def _scan_lines(path: str) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(offsets, lengths, line numbers) of the non-blank lines, `_CHUNK` bytes at a time. A line
    runs to and includes its b"\\n" (as iterating a binary file splits), the last one to the end
    of the file."""
    with open_binary(path) as f:
        pos, start, line, pending = 0, 0, 1, False  # `start`: where line `line` starts
        while data := f.read(_CHUNK):
            if pos == 0 and data.startswith(codecs.BOM_UTF8):
                start = len(codecs.BOM_UTF8)
            chunk = np.frombuffer(data, np.uint8)
            content = _NOT_SPACE[chunk]
            content[: max(start - pos, 0)] = False
            ends = np.flatnonzero(chunk == 10) + 1
            if not len(ends):
                pending |= bool(content.any())
                pos += len(data)
                continue
            counts = np.concatenate([[0], np.cumsum(content, dtype=np.int32)])
            starts = np.concatenate([[max(start - pos, 0)], ends[:-1]])
            filled = counts[ends] > counts[starts]
            filled[0] |= pending
            offsets = starts + pos
            offsets[0] = start
            numbers = np.arange(line, line + len(ends), dtype=np.int64)
            yield offsets[filled], (ends + pos - offsets)[filled], numbers[filled]
            line += len(ends)
            start = pos + int(ends[-1])
            pending = bool(counts[-1] > counts[ends[-1]])
            pos += len(data)
        if pending and pos > start:
            yield (np.array([start]), np.array([pos - start]), np.array([line]))


def _compact(values: np.ndarray) -> np.ndarray:
    """int64 values as uint32 where they all fit (lengths and line numbers always do in
    practice; offsets past 4 GiB into a file do not)."""
    if len(values) and int(values.max()) >= 1 << 32:
        return values
    return values.astype(np.uint32)


class ArrowRows:
    """Rows of an Arrow source in groups (Parquet row groups, or one memory-mapped table):
    `load(g)` gives group g as a table, read when one of its rows is asked for; at most
    `_GROUPS_KEPT` are kept, and `_BATCH` rows of one at a time as dicts."""

    def __init__(self, path: str, group_rows: Sequence[int], load: Callable[[int], Any]):
        self.path, self._load = path, load
        self._group_starts = np.cumsum([0, *group_rows], dtype=np.int64)
        self.count = int(self._group_starts[-1])
        self._tables: OrderedDict[int, Any] = OrderedDict()
        self._batch: tuple[int, int, list[dict[str, Any]]] | None = None

    def read(self, local: np.ndarray) -> Iterator[tuple[str, Record]]:
        groups = np.searchsorted(self._group_starts, local, side="right") - 1
        for row, g in zip(local.tolist(), groups.tolist(), strict=True):
            within = row - int(self._group_starts[g])
            rows = self._rows(g, within // _BATCH)
            yield f"{self.path}:row {row + 1}", drop_none(rows[within % _BATCH])

    def _rows(self, group: int, batch: int) -> list[dict[str, Any]]:
        if self._batch is None or self._batch[:2] != (group, batch):
            if group not in self._tables:
                self._tables[group] = self._load(group)
                while len(self._tables) > _GROUPS_KEPT:
                    self._tables.popitem(last=False)
            table = self._tables[group]
            self._batch = (group, batch, table.slice(batch * _BATCH, _BATCH).to_pylist())
        return self._batch[2]


class Decoded:
    """A file's records decoded whole (CSV, JSON list): held as `iter_records` gave them."""

    def __init__(self, items: list[Item]):
        self.items, self.count = items, len(items)

    def read(self, local: np.ndarray) -> Iterator[Item]:
        for k in local.tolist():
            yield self.items[k]


@contextlib.contextmanager
def _parquet_file(path: str) -> Iterator[Any]:
    """The file as a pyarrow ParquetFile (metadata read, no data); DataError if it is not one."""
    import pyarrow.parquet as pq  # Deferred: only Parquet data needs pyarrow's reader.

    with contextlib.ExitStack() as stack:
        source = stack.enter_context(open_binary(path)) if is_url(path) else path
        try:
            parquet = pq.ParquetFile(source)
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
            raise DataError(f"{path}: cannot read as Parquet: {e}") from e
        with contextlib.closing(parquet):
            yield parquet


def _read_row_group(path: str, group: int) -> Any:
    with _parquet_file(path) as f:
        try:
            return f.read_row_group(group)
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
            raise DataError(f"{path}: cannot read as Parquet: {e}") from e
