"""Data path: reading with exact errors, masks as data, resumable batching (packing has its own
file, test_data_packing.py)."""

import hashlib
import json
import pathlib
import time

import numpy as np
import pytest

from sft_jax.data import (
    DataError,
    Row,
    TrainIterator,
    encode_prompt,
    eval_batches,
    expand_files,
    load_tokenizer,
    pack_examples,
    packing_stats,
    read_rows,
    tokenize_rows,
)
from sft_jax.data.__main__ import data_config
from sft_jax.data.__main__ import main as data_cli
from sft_jax.data.source import iter_records

BOS, EOS = 1, 2


@pytest.fixture(scope="module")
def tokenizer(stories_dir):
    return load_tokenizer(str(stories_dir))


def write_jsonl(path: pathlib.Path, lines: list[bytes]) -> str:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def record(prompt="p", completion="c", **extra) -> bytes:
    return json.dumps({"prompt": prompt, "completion": completion, **extra}).encode()


# --------------------------------------------------------------------------- reading


def test_read_rows_basic_blank_lines_bom_crlf(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + record("p1", "c1") + b"\r\n\r\n  \n" + record("p2", "c2"))
    rows, skipped = read_rows(str(path), on_bad_row="error")
    assert skipped == 0
    assert rows == [Row("p1", "c1", f"{path}:1"), Row("p2", "c2", f"{path}:4")]


def test_expand_files_sorted_globs_dedup_and_missing(tmp_path):
    for name in ["b.jsonl", "a.jsonl", "c.txt"]:
        write_jsonl(tmp_path / name, [record()])
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    assert expand_files(f"{tmp_path}/*.jsonl") == [a, b]
    assert expand_files(f" {b} , {tmp_path}/*.jsonl") == [b, a]
    with pytest.raises(DataError, match="matches no file"):
        expand_files(f"{tmp_path}/*.parquet")
    with pytest.raises(DataError, match="does not exist"):
        expand_files(f"{a},{tmp_path}/nope.jsonl")
    with pytest.raises(DataError, match="empty"):
        expand_files(" , ")
    with pytest.raises(DataError, match="directory"):
        expand_files(str(tmp_path))


BAD_LINES = {
    # name: (line bytes, substrings the message must contain besides path:line)
    "broken_utf8": (b'{"prompt": "a", "completion": "caf\xc3 ok"}', ["'completion'", "UTF-8"]),
    "broken_utf8_outside_strings": (b'{"prompt": "a"\xff, "completion": "b"}', ["UTF-8", "JSON"]),
    "malformed_json": (b'{"prompt": "a", "completion": }', ["malformed JSON", "column 31"]),
    "not_object": (b'["a", "b"]', ["JSON object", "list"]),
    "missing_field": (b'{"prompt": "a"}', ["'completion'", "missing"]),
    "unknown_field": (record(source="x"), ["'source'", "unknown field"]),
    "typo_field": (b'{"prompt": "a", "completon": "b"}', ["'completon'", "'completion'?"]),
    "non_string": (b'{"prompt": 3, "completion": "b"}', ["'prompt'", "string", "int"]),
    "null_value": (b'{"prompt": "a", "completion": null}', ["'completion'", "NoneType"]),
    "empty_completion": (record("a", " \n\t "), ["'completion'", "empty"]),
    "duplicate_key": (b'{"prompt": "a", "completion": "b", "prompt": "c"}', ["'prompt'", "twice"]),
    "lone_surrogate": (b'{"prompt": "\\ud800", "completion": "b"}', ["'prompt'", "surrogate"]),
}


@pytest.mark.parametrize("name", sorted(BAD_LINES))
def test_bad_row_error_names_file_line_field(tmp_path, name):
    line, expected = BAD_LINES[name]
    path = write_jsonl(tmp_path / f"{name}.jsonl", [record(), b"", line, record()])
    with pytest.raises(DataError) as info:
        read_rows(path, on_bad_row="error")
    message = str(info.value)
    assert f"{path}:3" in message
    for part in expected:
        assert part in message, message
    rows, skipped = read_rows(path, on_bad_row="skip")
    assert (len(rows), skipped) == (2, 1)
    assert [r.source for r in rows] == [f"{path}:1", f"{path}:4"]


def test_skip_counts_every_bad_row_and_files_unchanged(tmp_path):
    lines = [record("first", "ok")] + [line for line, _ in BAD_LINES.values()] + [record()]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    before = hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()
    mtime = pathlib.Path(path).stat().st_mtime_ns
    rows, skipped = read_rows(path, on_bad_row="skip")
    assert (len(rows), skipped) == (2, len(BAD_LINES))
    with pytest.raises(DataError):
        read_rows(path, on_bad_row="error")
    assert hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest() == before
    assert pathlib.Path(path).stat().st_mtime_ns == mtime
    with pytest.raises(DataError, match="on_bad_row"):
        read_rows(path, on_bad_row="ignore")


def test_csv_line_numbers_count_blank_lines_and_multiline_fields(tmp_path):
    path = tmp_path / "t.csv"  # 1 header, 2 row, 3 blank, 4-5 one quoted row, 6 blank, 7 row
    path.write_text('prompt,completion\na,b\n\n"multi\nline",c\n\nd,\n', encoding="utf-8")
    assert [s for s, _ in iter_records(str(path))] == [f"{path}:{n}" for n in (2, 4, 7)]
    with pytest.raises(DataError) as info:
        read_rows(str(path), on_bad_row="error")
    assert f"{path}:7: field 'completion'" in str(info.value)


def test_json_list_file_line_numbers_in_linear_time(tmp_path):
    records = [{"prompt": "x" * 500 + str(i), "completion": "y" * 500} for i in range(4000)]
    listed, lines = tmp_path / "big.json", tmp_path / "big.jsonl"
    listed.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
    lines.write_text("".join(json.dumps(r) + "\n" for r in records))
    timings = []
    for path in (listed, lines):
        start = time.perf_counter()
        got = list(iter_records(str(path)))
        timings.append(time.perf_counter() - start)
        assert [r for _, r in got] == records
    assert [s for s, _ in iter_records(str(listed))][::1000] == [
        f"{listed}:{n}" for n in (2, 1002, 2002, 3002)
    ]
    # Counting the newlines from the file start for every record took ~3 s here (quadratic).
    assert timings[0] < 10 * timings[1] + 0.5, timings


DEMO = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py")


@pytest.mark.parametrize(("value", "expected"), [("True", True), ("1", True), ("false", False)])
def test_data_cli_parses_bool_overrides_like_training(value, expected):
    assert data_config(DEMO, [f"--config.data.pack_split={value}"]).data.pack_split is expected


@pytest.mark.parametrize(
    ("override", "named"),
    [("--config.data.no_such_key=1", "no_such_key"), ("--config.data.seq_len=abc", "seq_len")],
)
def test_data_cli_bad_override_exits_2_with_a_message(capsys, override, named):
    assert data_cli(["inspect", "--config", DEMO, override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err and "Traceback" not in err


def test_data_cli_with_data_tokenizer_never_resolves_model_path(capsys, stories_dir):
    # A Hub id that cannot be fetched (tests run offline): only the tokenizer is needed here.
    args = ["--config.model.path=nobody-here/not-a-model", f"--config.data.tokenizer={stories_dir}"]
    assert data_config(DEMO, args).data.tokenizer == str(stories_dir)
    assert data_cli(["inspect", "--config", DEMO, "--n", "1", "--json", *args]) == 0
    assert json.loads(capsys.readouterr().out)["loss_mask"]


# --------------------------------------------------------------------------- tokenising


def test_mask_exactly_on_completion_and_eos(tokenizer):
    rows = [Row("Once upon a time", "there was a cat.", "f:1")]
    (ex,), truncated = tokenize_rows(rows, tokenizer, seq_len=64)
    assert truncated == 0 and ex.source == "f:1"
    assert ex.tokens.dtype == np.int32 and ex.loss_mask.dtype == bool
    pieces = tokenizer.convert_ids_to_tokens(ex.tokens.tolist())
    # Hand-checked against the stories260K vocabulary.
    assert pieces[:5] == ["<s>", "▁Once", "▁upon", "▁a", "▁time"]
    assert pieces[-1] == "</s>"
    n_prompt = 5
    assert ex.loss_mask.tolist() == [False] * n_prompt + [True] * (len(pieces) - n_prompt)
    assert tokenizer.decode(ex.tokens[~ex.loss_mask], skip_special_tokens=True) == (
        "Once upon a time"
    )
    trained = ex.tokens[ex.loss_mask]
    assert trained[-1] == EOS
    assert tokenizer.decode(trained[:-1]) == "there was a cat."
    assert encode_prompt(tokenizer, "Once upon a time") == ex.tokens[:n_prompt].tolist()


def test_no_double_bos_and_encode_prompt_matches(tokenizer):
    rows = [Row("<s>Once upon", "a time", "f:1"), Row("", "Once", "f:2"), Row("Hi", "yo", "f:3")]
    examples, _ = tokenize_rows(rows, tokenizer, seq_len=64)
    for row, ex in zip(rows, examples, strict=True):
        assert ex.tokens[0] == BOS and np.count_nonzero(ex.tokens == BOS) == 1
        n_prompt = int(np.argmax(ex.loss_mask))
        assert encode_prompt(tokenizer, row.prompt) == ex.tokens[:n_prompt].tolist()
    assert examples[1].loss_mask.tolist() == [False] + [True] * (len(examples[1].tokens) - 1)


def test_eos_and_zero_ids_mid_completion_are_trained_not_padding(tokenizer):
    rows = [Row("Lily", "said </s> and <unk> ok", "f:1"), Row("a", "b</s>", "f:2")]
    (ex, ends_with_eos), _ = tokenize_rows(rows, tokenizer, seq_len=64)
    completion = ex.tokens[ex.loss_mask]
    assert EOS in completion[:-1].tolist() and 0 in completion.tolist()  # mid-text EOS and id 0
    assert completion[-1] == EOS
    # A completion that already ends with EOS gets no second one.
    assert ends_with_eos.tokens[-2:].tolist() != [EOS, EOS] and ends_with_eos.tokens[-1] == EOS
    # Packed with padding (targets 0 there): mid-text EOS/0 stay trained, padding never is.
    packed = pack_examples([ex], seq_len=32, window=4, seed=0)
    mask, targets, seg = packed["loss_mask"][0], packed["targets"][0], packed["segment_ids"][0]
    assert mask[targets == EOS].all() and np.count_nonzero(mask & (targets == EOS)) == 2
    assert mask[(targets == 0) & (seg > 0)].all()
    assert not mask[seg == 0].any() and (targets[seg == 0] == 0).all()


@pytest.mark.parametrize(("name", "adds_bos"), [("tok-llama3.1-hf", True), ("tok-qwen3", False)])
def test_other_real_tokenizers_prefix_and_no_doubled_specials(shared_assets, name, adds_bos):
    tok = load_tokenizer(str(shared_assets / name))
    bos, eos = tok.bos_token_id, tok.eos_token_id
    rows = [
        Row("Hello there", " General Kenobi", "f:1"),
        Row(f"{tok.bos_token or ''}Hi", "yo", "f:2"),  # pre-rendered BOS
        Row("Q", f"A{tok.eos_token}", "f:3"),  # completion already ending with EOS
    ]
    examples, _ = tokenize_rows(rows, tok, seq_len=64)
    for row, ex in zip(rows, examples, strict=True):
        assert (ex.tokens[0] == bos) == adds_bos
        if adds_bos:
            assert np.count_nonzero(ex.tokens == bos) == 1
        assert ex.tokens[-1] == eos and ex.tokens[-2] != eos
        n_prompt = int(np.argmax(ex.loss_mask))
        assert encode_prompt(tok, row.prompt) == ex.tokens[:n_prompt].tolist()
        assert ex.loss_mask[n_prompt:].all()
    assert tok.decode(examples[0].tokens[examples[0].loss_mask][:-1]) == " General Kenobi"


def test_empty_prompt_without_bos_still_trains_the_first_completion_token(shared_assets):
    """Qwen adds no BOS: an empty prompt put the first completion token in slot 0, which is never
    a target. A start token (EOS, Qwen has no BOS) now precedes it, in training and generation."""
    from sft_jax.data import EncodeSettings, Text, encode_examples

    tok = load_tokenizer(str(shared_assets / "tok-qwen3"))
    (ex,), _ = tokenize_rows([Row("", "Paris", "e:1")], tok, seq_len=16)
    first = tok("Paris", add_special_tokens=False)["input_ids"][0]
    assert ex.tokens.tolist()[:2] == [tok.eos_token_id, first] and ex.loss_mask[1]
    assert encode_prompt(tok, "") == [tok.eos_token_id]
    settings = EncodeSettings(None, "all", 16, "truncate", "error")
    (text,), _, _ = encode_examples([Text("Paris is big", "t:1")], tok, settings, num_workers=1)
    assert text.tokens[1] == first  # slot 1: a target


def test_truncation_counted_keeps_prompt_start_and_drops_untrainable(tokenizer):
    long_completion = " ".join(["cat"] * 50)
    rows = [
        Row("Once upon a time", long_completion, "f:1"),
        Row("Once upon a time there was " + "a big dog " * 20, "ok", "f:2"),
        Row("Hi", "short", "f:3"),
    ]
    examples, truncated = tokenize_rows(rows, tokenizer, seq_len=16)
    assert truncated == 2
    assert [e.source for e in examples] == ["f:1", "f:3"]
    ex = examples[0]
    assert len(ex.tokens) == 17
    assert ex.tokens[:5].tolist() == encode_prompt(tokenizer, rows[0].prompt)
    assert ex.loss_mask[5:].all() and ex.tokens[-1] != EOS
    for e in examples:
        assert e.loss_mask[1:].any()


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="no tokenizer"):
        load_tokenizer("")
    # A model directory with config.json but no tokenizer files: transformers would build an
    # empty 5-token tokenizer from the config alone, and the run would fail much later.
    (tmp_path / "config.json").write_text('{"model_type": "gemma3_text"}')
    with pytest.raises(DataError, match="no tokenizer files"):
        load_tokenizer(str(tmp_path))


# --------------------------------------------------------------------------- batching


def fake_packed(rows: int, seq_len: int = 4) -> dict[str, np.ndarray]:
    """Row r has inputs[r, 0] == r, so batches reveal which rows they hold."""
    inputs = np.tile(np.arange(rows, dtype=np.int32)[:, None], (1, seq_len))
    return {
        "inputs": inputs,
        "targets": inputs + 1,
        "loss_mask": np.ones((rows, seq_len), bool),
        "segment_ids": np.ones((rows, seq_len), np.int32),
        "positions": np.tile(np.arange(seq_len, dtype=np.int32), (rows, 1)),
    }


def take_rows(iterator, steps):
    return np.concatenate([next(iterator)["inputs"][:, 0] for _ in range(steps)])


def test_train_iterator_epochs_and_determinism():
    packed = fake_packed(95)
    it = TrainIterator(packed, global_batch_size=10, seed=7)
    assert (it.rows_per_epoch, it.steps_per_epoch, it.steps_for_epochs(2.0)) == (95, 10, 19)
    batch = next(TrainIterator(packed, global_batch_size=10, seed=7))
    assert {k: v.shape for k, v in batch.items()} == {k: (10, 4) for k in packed}
    stream = take_rows(it, 3 * it.steps_per_epoch)
    epochs = [stream[e * 95 : (e + 1) * 95] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(95))  # every row, once per epoch
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    same = take_rows(TrainIterator(packed, global_batch_size=10, seed=7), 30)
    np.testing.assert_array_equal(same, stream)
    other = take_rows(TrainIterator(packed, global_batch_size=10, seed=8), 30)
    assert not np.array_equal(other, stream)


def test_train_iterator_batch_larger_than_dataset():
    it = TrainIterator(fake_packed(3), global_batch_size=8, seed=0)
    assert it.steps_per_epoch == 1
    stream = take_rows(it, 3)
    for e in range(8):  # 24 rows = 8 epochs of 3, each a permutation
        assert sorted(stream[3 * e : 3 * e + 3].tolist()) == [0, 1, 2]


def test_process_shards_concatenate_to_global_batch():
    """Two processes holding one shard each hand out exactly the halves of the global batches of
    one process holding both shards ("virtual" shards)."""
    shards = [fake_packed(50), fake_packed(47)]
    whole = TrainIterator(shards, global_batch_size=8, seed=1)
    assert (whole.rows_per_shard, whole.steps_per_epoch, whole.rows_dropped_per_epoch) == (
        47,
        12,
        3,
    )
    parts = [
        TrainIterator(
            shards[p],
            global_batch_size=8,
            seed=1,
            first_shard=p,
            num_shards=2,
            rows_per_shard=47,
            loss_tokens=whole.get_state()["loss_tokens"],
        )
        for p in range(2)
    ]
    for _ in range(30):
        expected = next(whole)
        pieces = [next(p) for p in parts]
        for key in expected:
            assert pieces[0][key].shape == (4, 4)
            np.testing.assert_array_equal(np.concatenate([x[key] for x in pieces]), expected[key])
    assert parts[0].get_state() == parts[1].get_state() == whole.get_state()
    with pytest.raises(DataError, match="divisible"):
        TrainIterator(shards, global_batch_size=9, seed=1)


def test_each_shard_epoch_is_a_permutation_cut_to_the_smallest_shard():
    shards = [fake_packed(10), fake_packed(7)]
    it = TrainIterator(shards, global_batch_size=2, seed=5)
    assert it.steps_per_epoch == 7
    stream = np.stack([next(it)["inputs"][:, 0] for _ in range(3 * 7)])  # [steps, shard]
    seen_big = set()
    for e in range(3):
        epoch = stream[7 * e : 7 * (e + 1)]
        assert sorted(epoch[:, 1].tolist()) == list(range(7))  # the smallest shard: all rows
        assert len(set(epoch[:, 0].tolist())) == 7  # the larger one: 7 distinct of its 10
        seen_big |= set(epoch[:, 0].tolist())
    assert len(seen_big) > 7  # a different few are left out each epoch


def test_resume_from_state_gives_identical_batches():
    shards = [fake_packed(60), fake_packed(61)]
    kwargs = {"global_batch_size": 8, "seed": 3, "num_shards": 2, "rows_per_shard": 60}
    it = TrainIterator(shards[1], first_shard=1, **kwargs)
    take_rows(it, 17)  # crosses an epoch boundary
    state = json.loads(json.dumps(it.get_state()))
    assert state["seed"] == 3 and state["num_shards"] == 2
    fresh = TrainIterator(shards[1], first_shard=1, **kwargs)
    fresh.set_state(state)
    for _ in range(10):
        a, b = next(it), next(fresh)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize(
    ("packed_rows", "kwargs", "named"),
    [
        (60, {"seed": 4}, "seed"),
        (60, {"num_shards": 1}, "num_shards"),
        (61, {"rows_per_shard": None}, "rows_per_shard"),
        (60, {"global_batch_size": 4}, "global_batch_size"),
    ],
)
def test_mismatched_state_refused(packed_rows, kwargs, named):
    base = {"global_batch_size": 8, "seed": 3, "num_shards": 2, "rows_per_shard": 60}
    state = TrainIterator(fake_packed(60), **base).get_state()
    other = TrainIterator(fake_packed(packed_rows), **{**base, **kwargs})
    with pytest.raises(DataError, match=f"{named} was"):
        other.set_state(state)
    with pytest.raises(DataError, match="not a TrainIterator state"):
        other.set_state({"next_index": 3})


def test_train_iterator_refuses_empty_dataset():
    with pytest.raises(DataError, match="empty"):
        TrainIterator(fake_packed(0), global_batch_size=2, seed=0)


def test_eval_batches_pads_last_batch():
    packed = fake_packed(5)
    batches = eval_batches(packed, batch_size=2)
    assert len(batches) == 3 and all(b["inputs"].shape == (2, 4) for b in batches)
    for key in packed:
        joined = np.concatenate([b[key] for b in batches])
        np.testing.assert_array_equal(joined[:5], packed[key])
        assert not joined[5].any()
    assert eval_batches(fake_packed(0), batch_size=2) == []


def test_end_to_end_jsonl_to_batches(tmp_path, tokenizer):
    lines = [record(f"Once upon a time {i}", f"there was a cat number {i}.") for i in range(40)]
    rows, skipped = read_rows(write_jsonl(tmp_path / "d.jsonl", lines), on_bad_row="error")
    examples, truncated = tokenize_rows(rows, tokenizer, seq_len=32)
    packed = pack_examples(examples, seq_len=32, window=16, seed=0)
    stats = packing_stats(packed)
    assert (skipped, truncated) == (0, 0)
    assert stats["real_tokens"] == sum(len(e.tokens) - 1 for e in examples)
    assert stats["loss_tokens"] == sum(int(e.loss_mask[1:].sum()) for e in examples)
    batch = next(TrainIterator(packed, global_batch_size=4, seed=0))
    assert batch["inputs"].shape == (4, 32)
