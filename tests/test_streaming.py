"""Streaming rows (data/stream.py): the packing invariants of the in-memory packer, every example
once per epoch, determinism, several processes' views equal to one holding every shard, and an
interrupted-and-resumed iterator yields bitwise the batches of an uninterrupted one."""

import json

import numpy as np
import pytest

from sft_jax.data import TokenizedExample
from sft_jax.data.loader import TrainIterator
from sft_jax.data.pack import row_floor_from_terms, row_floor_terms, whole_example_row_floor
from sft_jax.data.source import DataError
from sft_jax.data.stream import (
    ListExamples,
    MappedExamples,
    ShardStream,
    StreamIterator,
    StreamSettings,
    count_epoch,
)

SEQ = 32


def examples(n=60, seed=0, longest=SEQ + 1) -> list[TokenizedExample]:
    """Example k's tokens all lie in [1000 k, 1000 k + 999], so a row names its examples."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        length = int(rng.integers(2, longest + 1))
        mask = rng.random(length) < 0.6
        tokens = (1000 * k + np.arange(length)).astype(np.int32)
        out.append(TokenizedExample(tokens, mask, f"e:{k}"))
    return out


def settings(window=8, buffer=16, split=False) -> StreamSettings:
    return StreamSettings(seq_len=SEQ, window=window, buffer=buffer, split=split)


def epoch_rows(source, s, key=(0,)):
    stream = ShardStream(source, s, list(key))
    rows = []
    while True:
        stream.pack_window()
        rows.extend(stream.pending)
        stream.pending.clear()
        if stream.epoch > 0:
            return rows, stream


def check_rows(batch, exs):
    """Each segment is a contiguous piece of one example with its own positions, targets and
    loss mask; returns the slots placed per example."""
    placed = {}
    for r in range(len(batch["inputs"])):
        seg = batch["segment_ids"][r]
        assert np.all(np.diff(seg[seg > 0]) >= 0) and np.all(seg[np.count_nonzero(seg) :] == 0)
        for s in np.unique(seg[seg > 0]):
            where = np.flatnonzero(seg == s)
            assert np.all(np.diff(where) == 1)
            k = int(batch["inputs"][r, where[0]]) // 1000
            ex = exs[k]
            pos = batch["positions"][r, where]
            assert np.array_equal(pos, np.arange(pos[0], pos[0] + len(where)))
            np.testing.assert_array_equal(batch["inputs"][r, where], ex.tokens[pos])
            np.testing.assert_array_equal(batch["targets"][r, where], ex.tokens[pos + 1])
            np.testing.assert_array_equal(batch["loss_mask"][r, where], ex.loss_mask[pos + 1])
            placed.setdefault(k, []).extend(pos.tolist())
        assert not batch["loss_mask"][r, seg == 0].any()
    return placed


@pytest.mark.parametrize("split", [False, True])
def test_an_epoch_places_every_slot_of_every_example_once(split):
    exs = examples()
    source = ListExamples(exs)
    rows, stream = epoch_rows(source, settings(split=split))
    batch = ShardStream(source, settings(split=split), [0]).fill(rows)
    placed = check_rows(batch, exs)
    assert sorted(placed) == list(range(len(exs)))
    for k, slots in placed.items():
        assert sorted(slots) == list(range(len(exs[k].tokens) - 1))
    if not split:  # whole examples: every segment starts at position 0
        starts = batch["segment_ids"] > 0
        starts[:, 1:] &= batch["segment_ids"][:, 1:] != batch["segment_ids"][:, :-1]
        assert np.all(batch["positions"][starts] == 0)
    count = count_epoch(source, settings(split=split), [0])
    assert count.rows == len(rows)
    assert count.real_tokens == int(np.count_nonzero(batch["segment_ids"]))
    slots = [len(e.tokens) - 1 for e in exs]
    assert count.row_floor == whole_example_row_floor(slots, SEQ)
    assert stream.epoch == 1 and not stream.carry


def test_row_floor_terms_add_up_over_windows():
    sizes = np.random.default_rng(5).integers(1, SEQ + 1, 300)
    parts = [row_floor_terms(sizes[a : a + 64], SEQ) for a in range(0, 300, 64)]
    assert row_floor_from_terms(sum(parts), SEQ) == whole_example_row_floor(sizes, SEQ)


def test_carried_rows_fill_better_than_packing_each_window_alone():
    exs = examples(400, seed=1)
    source = ListExamples(exs)
    rows, _ = epoch_rows(source, settings(window=16, buffer=64))
    from sft_jax.data.pack import pack_examples

    alone = pack_examples(exs, seq_len=SEQ, window=16, seed=0)
    assert len(rows) <= len(alone["inputs"])


def test_memory_is_bounded_by_buffer_and_window():
    exs = examples(500, seed=2)
    stream = ShardStream(ListExamples(exs), settings(window=8, buffer=16), [3])
    for _ in range(300):
        stream.rows(3)
        state = stream.get_state()
        assert len(state["buffer"]) <= 16
        assert len(state["carry"]) <= 8 // 4
        assert len(state["pending"]) <= 8 + 3
    assert stream.epoch >= 1  # several epochs were streamed


def test_epochs_draw_new_orders():
    exs = examples(40)
    source = ListExamples(exs)
    stream = ShardStream(source, settings(), [0])
    first, _ = epoch_rows(source, settings())
    order0 = [p.example for row in first for p in row]
    while stream.epoch == 0:
        stream.pack_window()
    stream.pending.clear()
    rows = []
    while stream.epoch == 1:
        stream.pack_window()
        rows.extend(stream.pending)
        stream.pending.clear()
    order1 = [p.example for row in rows for p in row]
    assert sorted(order0) == sorted(order1) == list(range(40))
    assert order0 != order1


def iterator(exs_per_shard, first=0, num_shards=None, seed=0, prefetch=0, batch=4):
    sources = [ListExamples(e) for e in exs_per_shard]
    return StreamIterator(
        sources,
        settings(),
        global_batch_size=batch,
        seed=seed,
        rows_per_shard=10,
        loss_tokens=123,
        first_shard=first,
        num_shards=num_shards,
        prefetch=prefetch,
    )


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resumed_iterator_yields_bitwise_the_uninterrupted_batches(prefetch):
    shards = [examples(50, seed=s) for s in range(2)]
    full = take(iterator(shards), 40)  # several epochs of 50 examples
    interrupted = iterator(shards, prefetch=prefetch)
    head = take(interrupted, 13)
    state = json.loads(json.dumps(interrupted.get_state()))  # as the checkpoint stores it
    interrupted.close()
    resumed = iterator(shards, prefetch=prefetch)
    take(resumed, 3)  # a resumed iterator's own position is replaced
    resumed.set_state(state)
    assert_same(head + take(resumed, 27), full)


def test_processes_views_concatenate_to_the_one_process_batch():
    shards = [examples(30, seed=s) for s in range(4)]
    one = iterator(shards)
    procs = [iterator(shards[:2], 0, 4), iterator(shards[2:], 2, 4)]
    for _ in range(12):
        whole, parts = next(one), [next(p) for p in procs]
        for key in whole:
            np.testing.assert_array_equal(whole[key], np.concatenate([p[key] for p in parts]))
    # The merged state (what gather_states builds) resumes each process at its own shards.
    merged = {"shards": {}}
    for p in procs:
        state = p.get_state()
        merged = {**state, "shards": {**merged["shards"], **state["shards"]}}
    again = iterator(shards[2:], 2, 4)
    again.set_state(merged)
    assert_same(take(again, 5), take(procs[1], 5))


def test_same_seed_same_batches_other_seed_other_batches():
    shards = [examples(40)]
    assert_same(take(iterator(shards), 6), take(iterator(shards), 6))
    a, b = take(iterator(shards), 6), take(iterator(shards, seed=1), 6)
    assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, b, strict=True))


def test_a_state_from_other_settings_or_the_in_memory_iterator_is_refused():
    shards = [examples(40)]
    state = iterator(shards).get_state()
    with pytest.raises(DataError, match="global_batch_size was 4, now 8"):
        iterator(shards, batch=8).set_state(state)
    rows = {k: np.zeros((4, SEQ), np.int32) for k in ("inputs", "targets", "positions")}
    rows["segment_ids"] = np.ones((4, SEQ), np.int32)
    rows["loss_mask"] = np.ones((4, SEQ), bool)
    memory = TrainIterator(rows, global_batch_size=4, seed=0)
    with pytest.raises(DataError, match="streaming position"):
        iterator(shards).set_state(memory.get_state())
    with pytest.raises(DataError, match="TrainIterator state"):
        memory.set_state(state)


def test_mapped_examples_read_a_back_to_back_store_like_a_list():
    exs = examples(20)
    starts = np.concatenate([[0], np.cumsum([len(e.tokens) for e in exs])])
    tokens = np.concatenate([e.tokens for e in exs])
    mask = np.concatenate([e.loss_mask for e in exs])
    odd = MappedExamples(starts, tokens, mask, range(1, 20, 2))
    listed = ListExamples(exs[1::2])
    idx = np.arange(len(odd))
    np.testing.assert_array_equal(odd.sizes(idx), listed.sizes(idx))
    assert odd.loss_tokens() == listed.loss_tokens()
    np.testing.assert_array_equal(odd.example(3).tokens, exs[7].tokens)
    picked = MappedExamples(starts, tokens, mask, np.asarray([5, 2]))
    np.testing.assert_array_equal(picked.example(1).loss_mask, exs[2].loss_mask)


def test_released_mapped_pages_read_back_the_same(tmp_path):
    exs = examples(20)
    arrays = {
        "starts": np.concatenate([[0], np.cumsum([len(e.tokens) for e in exs])]),
        "tokens": np.concatenate([e.tokens for e in exs]),
        "mask": np.concatenate([e.loss_mask for e in exs]),
    }
    for name, array in arrays.items():
        np.save(tmp_path / f"{name}.npy", array)
    mapped = [np.load(tmp_path / f"{name}.npy", mmap_mode="r") for name in arrays]
    source = MappedExamples(*mapped, range(20))
    before = [source.example(i) for i in range(20)]
    assert source.loss_tokens() == ListExamples(exs).loss_tokens()  # releases as it goes
    source.release()
    for i, ex in enumerate(before):
        np.testing.assert_array_equal(source.example(i).tokens, ex.tokens)
        np.testing.assert_array_equal(source.example(i).loss_mask, exs[i].loss_mask)
