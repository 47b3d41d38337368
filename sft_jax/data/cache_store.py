"""The tokenisation cache's files: verified directories and the parts of records they hold.

Every directory is written by `write_verified`: files into a temporary directory, then a completion
marker (`COMPLETE.json`: counts and each file's size and blake2b digest, or for a part's large
arrays one digest per block, cache_blocks.py), then a rename into place. `read_verified` trusts
nothing else: a missing marker (an interrupted write), a file of another size or digest
(truncated, flipped bytes) is a ValueError, and the caller removes the directory and encodes
again. A streamed start opens parts `lazy`: sizes and array headers at open, each block of the
large arrays verified when first read. Only plain file operations are used, through etils.epath,
so the cache can live wherever the workdir does. What the parts mean is in cache.py.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from sft_jax.data.cache_blocks import (
    BLOCK,
    BLOCKED,
    DTYPES,
    BlockGuard,
    block_digests,
    file_block_digests,
)
from sft_jax.data.encode import Encoded, EvalPrompt
from sft_jax.data.render import NAMED, TokenCounts
from sft_jax.data.tokenize import TokenizedExample
from sft_jax.paths import is_url

logger = logging.getLogger(__name__)

# 3: blocked digests of the large arrays in the marker; 4: rows an older version encoded are now
# refused (a trained turn's reasoning the template drops, field_map collisions, short CSV rows);
# 5: user / system messages without content are refused instead of encoded as empty turns;
# 6: prepared rows' counts carry whether some example masks a token (ProcessCounts).
CACHE_VERSION = 6
MARKER = "COMPLETE.json"
_BLOCK = 1 << 20
_LOOKUP = 1 << 20  # records looked up at a time by `RecordStore.missing`
# Record kinds (what formats.parse_record made of the record).
ROW, TEXT, CONVERSATION, UNPARSEABLE = 0, 1, 2, 3
_COUNTS = ("truncated", "split", "dropped", "control_text")
_NAMED = ("named_truncated", "named_dropped", "named_skipped", "named_control")
_ARRAYS = (
    "records",
    "kinds",
    "skipped",
    "counts",
    "record_pieces",
    "piece_starts",
    "tokens",
    "loss_mask",
    "eval_done",
    "source_files",
    "source_lines",
)


def digest_file(path: str | os.PathLike) -> str:
    """blake2b of every byte of one file, read in 1 MiB blocks."""
    h = hashlib.blake2b(digest_size=20)
    with epath.Path(path).open("rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


@dataclasses.dataclass
class Part:
    """One part's arrays (see `_ARRAYS`), its table of source names and sparse per-record extras.
    A piece's source ("path:line") is kept as two numbers, an id into `names` and the line (-1
    when the name has no line), so opening a part holds no Python object per piece."""

    arrays: dict[str, np.ndarray]
    names: list[str]
    named: dict[int, dict[str, list[str]]]  # local record index -> named_* lists
    prompts: dict[int, EvalPrompt | None]  # local index -> prompt, for records with eval_done
    # Opened lazily (streaming): array name -> the guard of its blocks not yet verified.
    guards: dict[str, BlockGuard] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tokens, self.mask = self.arrays["tokens"], self.arrays["loss_mask"]

    def span(self, name: str, lo: int, hi: int) -> np.ndarray:
        """`arrays[name][lo:hi]`, its blocks verified first (once) when opened lazily."""
        if self.guards:
            guard = self.guards.get(name)
            if guard is not None:
                guard.check(lo, hi)
                self._settle(guard)
        return self.arrays[name][lo:hi]

    def check_at(self, name: str, indices: np.ndarray) -> None:
        """Verifies (once) the blocks of `arrays[name]` at `indices` before they are read."""
        if self.guards:
            guard = self.guards.get(name)
            if guard is not None:
                guard.check_at(indices)
                self._settle(guard)

    def _settle(self, guard: BlockGuard) -> None:
        """Drops a guard whose every block is verified, so a fully verified part's reads cost
        one test of an empty dict (the dict is replaced, not changed: other threads may read)."""
        if guard.complete:
            self.guards = {name: g for name, g in self.guards.items() if not g.complete}

    def source(self, piece: int) -> str:
        """The source name of one piece."""
        return self.sources_of(np.asarray([piece]))[0]

    def sources_of(self, pieces: np.ndarray) -> list[str]:
        """The source names of the pieces at `pieces`."""
        self.check_at("source_files", pieces)
        self.check_at("source_lines", pieces)
        files = self.arrays["source_files"][pieces].tolist()
        lines = self.arrays["source_lines"][pieces].tolist()
        names = self.names
        return [names[f] if n < 0 else f"{names[f]}:{n}" for f, n in zip(files, lines, strict=True)]

    @functools.cached_property
    def starts(self) -> list[int]:
        """Piece starts as a plain list: per-piece indexing in Python is faster. Built when
        first used: a streamed run reads the memory-mapped array instead."""
        return self.span("piece_starts", 0, len(self.arrays["piece_starts"])).tolist()


@dataclasses.dataclass
class Selection:
    """What a list of records yields: pieces in order, summed counts, skips, and the kinds seen."""

    pieces: list[TokenizedExample]
    counts: TokenCounts
    skipped: int
    kinds: set[int]
    prompts: list[EvalPrompt]


class RecordStore:
    """The parts of one key directory, with a lookup from record position to (part, index).
    Each part's record positions are sorted (`write` sorts them), so the lookup is a binary
    search in its memory-mapped `records` array: no table per record is held. `lazy` (streaming)
    opens the parts without reading their large arrays (`read_part`)."""

    def __init__(self, root: str | os.PathLike, num_records: int, *, lazy: bool = False):
        self.root = epath.Path(root)
        self.num_records = num_records
        self.lazy = lazy
        self.parts: list[Part] = []
        if self.root.exists():
            for directory in sorted(self.root.iterdir()):
                if directory.name.startswith("part-"):
                    self._add(directory)
                elif directory.name.startswith(".tmp-") and _stale(directory):
                    remove(directory)  # left by a write that was killed

    def _add(self, directory: epath.Path) -> None:
        if is_url(directory) and not (directory / MARKER).exists():
            return  # in an object store, a part being written by another process has no marker yet
        try:
            part = read_part(directory, lazy=self.lazy)
        except (OSError, ValueError, KeyError) as error:
            logger.warning("data cache: ignoring and removing %s: %s", directory, error)
            remove(directory)
            return
        records = part.arrays["records"]
        if len(records) and (records[0] < 0 or records[-1] >= self.num_records):
            logger.warning("data cache: %s holds records beyond the data; removed", directory)
            remove(directory)
            return
        if not _sorted(records):
            logger.warning("data cache: %s holds unsorted records; removed", directory)
            remove(directory)
            return
        self.parts.append(part)

    def locate(
        self, positions: Sequence[int] | np.ndarray, *, held_out: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """(part, index in the part) of each record at `positions`; part -1 where no part holds
        it (for `held_out`, no part holds it with its prompt). A later part wins, as it was
        written later."""
        pos = np.asarray(positions, np.int64)
        part_of, local = np.full(len(pos), -1, np.int32), np.zeros(len(pos), np.int64)
        for p, part in enumerate(self.parts):
            records = part.arrays["records"]
            if not len(records):
                continue
            at = np.minimum(np.searchsorted(records, pos), len(records) - 1)
            hit = records[at] == pos
            if held_out:
                hit &= part.arrays["eval_done"][at]
            part_of[hit], local[hit] = p, at[hit]
        return part_of, local

    def missing(self, positions: Sequence[int], eval_positions: Sequence[int]) -> np.ndarray:
        """Sorted positions no part holds (or, for the held-out ones, holds without a prompt)."""
        need = [np.zeros(0, np.int64)]
        for chosen, held_out in ((positions, False), (eval_positions, True)):
            chosen = np.asarray(chosen, np.int64)
            for lo in range(0, len(chosen), _LOOKUP):  # in blocks: temporaries stay small
                block = chosen[lo : lo + _LOOKUP]
                need.append(block[self.locate(block, held_out=held_out)[0] < 0])
        return np.unique(np.concatenate(need))

    def select(
        self, positions: Sequence[int], *, held_out: bool = False, pieces: bool = True
    ) -> Selection:
        """The records at `positions`, in that order (all must be present: `missing` first).
        Vectorised per part: a restart assembles a few hundred thousand records in well under
        a second. `pieces=False` leaves the pieces out (streaming reads them through
        `piece_index` instead of holding one object per example)."""
        pos = np.asarray(positions, np.int64)
        part_of, local = self.locate(pos, held_out=held_out)
        if (part_of < 0).any():
            raise KeyError(f"record {pos[part_of < 0][0]} is not in the data cache {self.root}")
        counts, skipped, kinds = np.zeros(len(_COUNTS), np.int64), 0, set()
        first, number = np.zeros(len(pos), np.int64), np.zeros(len(pos), np.int64)
        extras: list[tuple[int, int, int]] = []  # (order, part, local) with names or a prompt
        for p in np.unique(part_of).tolist():
            where = part_of == p
            mine, a, part = local[where], self.parts[p].arrays, self.parts[p]
            kinds |= set(np.unique(a["kinds"][mine]).tolist())
            skipped += int(a["skipped"][mine].sum())
            counts += a["counts"][mine].sum(axis=0, dtype=np.int64)
            first[where] = a["record_pieces"][mine]
            number[where] = a["record_pieces"][mine + 1] - first[where]
            special = set(part.named) | (set(part.prompts) if held_out else set())
            if special:
                hits = np.flatnonzero(where)[np.isin(mine, list(special))]
                extras += [(int(o), p, int(local[o])) for o in hits]
        piece_part, piece = _pieces_of(part_of, first, number)
        examples: list[Any] = [None] * len(piece) if pieces else []
        for p in np.unique(piece_part).tolist() if pieces else ():
            at = np.flatnonzero(piece_part == p)
            part = self.parts[p]
            names, starts = part.sources_of(piece[at]), part.starts
            for i, k, name in zip(at.tolist(), piece[at].tolist(), names, strict=True):
                lo, hi = starts[k], starts[k + 1]
                tokens, mask = part.span("tokens", lo, hi), part.span("loss_mask", lo, hi)
                examples[i] = TokenizedExample(tokens, mask, name)
        named: dict[str, list[str]] = {name: [] for name in _NAMED}
        prompts: list[EvalPrompt] = []
        for _, p, i in sorted(extras):
            for name, values in self.parts[p].named.get(i, {}).items():
                named[name].extend(values)
            if held_out and self.parts[p].prompts.get(i) is not None:
                prompts.append(self.parts[p].prompts[i])
        total = TokenCounts(
            **dict(zip(_COUNTS, counts.tolist(), strict=True)),
            **{name: tuple(values[:NAMED]) for name, values in named.items()},
        )
        return Selection(examples, total, skipped, kinds, prompts)

    def piece_index(self, positions: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(part, piece within the part) of every piece of the records at `positions`, in
        order, as arrays (int32, int64): what `select` reads, without reading it."""
        pos = np.asarray(positions, np.int64)
        part_of, local = self.locate(pos)
        if (part_of < 0).any():
            raise KeyError(f"record {pos[part_of < 0][0]} is not in the data cache {self.root}")
        first, number = np.zeros(len(pos), np.int64), np.zeros(len(pos), np.int64)
        for p in np.unique(part_of).tolist():
            where = part_of == p
            bounds = self.parts[p].arrays["record_pieces"]
            first[where] = bounds[local[where]]
            number[where] = bounds[local[where] + 1] - first[where]
        piece_part, piece = _pieces_of(part_of, first, number)
        return piece_part.astype(np.int32), piece

    def write(
        self,
        positions: Sequence[int],
        kinds: Sequence[int],
        encoded: Sequence[Encoded],
        prompts: dict[int, EvalPrompt | None],
    ) -> None:
        """Adds a part holding these records (`prompts`: by position, for held-out ones). If it
        cannot be written (a full disk, no permission), the run goes on with it in memory: the
        cache only saves time, so failing to write it must not stop training. The records are
        written in position order (`locate` searches them)."""
        order = np.argsort(np.asarray(positions, np.int64), kind="stable").tolist()
        positions = [int(positions[i]) for i in order]
        kinds, encoded = [kinds[i] for i in order], [encoded[i] for i in order]
        files, counts = part_files(positions, kinds, encoded, prompts)
        try:
            directory = write_verified(self.root, f"part-{uuid.uuid4().hex}", files, counts)
        except OSError as error:
            logger.warning("data cache: cannot write to %s (%s); not cached", self.root, error)
            self.parts.append(part_from(counts, files))
            return
        self._add(directory)


def _pieces_of(
    part_of: np.ndarray, first: np.ndarray, number: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Records (part, first piece, piece count) -> each piece's (part, index in the part)."""
    piece_part = np.repeat(part_of, number)
    ends = np.cumsum(number)
    piece = np.repeat(first - (ends - number), number) + np.arange(
        int(ends[-1]) if len(ends) else 0
    )
    return piece_part, piece


def _sorted(records: np.ndarray) -> bool:
    """Whether a part's record positions ascend (read in blocks: they are memory-mapped)."""
    block = 1 << 20
    for lo in range(0, max(len(records) - 1, 0), block):
        chunk = np.asarray(records[lo : lo + block + 1])
        if (chunk[1:] <= chunk[:-1]).any():
            return False
    return True


def split_sources(sources: Sequence[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Source names -> (table of distinct names without their line, id into it, line or -1).
    "path:line" is split at its last colon when the rest is a line number written plainly;
    any other name is kept whole."""
    table: dict[str, int] = {}
    ids, lines = np.zeros(len(sources), np.int32), np.full(len(sources), -1, np.int64)
    for i, source in enumerate(sources):
        name, colon, line = source.rpartition(":")
        if colon and line.isdigit() and line.isascii() and str(int(line)) == line:
            lines[i] = int(line)
        else:
            name = source
        ids[i] = table.setdefault(name, len(table))
    return list(table), ids, lines


def part_files(
    positions: Sequence[int],
    kinds: Sequence[int],
    encoded: Sequence[Encoded],
    prompts: dict[int, EvalPrompt | None],
) -> tuple[dict[str, bytes], dict[str, int]]:
    """One part's files and counts (`write_verified` writes them, `part_from` reads them)."""
    pieces = [piece for e in encoded for piece in e.pieces]
    lengths = np.asarray([len(p.tokens) for p in pieces], np.int64)
    per_record = np.asarray([len(e.pieces) for e in encoded], np.int64)
    arrays = {
        "records": np.asarray(positions, np.int64),
        "kinds": np.asarray(kinds, np.int8),
        "skipped": np.asarray([e.skipped for e in encoded], bool),
        "counts": np.asarray(
            [[getattr(e.counts, c) for c in _COUNTS] for e in encoded], np.int32
        ).reshape(len(encoded), len(_COUNTS)),
        "record_pieces": np.concatenate([[0], np.cumsum(per_record)]).astype(np.int64),
        "piece_starts": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "tokens": concat([p.tokens for p in pieces], np.int32),
        "loss_mask": concat([p.loss_mask for p in pieces], bool),
        "eval_done": np.asarray([pos in prompts for pos in positions], bool),
    }
    names, arrays["source_files"], arrays["source_lines"] = split_sources(
        [p.source for p in pieces]
    )
    named = {}
    for i, e in enumerate(encoded):
        lists = {name: list(getattr(e.counts, name)) for name in _NAMED if getattr(e.counts, name)}
        if lists:
            named[str(i)] = lists
    meta = {
        "source_names": names,
        "named": named,
        "prompts": {
            str(i): prompt_json(prompts[pos]) for i, pos in enumerate(positions) if pos in prompts
        },
    }
    files = {f"{name}.npy": npy_bytes(value) for name, value in arrays.items()}
    files["meta.json"] = json.dumps(meta).encode("utf-8")
    counts = {"records": len(positions), "pieces": len(pieces), "tokens": int(lengths.sum())}
    return files, counts


def write_verified(
    root: epath.Path, name: str, files: dict[str, bytes], counts: dict[str, int]
) -> epath.Path:
    """Writes `files`, then the completion marker (the counts and every file's size and blake2b
    digest, one per `BLOCK` bytes for the large arrays, `BLOCKED`), into `root / name`. Locally
    into a temporary directory first, renamed into place (if another process put `name` there
    first, its directory is kept: same key, same contents). An object store has no directory
    rename; there each file is one atomic object, and the marker, written last, is what makes
    the directory count."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    remote = is_url(final)
    target = final if remote else root / f".tmp-{uuid.uuid4().hex}"
    target.mkdir(parents=True, exist_ok=True)
    for file, data in files.items():
        (target / file).write_bytes(data)
    digests = {
        f: [len(d), block_digests(d, BLOCK) if f in BLOCKED else _digest(d)]
        for f, d in files.items()
    }
    marker = {"version": CACHE_VERSION, **counts, "block_size": BLOCK, "files": digests}
    (target / MARKER).write_text(json.dumps(marker))
    if remote:
        return final
    try:
        target.rename(final)
    except OSError:  # FileExistsError, or ENOTEMPTY from os.rename
        if not (final / MARKER).exists():
            raise
        target.rmtree()
    return final


def read_verified(directory: epath.Path) -> tuple[dict[str, Any], dict[str, bytes | np.ndarray]]:
    """(marker, file contents) of a directory `write_verified` wrote; ValueError when its marker
    is missing or of another version, or a file does not match its size and digest. A local
    .npy file comes back as a read-only memory-mapped array (verified by a streaming digest
    first): a restart then maps a few hundred MB of packed rows instead of copying them into
    fresh memory, which costs seconds on a loaded host. Others come back as bytes."""
    marker, data, _ = open_verified(directory)
    return marker, data


def open_verified(
    directory: epath.Path, *, lazy: bool = False
) -> tuple[dict[str, Any], dict[str, bytes | np.ndarray], dict[str, BlockGuard]]:
    """`read_verified`, and with `lazy` the local blocked files (cache_blocks.py) only checked
    for their size and mapped, each with the guard that verifies its blocks when first read
    (returned by array name)."""
    marker_path = directory / MARKER
    if not marker_path.exists():
        raise ValueError("no completion marker (an interrupted write)")
    marker = json.loads(marker_path.read_text())
    if marker.get("version") != CACHE_VERSION:
        raise ValueError(f"cache version {marker.get('version')}, not {CACHE_VERSION}")
    block = marker.get("block_size", BLOCK)
    if not isinstance(block, int) or block <= 0 or block % 64:
        raise ValueError(f"block size {block!r} in the marker")
    data: dict[str, bytes | np.ndarray] = {}
    guards: dict[str, BlockGuard] = {}
    for file, (size, digest) in marker["files"].items():
        path = directory / file
        blocked = isinstance(digest, list)
        if file.endswith(".npy") and not is_url(path):
            if os.path.getsize(path) != size:
                raise ValueError(f"{file} is {os.path.getsize(path)} bytes, not {size}")
            if not (lazy and blocked):
                found = file_block_digests(path, block) if blocked else digest_file(path)
                if found != digest:
                    raise ValueError(f"{file} does not match its recorded digest")
            data[file] = array = np.load(os.fspath(path), mmap_mode="r", allow_pickle=False)
            if lazy and blocked:
                header_ok = array.ndim == 1 and array.dtype == DTYPES.get(file, array.dtype)
                if not header_ok or int(getattr(array, "offset", 0)) + array.nbytes != size:
                    raise ValueError(f"{file}: its array header does not match its size and dtype")
                guard = BlockGuard(directory, file, digest, block, array, MARKER)
                guards[file.removesuffix(".npy")] = guard
            continue
        raw = path.read_bytes()
        found = block_digests(raw, block) if blocked else _digest(raw)
        if len(raw) != size or found != digest:
            raise ValueError(f"{file} does not match its recorded size and digest")
        data[file] = raw
    return marker, data, guards


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=20).hexdigest()


def seal(directory: str | os.PathLike, counts: dict[str, int]) -> None:
    """Writes the completion marker of the files already in `directory`, as `write_verified`
    would (for a part assembled from files written elsewhere, as a benchmark's corpus)."""
    files = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        digest = file_block_digests(path, BLOCK) if name in BLOCKED else digest_file(path)
        files[name] = [os.path.getsize(path), digest]
    marker = {"version": CACHE_VERSION, **counts, "block_size": BLOCK, "files": files}
    with open(os.path.join(directory, MARKER), "w") as f:
        json.dump(marker, f)


def read_part(directory: epath.Path, *, lazy: bool = False) -> Part:
    """Loads and verifies one part: its marker, every file's size and digest, array shapes.
    `lazy` (streaming): the large arrays' blocks are verified when first read, not here."""
    marker, data, guards = open_verified(directory, lazy=lazy)
    part = part_from(marker, data)
    part.guards = guards
    return part


def part_from(marker: dict[str, Any], data: dict[str, bytes | np.ndarray]) -> Part:
    """A part from its marker's counts and its files' contents; ValueError if they disagree."""
    arrays = {name: npy_array(data[f"{name}.npy"]) for name in _ARRAYS}
    n, pieces = marker["records"], marker["pieces"]
    meta = json.loads(data["meta.json"])
    names = meta["source_names"]
    ids = arrays["source_files"]
    shapes_ok = (
        len(arrays["records"]) == n
        and len(arrays["record_pieces"]) == n + 1
        and len(arrays["piece_starts"]) == pieces + 1
        and len(ids) == pieces == len(arrays["source_lines"])
        and len(arrays["tokens"]) == marker["tokens"] == len(arrays["loss_mask"])
    )
    if not shapes_ok:
        raise ValueError("array lengths do not match the marker's counts")
    named = {int(i): lists for i, lists in meta["named"].items()}
    prompts = {int(i): prompt_from_json(v) for i, v in meta["prompts"].items()}
    return Part(arrays, names, named, prompts)


def prompt_json(prompt: EvalPrompt | None) -> list[Any] | None:
    return None if prompt is None else [list(prompt.prompt_ids), prompt.reference, prompt.source]


def prompt_from_json(value: list[Any] | None) -> EvalPrompt | None:
    return None if value is None else EvalPrompt([int(i) for i in value[0]], value[1], value[2])


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npy_array(data: bytes | np.ndarray) -> np.ndarray:
    """An array from `read_verified`: already one (memory-mapped), or .npy bytes."""
    if isinstance(data, np.ndarray):
        return data
    return np.load(io.BytesIO(data), allow_pickle=False)


def concat(arrays: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)


_STALE_SECONDS = 24 * 3600  # a temporary directory this old is not another process's write


def _stale(path: epath.Path) -> bool:
    try:
        return time.time() - path.stat().mtime > _STALE_SECONDS
    except OSError:
        return False


def remove(directory: epath.Path) -> None:
    try:
        directory.rmtree() if directory.is_dir() else directory.unlink()
    except OSError as error:  # another process may be removing it too
        logger.warning("data cache: could not remove %s: %s", directory, error)
