"""The path layer: local paths behave as before; data files and the tokenisation cache on gs://
work through etils.epath, tested against a local GCS emulator (gcp-storage-emulator + gcsfs,
the test extras; skipped when they are not installed)."""

import pathlib
import socket

import numpy as np
import pytest
from test_data_cache import assert_same, no_encoding, with_data
from test_data_shards import demo_config

from sft_jax.data import expand_files, paths, prepare_data
from sft_jax.data.cache_store import MARKER
from sft_jax.data.source import DataError, iter_records


def test_local_paths_unchanged(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "sub/c.jsonl"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text('{"text": "x"}\n')
    assert not paths.is_url(str(tmp_path)) and paths.is_url("gs://bucket/x")
    assert paths.glob_files(str(tmp_path / "*.jsonl")) == [
        str(tmp_path / "a.jsonl"),
        str(tmp_path / "b.jsonl"),
    ]
    assert paths.glob_files(str(tmp_path / "**" / "*.jsonl"))[-1] == str(tmp_path / "sub/c.jsonl")
    (tmp_path / "t.csv").write_bytes(b'text\r\n"a\r\nb"\r\n')
    with paths.open_text(str(tmp_path / "t.csv"), encoding="utf-8", newline="") as f:
        assert f.read() == 'text\r\n"a\r\nb"\r\n'
    with pytest.raises(DataError, match="matches no file"):
        expand_files(str(tmp_path / "*.parquet"))


@pytest.fixture
def gcs(monkeypatch):
    """A GCS emulator on 127.0.0.1 with bucket "test"; gs:// paths reach it through gcsfs."""
    # Before gcsfs is imported: no gRPC probe for hierarchical buckets (the emulator has none).
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    server_module = pytest.importorskip("gcp_storage_emulator.server")
    pytest.importorskip("gcsfs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = server_module.create_server("127.0.0.1", port, in_memory=True, default_bucket="test")
    server.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    import fsspec

    fsspec.filesystem("gs").clear_instance_cache()  # no client bound to an earlier emulator
    yield "gs://test"
    server.stop()


def upload(local: pathlib.Path, url: str) -> None:
    from etils import epath

    epath.Path(url).write_bytes(local.read_bytes())


@pytest.mark.slow
def test_data_and_cache_on_gcs(tmp_path, gcs, monkeypatch):
    """Data files read from gs:// (a glob too), the cache written there: batches equal the
    local run's; a restart reads the prepared rows back from the bucket."""
    config = demo_config(tmp_path, n_train=120, eval_fraction=0.1, eval_files="")
    local = pathlib.Path(config.data.train_files)
    upload(local, f"{gcs}/data/train.jsonl")
    assert [s for s, _ in iter_records(f"{gcs}/data/train.jsonl")][:1] == [
        f"{gcs}/data/train.jsonl:1"
    ]
    remote = with_data(config, train_files=f"{gcs}/data/*.jsonl", cache_dir=f"{gcs}/cache")
    first = prepare_data(remote)
    reference = prepare_data(config)
    assert first.stats == reference.stats
    for _ in range(5):
        x, y = next(first.train_iter), next(reference.train_iter)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    from etils import epath

    markers = list(epath.Path(f"{gcs}/cache").glob(f"*/part-*/{MARKER}"))
    assert len(markers) == 1
    no_encoding(monkeypatch)  # the restart reads the bucket's prepared rows
    assert_same(prepare_data(config), prepare_data(remote), sources=False)
