"""Faults driven through real processes and signals: SIGKILL, a kill during an asynchronous save,
SIGTERM (exit 42), non-finite losses (skip, then exit 43), and preflight errors (exit 2).

Resume is checked bitwise: every training record (loss, grad_norm, learning_rate) that a
restarted process wrote equals the uninterrupted run's record of the same step. Records of each
process start are told apart by their `run` field (0 for the first start).
"""

import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest

from sft_jax import config as config_lib
from sft_jax import preflight
from sft_jax.metrics import read_metrics
from sft_jax.train import main

REPO = pathlib.Path(__file__).resolve().parents[1]
TRAIN_FILE = REPO / "sft_jax" / "assets" / "demo" / "train.jsonl"
COMPARED = ("loss", "grad_norm", "learning_rate", "loss_tokens")
STEPS = 10


@pytest.fixture(scope="module")
def small_train(tmp_path_factory) -> str:
    """300 demo rows: enough for 10 steps, and quick to tokenise in every subprocess."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    lines = TRAIN_FILE.read_text(encoding="utf-8").splitlines(keepends=True)[:300]
    path.write_text("".join(lines), encoding="utf-8")
    return str(path)


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


def test_nonfinite_skip_consumes_batch_and_keeps_params(small_train, tmp_path):
    """Two NaN steps (below the limit): the run finishes, counts them, and step 5 (the first
    good step after them) sees the same parameters as step 3 would have."""
    code = main(
        [
            "train",
            *flags(small_train, tmp_path, "--config.faults.nan_at_step=3"),
            "--config.faults.nan_steps=2",
            "--config.train.max_steps=6",
        ]
    )
    assert code == 0
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


def test_url_workdir_is_refused_with_the_fix(small_train, tmp_path, capsys):
    code = main(["train", *flags(small_train, "gs://bucket/run")])
    assert code == 2
    err = capsys.readouterr().err
    assert "workdir 'gs://bucket/run' is a URL" in err and "gcsfuse" in err
    assert not os.path.exists("gs:")


def test_weighted_mixture_passes_preflight(small_train, tmp_path):
    """Preflight checks each file of 'a:0.9,b:0.1' without its weight (it used to look for a
    file literally named 'a:0.9')."""
    raw = config_lib.load_config_file(str(REPO / "configs" / "tiny.py"))
    raw.data.train_files = f"{small_train}:0.9,{small_train}:0.1"
    preflight.check_inputs(config_lib.parse(raw))
    preflight.check_workdir(str(tmp_path / "w"))
    assert os.listdir(tmp_path / "w") == []


@pytest.mark.slow
def test_preflight_error_via_real_cli(small_train, tmp_path):
    result = train_process(small_train, tmp_path / "w", "--config.data.tokenizer=/nonexistent/tok")
    assert result.returncode == 2
    assert "error: data.tokenizer '/nonexistent/tok' is not a directory" in result.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()
