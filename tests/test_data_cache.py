"""The tokenisation cache: cached and uncached preparation give bitwise-equal batches, statistics,
eval data and resumed positions; the key holds exactly what changes an encoding; corrupt or
partial parts are detected, removed and encoded again; processes write their parts in parallel."""

import dataclasses
import json
import os
import pathlib
import shutil

import numpy as np
import pytest
from test_data_shards import demo_config, prepare_as_processes

from sft_jax.data import cache as cache_module
from sft_jax.data import prepare_data
from sft_jax.data.cache_store import MARKER

STEPS = 12


def with_data(config, **data):
    return dataclasses.replace(config, data=dataclasses.replace(config.data, **data))


def batches(bundle, steps=STEPS):
    return [next(bundle.train_iter) for _ in range(steps)]


def assert_same(a, b, *, sources=True):
    """Two bundles give the same batches, statistics, eval batches and eval prompts (and the
    prompts name the same sources, unless `sources` is False: the same data at another path)."""
    assert a.stats == b.stats
    for x, y in zip(batches(a), batches(b), strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key].dtype == y[key].dtype
            np.testing.assert_array_equal(x[key], y[key])
    assert len(a.eval_batches) == len(b.eval_batches)
    for x, y in zip(a.eval_batches, b.eval_batches, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    key = (lambda p: p) if sources else (lambda p: (p.prompt_ids, p.reference))
    assert [key(p) for p in a.eval_prompts] == [key(p) for p in b.eval_prompts]
    assert (a.template is None) == (b.template is None)


def parts(cache) -> list[pathlib.Path]:
    return sorted(pathlib.Path(cache).glob("*/part-*"))


def no_encoding(monkeypatch) -> None:
    """From here on, any start that would read or encode records (not load prepared rows) fails."""

    def fail(*args, **kwargs):
        raise AssertionError("encoded although the prepared rows should have been loaded")

    monkeypatch.setattr(cache_module, "encode_cached", fail)


def forget_prepared(cache) -> None:
    """Removes the prepared (packed) entries, so the next start assembles from the parts."""
    shutil.rmtree(pathlib.Path(cache) / "prepared", ignore_errors=True)


def test_cached_equals_uncached_and_is_reused(tmp_path, monkeypatch):
    config = demo_config(tmp_path, eval_fraction=0.1, eval_files="")
    cache = tmp_path / "cache"
    plain = prepare_data(config)
    first = prepare_data(config, cache_dir=str(cache))
    assert len(parts(cache)) == 1
    assert_same(plain, first)
    no_encoding(monkeypatch)
    again = prepare_data(with_data(config, cache_dir=str(cache)))  # the config key, a hit
    assert len(parts(cache)) == 1
    assert_same(prepare_data(config), again)
    off = prepare_data(with_data(config, cache_dir="off"), cache_dir=str(tmp_path / "unused"))
    assert not (tmp_path / "unused").exists()
    assert_same(prepare_data(config), off)


@pytest.mark.parametrize("streaming", [False, True])
def test_saved_dataset_directory_is_cached(tmp_path, streaming):
    """A directory written by save_to_disk (a DatasetDict's, files in a subdirectory) is keyed by
    every file below it: the cache (on by default in training) used to fail on it. Its batches
    equal the same rows' JSONL, a changed file is a new key, and nothing is written beside it."""
    import datasets

    config = demo_config(tmp_path, n_train=40, eval_files="", streaming=streaming)
    rows = [
        json.loads(line)
        for line in pathlib.Path(config.data.train_files).read_text().split("\n")
        if line
    ]
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(saved))
    listing = sorted(saved.rglob("*"))
    cache = tmp_path / "cache"
    jsonl = prepare_data(config, cache_dir=str(tmp_path / "cache_jsonl"))
    first = prepare_data(with_data(config, train_files=str(saved)), cache_dir=str(cache))
    assert_same(jsonl, first, sources=False)
    keys = {p.name for p in cache.iterdir() if p.name not in ("prepared", "stream_counts")}
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:30])}).save_to_disk(str(saved))
    assert (
        prepare_data(with_data(config, train_files=str(saved)), cache_dir=str(cache)).stats[
            "examples"
        ]
        == 30
    )
    assert {p.name for p in cache.iterdir()} - {"prepared", "stream_counts"} > keys
    assert sorted(saved.rglob("*")) == listing


def test_resume_from_cached_equals_uncached(tmp_path, monkeypatch):
    config = demo_config(tmp_path)
    cache = str(tmp_path / "cache")
    prepare_data(config, cache_dir=cache)  # builds the cache
    reference = prepare_data(config)
    no_encoding(monkeypatch)
    expected = batches(reference, 2 * STEPS)
    resumed = prepare_data(config, cache_dir=cache)
    batches(resumed, 5)
    state = json.loads(json.dumps(resumed.train_iter.get_state()))
    restarted = prepare_data(config, cache_dir=cache)
    restarted.train_iter.set_state(state)
    for x, y in zip(batches(restarted, 2 * STEPS - 5), expected[5:], strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_key_changes_with_encoding_options_only(tmp_path):
    """Options that only select, mix, pack or order records reuse the parts; options that change
    an encoding, and the data's contents at the same size, encode again."""
    config = demo_config(tmp_path, eval_fraction=0.1, eval_files="")
    cache = str(tmp_path / "cache")
    prepare_data(config, cache_dir=cache)
    keys = lambda: sorted(p.name for p in pathlib.Path(cache).iterdir() if p.name != "prepared")
    assert len(keys()) == 1
    reused = [
        {"pack_window": 7, "pack_split": True, "prefetch": 2},
        {"shards": 2},
        {"max_eval_examples": 5},
    ]
    for change in reused:
        changed = with_data(config, **change)
        assert_same(prepare_data(changed), prepare_data(changed, cache_dir=cache))
        assert len(keys()) == 1, change
    reseeded = dataclasses.replace(config, seed=config.seed + 1)
    before = len(parts(cache))
    assert_same(prepare_data(reseeded), prepare_data(reseeded, cache_dir=cache))
    assert len(keys()) == 1
    # Another seed holds out other records: only those lacking a generation prompt are encoded.
    assert len(parts(cache)) == before + 1
    for change in [{"seq_len": 64}, {"train_on": "all"}, {"overlong": "drop"}]:
        changed = with_data(config, **change)
        n = len(keys())
        assert_same(prepare_data(changed), prepare_data(changed, cache_dir=cache))
        assert len(keys()) == n + 1, change
    path = pathlib.Path(config.data.train_files)
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("a", "b", 1), encoding="utf-8")  # same size, other contents
    n = len(keys())
    assert_same(prepare_data(config), prepare_data(config, cache_dir=cache))
    assert len(keys()) == n + 1


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_marker", "tmp_only"])
def test_corrupt_or_partial_parts_are_rebuilt(tmp_path, damage):
    config = demo_config(tmp_path, n_train=120)
    cache = str(tmp_path / "cache")
    reference = prepare_data(config)
    prepare_data(config, cache_dir=cache)
    forget_prepared(cache)
    (part,) = parts(cache)
    break_dir(part, damage)
    rebuilt = prepare_data(config, cache_dir=cache)
    assert_same(reference, rebuilt)
    (new,) = parts(cache)
    assert new != part or damage == "tmp_only"
    assert (new / MARKER).exists()
    if damage == "tmp_only":  # kept while it may be another process's write; a day later, gone
        stale = part.parent / ".tmp-interrupted"
        assert stale.exists()
        os.utime(stale, (0, 0))
        forget_prepared(cache)
        prepare_data(config, cache_dir=cache)
        assert not stale.exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_marker"])
def test_corrupt_prepared_rows_are_rebuilt(tmp_path, damage):
    config = demo_config(tmp_path, n_train=120)
    cache = str(tmp_path / "cache")
    reference = prepare_data(config)
    prepare_data(config, cache_dir=cache)
    (prepared,) = (pathlib.Path(cache) / "prepared").iterdir()
    break_dir(prepared, damage, "shard0.inputs.npy")
    assert_same(reference, prepare_data(config, cache_dir=cache))
    assert (prepared / MARKER).exists()  # written again
    assert_same(prepare_data(config), prepare_data(config, cache_dir=cache))


def break_dir(directory: pathlib.Path, damage: str, file: str = "tokens.npy") -> None:
    target = directory / file
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-7])
    elif damage == "flip":
        raw = bytearray(target.read_bytes())
        raw[-3] ^= 0xFF
        target.write_bytes(bytes(raw))
    elif damage == "no_marker":
        (directory / MARKER).unlink()
    else:  # an interrupted write: the temporary directory was never renamed into place
        directory.rename(directory.parent / ".tmp-interrupted")
        (directory.parent / ".tmp-interrupted" / MARKER).unlink()


def test_processes_write_parts_in_parallel_and_share_them(tmp_path):
    """Two processes each encode their own shard into a part of one cache; one process with
    both (virtual) shards then finds everything there and encodes nothing."""
    config = with_data(demo_config(tmp_path, shards=2), cache_dir=str(tmp_path / "cache"))
    two = prepare_as_processes(config, 2)
    assert len(parts(tmp_path / "cache")) == 2
    (one,) = prepare_as_processes(config, 1)
    assert len(parts(tmp_path / "cache")) == 2  # nothing new was encoded
    uncached = with_data(config, cache_dir="off")
    reference = prepare_as_processes(uncached, 2)
    for cached, plain in zip(two, reference, strict=True):
        assert_same(cached, plain)
    assert_same(one, prepare_as_processes(uncached, 1)[0])


def test_bad_rows_skipped_the_same_way(tmp_path):
    config = demo_config(tmp_path, n_train=60, on_bad_row="skip", eval_fraction=0.2)
    lines = pathlib.Path(config.data.train_files).read_text(encoding="utf-8").splitlines()
    lines[3] = "{not json"
    lines[10] = json.dumps({"prompt": "x", "completion": ""})  # empty answer: skipped
    pathlib.Path(config.data.train_files).write_text("\n".join(lines) + "\n", encoding="utf-8")
    cache = str(tmp_path / "cache")
    plain = prepare_data(config)
    assert plain.stats["skipped"] == 2
    assert_same(plain, prepare_data(config, cache_dir=cache))
    restarted = prepare_data(config, cache_dir=cache)
    # The restart's data stage builds no tokenizer: the template comes with the prepared rows.
    assert not restarted.tokenizer.loaded and restarted.template == plain.template
    assert_same(prepare_data(config), restarted)
    # The trainer's vocabulary check reads the recorded length; decoding builds the tokenizer.
    assert len(restarted.tokenizer) == len(plain.tokenizer) and not restarted.tokenizer.loaded
    assert restarted.tokenizer.decode([1, 2]) == plain.tokenizer.decode([1, 2])
    assert restarted.tokenizer.loaded
    chatml = with_data(config, chat_template="chatml")  # another template: another key
    assert_same(prepare_data(chatml), prepare_data(chatml, cache_dir=cache))
    assert len([p for p in pathlib.Path(cache).iterdir() if p.name != "prepared"]) == 2


@pytest.mark.slow
def test_conversations_cached_equal_uncached(tmp_path, shared_assets):
    """ShareGPT conversations with the Qwen3 template, split at turn ends, held-out prompts."""
    src = shared_assets / "data-fastchat" / "dummy_conversation.json"
    data = tmp_path / "conv.json"
    shutil.copy(src, data)
    config = demo_config(tmp_path)
    config = dataclasses.replace(
        with_data(
            config,
            train_files=str(data),
            tokenizer=str(shared_assets / "tok-qwen3"),
            chat_template="tokenizer",
            train_on="last_assistant",
            overlong="split",
            seq_len=256,
            eval_fraction=0.05,
            eval_files="",
            max_eval_examples=16,
        ),
        train=dataclasses.replace(config.train, global_batch_size=4),
    )
    cache = str(tmp_path / "cache")
    plain = prepare_data(config)
    assert plain.template is not None and plain.eval_prompts
    assert_same(plain, prepare_data(config, cache_dir=cache))
    restarted = prepare_data(config, cache_dir=cache)
    # The restart's data stage builds no tokenizer: the template comes with the prepared rows.
    assert not restarted.tokenizer.loaded and restarted.template == plain.template
    assert_same(prepare_data(config), restarted)
    # The trainer's vocabulary check reads the recorded length; decoding builds the tokenizer.
    assert len(restarted.tokenizer) == len(plain.tokenizer) and not restarted.tokenizer.loaded
    assert restarted.tokenizer.decode([1, 2]) == plain.tokenizer.decode([1, 2])
    assert restarted.tokenizer.loaded
    chatml = with_data(config, chat_template="chatml")  # another template: another key
    assert_same(prepare_data(chatml), prepare_data(chatml, cache_dir=cache))
    assert len([p for p in pathlib.Path(cache).iterdir() if p.name != "prepared"]) == 2


def test_unwritable_cache_does_not_stop_the_run(tmp_path, monkeypatch, caplog):
    """A full disk (or no permission) where the cache goes: the run prepares the same data, with
    a warning, and nothing half-written is left to be trusted."""
    from sft_jax.data import cache_store

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_store, "write_verified", full)
    monkeypatch.setattr(cache_module, "write_verified", full)
    config = demo_config(tmp_path, n_train=120, eval_fraction=0.1, eval_files="")
    cache = str(tmp_path / "cache")
    assert_same(prepare_data(config), prepare_data(config, cache_dir=cache))
    assert "No space left on device" in caplog.text
    assert not parts(cache) and not (pathlib.Path(cache) / "prepared").exists()


def test_weighted_mixture_cached_equals_uncached(tmp_path, monkeypatch):
    """Each mixture group has its own key directory; held-out shares are capped across groups."""
    config = demo_config(tmp_path, eval_fraction=0.2, eval_files="", max_eval_examples=7)
    other = tmp_path / "other.jsonl"
    lines = pathlib.Path(config.data.train_files).read_text(encoding="utf-8").splitlines()
    other.write_text("\n".join(lines[100:160]) + "\n", encoding="utf-8")
    config = with_data(config, train_files=f"{config.data.train_files}:0.7,{other}:0.3")
    cache = str(tmp_path / "cache")
    assert_same(prepare_data(config), prepare_data(config, cache_dir=cache))
    assert len([p for p in pathlib.Path(cache).iterdir() if p.name != "prepared"]) == 2
    n = len(parts(cache))
    forget_prepared(cache)
    assert_same(prepare_data(config), prepare_data(config, cache_dir=cache))
    assert len(parts(cache)) == n  # every record came from the parts
    no_encoding(monkeypatch)
    assert_same(prepare_data(config), prepare_data(config, cache_dir=cache))


def test_first_encode_in_parts_of_bounded_size_equals_uncached(tmp_path, monkeypatch):
    """The first start encodes and writes the missing records a bounded number at a time: many
    parts, the same data as without the cache (held-out prompts included)."""
    monkeypatch.setattr(cache_module, "_ENCODE_RECORDS", 7)
    config = demo_config(tmp_path, eval_fraction=0.1, eval_files="")
    cache = tmp_path / "cache"
    chunked = prepare_data(config, cache_dir=str(cache))
    assert len(parts(cache)) > 1
    assert_same(prepare_data(config), chunked)
