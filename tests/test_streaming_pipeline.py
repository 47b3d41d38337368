"""data.streaming through prepare_data: the same examples and counted tokens as the in-memory
path, rows read from the tokenisation cache, exact resume, processes' views equal to one process
holding every shard, and that streaming refuses to run without the cache (weighted mixtures:
test_streaming_mixture.py)."""

import dataclasses
import json

import numpy as np
import pytest
from conftest import REPO
from test_data_shards import demo_config, prepare_as_processes

from sft_jax.config import ConfigError, parse
from sft_jax.config_file import load_config_file
from sft_jax.data import prepare_data
from sft_jax.data.source import DataError
from sft_jax.data.stream import StreamIterator


def streamed(tmp_path, **data):
    values = {"streaming": True, "cache_dir": str(tmp_path / "cache"), "pack_window": 64}
    return demo_config(tmp_path, **{**values, **data})


def take(it, n):
    return [next(it) for _ in range(n)]


def test_streaming_counts_the_same_examples_and_tokens_as_packing_in_memory(tmp_path):
    config = streamed(tmp_path)
    stream = prepare_data(config)
    memory = prepare_data(
        dataclasses.replace(config, data=dataclasses.replace(config.data, streaming=False))
    )
    assert isinstance(stream.train_iter, StreamIterator)
    for key in ("examples", "real_tokens", "loss_tokens", "skipped", "truncated", "row_floor"):
        assert stream.stats[key] == memory.stats[key], key
    assert stream.stats["continued_segments"] == 0
    assert 0 < stream.stats["padding_fraction"] < 1
    # One epoch of streamed rows holds exactly the counted rows, tokens and loss tokens.
    it = stream.train_iter
    rows = stream.stats["rows"]
    batch = config.train.global_batch_size
    epoch = take(it, -(-rows // batch))
    seg = np.concatenate([b["segment_ids"] for b in epoch])[:rows]
    mask = np.concatenate([b["loss_mask"] for b in epoch])[:rows]
    assert int(np.count_nonzero(seg)) == stream.stats["real_tokens"]
    assert int(np.count_nonzero(mask)) == stream.stats["loss_tokens"]
    assert len(stream.eval_batches) == len(memory.eval_batches)
    for x, y in zip(stream.eval_batches, memory.eval_batches, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def assert_resumes_bitwise(config, batches: int, stop_at: int) -> None:
    """A run stopped after `stop_at` batches, its iterator state saved (through JSON, as in a
    checkpoint) and restored in a fresh data stage, hands out the uninterrupted run's batches."""
    full = take(prepare_data(config).train_iter, batches)
    first = prepare_data(config).train_iter
    head = take(first, stop_at)
    state = json.loads(json.dumps(first.get_state()))
    first.close()
    resumed = prepare_data(config).train_iter
    resumed.set_state(state)
    for x, y in zip(head + take(resumed, batches - stop_at), full, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_a_resumed_streaming_bundle_continues_bitwise(tmp_path):
    assert_resumes_bitwise(streamed(tmp_path, prefetch=2), batches=30, stop_at=11)


def test_processes_stream_their_own_shards(tmp_path):
    config = streamed(tmp_path, shards=2)
    one = prepare_data(config).train_iter
    procs = [b.train_iter for b in prepare_as_processes(config, 2)]
    for _ in range(6):
        whole, parts = next(one), [next(p) for p in procs]
        for key in whole:
            np.testing.assert_array_equal(whole[key], np.concatenate([p[key] for p in parts]))


def test_streaming_refuses_no_cache(tmp_path):
    config = streamed(tmp_path)
    off = dataclasses.replace(config, data=dataclasses.replace(config.data, cache_dir="off"))
    raw = load_config_file(str(REPO / "configs" / "tiny.py"))
    raw.data.streaming, raw.data.cache_dir = True, "off"
    with pytest.raises(ConfigError, match=r"data\.streaming"):
        parse(raw)
    with pytest.raises(DataError, match="tokenisation cache"):
        prepare_data(off)
