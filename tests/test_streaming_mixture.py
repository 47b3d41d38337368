"""data.streaming with weighted mixtures and the kept first-epoch counts: a streamed epoch holds
exactly the examples the in-memory path draws (a small group repeated, a large one subsampled),
a streamed mixture resumes exactly, and a restart reads the shard counts back instead of
counting again (but counts again when the file is damaged or the settings change)."""

import collections
import dataclasses
import json
import logging
import pathlib

import numpy as np
import pytest
from test_data_shards import demo_config
from test_paths import gcs  # noqa: F401 (the fixture)
from test_streaming_pipeline import assert_resumes_bitwise, streamed, take

from sft_jax.data import prepare_data, stream_counts
from sft_jax.data.mixture import mix, mixture_picks


def mixture_config(tmp_path, shards=0, **data):
    """Three groups of the demo data: 10 examples at weight 0.4 (repeated), 150 at 0.4
    (subsampled), 40 at 0.2."""
    lines = pathlib.Path(demo_config(tmp_path).data.train_files).read_text().splitlines()
    files = []
    for name, (lo, hi), weight in (
        ("small", (0, 10), 0.4),
        ("large", (10, 160), 0.4),
        ("medium", (160, 200), 0.2),
    ):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(lines[lo:hi]) + "\n")
        files.append(f"{path}:{weight}")
    return streamed(tmp_path, train_files=",".join(files), shards=shards, **data)


def in_memory(config):
    return dataclasses.replace(config, data=dataclasses.replace(config.data, streaming=False))


def epoch_examples(bundle) -> collections.Counter:
    """The examples (token tuples) of the first epoch's rows, counted (pack_split off: each
    segment is one whole example)."""
    rows, batch = bundle.stats["rows"], bundle.train_iter.global_batch_size
    batches = take(bundle.train_iter, -(-rows // batch))
    found: collections.Counter = collections.Counter()
    inputs = np.concatenate([b["inputs"] for b in batches])[:rows]
    targets = np.concatenate([b["targets"] for b in batches])[:rows]
    segments = np.concatenate([b["segment_ids"] for b in batches])[:rows]
    for r in range(rows):
        for s in np.unique(segments[r][segments[r] > 0]).tolist():
            where = segments[r] == s
            found[(*inputs[r][where].tolist(), int(targets[r][where][-1]))] += 1
    return found


def test_mixture_picks_are_the_draw_of_mix():
    groups = [list(range(3)), list(range(100, 150)), list(range(200, 220))]
    weights = [0.5, 0.3, 0.2]
    picks = mixture_picks([len(g) for g in groups], weights, [4, 1])
    assert [len(p) for p in picks] == [36, 22, 15]  # 73 examples by largest remainder
    drawn = [g[i] for g, p in zip(groups, picks, strict=True) for i in p.tolist()]
    assert drawn == mix(groups, weights, [4, 1])
    assert collections.Counter(picks[0].tolist()) == {0: 12, 1: 12, 2: 12}  # repeated whole
    assert len(set(picks[1].tolist())) == 22  # without replacement


def test_a_streamed_mixture_epoch_holds_the_in_memory_draw(tmp_path):
    config = mixture_config(tmp_path)
    stream, memory = prepare_data(config), prepare_data(in_memory(config))
    mixture = stream.stats["mixture"]
    assert mixture == memory.stats["mixture"]
    assert mixture[0] > 10 and mixture[1] < 150  # small group repeated, large subsampled
    for key in ("examples", "real_tokens", "loss_tokens", "row_floor", "row_floor_split"):
        assert stream.stats[key] == memory.stats[key], key
    assert stream.stats["examples"] == sum(mixture)
    streamed_epoch, memory_epoch = epoch_examples(stream), epoch_examples(memory)
    assert sum(streamed_epoch.values()) == sum(mixture)
    assert streamed_epoch == memory_epoch


def test_each_shard_mixes_as_in_memory(tmp_path):
    config = mixture_config(tmp_path, shards=2)
    stream, memory = prepare_data(config), prepare_data(in_memory(config))
    for key in ("mixture", "examples", "real_tokens", "loss_tokens"):
        assert stream.stats[key] == memory.stats[key], key


def test_a_resumed_streamed_mixture_continues_bitwise(tmp_path):
    config = mixture_config(tmp_path, prefetch=2, stream_buffer=16)
    assert_resumes_bitwise(config, batches=24, stop_at=9)


def counted(monkeypatch) -> list:
    """Records every shard the counting pass runs on."""
    calls, inner = [], stream_counts.count_shard

    def count_shard(source, settings, key):
        calls.append(list(key))
        return inner(source, settings, key)

    monkeypatch.setattr(stream_counts, "count_shard", count_shard)
    return calls


def counts_files(tmp_path) -> list[pathlib.Path]:
    return sorted((tmp_path / "cache" / stream_counts.DIRECTORY).glob("*.json"))


def test_a_restart_reads_the_counts_back(tmp_path, monkeypatch):
    config = mixture_config(tmp_path, shards=2)
    calls = counted(monkeypatch)
    first = prepare_data(config)
    assert len(calls) == 2 and len(counts_files(tmp_path)) == 2
    again = prepare_data(config)
    assert len(calls) == 2  # nothing counted
    assert again.stats == first.stats
    for x, y in zip(take(first.train_iter, 3), take(again.train_iter, 3), strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


@pytest.mark.parametrize("damage", ["garbage", "number", "empty"])
def test_a_damaged_counts_file_is_counted_again(tmp_path, monkeypatch, caplog, damage):
    config = streamed(tmp_path)
    first = prepare_data(config)
    (path,) = counts_files(tmp_path)
    saved = json.loads(path.read_text())
    good = json.loads(json.dumps(saved))
    if damage == "garbage":
        path.write_text('{"key": ')
    elif damage == "number":  # still valid JSON: only the digest tells
        saved["counts"]["rows"] += 1
        path.write_text(json.dumps(saved))
    else:
        path.write_text("")
    calls = counted(monkeypatch)
    with caplog.at_level(logging.WARNING):
        again = prepare_data(config)
    assert len(calls) == 1 and "counting again" in caplog.text
    assert again.stats == first.stats
    assert json.loads(path.read_text()) == good  # written again


def test_another_seq_len_or_window_is_counted_again(tmp_path, monkeypatch):
    config = streamed(tmp_path)
    calls = counted(monkeypatch)
    prepare_data(config)
    for change, counts in (({"seq_len": 96}, 2), ({"seq_len": 128}, 2), ({"pack_window": 32}, 3)):
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, **change))
        prepare_data(config)
        assert len(calls) == counts, change  # back at seq_len 128: its counts are read
    assert len(counts_files(tmp_path)) == 3


@pytest.mark.usefixtures("gcs")
def test_counts_file_in_a_bucket():
    """The counts go through the path layer: written as one object, read back, and an object
    that does not hold what was written is not trusted."""
    from etils import epath

    bucket = "gs://test"  # the emulator's
    identity = {"version": stream_counts.COUNTS_VERSION, "groups": ["g"], "stream": [8, 4, 4]}
    counts = dict.fromkeys(stream_counts.COUNTED, 3)
    path = stream_counts.counts_path(f"{bucket}/cache", identity)
    assert path.startswith(f"{bucket}/cache/{stream_counts.DIRECTORY}/")
    assert stream_counts.load_counts(path, identity) is None
    stream_counts.save_counts(path, identity, counts)
    assert stream_counts.load_counts(path, identity) == counts
    assert stream_counts.load_counts(path, {**identity, "groups": ["h"]}) is None
    epath.Path(path).write_text(epath.Path(path).read_text().replace(": 3", ": 4", 1))
    assert stream_counts.load_counts(path, identity) is None
