"""The path layer: local paths behave as before; data files, the tokenisation cache and a whole
training workdir on gs:// work through etils.epath, tested against a local GCS emulator
(gcp-storage-emulator + gcsfs, the test extras; skipped when they are not installed)."""

import contextlib
import json
import os
import pathlib
import socket
import subprocess
import time

import numpy as np
import pytest
from test_data_cache import assert_same, no_encoding, with_data
from test_data_shards import demo_config

from sft_jax import paths
from sft_jax.data import expand_files, prepare_data
from sft_jax.data.cache_store import MARKER
from sft_jax.data.raw_records import count_records, lazy_records
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


def test_workdir_files_locally(tmp_path, monkeypatch):
    """The workdir's operations on a local directory: join, exclusive create, append."""
    assert paths.join(str(tmp_path), "a", "b") == str(tmp_path / "a" / "b")
    assert paths.join("gs://bucket/run/", "metrics.jsonl") == "gs://bucket/run/metrics.jsonl"
    assert paths.absolute("gs://bucket/run") == "gs://bucket/run"
    lock = str(tmp_path / "lock")
    assert paths.create_exclusive(lock, "one") and not paths.create_exclusive(lock, "two")
    assert paths.read_text(lock) == "one"
    log = paths.AppendFile(str(tmp_path / "log"))
    log.append("a\n")
    log.append("b\n")
    assert (tmp_path / "log").read_text() == "a\nb\n"  # locally every append is on disk


def appended(url: str, flush_s: float) -> tuple[str, str]:
    """(the object after a first and a second append, after close) with `flush_s`."""
    log = paths.AppendFile(url)
    log.flush_s = flush_s
    log.append("a\n")
    log.append("b\n")
    middle = paths.read_text(url)
    log.close()
    return middle, paths.read_text(url)


_HOST = [""]


def gcs_host() -> str:
    """host:port of the emulator the `gcs` fixture started."""
    return _HOST[0]


def _with_generation_headers(server_module) -> None:
    """Makes the emulator's downloads carry x-goog-generation as Cloud Storage's do: TensorStore
    (Orbax's OCDBT manifests) reads an object's generation from them to replace it
    conditionally, and fails with "Malformed StorageGeneration" without them."""
    from gcp_storage_emulator.handlers import objects

    original = objects.download
    if getattr(original, "with_generation", False):
        return

    def download(request, response, storage, *args, **kwargs):
        with contextlib.suppress(Exception):  # absent: the original answers 404
            params = request.params
            obj = storage.get_file_obj(params["bucket_name"], params["object_id"])
            response["x-goog-generation"] = obj["generation"]
            response["x-goog-metageneration"] = obj["metageneration"]
        return original(request, response, storage, *args, **kwargs)

    download.with_generation = True
    objects.download = download  # objects.get calls it by name; the route table holds it too
    for _, handlers in server_module.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler is original:
                handlers[method] = download


@pytest.fixture
def gcs(monkeypatch):
    """A GCS emulator on 127.0.0.1 with bucket "test"; gs:// paths reach it through gcsfs."""
    # Before gcsfs is imported: no gRPC probe for hierarchical buckets (the emulator has none).
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    server_module = pytest.importorskip("gcp_storage_emulator.server")
    pytest.importorskip("gcsfs")
    _with_generation_headers(server_module)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = server_module.create_server("127.0.0.1", port, in_memory=True, default_bucket="test")
    server.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    _HOST[0] = f"127.0.0.1:{port}"
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


def test_store_lookups_see_what_other_hosts_wrote(gcs):
    """Another host (a second client) creates, replaces and deletes objects after this process
    listed their directory: exists / isfile / glob see the change, and a replaced object reads
    back whole, not cut to the size the listing remembered; `**` globs at any depth."""
    import gcsfs

    paths.write_text(f"{gcs}/d/a.txt", "one")
    assert paths.glob_files(f"{gcs}/d/*.txt") == [f"{gcs}/d/a.txt"]  # now a cached listing
    assert paths.exists(f"{gcs}/d/a.txt")
    other = gcsfs.GCSFileSystem(skip_instance_cache=True)
    other.pipe("test/d/b.txt", b"b")
    other.pipe("test/d/a.txt", b"one, then more")
    assert paths.read_text(f"{gcs}/d/a.txt") == "one, then more"
    other.rm("test/d/a.txt")
    assert not paths.exists(f"{gcs}/d/a.txt") and not paths.isfile(f"{gcs}/d/a.txt")
    assert paths.isfile(f"{gcs}/d/b.txt")
    other.pipe("test/d/deep/c.txt", b"c")
    assert paths.isdir(f"{gcs}/d/deep")
    assert paths.glob_files(f"{gcs}/**/*.txt") == [f"{gcs}/d/b.txt", f"{gcs}/d/deep/c.txt"]


def test_lazy_records_on_gcs(tmp_path, gcs):
    """Records listed lazily from gs:// (JSON Lines read back by offset, Parquet by row group)
    are the local files' records, with the objects' names as sources."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_lazy_records import AWKWARD

    local = tmp_path / "awkward.jsonl"
    local.write_bytes(AWKWARD)
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(20)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet", row_group_size=6)
    for name in ("awkward.jsonl", "rows.parquet"):
        upload(tmp_path / name, f"{gcs}/data/{name}")
    files = "{}/awkward.jsonl,{}/rows.parquet"
    remote = lazy_records(files.format(f"{gcs}/data", f"{gcs}/data"))
    mine = lazy_records(files.format(tmp_path, tmp_path))
    assert (
        len(remote) == len(mine) == 28 == count_records(files.format(f"{gcs}/data", gcs + "/data"))
    )
    order = [27, 0, 9, 3, 20, 21, 4]
    assert [
        (s.replace(f"{gcs}/data", str(tmp_path)), item) for s, item in remote.take(order)
    ] == list(mine.take(order))


@pytest.mark.slow
def test_append_and_lock_objects_on_gcs(gcs):
    """An object cannot be appended to: it is rewritten whole, at the first append, then at most
    every flush_s, and on close; a later writer keeps what is there. The lock object is created
    once."""
    url = f"{gcs}/run/metrics.jsonl"
    assert appended(url, flush_s=3600) == ("a\n", "a\nb\n")
    assert appended(url, flush_s=0) == ("a\nb\na\nb\n", "a\nb\na\nb\n")
    assert paths.create_exclusive(f"{gcs}/run/lock", "one")
    assert not paths.create_exclusive(f"{gcs}/run/lock", "two")
    assert paths.read_text(f"{gcs}/run/lock") == "one"
    assert sorted(paths.listdir(f"{gcs}/run")) == ["lock", "metrics.jsonl"]
    from sft_jax.training import preflight  # data patterns in a bucket pass preflight

    assert preflight._matches(f"{gcs}/run/metrics.jsonl") and preflight._matches(
        f"{gcs}/run/*.jsonl"
    )
    assert not preflight._matches(f"{gcs}/run/none*.jsonl")
    assert not preflight._matches(f"{gcs}/run/none.jsonl")


@pytest.mark.slow
def test_workdir_lock_object_on_gcs(gcs):
    """The workdir lock in a bucket: a live holder on this host refuses a start, a dead one's
    lock is recovered, and release deletes the object."""
    from sft_jax.training.workdir_lock import WorkdirBusyError, WorkdirLock, _pid_start

    lock_url = f"{gcs}/run/train.lock"
    live = os.getppid()
    holder = {"host": socket.gethostname(), "pid": live, "pid_start": _pid_start(live)}
    paths.write_text(lock_url, json.dumps({**holder, "token": "theirs"}))
    with pytest.raises(WorkdirBusyError, match="in use by another training run"):
        WorkdirLock(f"{gcs}/run").acquire()
    dead = subprocess.Popen(["true"])
    dead.wait()
    holder = {"host": socket.gethostname(), "pid": dead.pid, "pid_start": "1"}
    paths.write_text(lock_url, json.dumps({**holder, "token": "theirs"}))
    lock = WorkdirLock(f"{gcs}/run", heartbeat_s=0.05)
    lock.acquire()
    assert json.loads(paths.read_text(lock_url))["token"] == lock.token
    time.sleep(0.3)  # the heartbeat rewrites the object with a growing beat
    assert json.loads(paths.read_text(lock_url)).get("beat", 0) >= 1
    lock.release()
    assert not paths.exists(lock_url)


@pytest.mark.slow
def test_workdir_on_gcs_trains_resumes_and_reads_back(small_train, tmp_path, gcs, monkeypatch):
    """--workdir gs://...: a run preempted at step 2 resumes from its checkpoint in the bucket
    and logs the same losses as a local run; its lock is gone; export, the report and
    sft_jax.load read it back from the bucket."""
    from test_faults import STEPS, flags, train_records

    import sft_jax
    from sft_jax import export, report
    from sft_jax.train import main

    # Orbax writes arrays with TensorStore, which reaches the emulator through these.
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", f"http://{gcs_host()}")
    monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    workdir = f"{gcs}/run"
    assert main(["train", *flags(small_train, workdir, "--config.faults.sigterm_at_step=2")]) == 42
    assert main(["train", *flags(small_train, workdir)]) == 0
    assert main(["train", *flags(small_train, tmp_path / "local")]) == 0
    remote, local = train_records(workdir), train_records(tmp_path / "local")
    assert sorted(remote) == list(range(1, STEPS + 1))
    for step, record in remote.items():
        assert record["loss"] == local[step]["loss"], step
    log = paths.read_text(f"{workdir}/train.log")
    assert log.count("--- start") == 2 and "resumed from checkpoint at step 2" in log
    assert json.loads(paths.read_text(f"{workdir}/summary.json"))["steps"] == STEPS
    assert not paths.exists(f"{workdir}/train.lock")
    events = paths.listdir(f"{workdir}/tensorboard")  # each start's, uploaded when it ended
    assert len(events) == 2 and all(name.startswith("events.out") for name in events)
    assert len(paths.listdir(f"{workdir}/data_cache")) >= 2  # a key directory and prepared/
    page = report.build_report(workdir)
    assert page == f"{workdir}/report/index.html" and "<html" in paths.read_text(page)
    out = tmp_path / "hf"
    assert export.main(["--workdir", workdir, "--out", str(out)]) == 0
    assert (out / "config.json").is_file()
    loaded = sft_jax.load(workdir)
    assert loaded.run.step == STEPS
