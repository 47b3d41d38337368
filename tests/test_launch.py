"""Launchers: every one has a dry-run mode that prints the commands it would run."""

import pathlib
import subprocess

REPO = pathlib.Path(__file__).resolve().parents[1]
TRAIN = ["--", "--config", "configs/x.py", "--workdir", "gs://bucket/my run"]


def run(*args, env=None):
    return subprocess.run(
        ["bash", *args], capture_output=True, text=True, cwd=REPO, timeout=30, env=env
    )


def test_tpu_vm_dry_run_prints_lifecycle():
    out = run(
        "launch/tpu_vm.sh",
        "--name",
        "t1",
        "--zone",
        "us-east5-a",
        "--type",
        "v5p-32",
        "--dry-run",
        *TRAIN,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("gcloud compute tpus tpu-vm create t1")
    assert any("--worker=all" in line and "sft_jax.train" in line for line in lines)
    assert "gs://bucket/my" in out.stdout and "gs://bucket/my run" not in out.stdout  # quoted
    assert lines[-1].startswith("gcloud compute tpus tpu-vm delete t1")


def test_tpu_vm_queued_and_missing_arguments():
    out = run(
        "launch/tpu_vm.sh",
        "--name",
        "t1",
        "--zone",
        "z",
        "--type",
        "v5e-16",
        "--queued",
        "--keep",
        "--dry-run",
        *TRAIN,
    )
    assert "queued-resources create t1" in out.stdout and "delete" not in out.stdout
    assert run("launch/tpu_vm.sh", "--name", "t1", "--dry-run").returncode == 2


def test_gke_dry_run_renders_jobset():
    out = run(
        "launch/gke/submit.sh",
        "--name",
        "r1",
        "--image",
        "img:1",
        "--accelerator",
        "tpu-v5p-slice",
        "--topology",
        "2x2x4",
        "--hosts",
        "4",
        "--dry-run",
        *TRAIN,
    )
    assert out.returncode == 0, out.stderr
    assert "kind: JobSet" in out.stdout and "parallelism: 4" in out.stdout
    assert '"--config", "configs/x.py"' in out.stdout and "${" not in out.stdout
    assert run("launch/gke/submit.sh", "--name", "r1", "--dry-run", *TRAIN).returncode == 2


def test_slurm_dry_run_prints_srun():
    out = run(
        "launch/slurm.sbatch",
        "--config",
        "configs/x.py",
        "--workdir",
        "/w",
        env={"DRY_RUN": "1", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("srun --kill-on-bad-exit=1 python -m sft_jax.train --config")


def test_local_multiprocess_dry_run():
    out = run(
        "launch/local_multiprocess.sh",
        "--dry-run",
        "-n",
        "3",
        "-d",
        "2",
        "--",
        "--config",
        "configs/tiny.py",
        "--workdir",
        "/tmp/x",
    )
    lines = out.stdout.splitlines()
    assert len(lines) == 3
    assert all("--config.distributed.num_processes=3" in line for line in lines)
    assert "process_id=2" in lines[2] and "device_count=2" in lines[0]
