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
    files (contents), the chat template's source (a file's or built-in's; the tokenizer's own
    is in its files), data.format / field_map /
    ignore_fields / train_on / seq_len / overlong / on_bad_row / on_control_tokens, and
    CACHE_VERSION (raised whenever the encoding code changes what it produces).

A seed, shard count, pack setting, batch size or learning-rate change reuses the cache; a change
of any of the above encodes again (into another key directory).

Layout: `<cache_dir>/<key>/part-<id>/`, each part a set of numpy arrays (its records in position
order; each piece's source as an id into a table of names and a line number) plus `meta.json` (that
table, the sparse named lists and prompts), written into a temporary directory that is renamed into
place, with a completion marker (`COMPLETE.json`: counts and the blake2b digest of every file)
written last. A part is trusted only when its marker is there and every file matches its digest;
anything else (a truncated file, flipped bytes, no marker) is logged, removed and encoded again.
Parts are sparse: a process encodes the records it needs (its own data shards and the held-out
records) and writes them as parts (of at most `_ENCODE_RECORDS` records), so the processes of a
multi-host run write their parts in parallel, with no coordination, and a later run with other
shards or another seed finds each record in whichever part holds it, encoding only what no part has.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from etils import epath

from sft_jax.assets import asset_path
from sft_jax.data.cache_store import (
    CACHE_VERSION,
    CONVERSATION,
    ROW,
    TEXT,
    UNPARSEABLE,
    RecordStore,
    concat,
    digest_file,
    npy_array,
    npy_bytes,
    prompt_from_json,
    prompt_json,
    read_verified,
    remove,
    write_verified,
)
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
from sft_jax.data.raw_records import count_records, lazy_records
from sft_jax.data.render import TokenCounts
from sft_jax.data.shards import (
    ShardPlan,
    held_out_shares,
    shard_positions,
    split_position_arrays,
)
from sft_jax.data.source import (
    DataError,
    SkipCounter,
    decode_record,
    expand_files,
)
from sft_jax.data.templates import BUILTIN_TEMPLATES, NAMED_TEMPLATES, load_chat_template
from sft_jax.data.tokenize import TokenizedExample
from sft_jax.paths import is_url

logger = logging.getLogger(__name__)

_ENCODE_RECORDS = 1 << 17  # records encoded and written as one part at a time

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


def files_identity(paths: Sequence[str]) -> list[list[Any]]:
    """[path, size, content digest] of each data file; a dataset directory lists its files."""
    out: list[list[Any]] = []
    for path in paths:
        p = epath.Path(path)
        files = _files_under(p) if p.is_dir() else [p]
        out.extend([str(f), f.stat().length, digest_file(f)] for f in files)
    return out


def _files_under(directory: epath.Path) -> list[epath.Path]:
    """Every file below a (saved dataset) directory, sorted. Walked with iterdir: epath's rglob
    raises NotImplementedError for its `**` pattern, on local paths too."""
    files, todo = [], [directory]
    while todo:
        for entry in todo.pop().iterdir():
            (todo if entry.is_dir() else files).append(entry)
    return sorted(files)


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


def group_roots(config: Any, tokenizer_dir: str, cache_dir: str) -> list[epath.Path]:
    """Each mixture group's key directory (hashes the data files and the tokenizer's files; no
    tokenizer is built, so a restart that finds its prepared rows never loads one)."""
    dc = config.data
    common = {
        "tokenizer": tokenizer_identity(tokenizer_dir),
        "template": _template_identity(dc.chat_template),
        "options": {name: getattr(dc, name) for name in ENCODING_OPTIONS},
    }
    return [
        epath.Path(cache_dir) / encoding_key({**common, "files": files_identity(expand_files(p))})
        for p, _ in parse_mixture(dc.train_files)
    ]


def encode_cached(
    config: Any,
    tokenizer: Any,
    roots: list[epath.Path],
    plan: ShardPlan,
    prepare: Callable[[Sequence[Example]], tuple[EncodeSettings, int]],
) -> EncodedSplits:
    """The own shards' and held-out examples, from the cache (`roots`: `group_roots`); records no
    part holds are read, parsed and encoded (`prepare(examples)` gives the settings and worker
    count) and added to the cache as new parts of each mixture group. The selection of records
    is `read_splits`'s."""
    s = encode_selected(config, tokenizer, roots, plan, prepare)
    return assemble(config, tokenizer, s.stores, s.train, s.eval, s.spec, prepare, s.entries)


@dataclasses.dataclass
class Selected:
    """The cache's stores and the positions a process trains (per own shard and mixture group)
    and evaluates on (per group), all encoded; `assemble` (or streaming) reads them."""

    stores: list[RecordStore]
    train: list[list[np.ndarray]]  # [slot][group] -> record positions (int64)
    eval: list[np.ndarray]  # [group] -> record positions (int64)
    spec: FormatSpec
    entries: list[tuple[str, float | None]]


def encode_selected(
    config: Any,
    tokenizer: Any,
    roots: list[epath.Path],
    plan: ShardPlan,
    prepare: Callable[[Sequence[Example]], tuple[EncodeSettings, int]],
) -> Selected:
    """`encode_cached` up to reading the encoded records: selects them and encodes any that no
    part holds."""
    dc = config.data
    entries = parse_mixture(dc.train_files)
    stores, positions, held = [], [], []
    for (pattern, _), root in zip(entries, roots, strict=True):
        store = RecordStore(root, _record_count(root, pattern), lazy=dc.streaming)
        train, held_out = split_position_arrays(
            store.num_records, dc.eval_fraction, config.seed, hold_out=not dc.eval_files
        )
        stores.append(store)
        positions.append(train)
        held.append(held_out)
    shares = held_out_shares(
        [len(h) for h in held], [len(t) for t in positions], dc.max_eval_examples, plan
    )
    train_sel: list[list[Any]] = [[None for _ in entries] for _ in plan.local]
    eval_sel = []
    for g, share in enumerate(shares):
        for slot, shard in enumerate(plan.local):
            mine = shard_positions(positions[g], shard, plan.num_shards)
            extra = held[g][np.asarray(share.extra[slot], np.int64)]
            train_sel[slot][g] = np.concatenate([mine, extra])
        eval_sel.append(held[g][: share.keep])
    spec = FormatSpec.parse(dc.format, dc.field_map, dc.ignore_fields)
    for g, (pattern, _) in enumerate(entries):
        need = [stores[g].missing(slot[g], []) for slot in train_sel]
        need.append(stores[g].missing([], eval_sel[g]))
        missing = np.unique(np.concatenate(need))
        if missing.size:
            _encode_missing(
                stores[g],
                pattern,
                missing,
                set(eval_sel[g].tolist()),
                spec,
                tokenizer,
                prepare,
                dc.on_bad_row,
            )
    return Selected(stores, train_sel, eval_sel, spec, entries)


def assemble(
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
    """Lists the group's records, parses and encodes those at `missing`, and adds them as parts
    of `_ENCODE_RECORDS` records each (with generation prompts for those in `held_out`), so the
    encoded records held at once are bounded, not the whole of a large dataset."""
    records = lazy_records(pattern)
    skips = SkipCounter(on_bad_row)
    for lo in range(0, len(missing), _ENCODE_RECORDS):
        chunk = missing[lo : lo + _ENCODE_RECORDS].tolist()
        _encode_part(store, records, chunk, held_out, spec, tokenizer, prepare, skips)
    skips.finish()
    logger.info("data cache: encoded %d records of %s into %s", len(missing), pattern, store.root)


def _encode_part(store, records, missing, held_out, spec, tokenizer, prepare, skips) -> None:
    """Parses and encodes the records at `missing` and writes them as one part."""
    parsed: dict[int, Example] = {}
    for position, (source, item) in zip(missing, records.take(missing), strict=True):
        try:
            record = decode_record(source, item)
            if isinstance(record, DataError):
                raise record
            parsed[position] = parse_record(record, source, spec)
        except DataError as error:
            skips.bad(error)
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


def _kind(example: Example) -> int:
    return ROW if isinstance(example, Row) else TEXT if isinstance(example, Text) else CONVERSATION


def _record_count(root: epath.Path, pattern: str) -> int:
    """The group's number of records, from the key directory (it depends only on the files, which
    are in the key), or counted by reading the files once (nothing kept per record) and then
    recorded there."""
    path = root / "RECORDS.json"
    if path.exists():
        try:
            return int(json.loads(path.read_text())["records"])
        except (ValueError, KeyError, TypeError) as error:
            logger.warning("data cache: unreadable %s (%s); counting again", path, error)
    count = count_records(pattern)
    text = json.dumps({"records": count, "files": pattern})
    try:
        root.mkdir(parents=True, exist_ok=True)
        if is_url(path):  # one object: written whole or not at all
            path.write_text(text)
            return count
        tmp = root / f".tmp-{uuid.uuid4().hex}.json"
        tmp.write_text(text)
        try:
            tmp.rename(path)
        except FileExistsError:  # another process recorded it first (the same count)
            tmp.unlink()
    except OSError as error:  # the cache only saves time: the run goes on without it
        logger.warning("data cache: cannot write to %s (%s); not cached", root, error)
    return count


def _template_identity(spec: str) -> str:
    """The template's source (a file or built-in's text); "tokenizer" for the tokenizer's own,
    which its hashed files hold. Whether the template loads with the tokenizer (its end of turn
    one token) follows from the two, so that needs no tokenizer here."""
    if spec == "tokenizer":
        return spec
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    path = asset_path(NAMED_TEMPLATES[spec]) if spec in NAMED_TEMPLATES else spec
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as error:
        return f"unloadable {spec!r}: {error}"


def prepared_key(config: Any, roots: list[epath.Path], plan: ShardPlan) -> str:
    """The key of a process's prepared data (packed rows, eval data, counts): the encodings'
    keys and every option that selects, mixes or packs records for this process's shards."""
    dc = config.data
    eval_files = files_identity(expand_files(dc.eval_files)) if dc.eval_files else []
    return encoding_key(
        {
            "groups": [r.name for r in roots],
            "train_files": dc.train_files,  # the mixture weights
            "seed": config.seed,
            "plan": [plan.num_shards, plan.first, plan.count],
            "eval": [dc.eval_fraction, dc.max_eval_examples, eval_files],
            "pack": [dc.pack_window, dc.pack_split],
        }
    )


@dataclasses.dataclass
class Prepared:
    """What `save_prepared` keeps of a process's prepared data."""

    shards: list[dict[str, np.ndarray]]
    eval_examples: list[TokenizedExample]
    eval_prompts: list[EvalPrompt]
    meta: dict[str, Any]  # JSON: counts and flags, the caller's


def save_prepared(cache_dir: str, key: str, prepared: Prepared) -> None:
    """Keeps the packed rows and eval data under `<cache_dir>/prepared/<key>` (verified)."""
    files = {
        f"shard{i}.{name}.npy": npy_bytes(array)
        for i, shard in enumerate(prepared.shards)
        for name, array in shard.items()
    }
    examples = prepared.eval_examples
    lengths = np.asarray([len(e.tokens) for e in examples], np.int64)
    files["eval_starts.npy"] = npy_bytes(np.concatenate([[0], np.cumsum(lengths)]))
    files["eval_tokens.npy"] = npy_bytes(concat([e.tokens for e in examples], np.int32))
    files["eval_mask.npy"] = npy_bytes(concat([e.loss_mask for e in examples], bool))
    meta = {
        **prepared.meta,
        "sources": [e.source for e in examples],
        "prompts": [prompt_json(p) for p in prepared.eval_prompts],
        "shard_keys": sorted({name for shard in prepared.shards for name in shard}),
    }
    files["meta.json"] = json.dumps(meta).encode("utf-8")
    counts = {"shards": len(prepared.shards), "eval_examples": len(examples)}
    try:
        write_verified(epath.Path(cache_dir) / "prepared", key, files, counts)
    except OSError as error:  # the cache only saves time: the run goes on without it
        logger.warning("data cache: cannot write to %s (%s); not cached", cache_dir, error)


def load_prepared(cache_dir: str, key: str) -> Prepared | None:
    """The prepared data saved under `key`, or None (absent; damaged ones are removed)."""
    directory = epath.Path(cache_dir) / "prepared" / key
    if not directory.exists():
        return None
    try:
        marker, data = read_verified(directory)
        meta = json.loads(data["meta.json"])
        shards = [
            {name: npy_array(data[f"shard{i}.{name}.npy"]) for name in meta["shard_keys"]}
            for i in range(marker["shards"])
        ]
        starts = npy_array(data["eval_starts.npy"]).tolist()
        tokens, mask = npy_array(data["eval_tokens.npy"]), npy_array(data["eval_mask.npy"])
        examples = [
            TokenizedExample(tokens[a:b], mask[a:b], source)
            for a, b, source in zip(starts[:-1], starts[1:], meta["sources"], strict=True)
        ]
        prompts = [prompt_from_json(p) for p in meta["prompts"]]
    except (OSError, ValueError, KeyError) as error:
        logger.warning("data cache: ignoring and removing %s: %s", directory, error)
        remove(directory)
        return None
    return Prepared(shards, examples, prompts, meta)
