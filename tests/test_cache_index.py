"""The tokenisation cache's per-record index: source names survive their split into a table and
line numbers, and the index a streamed shard holds (the opened store, each example's part and
piece) costs no Python memory per record, neither held nor while it is built."""

import json
import tracemalloc

import numpy as np
import pytest

from sft_jax.data import stream_prepare
from sft_jax.data.cache_store import (
    RecordStore,
    npy_bytes,
    split_sources,
    write_verified,
)
from sft_jax.data.shards import split_position_arrays


def test_source_names_round_trip_through_the_table():
    sources = ["a.jsonl:1", "a.jsonl:2", "gs://b/c:d.jsonl:30", "x:007", "plain", "y:", ":5", "z:0"]
    names, ids, lines = split_sources(sources)
    assert names == ["a.jsonl", "gs://b/c:d.jsonl", "x:007", "plain", "y:", "", "z"]
    rebuilt = [names[i] if n < 0 else f"{names[i]}:{n}" for i, n in zip(ids, lines, strict=True)]
    assert rebuilt == sources


def write_part(root, n: int, *, two_pieces_every: int = 3) -> None:
    """A verified part of `n` records of two tokens per piece; every `two_pieces_every`-th record
    has two pieces (a split one), the rest one."""
    per_record = np.where(np.arange(n) % two_pieces_every == 0, 2, 1)
    pieces = int(per_record.sum())
    arrays = {
        "records": np.arange(n, dtype=np.int64),
        "kinds": np.zeros(n, np.int8),
        "skipped": np.zeros(n, bool),
        "counts": np.zeros((n, 4), np.int32),
        "record_pieces": np.concatenate([[0], np.cumsum(per_record)]).astype(np.int64),
        "piece_starts": np.arange(0, 2 * pieces + 1, 2, dtype=np.int64),
        "tokens": np.arange(2 * pieces, dtype=np.int32),
        "loss_mask": np.ones(2 * pieces, bool),
        "eval_done": np.zeros(n, bool),
        "source_files": np.zeros(pieces, np.int32),
        "source_lines": np.repeat(np.arange(1, n + 1), per_record).astype(np.int64),
    }
    files = {f"{name}.npy": npy_bytes(value) for name, value in arrays.items()}
    meta = {"source_names": ["train.jsonl"], "named": {}, "prompts": {}}
    files["meta.json"] = json.dumps(meta).encode()
    counts = {"records": n, "pieces": pieces, "tokens": 2 * pieces}
    write_verified(root, "part-0", files, counts)


def index_memory(tmp_path, n: int) -> tuple[int, int, stream_prepare.CachedExamples]:
    """(bytes held after, peak bytes while) opening the cache and building two shards' index
    over `n` records, as Python allocations (numpy's included) counted by tracemalloc."""
    root = tmp_path / str(n)
    write_part(root, n)
    positions, _ = split_position_arrays(n, 0.0, 0, hold_out=True)
    tracemalloc.start()
    try:
        store = RecordStore(root, n)
        shards = [
            stream_prepare.shard_index([store], [positions[s::2]], str(tmp_path)) for s in (0, 1)
        ]
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return held, peak, shards[1].source


def test_index_memory_does_not_grow_with_records(tmp_path, monkeypatch):
    monkeypatch.setattr(stream_prepare, "_INDEX_RECORDS", 1 << 12)
    small_held, small_peak, _ = index_memory(tmp_path, 20_000)
    held, peak, source = index_memory(tmp_path, 400_000)
    # Twenty times the records: a Python object, table entry or in-memory array per record would
    # add megabytes (the positions passed in are the caller's, allocated before counting).
    assert held < small_held + 64 * 1024
    assert peak < small_peak + 1024 * 1024
    # The index is right: shard 1 holds records 1, 3, 5, ...; record r has two pieces when
    # r % 3 == 0, each piece two tokens, named by its line r + 1.
    assert len(source) == sum(2 if r % 3 == 0 else 1 for r in range(1, 400_000, 2))
    first = [source.example(i) for i in range(4)]  # records 1, 3 (two pieces), 5
    assert [e.source for e in first] == [
        "train.jsonl:2",
        "train.jsonl:4",
        "train.jsonl:4",
        "train.jsonl:6",
    ]
    ends = np.cumsum(np.where(np.arange(400_000) % 3 == 0, 2, 1))
    piece_of_3 = int(ends[2])  # the first piece of record 3
    np.testing.assert_array_equal(first[1].tokens, [2 * piece_of_3, 2 * piece_of_3 + 1])
    np.testing.assert_array_equal(source.sizes(np.arange(4)), [2, 2, 2, 2])


@pytest.mark.parametrize("held_out", [False, True])
def test_locate_and_missing_search_the_sorted_records(tmp_path, held_out):
    write_part(tmp_path, 10)
    store = RecordStore(tmp_path, 12)
    part_of, local = store.locate([0, 9, 10, 3], held_out=held_out)
    if held_out:  # no record of the part has its prompt
        np.testing.assert_array_equal(part_of, [-1, -1, -1, -1])
    else:
        np.testing.assert_array_equal(part_of, [0, 0, -1, 0])
        np.testing.assert_array_equal(local[part_of >= 0], [0, 9, 3])
    assert store.missing([0, 10, 11], []).tolist() == [10, 11]


def test_index_files_fall_back_to_the_temporary_directory(tmp_path):
    """A cache directory that takes no new file (here: none) does not stop the index."""
    write_part(tmp_path / "cache", 10)
    store = RecordStore(tmp_path / "cache", 10)
    index = stream_prepare.shard_index([store], [np.arange(10)], str(tmp_path / "absent"))
    assert len(index.source) == 14 and index.per_group == [14]
    assert index.source.example(13).source == "train.jsonl:10"
