"""Two real processes (jax.distributed on CPU) training in one gs:// workdir, against the local GCS
emulator of test_paths: both train, only process 0 writes the workdir's files and holds the lock,
Orbax writes the checkpoints into the bucket, and both killed and restarted resume from there."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest
from test_faults import starts, train_records
from test_paths import gcs, gcs_host  # noqa: F401 (gcs: the emulator fixture)

from sft_jax import paths

REPO = pathlib.Path(__file__).resolve().parents[1]
BUCKET = "gs://test"
ARGS = (
    "--config",
    "configs/tiny.py",
    "--config.train.max_steps=8",
    "--config.train.log_every=1",
    "--config.eval.every_steps=0",
    "--config.checkpoint.every_steps=2",
    "--config.checkpoint.async_save=False",
    "--config.data.shards=2",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(workdir: str, logs: pathlib.Path, *extra: str) -> list[subprocess.Popen]:
    """Process 0 and 1 of one run, as launch/local_multiprocess.sh starts them, still running."""
    port = _free_port()
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        # Orbax writes arrays with TensorStore, which reaches the emulator through these.
        "TENSORSTORE_GCS_HTTP_URL": f"http://{gcs_host()}",
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
    }
    logs.mkdir(parents=True, exist_ok=True)
    processes = []
    for i in range(2):
        command = [
            sys.executable,
            "-m",
            "sft_jax.train",
            *ARGS,
            *extra,
            "--workdir",
            workdir,
            f"--config.distributed.coordinator_address=localhost:{port}",
            "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={i}",
        ]
        log = open(logs / f"process_{i}.log", "w")  # noqa: SIM115 (the child holds it)
        processes.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=log))
        log.close()
    return processes


def _wait(processes: list[subprocess.Popen], logs: pathlib.Path) -> list[int]:
    codes = []
    for p in processes:
        try:
            codes.append(p.wait(timeout=600))
        except subprocess.TimeoutExpired:
            for q in processes:
                q.kill()
            raise AssertionError(_tails(logs)) from None
    return codes


def _tails(logs: pathlib.Path) -> str:
    return "".join(p.read_text()[-3000:] for p in sorted(logs.glob("*.log")))


@pytest.mark.slow
@pytest.mark.usefixtures("gcs")
def test_two_processes_train_and_resume_in_a_gcs_workdir(tmp_path):
    workdir = f"{BUCKET}/run"
    logs = tmp_path / "logs"
    killed = _two_processes(workdir, logs / "killed", "--config.faults.kill_at_step=5")
    codes = _wait(killed, logs / "killed")
    assert all(code != 0 for code in codes), _tails(logs / "killed")
    # The kill left process 0's lock object behind (SIGKILL releases nothing).
    holder = json.loads(paths.read_text(f"{workdir}/train.lock"))
    assert holder["pid"] == killed[0].pid and holder["host"] == socket.gethostname()
    steps = paths.listdir(f"{workdir}/checkpoints")
    assert "4" in steps, steps  # Orbax wrote the checkpoints into the bucket

    finished = _two_processes(workdir, logs / "finished")
    assert _wait(finished, logs / "finished") == [0, 0], _tails(logs / "finished")
    assert not paths.exists(f"{workdir}/train.lock")  # recovered, then released
    # One start record per start, one record per step: process 1 wrote none of them (its writes
    # would have replaced the objects, or doubled the records).
    assert [s["resumed_from"] for s in starts(workdir)] == [0, 4]
    assert sorted(train_records(workdir, run=1)) == [5, 6, 7, 8]
    metrics = paths.read_text(f"{workdir}/metrics.jsonl").splitlines()
    step_records = [json.loads(x) for x in metrics]
    step_records = [r for r in step_records if "loss" in r and "kind" not in r]
    assert len(step_records) == len({(r["run"], r["step"]) for r in step_records})
    log = paths.read_text(f"{workdir}/train.log")
    assert log.count("--- start") == 2 and "resumed from checkpoint at step 4" in log
    assert json.loads(paths.read_text(f"{workdir}/summary.json"))["steps"] == 8
    assert "8" in paths.listdir(f"{workdir}/checkpoints")
    for i in range(2):  # both processes trained to the end
        assert "Traceback" not in (logs / "finished" / f"process_{i}.log").read_text()
