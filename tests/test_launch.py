"""Launchers: every one has a dry-run mode that prints the commands it would run."""

import os
import pathlib
import re
import shlex
import subprocess

import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
TRAIN = ["--", "--config", "configs/x.py", "--workdir", "/workdir/my run"]
GKE = ["launch/gke/submit.sh", "--name", "r1", "--image", "img:1", "--accelerator", "tpu-v5p-slice"]
GKE += ["--topology", "2x2x4", "--hosts", "4", "--pvc", "sft-workdir", "--dry-run"]


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
    assert "/workdir/my" in out.stdout and "/workdir/my run" not in out.stdout  # quoted
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


def _pod_spec(stdout):
    assert stdout.startswith("kubectl apply -f -\n")
    jobset = yaml.safe_load(stdout.split("\n", 1)[1])
    assert jobset["kind"] == "JobSet" and jobset["metadata"]["name"] == "r1"
    return jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]


def test_gke_dry_run_renders_jobset():
    out = run(*GKE, *TRAIN)
    assert out.returncode == 0, out.stderr
    assert "parallelism: 4" in out.stdout and "${" not in out.stdout and "#" not in out.stdout
    pod = _pod_spec(out.stdout)
    container = pod["spec"]["containers"][0]
    assert container["args"][:4] == ["--config", "configs/x.py", "--workdir", "/workdir/my run"]
    assert container["volumeMounts"] == [{"name": "workdir", "mountPath": "/workdir"}]
    assert pod["spec"]["volumes"][0]["persistentVolumeClaim"] == {"claimName": "sft-workdir"}
    assert "HF_TOKEN" not in out.stdout and pod["metadata"]["annotations"] == {}
    assert run("launch/gke/submit.sh", "--name", "r1", "--dry-run", *TRAIN).returncode == 2


def test_gke_token_secret_gcsfuse_and_literal_arguments():
    odd = (
        'a\\b & "c" ${NAME} ${PVC}'  # backslash, sed/bash replacement chars, quotes, a placeholder
    )
    train = ["--", "--config", odd, "--workdir=/mnt/w/x"]
    extra = ["--mount-path", "/mnt/w/", "--gcsfuse", "--hf-token-secret", "hf:tok"]
    out = run(*GKE, *extra, *train)
    assert out.returncode == 0, out.stderr
    pod = _pod_spec(out.stdout)
    container = pod["spec"]["containers"][0]
    assert container["args"][:3] == ["--config", odd, "--workdir=/mnt/w/x"]
    token = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "tok"}}}
    assert token in container["env"] and container["volumeMounts"][0]["mountPath"] == "/mnt/w"
    assert pod["metadata"]["annotations"] == {"gke-gcsfuse/volumes": "true"}


def test_gke_refuses_workdirs_the_pods_cannot_share():
    out = run(*GKE, "--", "--config", "c.py", "--workdir", "/tmp/run")
    assert out.returncode == 2 and "not under --mount-path /workdir" in out.stderr
    assert out.stdout == ""
    assert run(*GKE[:-3], "--dry-run", *TRAIN).returncode == 2  # no --pvc


def test_gs_workdirs_reach_every_host():
    """Every host writes a gs:// workdir through Cloud Storage itself: each launcher passes it
    to the trainer unchanged."""
    tpu = ["launch/tpu_vm.sh", "--name", "t1", "--zone", "z", "--type", "v5p-8", "--dry-run"]
    for args, env in [
        ([*tpu, "--", "--workdir", "gs://b/r"], None),
        ([*tpu, "--", "--workdir=gs://b/r"], None),
        ([*GKE, "--", "--config", "c.py", "--workdir", "gs://b/r"], None),
        (
            ["launch/slurm.sbatch", "--workdir", "gs://b/r"],
            {"DRY_RUN": "1", "PATH": "/usr/bin:/bin"},
        ),
    ]:
        out = run(*args, env=env)
        assert out.returncode == 0, (args, out.stderr)
        assert "gs://b/r" in out.stdout, args


def test_readme_dry_run_commands_still_work():
    """Every launcher's example in launch/README.md runs (in dry-run mode) and exits 0."""
    readme = (REPO / "launch" / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    launchers = {"tpu_vm.sh", "submit.sh", "slurm.sbatch", "local_multiprocess.sh"}
    seen = set()
    for command in commands:
        words = shlex.split(command)
        env = {"PATH": "/usr/bin:/bin"}
        while "=" in words[0]:
            key, value = words.pop(0).split("=", 1)
            env[key] = value
        if words[0] == "bash":
            words.pop(0)
        assert "--dry-run" in words or env.get("DRY_RUN") == "1", command
        out = run(*words, env=env)
        assert out.returncode == 0, (command, out.stderr)
        assert out.stdout.strip(), command
        seen.add(pathlib.Path(words[0]).name)
    assert seen == launchers


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


def test_local_multiprocess_exits_with_a_failing_process_code(tmp_path):
    """The launcher's exit code is the first non-zero one among its processes (it once returned
    0 because `if ! wait` leaves $? as the negation)."""
    env = {**os.environ, "PYTHON": "sh -c 'exit 7'", "LOG_DIR": str(tmp_path)}
    out = run("launch/local_multiprocess.sh", "-n", "2", "-d", "1", "--", "--config", "x", env=env)
    assert out.returncode == 7, out.stderr
