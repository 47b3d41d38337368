"""A streamed shard's first-epoch counts, kept beside the tokenisation cache so a restart does not
count again.

With `data.streaming` every start needs, per own shard, the rows, tokens, padding floors and loss
tokens of the shard's first epoch (the statistics and the epoch length the step count uses). They
come from a sizes-only pass through the epoch (stream.count_epoch) and a pass over every loss
mask, both linear in examples. What they depend on is fixed by the run's data and settings, so the
first start writes them to `<cache_dir>/stream_counts/<key>.json` and later starts read them back.

The key (`counts_key`) is a digest of everything the passes depend on: the encodings' cache keys
(each mixture group's key directory: files, tokenizer, template, encoding options), the shard's
selected record positions in every group (which fixes the held-out split, the shard's share and
the seed's part in both), the shard's seed key, the mixture weights, seq_len and the stream's
window, buffer and pack_split, and `COUNTS_VERSION` (raised whenever the counting changes what it
produces). Another value of any of them is another file.

A file is trusted only when it parses, names the same key and carries every count as a
non-negative integer whose digest matches the one written with it; anything else is logged and
counted again (and written again). Writes are atomic: locally a temporary file renamed into place,
in an object store one object written whole. A file that cannot be written is logged and the run
goes on: like the cache, the counts only save time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from sft_jax import paths
from sft_jax.data.stream import ExampleSource, StreamSettings, count_epoch

logger = logging.getLogger(__name__)

COUNTS_VERSION = 1
DIRECTORY = "stream_counts"
# What `shard_counts` returns: the statistics' per-shard counts that the passes produce.
COUNTED = (
    "rows",
    "slots",
    "real_tokens",
    "loss_tokens",
    "continued_segments",
    "examples",
    "row_floor",
    "row_floor_split",
)


def counts_key(
    groups: Sequence[str],
    chosen: Sequence[np.ndarray],
    settings: StreamSettings,
    key: Sequence[int],
    weights: Sequence[float] | None,
) -> dict[str, Any]:
    """What a shard's counts depend on (see the module docstring), as a JSON-able dict:
    `groups` are the mixture groups' cache key directory names, `chosen[g]` the shard's record
    positions in group g, `key` the shard's seed key."""
    records = [
        hashlib.blake2b(np.ascontiguousarray(c, np.int64).tobytes(), digest_size=16).hexdigest()
        for c in chosen
    ]
    return {
        "version": COUNTS_VERSION,
        "groups": list(groups),
        "records": records,
        "shard_key": [int(k) for k in key],
        "weights": None if weights is None else [float(w) for w in weights],
        "stream": [settings.seq_len, settings.window, settings.buffer, bool(settings.split)],
    }


def count_shard(source: ExampleSource, settings: StreamSettings, key: list[int]) -> dict[str, int]:
    """A shard's counts for the statistics, from its first epoch (sizes only) and its masks."""
    epoch = count_epoch(source, settings, key)
    return {
        "rows": epoch.rows,
        "slots": epoch.rows * settings.seq_len,
        "real_tokens": epoch.real_tokens,
        "loss_tokens": source.loss_tokens(),
        "continued_segments": epoch.continued_segments,
        "examples": len(source),
        "row_floor": epoch.row_floor,
        "row_floor_split": -(-epoch.real_tokens // settings.seq_len),
    }


def shard_counts(
    source: ExampleSource,
    settings: StreamSettings,
    key: list[int],
    cache_dir: str,
    identity: dict[str, Any],
) -> dict[str, int]:
    """The shard's counts: read from `cache_dir` when a trusted file for `identity`
    (`counts_key`) is there, else counted (`count_shard`) and written for the next start."""
    path = counts_path(cache_dir, identity)
    saved = load_counts(path, identity)
    if saved is not None and saved["examples"] == len(source):
        return saved
    if saved is not None:
        logger.warning("data cache: %s counts another number of examples; counting again", path)
    counts = count_shard(source, settings, key)
    save_counts(path, identity, counts)
    return counts


def counts_path(cache_dir: str, identity: dict[str, Any]) -> str:
    text = json.dumps(identity, sort_keys=True)
    name = hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()
    return paths.join(cache_dir, DIRECTORY, f"{name}.json")


def _check(counts: dict[str, int]) -> str:
    text = json.dumps({k: counts[k] for k in COUNTED}, sort_keys=True)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def load_counts(path: str, identity: dict[str, Any]) -> dict[str, int] | None:
    """The counts saved at `path` for `identity`; None when there is no file, and (logged) when
    it cannot be read or is not exactly what `save_counts` writes."""
    try:
        text = paths.read_text(path)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        logger.warning("data cache: cannot read %s (%s); counting again", path, error)
        return None
    try:
        saved = json.loads(text)
        counts = saved["counts"]
        if saved["key"] != identity:
            raise ValueError("it was written for other data or settings")
        if sorted(counts) != sorted(COUNTED) or not all(
            type(v) is int and v >= 0 for v in counts.values()
        ):
            raise ValueError(f"its counts are not {len(COUNTED)} non-negative integers")
        if saved["check"] != _check(counts):
            raise ValueError("its counts do not match their digest")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        logger.warning("data cache: ignoring %s (%s); counting again", path, error)
        return None
    return counts


def save_counts(path: str, identity: dict[str, Any], counts: dict[str, int]) -> None:
    """Writes the counts atomically (locally: a temporary file renamed into place; in a store:
    one object, whole or not at all); a failure is logged, not raised."""
    text = json.dumps({"key": identity, "counts": counts, "check": _check(counts)}, sort_keys=True)
    directory = path.rsplit("/", 1)[0] if paths.is_url(path) else os.path.dirname(path)
    try:
        paths.makedirs(directory)
        if paths.is_url(path):
            paths.write_text(path, text)
            return
        tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}.json")
        paths.write_text(tmp, text)
        try:
            os.replace(tmp, path)
        except OSError:
            os.remove(tmp)
            raise
    except OSError as error:  # the counts only save time: the run goes on without them
        logger.warning(
            "data cache: cannot write %s (%s); counted again at the next start", path, error
        )
