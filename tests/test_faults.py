"""Faults driven through real processes and signals: SIGKILL, a kill during an asynchronous save,
SIGTERM (exit 42), non-finite losses (skip, then exit 43), and preflight errors (exit 2).

Resume is checked bitwise: every training record (loss, grad_norm, learning_rate) that a
restarted process wrote equals the uninterrupted run's record of the same step. Records of each
process start are told apart by their `run` field (0 for the first start).
"""

import importlib.util
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from sft_jax import config as config_lib
from sft_jax.config_file import load_config_file
from sft_jax.data.mixture import parse_mixture
from sft_jax.data.source import DataError
from sft_jax.train import main
from sft_jax.training import preflight
from sft_jax.training.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
STORIES = REPO / "sft_jax" / "assets" / "stories260K"
COMPARED = ("loss", "grad_norm", "learning_rate", "loss_tokens")
STEPS = 10


def flags(small_train: str, workdir, *extra: str) -> list[str]:
    return [
        "--config",
        str(REPO / "configs" / "tiny.py"),
        "--workdir",
        str(workdir),
        f"--config.data.train_files={small_train}",
        f"--config.train.max_steps={STEPS}",
        "--config.train.log_every=1",
        "--config.checkpoint.every_steps=2",
        "--config.checkpoint.async_save=True",
        *extra,
    ]


def train_process(small_train: str, workdir, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}  # 1 CPU device, fast start
    return subprocess.run(
        [sys.executable, "-m", "sft_jax.train", *flags(small_train, workdir, *extra)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def train_records(workdir, run: int | None = None) -> dict[int, dict]:
    records = [r for r in read_metrics(str(workdir)) if "loss" in r and "kind" not in r]
    return {r["step"]: r for r in records if run is None or r["run"] == run}


def starts(workdir) -> list[dict]:
    return [r for r in read_metrics(str(workdir)) if r.get("kind") == "start"]


def assert_bitwise(records: dict[int, dict], reference: dict[int, dict]) -> None:
    assert records
    for step, record in records.items():
        for key in COMPARED:
            assert record[key] == reference[step][key], (step, key, record, reference[step])


@pytest.fixture(scope="module")
def reference(small_train, tmp_path_factory) -> dict[int, dict]:
    workdir = tmp_path_factory.mktemp("reference")
    result = train_process(small_train, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    records = train_records(workdir)
    assert sorted(records) == list(range(1, STEPS + 1))
    return records


@pytest.mark.slow
def test_sigkill_then_sigterm_then_finish_is_bitwise_identical(small_train, reference, tmp_path):
    """SIGKILL after step 5 (last committed checkpoint 4, or 2), restart; SIGTERM after step 7
    saves step 7 and exits 42; restart finishes. Every step after each restore equals the
    uninterrupted run."""
    killed = train_process(small_train, tmp_path, "--config.faults.kill_at_step=5")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(train_records(tmp_path, run=0)) == [1, 2, 3, 4, 5]

    preempted = train_process(small_train, tmp_path, "--config.faults.sigterm_at_step=7")
    assert preempted.returncode == 42, preempted.stderr[-3000:]
    assert "preempted at step 7" in preempted.stderr
    assert (tmp_path / "checkpoints" / "7").is_dir()  # saved at the current step, off-schedule

    finished = train_process(small_train, tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]

    resumed = [s["resumed_from"] for s in starts(tmp_path)]
    # The step-4 save is asynchronous: the kill after step 5 may land before it commits.
    assert resumed[0] == 0 and resumed[1] in (2, 4) and resumed[2] == 7, resumed
    assert sorted(train_records(tmp_path, run=1)) == list(range(resumed[1] + 1, 8))
    assert sorted(train_records(tmp_path, run=2)) == [8, 9, 10]
    assert_bitwise(train_records(tmp_path, run=0), reference)
    assert_bitwise(train_records(tmp_path, run=1), reference)
    assert_bitwise(train_records(tmp_path, run=2), reference)


@pytest.mark.slow
def test_kill_during_async_save_restarts_from_last_committed(small_train, reference, tmp_path):
    """SIGKILL right after the step-5 save started: that save never commits, so the restart
    resumes from the last committed step and matches the uninterrupted run."""
    killed = train_process(
        small_train,
        tmp_path,
        "--config.faults.kill_at_step=5",
        "--config.faults.kill_during_save=True",
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    committed = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert "5" not in committed, committed

    finished = train_process(small_train, tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    resumed = [s["resumed_from"] for s in starts(tmp_path)]
    assert resumed[0] == 0 and resumed[1] in (2, 4), resumed  # step 4's save may be in flight too
    assert sorted(train_records(tmp_path, run=1)) == list(range(resumed[1] + 1, STEPS + 1))
    assert_bitwise(train_records(tmp_path, run=1), reference)
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir() if "tmp" in p.name]
    assert not leftovers  # the half-written step was cleaned up


# ----------------------------------------------------------------------------- in-process CLI


def test_nonfinite_steps_are_skipped_then_abort_with_43(small_train, tmp_path, capsys):
    """NaN from step 3 on: steps 3 and 4 are skipped (parameters untouched), step 5 is the third
    in a row and the run stops with 43. The step-4 checkpoint holds the step-2 parameters."""
    code = main(
        [
            "train",
            *flags(small_train, tmp_path, "--config.faults.nan_at_step=3"),
            "--config.faults.nan_steps=100",
            "--config.train.max_nonfinite_steps=3",
        ]
    )
    assert code == 43
    assert "3 steps in a row had a non-finite loss" in capsys.readouterr().err
    records = train_records(tmp_path)
    assert [records[s]["nonfinite"] for s in (1, 2, 3, 4, 5)] == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert records[4]["skipped_steps"] == 2
    assert records[4]["learning_rate"] == records[3]["learning_rate"]  # the optimizer did not move
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 4]  # nothing saved at or after the abort


def test_nonfinite_skip_consumes_batch_and_keeps_params(small_train, tmp_path, monkeypatch):
    """Two NaN steps (below the limit): the run finishes, counts them, and step 5 (the first
    good step after them) sees the same parameters as step 3 would have. The workdir lock is
    held during the steps and released at the end."""
    from sft_jax.training import faults

    held = _spy_on_lock(monkeypatch, faults.FaultInjector, "after_step", tmp_path)
    code = main(
        [
            "train",
            *flags(small_train, tmp_path, "--config.faults.nan_at_step=3"),
            "--config.faults.nan_steps=2",
            "--config.train.max_steps=6",
        ]
    )
    assert code == 0
    assert held == [True] * 6 and not (tmp_path / "train.lock").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["skipped_steps"] == 2 and summary["steps"] == 6
    records = train_records(tmp_path)
    assert records[3]["loss"] == "nan" and records[4]["loss"] == "nan"
    assert records[5]["learning_rate"] == records[3]["learning_rate"]


@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.data.tokenizer=/nonexistent/tok", "data.tokenizer '/nonexistent/tok'"),
        ("--config.model.path=/nonexistent/model", "model.path '/nonexistent/model'"),
        ("--config.data.eval_files=/nonexistent/*.jsonl", "data.eval_files"),
        (
            "--config.data.eval_files=/nonexistent/a.jsonl:0.7,/nonexistent/b.jsonl:0.3",
            "data.eval_files: '/nonexistent/a.jsonl' matches no file",
        ),
        (
            "--config.data.eval_files=/nonexistent/a.jsonl:abc",
            "data file weight 'abc' in '/nonexistent/a.jsonl:abc' is not a number",
        ),
        ("--config.mesh.fsdp=3", "mesh (data, fsdp, tensor)"),
        ("--config.checkpoint.keep=0", "checkpoint.keep"),
        ("--config.train.max_nonfinite_steps=0", "train.max_nonfinite_steps"),
        ("--config.checkpoint.async_save=False", "faults.kill_during_save needs"),
    ],
)
def test_preflight_errors_exit_2_before_compute(small_train, tmp_path, capsys, override, message):
    extra = [override]
    if "async_save" in override:
        extra += ["--config.faults.kill_at_step=2", "--config.faults.kill_during_save=True"]
    code = main(["train", *flags(small_train, tmp_path / "w"), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err
    assert not (tmp_path / "w" / "checkpoints").exists()
    assert not (tmp_path / "w" / "metrics.jsonl").exists()


def test_unwritable_workdir_exits_2(small_train, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code = main(["train", *flags(small_train, blocker / "w")])
    assert code == 2
    assert "is not writable" in capsys.readouterr().err


def test_url_workdir_without_its_backend_exits_2(small_train, tmp_path, capsys):
    """An object-store workdir goes through sft_jax.paths; without the store's fsspec package
    preflight stops (exit 2) naming the workdir and what to install, with nothing written."""
    if importlib.util.find_spec("s3fs") is not None:
        pytest.skip("s3fs is installed: the probe would reach for S3")
    code = main(["train", *flags(small_train, "s3://bucket/run")])
    assert code == 2
    err = capsys.readouterr().err
    assert "workdir 's3://bucket/run' is not writable" in err and "s3fs" in err
    assert not os.path.exists("s3:")


def test_weighted_mixture_passes_preflight(small_train, tmp_path):
    """Preflight checks each file of 'a:0.9,b:0.1' without its weight (it used to look for a
    file literally named 'a:0.9')."""
    raw = load_config_file(str(REPO / "configs" / "tiny.py"))
    raw.data.train_files = f"{small_train}:0.9,{small_train}:0.1"
    preflight.check_inputs(config_lib.parse(raw))
    preflight.check_workdir(str(tmp_path / "w"))
    assert os.listdir(tmp_path / "w") == []


def test_colon_in_an_existing_file_name_is_not_a_weight(tmp_path):
    (tmp_path / "run:v2.jsonl").write_text("{}\n", encoding="utf-8")
    files = f"{tmp_path}/run:v2.jsonl"
    assert parse_mixture(files) == [(files, None)]
    with pytest.raises(DataError, match="weight 'x2' in"):
        parse_mixture(f"{tmp_path}/run:x2")


def _broken_model(model_dir: pathlib.Path, damage: str) -> str:
    """A copy of the bundled stories260K model with one defect -> the file named in the error."""
    shutil.copytree(STORIES, model_dir)
    config_file, weights = model_dir / "config.json", model_dir / "model.safetensors"
    raw = json.loads(config_file.read_text())
    if damage == "config_not_json":
        config_file.write_text(config_file.read_text()[:-20], encoding="utf-8")
    elif damage == "config_field_missing":
        del raw["num_hidden_layers"]
        config_file.write_text(json.dumps(raw), encoding="utf-8")
    elif damage == "config_field_wrong_type":
        raw["hidden_size"] = "64"
        config_file.write_text(json.dumps(raw), encoding="utf-8")
    elif damage == "weights_truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return str(weights)
    elif damage == "weights_header_cut":
        weights.write_bytes(weights.read_bytes()[:100])
        return str(weights)
    return str(config_file)


@pytest.mark.parametrize(
    "damage,message",
    [
        ("config_not_json", "not valid JSON"),
        ("config_field_missing", "required field 'num_hidden_layers' is missing"),
        ("config_field_wrong_type", "field 'hidden_size' must be a positive integer"),
        ("weights_truncated", "truncated: its header describes"),
        ("weights_header_cut", "truncated or not a safetensors file"),
    ],
)
def test_broken_model_directory_exits_2_in_one_line(small_train, tmp_path, capsys, damage, message):
    """Found in preflight, before the data is read: exit 2, one line naming the file."""
    path = _broken_model(tmp_path / "model", damage)
    code = main(
        ["train", *flags(small_train, tmp_path / "w", f"--config.model.path={tmp_path}/model")]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    line = next(x for x in err.splitlines() if x.startswith("error:"))
    assert path in line and message in line, err
    assert "Traceback" not in err
    assert not (tmp_path / "w" / "metrics.jsonl").exists()


def test_overflowing_update_is_not_reported_as_skipped(small_train, tmp_path):
    """A learning rate that is inf in float32 (validation now refuses it; set here behind its
    back) makes step 1's update non-finite although its loss and gradients were finite. The
    save at step 1 refuses the state, and the message says what happened: no step was skipped."""
    import dataclasses

    from sft_jax.train import train_and_evaluate
    from sft_jax.training import faults

    raw = load_config_file(str(REPO / "configs" / "tiny.py"))
    raw.data.train_files = small_train
    raw.data.eval_files = ""  # no evaluation: the abort is all this test needs
    raw.checkpoint.every_steps = 1
    raw.optim.warmup_steps = 0
    config = config_lib.parse(raw)
    config = dataclasses.replace(
        config, optim=dataclasses.replace(config.optim, learning_rate=1e39)
    )
    with pytest.raises(faults.NonFiniteAbort) as info:
        train_and_evaluate(config, str(tmp_path))
    message = str(info.value)
    assert "aborting at step 1: the parameters or optimizer state became non-finite" in message
    assert "skipped" not in message
    assert not (tmp_path / "checkpoints" / "1").exists()


@pytest.mark.slow
def test_preflight_error_via_real_cli(small_train, tmp_path):
    result = train_process(small_train, tmp_path / "w", "--config.data.tokenizer=/nonexistent/tok")
    assert result.returncode == 2
    assert "error: data.tokenizer '/nonexistent/tok' is not a directory" in result.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()


# ----------------------------------------------------------------------------- workdir lock

HOLDER = """
import sys, time
from sft_jax.training.workdir_lock import WorkdirLock
WorkdirLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(300)
"""


@pytest.fixture
def lock_holder():
    """Starts a real process that takes a workdir's lock and keeps it (killed at teardown)."""
    processes = []

    def start(workdir) -> subprocess.Popen:
        os.makedirs(workdir, exist_ok=True)
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
        process = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(workdir)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        processes.append(process)
        assert process.stdout.readline().strip() == "held"
        return process

    yield start
    for process in processes:
        process.kill()
        process.wait()


def test_second_start_on_a_busy_workdir_is_refused(small_train, tmp_path, capsys, lock_holder):
    holder = lock_holder(tmp_path / "w")
    code = main(["train", *flags(small_train, tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"host {socket.gethostname()}, pid {holder.pid}" in err, err
    assert "is in use by another training run" in err and "train.lock" in err
    assert sorted(os.listdir(tmp_path / "w")) == ["train.lock"]  # nothing written or deleted
    assert json.loads((tmp_path / "w" / "train.lock").read_text())["pid"] == holder.pid


def _spy_on_lock(monkeypatch, target, name: str, workdir) -> list[bool]:
    """Wraps target.name to record whether the workdir lock file exists when it is called."""
    seen, original = [], getattr(target, name)

    def spy(*args, **kwargs):
        seen.append((workdir / "train.lock").exists())
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, spy)
    return seen


def test_lock_of_a_killed_run_is_recovered_and_released_on_exit_2(
    small_train, tmp_path, capsys, monkeypatch, lock_holder
):
    """SIGKILL leaves the lock file; its pid is dead, so the next start takes it over, holds it
    while reading data, and removes it on the way out (here: exit 2 on a malformed row)."""
    from sft_jax import data as data_lib

    workdir = tmp_path / "w"
    holder = lock_holder(workdir)
    holder.kill()
    holder.wait()
    assert (workdir / "train.lock").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{not json\n', encoding="utf-8")
    seen = _spy_on_lock(monkeypatch, data_lib, "prepare_data", workdir)
    code = main(["train", *flags(small_train, workdir, f"--config.data.train_files={bad}")])
    err = capsys.readouterr().err
    assert code == 2 and seen == [True], err
    host = socket.gethostname()
    assert f"recovered the stale workdir lock of host {host}, pid {holder.pid}" in err, err
    assert not (workdir / "train.lock").exists()


def test_lock_is_released_on_preemption(small_train, tmp_path, monkeypatch):
    from sft_jax.training import faults

    seen = _spy_on_lock(monkeypatch, faults.FaultInjector, "after_step", tmp_path)
    code = main(["train", *flags(small_train, tmp_path, "--config.faults.sigterm_at_step=1")])
    assert code == 42 and seen == [True]
    assert not (tmp_path / "train.lock").exists()
    assert (tmp_path / "checkpoints" / "1").is_dir()


def _other_host_lock(path) -> None:
    info = {"host": "another-host", "pid": 1, "token": "theirs", "since": "earlier"}
    path.write_text(json.dumps(info), encoding="utf-8")


def test_lock_of_another_host_is_taken_over_only_when_its_heartbeat_stops(tmp_path):
    """Another host's processes cannot be probed: a lock that does not change for stale_s is
    taken over; one that is touched (the holder's heartbeat) refuses the start."""
    import threading

    from sft_jax.training.workdir_lock import WorkdirBusyError, WorkdirLock

    path = tmp_path / "train.lock"
    _other_host_lock(path)
    stop = threading.Event()

    def heartbeat():
        while not stop.wait(0.05):
            os.utime(path)

    beating = threading.Thread(target=heartbeat)
    beating.start()
    try:
        with pytest.raises(WorkdirBusyError, match=r"another-host.*its heartbeat is live"):
            WorkdirLock(str(tmp_path), stale_s=5, poll_s=0.02).acquire()
    finally:
        stop.set()
        beating.join()
    lock = WorkdirLock(str(tmp_path), stale_s=0.3, poll_s=0.02, heartbeat_s=0.05)
    lock.acquire()
    assert json.loads(path.read_text())["token"] == lock.token
    before = path.stat().st_mtime_ns
    deadline = time.monotonic() + 5
    while path.stat().st_mtime_ns == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert path.stat().st_mtime_ns != before  # our own heartbeat
    lock.release()
    assert not path.exists()


def test_lock_with_a_reused_pid_is_stale(tmp_path):
    """Same host, pid alive but started at another time (a restarted container reusing the
    pid): the holder is gone."""
    from sft_jax.training.workdir_lock import WorkdirLock

    if not os.path.exists(f"/proc/{os.getppid()}/stat"):
        pytest.skip("needs /proc")
    info = {"host": socket.gethostname(), "pid": os.getppid(), "pid_start": "1", "token": "old"}
    (tmp_path / "train.lock").write_text(json.dumps(info), encoding="utf-8")
    lock = WorkdirLock(str(tmp_path))
    lock.acquire()
    lock.release()
    info["pid_start"] = None  # no start time recorded: a live pid keeps it
    (tmp_path / "train.lock").write_text(json.dumps(info), encoding="utf-8")
    with pytest.raises(config_lib.ConfigError, match="is running on this host"):
        WorkdirLock(str(tmp_path)).acquire()
