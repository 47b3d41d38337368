"""Block verification of the tokenisation cache on a streamed start: a part opens without reading
its large arrays (a truncated file is still caught there), each block is verified when a row
first reads from it (a flipped byte is named, with its part and file, and the part is re-encoded
at the next start), one epoch verifies every block, and a marker of the old layout is encoded
again, not misread."""

import json
import pathlib

import numpy as np
import pytest
from test_cache_index import write_part
from test_streaming_pipeline import streamed, take

from sft_jax.data import cache_blocks, cache_store, prepare_data, stream_prepare
from sft_jax.data.cache_blocks import CacheCorrupt
from sft_jax.data.cache_store import MARKER, RecordStore, read_part

BLOCK = 256  # bytes: a small part spans many blocks


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(cache_store, "BLOCK", BLOCK)


@pytest.fixture
def guards(monkeypatch):
    """Every BlockGuard made from here on."""
    made = []

    class Recorded(cache_blocks.BlockGuard):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(cache_store, "BlockGuard", Recorded)
    return made


def flip(path: pathlib.Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def shard(tmp_path, n: int) -> tuple[RecordStore, stream_prepare.CachedExamples]:
    store = RecordStore(tmp_path / "cache", n, lazy=True)
    index = stream_prepare.shard_index([store], [np.arange(n)], str(tmp_path))
    return store, index.source


def test_a_flipped_byte_is_found_when_its_row_is_read_and_the_part_marked(tmp_path):
    n = 200
    write_part(tmp_path / "cache", n)
    part = tmp_path / "cache" / "part-0"
    tokens = np.load(part / "tokens.npy")
    offset = (part / "tokens.npy").stat().st_size - tokens.nbytes
    starts = np.load(part / "piece_starts.npy")
    victim = len(starts) - 10  # a piece in the last blocks, not read at open
    flip(part / "tokens.npy", offset + 4 * int(starts[victim]))
    store, source = shard(tmp_path, n)  # opens: only sizes and headers of the large arrays
    assert len(store.parts) == 1
    assert source.example(0).tokens.tolist() == tokens[starts[0] : starts[1]].tolist()
    with pytest.raises(CacheCorrupt, match=r"corrupt: .*part-0[/\\]tokens\.npy.*restart"):
        source.example(victim)
    with pytest.raises(CacheCorrupt):  # never handed out later either
        source.example(victim)
    assert not (part / MARKER).exists()  # the next start encodes these records again
    assert RecordStore(tmp_path / "cache", n, lazy=True).parts == []
    assert not part.exists()


def test_a_truncated_file_is_caught_at_open(tmp_path):
    write_part(tmp_path / "cache", 200)
    part = tmp_path / "cache" / "part-0"
    path = part / "loss_mask.npy"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(ValueError, match=r"loss_mask\.npy is"):
        read_part(part, lazy=True)
    assert RecordStore(tmp_path / "cache", 200, lazy=True).parts == []
    assert not part.exists()


def test_a_changed_array_header_is_caught_at_open(tmp_path):
    write_part(tmp_path / "cache", 200)
    part = tmp_path / "cache" / "part-0"
    path = part / "tokens.npy"
    data = path.read_bytes()
    path.write_bytes(data.replace(b"'<i4'", b"'>i4'", 1))  # same size, other byte order
    with pytest.raises(ValueError, match=r"tokens\.npy: its array header"):
        read_part(part, lazy=True)


def test_every_block_is_verified_once_over_an_epoch(tmp_path, guards):
    n = 200
    write_part(tmp_path / "cache", n)
    _, source = shard(tmp_path, n)
    assert {g.file for g in guards} == cache_blocks.BLOCKED
    assert all(g.blocks > 1 for g in guards if g.file == "tokens.npy")
    before = sum(g.verified for g in guards)
    for i in range(len(source)):
        source.example(i)
    for i in range(len(source)):  # a second epoch verifies nothing again
        source.example(i)
    assert all(g.complete and g.verified == g.blocks for g in guards)
    assert sum(g.verified for g in guards) - before <= sum(g.blocks for g in guards)


def test_a_streamed_epoch_verifies_every_block_and_a_corrupt_part_is_reencoded(tmp_path, guards):
    config = streamed(tmp_path, n_train=120)
    first = prepare_data(config)
    rows, batch = first.stats["rows"], config.train.global_batch_size
    epoch = take(first.train_iter, -(-rows // batch))
    # The epoch and the eval data together read every piece: every block is verified.
    assert guards and all(g.complete for g in guards)
    (part,) = sorted(pathlib.Path(config.data.cache_dir).glob("*/part-*"))
    flip(part / "tokens.npy", (part / "tokens.npy").stat().st_size - 3)
    with pytest.raises(CacheCorrupt, match=r"tokens\.npy"):
        take(prepare_data(config).train_iter, 2 * len(epoch))
    assert not (part / MARKER).exists()
    again = prepare_data(config)  # encodes the part again
    (new,) = sorted(pathlib.Path(config.data.cache_dir).glob("*/part-*"))
    assert new != part and (new / MARKER).exists()
    for x, y in zip(take(again.train_iter, len(epoch)), epoch, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_a_marker_of_the_old_layout_is_encoded_again(tmp_path):
    config = streamed(tmp_path, n_train=120)
    reference = take(prepare_data(config).train_iter, 3)
    (part,) = sorted(pathlib.Path(config.data.cache_dir).glob("*/part-*"))
    marker = json.loads((part / MARKER).read_text())
    marker["version"] = 2  # whole-file digests only, no block size
    del marker["block_size"]
    marker["files"] = {
        name: [size, cache_store.digest_file(part / name)]
        for name, (size, _) in marker["files"].items()
    }
    (part / MARKER).write_text(json.dumps(marker))
    again = prepare_data(config)
    (new,) = sorted(pathlib.Path(config.data.cache_dir).glob("*/part-*"))
    assert new != part
    assert json.loads((new / MARKER).read_text())["version"] == cache_store.CACHE_VERSION
    for x, y in zip(take(again.train_iter, 3), reference, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
