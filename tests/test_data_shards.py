"""Data shards, split packing and prefetch: each process's data is its own shards, S virtual shards
in one process equal S processes, split packing keeps every target exactly once, and a prefetching
iterator saves the position of the last batch consumed. Also the held-out set: capped in proportion
per mixture group, and bad held-out rows skipped like training rows."""

import dataclasses
import itertools
import json
import pathlib
import threading
import time

import numpy as np
import pytest
from conftest import REPO

from sft_jax.config import parse
from sft_jax.config_file import load_config_file
from sft_jax.data import (
    DataError,
    EncodeSettings,
    FormatSpec,
    ShardPlan,
    TokenizedExample,
    TrainIterator,
    encode_examples,
    eval_batches,
    load_chat_template,
    load_tokenizer,
    pack_examples,
    packing_stats,
    prepare_data,
    read_examples,
    read_splits,
    shard_plan,
    split_into_gaps,
)
from sft_jax.data.pack import MIN_SPLIT_PIECE, Piece
from sft_jax.data.prepared import ProcessCounts
from sft_jax.data.raw_records import lazy_records
from sft_jax.data.shards import agree


def demo_config(tmp_path, n_train=240, **data):
    """configs/tiny.py on the first `n_train` demo examples (small enough to tokenise quickly)."""
    config = parse(load_config_file(str(REPO / "configs" / "tiny.py")))
    lines = pathlib.Path(config.data.train_files).read_text(encoding="utf-8").splitlines()
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines[:n_train]) + "\n", encoding="utf-8")
    values = {"train_files": str(path), "prefetch": 0, **data}
    return dataclasses.replace(config, data=dataclasses.replace(config.data, **values))


def break_line(path: str, index: int) -> None:
    lines = pathlib.Path(path).read_text(encoding="utf-8").splitlines()
    lines[index] = "{not json"
    pathlib.Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


class InMemoryExchange:
    """A stand-in for the process_allgather of shards.agree between threads of one process."""

    def __init__(self, processes: int):
        self._barrier = threading.Barrier(processes, timeout=60)
        self._values: list = [None] * processes

    def for_process(self, index: int):
        def exchange(local, count):
            self._values[index] = np.asarray(local, np.int64)
            self._barrier.wait()
            return np.stack(self._values)

        return exchange


def prepare_as_processes(config, processes: int):
    """prepare_data of every process, run side by side in threads of this process."""
    exchange, bundles = InMemoryExchange(processes), [None] * processes

    def run(index):
        bundles[index] = prepare_data(
            config,
            process_index=index,
            process_count=processes,
            exchange=exchange.for_process(index),
        )

    threads = [threading.Thread(target=run, args=(i,)) for i in range(processes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(b is not None for b in bundles), "a process failed (see the traceback above)"
    return bundles


def test_shard_plan_and_errors():
    assert shard_plan(0, 1, 2) == ShardPlan(2, 1, 1)
    assert shard_plan(8, 1, 2) == ShardPlan(8, 4, 4)
    assert list(shard_plan(8, 1, 2).local) == [4, 5, 6, 7]
    with pytest.raises(DataError, match="multiple of the number of processes"):
        shard_plan(3, 0, 2)
    assert agree([5, 2**40 + 3], 1).tolist() == [[5, 2**40 + 3]]


def test_shards_are_disjoint_and_cover_every_train_example(tmp_path):
    config = demo_config(tmp_path, n_train=100, eval_fraction=0.1, eval_files="")
    everything = read_splits(config)
    sources = {e.source for e in everything.train_groups[0]}
    assert len(sources) == 90 and len(everything.eval) == 10
    per_shard = [read_splits(config, ShardPlan(3, s, 1)) for s in range(3)]
    shard_sources = [{e.source for e in split.train_groups[0]} for split in per_shard]
    assert [len(s) for s in shard_sources] == [30, 30, 30]  # round-robin: balanced
    assert set.union(*shard_sources) == sources  # coverage
    assert sum(len(s) for s in shard_sources) == len(sources)  # disjoint
    for split in per_shard:  # every process holds out the same eval examples
        assert [e.source for e in split.eval] == [e.source for e in everything.eval]


def test_sharded_reading_parses_only_own_lines(tmp_path):
    """A malformed line in another shard's part of the file is never parsed by this shard."""
    config = demo_config(tmp_path, n_train=10, eval_files="")
    path = config.data.train_files
    break_line(path, 3)
    assert len(lazy_records(path)) == 10
    own = read_splits(config, ShardPlan(2, 0, 1))  # positions 0, 2, 4, ...: line 4 is shard 1's
    assert len(own.train_groups[0]) == 5
    with pytest.raises(DataError, match=r"train.jsonl:4"):
        read_splits(config, ShardPlan(2, 1, 1))


@pytest.mark.parametrize("mixture", [False, True])
def test_virtual_shards_equal_processes(tmp_path, mixture):
    """One process with data.shards=2 yields exactly the concatenated batches of 2 processes;
    statistics and the saved position agree; eval batches are the same global batches."""
    config = demo_config(tmp_path, shards=2)
    if mixture:  # a weighted mixture: each shard mixes its own share of both groups
        other = tmp_path / "other.jsonl"
        lines = pathlib.Path(config.data.train_files).read_text(encoding="utf-8").splitlines()
        other.write_text("\n".join(lines[:50]) + "\n", encoding="utf-8")
        files = f"{config.data.train_files}:0.7,{other}:0.3"
        config = dataclasses.replace(
            config, data=dataclasses.replace(config.data, train_files=files)
        )
    (virtual,) = prepare_as_processes(config, 1)
    parts = prepare_as_processes(config, 2)
    assert virtual.stats == parts[0].stats == parts[1].stats
    assert 0 <= virtual.stats["padding_floor"] <= virtual.stats["padding_fraction"]
    assert virtual.stats["shards"] == 2 and virtual.train_iter.steps_per_epoch > 2
    assert len(virtual.stats["mixture"]) == (2 if mixture else 1)
    steps = virtual.train_iter.steps_per_epoch + 3  # into the second epoch
    for _ in range(steps):
        expected = next(virtual.train_iter)
        got = [next(p.train_iter) for p in parts]
        for key in expected:
            np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), expected[key])
    states = [b.train_iter.get_state() for b in (virtual, *parts)]
    assert states[0] == states[1] == states[2]
    assert len(virtual.eval_batches) == len(parts[0].eval_batches) > 0
    for i, batch in enumerate(virtual.eval_batches):
        for key in batch:
            joined = np.concatenate([p.eval_batches[i][key] for p in parts])
            np.testing.assert_array_equal(joined, batch[key])


@pytest.mark.parametrize("streaming", [False, True])
def test_an_empty_group_names_the_files_not_the_shards(tmp_path, streaming):
    """With one data shard, a mixture group (or the data) without examples is the files' fault:
    the error names the group's files and does not advise fewer shards, in memory and streamed.
    With several shards the advice stays."""
    config = demo_config(tmp_path, n_train=8, eval_files="", streaming=streaming)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    train = config.data.train_files
    cases = {
        f"{train}:0.5,{empty}:0.5": f"no trainable examples of mixture group(s) {[str(empty)]}",
        str(empty): f"no trainable examples in {empty}",
    }
    for files, expected in cases.items():
        data = dataclasses.replace(config.data, train_files=files, shards=1)
        with pytest.raises(DataError) as info:
            prepare_data(dataclasses.replace(config, data=data), cache_dir=str(tmp_path / "c"))
        assert expected in str(info.value) and "fewer data shards" not in str(info.value)
    one = tmp_path / "one.jsonl"
    one.write_text(pathlib.Path(train).read_text().splitlines()[0] + "\n")
    data = dataclasses.replace(config.data, train_files=f"{train}:0.5,{one}:0.5", shards=2)
    train_config = dataclasses.replace(config.train, global_batch_size=2)
    with pytest.raises(DataError, match=r"data shard 1 of 2 has no examples of mixture.*fewer"):
        prepare_data(
            dataclasses.replace(config, data=data, train=train_config),
            process_index=0,
            process_count=1,
            cache_dir=str(tmp_path / "c"),
        )


def test_failure_on_one_process_stops_all(tmp_path):
    config = demo_config(tmp_path, n_train=10, eval_files="", eval_fraction=0.0)
    break_line(config.data.train_files, 3)  # position 3: shard 1's
    exchange, errors = InMemoryExchange(2), [None, None]

    def run(index):
        try:
            prepare_data(config, process_index=index, process_count=2,
                         exchange=exchange.for_process(index))  # fmt: skip
        except DataError as error:
            errors[index] = str(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert "failed on process(es) [1]" in errors[0]
    assert "train.jsonl:4" in errors[1]


def test_process_counts_travel_as_one_vector_of_one_length():
    """A failed process sends a vector as long as a successful one's (else the exchange would
    not line up), and every field comes back by name after the exchange."""
    failed = ProcessCounts.failure(groups=2)
    summed = {k: i + 1 for i, k in enumerate(failed.summed)}
    counts = ProcessCounts(summed, 7, False, True, False, [3, 4])
    assert len(counts.to_vector()) == len(failed.to_vector())
    gathered = agree(counts.to_vector(), 1)
    assert ProcessCounts.from_vector(gathered[0]) == counts
    assert ProcessCounts.from_vector(failed.to_vector()).failed


def write_records(path: pathlib.Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_eval_cap_is_proportional_per_group_and_the_rest_trains(tmp_path):
    a, b = (
        write_records(tmp_path / f"{g}.jsonl", [{"prompt": g, "completion": g}] * n)
        for g, n in (("A", 300), ("B", 100))
    )
    files = f"{a}:0.5,{b}:0.5"
    config = demo_config(
        tmp_path, train_files=files, eval_files="", eval_fraction=0.2, max_eval_examples=40
    )
    splits = read_splits(config)
    held = [e.prompt[0] for e in splits.eval]
    assert (held.count("A"), held.count("B")) == (30, 10)  # 60 and 20 held out: capped 3 to 1
    train = {e.source for g in splits.train_groups for e in g}
    assert len(train) == 400 - 40 and not train & {e.source for e in splits.eval}
    shards = [read_splits(config, ShardPlan(2, s, 1)) for s in range(2)]
    for split in shards:  # the same held-out set on every process
        assert [e.source for e in split.eval] == [e.source for e in splits.eval]
    assert set.union(*({e.source for g in s.train_groups for e in g} for s in shards)) == train


GOOD = {
    "messages": [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "A cat."}]
}
UNTRAINED = {  # every assistant turn excluded: no token would be trained
    "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "x", "loss_weight": 0},
    ]
}
TOOL = {  # the alpaca template has no tool role: fails to render
    "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "call"},
        {"role": "tool", "content": "result"},
        {"role": "assistant", "content": "done"},
    ]
}


def test_untrainable_conversation_is_a_bad_row(tmp_path):
    path = write_records(tmp_path / "c.jsonl", [GOOD, UNTRAINED, GOOD])
    examples, _ = read_examples(path, FormatSpec(), on_bad_row="error")
    tokenizer = load_tokenizer(str(REPO / "sft_jax" / "assets" / "stories260K"))
    skip = EncodeSettings(
        load_chat_template("plain", tokenizer), "all_assistant", 64, "drop", "skip"
    )
    encoded, _, skipped = encode_examples(examples, tokenizer, skip, num_workers=1)
    assert skipped == 1 and [e.source for e in encoded] == [f"{path}:1", f"{path}:3"]
    alone, _, _ = encode_examples(examples[:1], tokenizer, skip, num_workers=1)
    np.testing.assert_array_equal(encoded[0].tokens, alone[0].tokens)
    np.testing.assert_array_equal(encoded[0].loss_mask, alone[0].loss_mask)
    error = dataclasses.replace(skip, on_bad_row="error")
    with pytest.raises(DataError, match=r"c\.jsonl:2: no token is trained"):
        encode_examples(examples, tokenizer, error, num_workers=1)


def test_bad_held_out_rows_are_skipped_counted_and_give_no_prompt(tmp_path):
    train = write_records(tmp_path / "chat_train.jsonl", [GOOD] * 20 + [TOOL])
    held = write_records(tmp_path / "chat_eval.jsonl", [GOOD, TOOL, UNTRAINED])
    config = demo_config(
        tmp_path, train_files=train, eval_files=held, chat_template="alpaca", on_bad_row="skip"
    )
    bundle = prepare_data(config)
    assert bundle.stats["skipped"] == 3  # 1 train + 2 eval rows
    assert bundle.stats["eval_examples"] == 1
    assert [p.source for p in bundle.eval_prompts] == [f"{held}:1"]


# --------------------------------------------------------------------------- split packing


def synthetic(count: int, seed: int = 0) -> list[TokenizedExample]:
    """Long-tailed lengths like the CPU benchmark (many examples over half a row)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(count):
        n = int(rng.integers(60, 500))
        tokens = np.concatenate([[100_000 + k], rng.integers(3, 1000, n - 1)]).astype(np.int32)
        mask = rng.random(n) < 0.6
        out.append(TokenizedExample(tokens, mask, f"s:{k}"))
    return out


def test_split_packing_places_every_target_once_with_continued_positions():
    examples = synthetic(300)
    whole = pack_examples(examples, seq_len=512, window=128, seed=1)
    split = pack_examples(examples, seq_len=512, window=128, seed=1, split=True)
    stats_whole, stats_split = packing_stats(whole), packing_stats(split)
    assert stats_split["padding_fraction"] < 0.02 < stats_whole["padding_fraction"]
    assert stats_split["continued_segments"] > 0 == stats_whole["continued_segments"]
    assert stats_split["loss_tokens"] == stats_whole["loss_tokens"]
    # Rebuild each example from its pieces: slot j holds input tokens[j], target tokens[j + 1]
    # and mask bit loss_mask[j + 1], at position j, each slot exactly once.
    seen = {k: np.zeros(len(e.tokens) - 1, int) for k, e in enumerate(examples)}
    owner = {}
    for r in range(len(split["inputs"])):
        seg = split["segment_ids"][r]
        for s in range(1, seg.max() + 1):
            idx = np.flatnonzero(seg == s)
            assert (np.diff(idx) == 1).all() and len(idx) > 0
            pos = split["positions"][r, idx]
            assert (np.diff(pos) == 1).all()
            if pos[0] == 0:
                owner[(r, s)] = int(split["inputs"][r, idx[0]]) - 100_000
            k = owner.get((r, s))
            if k is None:  # a continuation: find the example whose tokens match
                k = next(
                    k
                    for k, e in enumerate(examples)
                    if len(e.tokens) > pos[-1] + 1
                    and np.array_equal(e.tokens[pos], split["inputs"][r, idx])
                    and np.array_equal(e.tokens[pos + 1], split["targets"][r, idx])
                )
            ex = examples[k]
            np.testing.assert_array_equal(split["inputs"][r, idx], ex.tokens[pos])
            np.testing.assert_array_equal(split["targets"][r, idx], ex.tokens[pos + 1])
            np.testing.assert_array_equal(split["loss_mask"][r, idx], ex.loss_mask[pos + 1])
            seen[k][pos] += 1
    assert all((v == 1).all() for v in seen.values())


def test_split_into_gaps_hand_case():
    # Rows of 100: [60] [55] [50] -> the least-filled row (50) is cut into the two gaps (40, 45):
    # no whole fit, so its head fills the largest gap (45) and the tail (5) the tightest fitting.
    rows = [[Piece(0, 0, 60)], [Piece(1, 0, 55)], [Piece(2, 0, 50)]]
    out = split_into_gaps(rows, 100)
    assert out == [
        [Piece(0, 0, 60), Piece(2, 45, 5)],
        [Piece(1, 0, 55), Piece(2, 0, 45)],
    ]
    # Gaps below MIN_SPLIT_PIECE get no cut pieces: nothing changes.
    small = 100 - MIN_SPLIT_PIECE + 1
    rows = [[Piece(0, 0, small)], [Piece(1, 0, small)], [Piece(2, 0, 10)]]
    assert split_into_gaps(rows, 100) == rows


# --------------------------------------------------------------------------- prefetch


def fake_packed(rows: int, seq_len: int = 4) -> dict[str, np.ndarray]:
    inputs = np.tile(np.arange(rows, dtype=np.int32)[:, None], (1, seq_len))
    return {
        "inputs": inputs,
        "targets": inputs + 1,
        "loss_mask": np.ones((rows, seq_len), bool),
        "segment_ids": np.ones((rows, seq_len), np.int32),
        "positions": np.tile(np.arange(seq_len, dtype=np.int32), (rows, 1)),
    }


def rows_of(iterator, steps):
    return [next(iterator)["inputs"][:, 0].tolist() for _ in range(steps)]


def test_prefetch_gives_the_same_stream_and_saves_the_consumed_position():
    shards = [fake_packed(23), fake_packed(25)]
    plain = TrainIterator(shards, global_batch_size=4, seed=2)
    ahead = TrainIterator(shards, global_batch_size=4, seed=2, prefetch=3)
    assert rows_of(ahead, 5) == rows_of(plain, 5)
    # Wait until the thread has read ahead (3 queued + 1 waiting to be queued), then save: the
    # position must be 5, the last batch handed out, not 9.
    deadline = time.time() + 10
    while ahead._iterator.get_state()["next_index"] < 9 and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    assert ahead._iterator.get_state()["next_index"] == 9  # really prefetched, and bounded
    state = json.loads(json.dumps(ahead.get_state()))
    assert state == plain.get_state() and state["grain"]["next_index"] == 5
    resumed = TrainIterator(shards, global_batch_size=4, seed=2, prefetch=2)
    resumed.set_state(state)
    expected = rows_of(plain, 12)
    assert rows_of(resumed, 12) == expected
    assert rows_of(ahead, 12) == expected  # the prefetched batches were not lost
    ahead.set_state(state)  # rewinding a running prefetcher
    assert rows_of(ahead, 3) == expected[:3]
    ahead.close()  # rewinds the thread's read-ahead to the last batch handed out
    assert ahead.get_state()["grain"]["next_index"] == 8
    assert rows_of(ahead, 2) == expected[3:5]


def test_prefetch_raises_errors_of_the_reading_thread():
    it = TrainIterator(fake_packed(8), global_batch_size=2, seed=0, prefetch=2)
    calls = itertools.count()

    def broken(indices):
        if next(calls) == 2:
            raise DataError("disk went away")
        return {"inputs": indices[0]}

    it._gather = broken
    next(it), next(it)
    with pytest.raises(DataError, match="disk went away"):
        next(it)
    # The thread has ended: every later next() raises the same error instead of waiting forever.
    later: list = []

    def again():
        with pytest.raises(DataError, match="disk went away"):
            next(it)
        later.append(True)

    thread = threading.Thread(target=again, daemon=True)
    thread.start()
    thread.join(10)
    assert later == [True]


def test_eval_batches_slices_of_processes_are_the_global_batches():
    packed = fake_packed(5)
    whole = eval_batches(packed, batch_size=4)
    parts = [eval_batches(packed, batch_size=4, process_index=p, process_count=2) for p in (0, 1)]
    assert len(whole) == len(parts[0]) == len(parts[1]) == 2
    for i, batch in enumerate(whole):
        for key in batch:
            assert parts[0][i][key].shape[0] == 2
            np.testing.assert_array_equal(np.concatenate([p[i][key] for p in parts]), batch[key])
    assert not parts[1][1]["segment_ids"].any()  # rows 6-7 of 5: padding only
    with pytest.raises(DataError, match="divisible by the number of processes"):
        eval_batches(packed, batch_size=3, process_index=0, process_count=2)
