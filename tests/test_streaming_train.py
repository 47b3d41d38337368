"""data.streaming end to end: a streamed run preempted (SIGTERM, exit 42) and restarted writes
bitwise the training records of an uninterrupted streamed run, its data order included; two
streaming processes killed and restarted train like one uninterrupted process."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from test_faults import STEPS, assert_bitwise, starts, train_process, train_records

REPO = pathlib.Path(__file__).resolve().parents[1]
STREAM = (
    "--config.data.streaming=True",
    "--config.data.pack_window=32",
    "--config.data.stream_buffer=64",
)


@pytest.mark.slow
def test_preempted_streamed_run_resumes_bitwise(small_train, tmp_path):
    reference_dir = tmp_path / "reference"
    uninterrupted = train_process(small_train, reference_dir, *STREAM)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    reference = train_records(reference_dir)
    assert sorted(reference) == list(range(1, STEPS + 1))

    workdir = tmp_path / "run"
    preempted = train_process(small_train, workdir, *STREAM, "--config.faults.sigterm_at_step=5")
    assert preempted.returncode == 42, preempted.stderr[-3000:]
    finished = train_process(small_train, workdir, *STREAM)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert [s["resumed_from"] for s in starts(workdir)] == [0, 5]
    assert sorted(train_records(workdir, run=1)) == list(range(6, STEPS + 1))
    assert_bitwise(train_records(workdir, run=0), reference)
    assert_bitwise(train_records(workdir, run=1), reference)


def _losses(workdir) -> dict[int, float]:
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r and "kind" not in r}


@pytest.mark.slow
def test_two_streaming_processes_resume_like_one_uninterrupted(tmp_path):
    """2 processes stream their own shard, are killed after step 5 (checkpoint 4) and restarted:
    the checkpoint's data state gathers both processes' shard positions, so steps 5-8 of the
    restart have the losses of one uninterrupted process streaming both shards."""
    args = [
        "--config",
        "configs/tiny.py",
        "--config.train.max_steps=8",
        "--config.train.log_every=1",
        "--config.eval.every_steps=0",
        "--config.checkpoint.every_steps=2",
        "--config.checkpoint.async_save=False",
        "--config.data.shards=2",
        *STREAM,
    ]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    single = subprocess.run(
        [sys.executable, "-m", "sft_jax.train", *args, "--workdir", str(tmp_path / "one")],
        cwd=REPO,
        env={**env, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]

    def two(*extra: str) -> subprocess.CompletedProcess:
        command = ["bash", "launch/local_multiprocess.sh", "-n", "2", "-d", "2", "-p", "12397"]
        return subprocess.run(
            [*command, "--", *args, *extra, "--workdir", str(tmp_path / "two")],
            cwd=REPO,
            env={**os.environ, "PYTHON": sys.executable, "LOG_DIR": str(tmp_path / "logs")},
            capture_output=True,
            text=True,
            timeout=600,
        )

    def logs() -> str:
        return "".join(p.read_text()[-2000:] for p in sorted((tmp_path / "logs").glob("*.log")))

    killed = two("--config.faults.kill_at_step=5")
    assert killed.returncode != 0, logs()
    finished = two()
    assert finished.returncode == 0, logs()
    assert [s["resumed_from"] for s in starts(tmp_path / "two")] == [0, 4]
    one, resumed = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(one) == list(range(1, 9)) and {5, 6, 7, 8} <= set(resumed)
    for step in one:
        assert resumed[step] == pytest.approx(one[step], rel=1e-5), step
