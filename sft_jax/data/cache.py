"""The tokenisation cache: each record's encoding, written once and reused by every later start.

Encoding (render + tokenise + mask) is the slow part of the data stage: minutes for a few hundred
thousand conversations on a few cores, redone at every start, resume and on every process. The
cache keeps, per mixture group (one `data.train_files` pattern), the encoding of each *record* by
its position in the group's file list: its pieces (tokens, loss mask, source), what happened to
it (truncated, split, dropped, special-token text, skipped as bad, and the first names of those),
its kind (prompt/completion, text, conversation, or unparseable) and, for records that were held
out, the generation prompt. Which records a run trains or evaluates on (the held-out split, the
data shards), and everything after encoding (mixing, packing, order), is recomputed from these
per-record entries at every start, so only options that change a record's encoding are in the key:

    the data files' paths, sizes and contents (streaming blake2b of every byte), the tokenizer's
    files (contents), the resolved chat template's source, data.format / field_map /
    ignore_fields / train_on / seq_len / overlong / on_bad_row / on_control_tokens, and
    CACHE_VERSION (raised whenever the encoding code changes what it produces).

A seed, shard count, pack setting, batch size or learning-rate change reuses the cache; a change
of any of the above encodes again (into another key directory).

Layout: `<cache_dir>/<key>/part-<id>/`, each part a set of numpy arrays plus `sources.bin` and
`meta.json`, written into a temporary directory that is renamed into place, with a completion
marker (`COMPLETE.json`: counts and the blake2b digest of every file) written last. A part is
trusted only when its marker is there and every file matches its digest; anything else (a
truncated file, flipped bytes, no marker) is logged, removed and encoded again. Parts are
sparse: a process encodes the records it needs (its own data shards and the held-out records)
and writes them as one part, so the processes of a multi-host run write their parts in parallel,
with no coordination, and a later run with other shards or another seed finds each record in
whichever part holds it, encoding only what no part has.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from etils import epath

from sft_jax.data.encode import (
    Encoded,
    EncodedSplits,
    EncodeSettings,
    EvalPrompt,
    encode_each,
    encode_held_out,
    eval_prompt,
)
from sft_jax.data.formats import (
    Example,
    FormatSpec,
    Row,
    Text,
    parse_record,
    read_examples,
)
from sft_jax.data.mixture import parse_mixture
from sft_jax.data.render import TokenCounts
from sft_jax.data.shards import ShardPlan, held_out_shares, shard_positions, split_positions
from sft_jax.data.source import (
    DataError,
    SkipCounter,
    decode_record,
    expand_files,
    lazy_records,
)
from sft_jax.data.templates import load_chat_template
from sft_jax.data.tokenize import TokenizedExample

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
MARKER = "COMPLETE.json"
_BLOCK = 1 << 20
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
)
# Files a tokenizer directory may hold that change tokenisation (a model directory also holds
# weights, which are not hashed).
_TOKENIZER_PREFIXES = (
    "tokenizer",
    "vocab",
    "merges",
    "special_tokens_map",
    "added_tokens",
    "chat_template",
    "spiece",
    "sentencepiece",
)
_TOKENIZER_NAMES = ("config.json",)


def digest_file(path: str | os.PathLike) -> str:
    """blake2b of every byte of one file, read in 1 MiB blocks."""
    h = hashlib.blake2b(digest_size=20)
    with epath.Path(path).open("rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def files_identity(paths: Sequence[str]) -> list[list[Any]]:
    """[path, size, content digest] of each data file; a dataset directory lists its files."""
    out: list[list[Any]] = []
    for path in paths:
        p = epath.Path(path)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        out.extend([str(f), f.stat().length, digest_file(f)] for f in files)
    return out


def tokenizer_identity(directory: str) -> list[list[str]]:
    """[name, content digest] of the files in a tokenizer directory that change tokenisation."""
    root = epath.Path(directory)
    names = sorted(
        f.name
        for f in root.iterdir()
        if f.is_file() and (f.name.startswith(_TOKENIZER_PREFIXES) or f.name in _TOKENIZER_NAMES)
    )
    return [[name, digest_file(root / name)] for name in names]


def encoding_key(description: dict[str, Any]) -> str:
    """The key directory's name: a digest of everything that changes a record's encoding."""
    text = json.dumps({"version": CACHE_VERSION, **description}, sort_keys=True)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


@dataclasses.dataclass
class Part:
    """One part's arrays (see `_ARRAYS`), piece sources and sparse per-record extras."""

    arrays: dict[str, np.ndarray]
    sources: list[str]
    named: dict[int, dict[str, list[str]]]  # local record index -> named_* lists
    prompts: dict[int, EvalPrompt | None]  # local index -> prompt, for records with eval_done


@dataclasses.dataclass
class Selection:
    """What a list of records yields: pieces in order, summed counts, skips, and the kinds seen."""

    pieces: list[TokenizedExample]
    counts: TokenCounts
    skipped: int
    kinds: set[int]
    prompts: list[EvalPrompt]


class RecordStore:
    """The parts of one key directory, with a lookup from record position to (part, index)."""

    def __init__(self, root: str | os.PathLike, num_records: int):
        self.root = epath.Path(root)
        self.num_records = num_records
        self.parts: list[Part] = []
        self._part = np.full(num_records, -1, np.int64)
        self._local = np.zeros(num_records, np.int64)
        self._eval_part = np.full(num_records, -1, np.int64)
        self._eval_local = np.zeros(num_records, np.int64)
        if self.root.exists():
            for directory in sorted(self.root.iterdir()):
                if directory.name.startswith("part-"):
                    self._add(directory)

    def _add(self, directory: epath.Path) -> None:
        try:
            part = read_part(directory)
        except (OSError, ValueError, KeyError) as error:
            logger.warning("data cache: ignoring and removing %s: %s", directory, error)
            _remove(directory)
            return
        records = part.arrays["records"]
        if len(records) and (records.min() < 0 or records.max() >= self.num_records):
            logger.warning("data cache: %s holds records beyond the data; removed", directory)
            _remove(directory)
            return
        index = len(self.parts)
        self.parts.append(part)
        local = np.arange(len(records))
        self._part[records], self._local[records] = index, local
        done = part.arrays["eval_done"]
        self._eval_part[records[done]], self._eval_local[records[done]] = index, local[done]

    def missing(self, positions: Sequence[int], eval_positions: Sequence[int]) -> list[int]:
        """Sorted positions no part holds (or, for the held-out ones, holds without a prompt)."""
        train = np.asarray(positions, np.int64)
        held = np.asarray(eval_positions, np.int64)
        need = set(train[self._part[train] < 0].tolist())
        need |= set(held[self._eval_part[held] < 0].tolist())
        return sorted(need)

    def select(self, positions: Sequence[int], *, held_out: bool = False) -> Selection:
        """The records at `positions`, in that order (all must be present: `missing` first)."""
        table = (self._eval_part, self._eval_local) if held_out else (self._part, self._local)
        pieces: list[TokenizedExample] = []
        prompts: list[EvalPrompt] = []
        counts, skipped, kinds = np.zeros(len(_COUNTS), np.int64), 0, set()
        named: dict[str, list[str]] = {name: [] for name in _NAMED}
        for position in positions:
            p, i = int(table[0][position]), int(table[1][position])
            if p < 0:
                raise KeyError(f"record {position} is not in the data cache {self.root}")
            part = self.parts[p]
            a = part.arrays
            kinds.add(int(a["kinds"][i]))
            skipped += int(a["skipped"][i])
            counts += a["counts"][i]
            for name, values in part.named.get(i, {}).items():
                named[name].extend(values)
            starts, tokens, mask = a["piece_starts"], a["tokens"], a["loss_mask"]
            for k in range(int(a["record_pieces"][i]), int(a["record_pieces"][i + 1])):
                lo, hi = int(starts[k]), int(starts[k + 1])
                pieces.append(TokenizedExample(tokens[lo:hi], mask[lo:hi], part.sources[k]))
            if held_out and part.prompts.get(i) is not None:
                prompts.append(part.prompts[i])
        total = TokenCounts(
            **dict(zip(_COUNTS, counts.tolist(), strict=True)),
            **{name: tuple(values[:5]) for name, values in named.items()},
        )
        return Selection(pieces, total, skipped, kinds, prompts)

    def write(
        self,
        positions: Sequence[int],
        kinds: Sequence[int],
        encoded: Sequence[Encoded],
        prompts: dict[int, EvalPrompt | None],
    ) -> None:
        """Adds a part holding these records (`prompts`: by position, for held-out ones)."""
        directory = write_part(self.root, positions, kinds, encoded, prompts)
        self._add(directory)


def write_part(
    root: epath.Path,
    positions: Sequence[int],
    kinds: Sequence[int],
    encoded: Sequence[Encoded],
    prompts: dict[int, EvalPrompt | None],
) -> epath.Path:
    """Writes one part into a temporary directory, marker last, then renames it into place."""
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
        "tokens": _concat([p.tokens for p in pieces], np.int32),
        "loss_mask": _concat([p.loss_mask for p in pieces], bool),
        "eval_done": np.asarray([pos in prompts for pos in positions], bool),
    }
    named = {}
    for i, e in enumerate(encoded):
        lists = {name: list(getattr(e.counts, name)) for name in _NAMED if getattr(e.counts, name)}
        if lists:
            named[str(i)] = lists
    meta = {
        "named": named,
        "prompts": {
            str(i): _prompt_json(prompts[pos]) for i, pos in enumerate(positions) if pos in prompts
        },
    }
    files = {f"{name}.npy": _npy_bytes(value) for name, value in arrays.items()}
    files["sources.bin"] = "\0".join(p.source for p in pieces).encode("utf-8", "surrogateescape")
    files["meta.json"] = json.dumps(meta).encode("utf-8")
    root.mkdir(parents=True, exist_ok=True)
    name = uuid.uuid4().hex
    tmp = root / f".tmp-{name}"
    tmp.mkdir()
    for file, data in files.items():
        (tmp / file).write_bytes(data)
    marker = {
        "version": CACHE_VERSION,
        "records": len(positions),
        "pieces": len(pieces),
        "tokens": int(lengths.sum()),
        "files": {
            f: [len(d), hashlib.blake2b(d, digest_size=20).hexdigest()] for f, d in files.items()
        },
    }
    (tmp / MARKER).write_text(json.dumps(marker))
    final = root / f"part-{name}"
    tmp.rename(final)
    return final


def read_part(directory: epath.Path) -> Part:
    """Loads and verifies one part: its marker, every file's size and digest, array shapes."""
    marker_path = directory / MARKER
    if not marker_path.exists():
        raise ValueError("no completion marker (an interrupted write)")
    marker = json.loads(marker_path.read_text())
    if marker.get("version") != CACHE_VERSION:
        raise ValueError(f"cache version {marker.get('version')}, not {CACHE_VERSION}")
    data: dict[str, bytes] = {}
    for file, (size, digest) in marker["files"].items():
        raw = (directory / file).read_bytes()
        if len(raw) != size or hashlib.blake2b(raw, digest_size=20).hexdigest() != digest:
            raise ValueError(f"{file} does not match its recorded size and digest")
        data[file] = raw
    arrays = {name: np.load(io.BytesIO(data[f"{name}.npy"])) for name in _ARRAYS}
    n, pieces = marker["records"], marker["pieces"]
    sources = data["sources.bin"].decode("utf-8", "surrogateescape").split("\0") if pieces else []
    shapes_ok = (
        len(arrays["records"]) == n
        and len(arrays["record_pieces"]) == n + 1
        and len(arrays["piece_starts"]) == pieces + 1
        and len(sources) == pieces
        and len(arrays["tokens"]) == marker["tokens"] == len(arrays["loss_mask"])
    )
    if not shapes_ok:
        raise ValueError("array lengths do not match the marker's counts")
    meta = json.loads(data["meta.json"])
    named = {int(i): lists for i, lists in meta["named"].items()}
    prompts = {int(i): _prompt_from_json(v) for i, v in meta["prompts"].items()}
    return Part(arrays, sources, named, prompts)


def _prompt_json(prompt: EvalPrompt | None) -> list[Any] | None:
    return None if prompt is None else [list(prompt.prompt_ids), prompt.reference, prompt.source]


def _prompt_from_json(value: list[Any] | None) -> EvalPrompt | None:
    return None if value is None else EvalPrompt([int(i) for i in value[0]], value[1], value[2])


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _concat(arrays: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)


def _remove(directory: epath.Path) -> None:
    try:
        directory.rmtree()
    except OSError as error:  # another process may be removing it too
        logger.warning("data cache: could not remove %s: %s", directory, error)


# Data options that change a record's encoding (data.tokenizer and data.chat_template enter the
# key through their contents; every other data option only selects, mixes or packs records).
ENCODING_OPTIONS = (
    "format",
    "field_map",
    "ignore_fields",
    "train_on",
    "seq_len",
    "overlong",
    "on_bad_row",
    "on_control_tokens",
)


def encode_cached(
    config: Any,
    tokenizer: Any,
    tokenizer_dir: str,
    plan: ShardPlan,
    cache_dir: str,
    prepare: Callable[[Sequence[Example]], tuple[EncodeSettings, int]],
) -> EncodedSplits:
    """The own shards' and held-out examples, from the cache; records no part holds are read,
    parsed and encoded (`prepare(examples)` gives the settings and worker count) and added to the
    cache as one new part per mixture group. The selection of records is `read_splits`'s."""
    dc = config.data
    common = {
        "tokenizer": tokenizer_identity(tokenizer_dir),
        "template": _template_identity(dc.chat_template, tokenizer),
        "options": {name: getattr(dc, name) for name in ENCODING_OPTIONS},
    }
    entries = parse_mixture(dc.train_files)
    stores, positions, held = [], [], []
    for pattern, _ in entries:
        root = epath.Path(cache_dir) / encoding_key(
            {**common, "files": files_identity(expand_files(pattern))}
        )
        store = RecordStore(root, _record_count(root, pattern))
        train, held_out = split_positions(
            store.num_records, dc.eval_fraction, config.seed, hold_out=not dc.eval_files
        )
        stores.append(store)
        positions.append(train)
        held.append(held_out)
    shares = held_out_shares(
        [len(h) for h in held], [len(t) for t in positions], dc.max_eval_examples, plan
    )
    train_sel = [[[] for _ in entries] for _ in plan.local]  # [slot][group] -> positions
    eval_sel = []
    for g, share in enumerate(shares):
        for slot, shard in enumerate(plan.local):
            mine = list(shard_positions(positions[g], shard, plan.num_shards))
            train_sel[slot][g] = mine + [held[g][i] for i in share.extra[slot]]
        eval_sel.append(held[g][: share.keep])
    spec = FormatSpec.parse(dc.format, dc.field_map, dc.ignore_fields)
    for g, (pattern, _) in enumerate(entries):
        wanted = [p for slot in train_sel for p in slot[g]]
        missing = stores[g].missing(wanted, eval_sel[g])
        if missing:
            _encode_missing(
                stores[g],
                pattern,
                missing,
                set(eval_sel[g]),
                spec,
                tokenizer,
                prepare,
                dc.on_bad_row,
            )
    return _assemble(config, tokenizer, stores, train_sel, eval_sel, spec, prepare, entries)


def _assemble(
    config, tokenizer, stores, train_sel, eval_sel, spec, prepare, entries
) -> EncodedSplits:
    """EncodedSplits from the stores' records at the selected positions."""
    dc = config.data
    kinds: set[int] = set()
    train, counts, skipped = [], [], []
    for slot in train_sel:
        groups, slot_counts, slot_skipped = [], TokenCounts(), 0
        for store, chosen in zip(stores, slot, strict=True):
            selection = store.select(chosen)
            groups.append(selection.pieces)
            slot_counts, slot_skipped = (
                slot_counts + selection.counts,
                slot_skipped + selection.skipped,
            )
            kinds |= selection.kinds
        train.append(groups)
        counts.append(slot_counts)
        skipped.append(slot_skipped)
    if dc.eval_files:
        evals, skipped_files = read_examples(dc.eval_files, spec, on_bad_row=dc.on_bad_row)
        evals = evals[: dc.max_eval_examples]
        settings, _ = prepare(evals)
        eval_examples, prompts, skipped_eval = encode_held_out(evals, tokenizer, settings)
        skipped_eval += skipped_files
        kinds |= {_kind(e) for e in evals}
    else:
        eval_examples, prompts, skipped_eval = [], [], 0
        for store, chosen in zip(stores, eval_sel, strict=True):
            selection = store.select(chosen, held_out=True)
            eval_examples += selection.pieces
            prompts += selection.prompts
            skipped_eval += selection.skipped
            kinds |= selection.kinds
    kinds.discard(UNPARSEABLE)
    template = load_chat_template(dc.chat_template, tokenizer) if CONVERSATION in kinds else None
    weights = [w for _, w in entries] if entries[0][1] is not None else None
    return EncodedSplits(
        train,
        counts,
        skipped,
        0,
        weights,
        eval_examples,
        prompts,
        skipped_eval,
        template,
        bool(kinds - {TEXT}),
    )


def _encode_missing(
    store, pattern, missing, held_out, spec, tokenizer, prepare, on_bad_row
) -> None:
    """Reads the group's records, parses and encodes those at `missing`, and adds them as a part
    (with generation prompts for those in `held_out`)."""
    records = lazy_records(pattern)
    skips = SkipCounter(on_bad_row)
    parsed: dict[int, Example] = {}
    for position in missing:
        source, item = records[position]
        try:
            record = decode_record(source, item)
            if isinstance(record, DataError):
                raise record
            parsed[position] = parse_record(record, source, spec)
        except DataError as error:
            skips.bad(error)
    skips.finish()
    examples = list(parsed.values())
    settings, workers = prepare(examples)
    encoded = dict(
        zip(parsed, encode_each(examples, tokenizer, settings, num_workers=workers), strict=True)
    )
    prompts: dict[int, EvalPrompt | None] = {}
    for position in missing:
        if position not in held_out:
            continue
        done = encoded.get(position)
        prompts[position] = None
        if done is not None and not done.skipped:
            prompts[position] = eval_prompt(
                parsed[position],
                tokenizer,
                settings.template,
                settings.on_bad_row,
                control=settings.control,
                on_control_tokens=settings.on_control_tokens,
            )
    unparseable = Encoded([], TokenCounts(), skipped=True)
    store.write(
        missing,
        [_kind(parsed[p]) if p in parsed else UNPARSEABLE for p in missing],
        [encoded.get(p, unparseable) for p in missing],
        prompts,
    )
    logger.info("data cache: encoded %d records of %s into %s", len(missing), pattern, store.root)


def _kind(example: Example) -> int:
    return ROW if isinstance(example, Row) else TEXT if isinstance(example, Text) else CONVERSATION


def _record_count(root: epath.Path, pattern: str) -> int:
    """The group's number of records, from the key directory (it depends only on the files, which
    are in the key), or counted by reading the files once and then recorded there."""
    path = root / "RECORDS.json"
    if path.exists():
        try:
            return int(json.loads(path.read_text())["records"])
        except (ValueError, KeyError, TypeError) as error:
            logger.warning("data cache: unreadable %s (%s); counting again", path, error)
    count = len(lazy_records(pattern))
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{uuid.uuid4().hex}.json"
    tmp.write_text(json.dumps({"records": count, "files": pattern}))
    try:
        tmp.rename(path)
    except FileExistsError:  # another process recorded it first (the same count)
        tmp.unlink()
    return count


def _template_identity(spec: str, tokenizer: Any) -> str:
    """The resolved template's source (a file or built-in's text, or the tokenizer's template),
    or a marker when it does not load with this tokenizer (then no record can use it)."""
    try:
        return load_chat_template(spec, tokenizer).source
    except DataError as error:
        return f"unloadable {spec!r}: {error}"
