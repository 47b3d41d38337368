"""Multi-process start-up: detection, the platform guard, and two real processes = one."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from sft_jax.config import ConfigError, DistributedSection
from sft_jax.training.distributed import check_platform, detected_cluster, initialize_distributed

REPO = pathlib.Path(__file__).resolve().parents[1]


def section(**kw) -> DistributedSection:
    values = dict(
        coordinator_address="",
        num_processes=0,
        process_id=-1,
        initialization_timeout_s=10,
        expected_platform="",
    )
    values.update(kw)
    return DistributedSection(**values)


@pytest.mark.parametrize(
    "env,expected",
    [
        ({}, None),
        ({"SLURM_NTASKS": "1"}, None),
        ({"SLURM_NTASKS": "4"}, "SLURM_NTASKS"),
        ({"TPU_WORKER_HOSTNAMES": "a,b"}, "TPU_WORKER_HOSTNAMES"),
        ({"JOBSET_NAME": "r"}, "JOBSET_NAME"),
    ],
)
def test_cluster_detection(monkeypatch, env, expected):
    for name in (
        "SLURM_NTASKS",
        "OMPI_COMM_WORLD_SIZE",
        "TPU_WORKER_HOSTNAMES",
        "JOBSET_NAME",
        "JAX_COORDINATOR_ADDRESS",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert detected_cluster() == expected


def test_single_process_is_not_initialised(monkeypatch):
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    assert initialize_distributed(section()) is False
    assert initialize_distributed(section(num_processes=1, coordinator_address="x:1")) is False


def test_explicit_coordinator_needs_count_and_index():
    with pytest.raises(ConfigError, match="process_id"):
        initialize_distributed(section(coordinator_address="localhost:1", num_processes=2))


def test_platform_guard():
    check_platform("")
    check_platform("cpu")
    with pytest.raises(ConfigError, match="expected_platform is 'tpu'"):
        check_platform("tpu")


def losses(workdir: pathlib.Path, key: str = "loss") -> dict[int, float]:
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    """2 processes x 2 CPU devices (gloo collectives), each reading only its data shard, give the
    losses and eval loss of 1 process x 4 devices holding both shards (data.shards=2)."""
    args = [
        "--config",
        "configs/tiny.py",
        "--config.train.max_steps=6",
        "--config.train.log_every=2",
        "--config.eval.every_steps=0",
    ]
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    single = subprocess.run(
        [
            sys.executable,
            "-m",
            "sft_jax.train",
            *args,
            "--config.data.shards=2",
            "--workdir",
            str(tmp_path / "one"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run(
        [
            "bash",
            "launch/local_multiprocess.sh",
            "-n",
            "2",
            "-d",
            "2",
            "-p",
            "12391",
            "--",
            *args,
            "--workdir",
            str(tmp_path / "two"),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHON": sys.executable, "LOG_DIR": str(tmp_path / "logs")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    logs = "".join(p.read_text()[-2000:] for p in sorted((tmp_path / "logs").glob("*.log")))
    assert multi.returncode == 0, logs
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [2, 4, 6]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5)
    one_eval, two_eval = (
        losses(tmp_path / "one", "eval_loss"),
        losses(tmp_path / "two", "eval_loss"),
    )
    assert sorted(one_eval) == sorted(two_eval) and 6 in one_eval  # the final eval, at least
    for step in one_eval:
        assert two_eval[step] == pytest.approx(one_eval[step], rel=1e-5)
