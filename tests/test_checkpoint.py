"""Checkpoints in-process: a corrupt or uncommitted latest step falls back to the previous one,
last-K plus best-K retention with rewinding to the best step, early stopping, and restore onto
other meshes and device counts (8 devices -> 1 -> (2, 2, 2)) with the same losses."""

import errno
import json
import os
import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sft_jax import paths
from sft_jax.config import parse
from sft_jax.config_file import load_config_file
from sft_jax.train import main, train_and_evaluate
from sft_jax.training import faults, preflight
from sft_jax.training.checkpoint import Checkpointer, storage_error
from sft_jax.training.metrics import read_metrics
from sft_jax.training.optim import make_schedule, schedule_change

REPO = pathlib.Path(__file__).resolve().parents[1]


def config(small_train: str, **overrides):
    raw = load_config_file(str(REPO / "configs" / "tiny.py"))
    raw.data.train_files = small_train
    raw.train.log_every = 1
    raw.train.max_steps = 8
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        raw[section][key] = value
    return parse(raw)


def losses(workdir, run: int | None = None) -> dict[int, float]:
    return {
        r["step"]: r["loss"]
        for r in read_metrics(str(workdir))
        if "loss" in r and "kind" not in r and (run is None or r["run"] == run)
    }


def step_dirs(workdir) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _flip_one_bit_of_one_saved_value(step_dir):
    """Bit rot that still decodes: one float of the saved embedding differs in its lowest bit.

    Written through TensorStore, so the step stays a valid (compressed) Orbax checkpoint and
    Orbax restores it without error; only the integrity sums can tell. Flipping a byte of the
    compressed files in place is not deterministic: where a byte lands depends on the write
    order, and in zstd framing it fails decoding instead (another error, not bit rot).
    """
    import tensorstore as ts

    spec = {
        "driver": "zarr",
        "kvstore": {
            "driver": "ocdbt",
            "base": f"file://{step_dir / 'state'}",
            "path": "params.embed.embedding/",
        },
    }
    array = ts.open(spec).result()
    bits = np.array(array.read().result()).view(np.uint32)
    bits[3, 5] ^= 0x01
    array.write(bits.view(np.float32)).result()
    altered = np.asarray(ts.open(spec).result().read().result())  # what a restore reads
    np.testing.assert_array_equal(altered.view(np.uint32), bits)
    assert np.isfinite(altered).all()


@pytest.fixture(scope="module")
def finished_run(small_train, tmp_path_factory) -> pathlib.Path:
    """An 8-step run with checkpoints at steps 4 and 8, trained once: each corruption test
    damages its own copy."""
    workdir = tmp_path_factory.mktemp("finished_run")
    train_and_evaluate(corruption_config(small_train), str(workdir))
    return workdir


def corruption_config(small_train: str):
    return config(small_train, checkpoint__every_steps=4, checkpoint__keep=3)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param("truncate_arrays", marks=pytest.mark.slow),
        "remove_commit_marker",
        "flip_one_bit",
    ],
)
def test_corrupt_latest_checkpoint_falls_back_to_previous(
    small_train, finished_run, tmp_path, capsys, damage
):
    shutil.copytree(finished_run, tmp_path, dirs_exist_ok=True)
    cfg = corruption_config(small_train)
    first = losses(tmp_path, run=0)
    latest = tmp_path / "checkpoints" / "8"
    if damage == "truncate_arrays":
        for root, _, files in os.walk(latest / "state"):
            for name in files:
                if "ocdbt.process" in root:
                    open(os.path.join(root, name), "w").close()  # truncate to 0 bytes
    elif damage == "flip_one_bit":
        _flip_one_bit_of_one_saved_value(latest)
    else:
        (latest / "commit_success.txt").unlink()
    capsys.readouterr()
    train_and_evaluate(cfg, str(tmp_path))
    out, err = capsys.readouterr()
    assert f"checkpoint {latest} cannot be restored" in err, err
    if damage == "flip_one_bit":
        assert "checksum mismatch" in err, err
    assert "resumed from checkpoint at step 4" in out  # the run's record is on stdout
    assert list((tmp_path / "checkpoints.corrupt").iterdir())  # moved aside, not deleted
    second = losses(tmp_path, run=1)
    assert sorted(second) == [5, 6, 7, 8]
    assert all(second[s] == first[s] for s in second)  # bitwise
    assert step_dirs(tmp_path) == [4, 8]


def test_keep_last_and_best_then_rewind(small_train, tmp_path):
    """keep=1 last + keep_best=2 by eval loss; rewind evaluates what is kept and names the best."""
    cfg = config(
        small_train,
        checkpoint__every_steps=2,
        checkpoint__keep=1,
        checkpoint__keep_best=2,
        checkpoint__rewind_to_best=True,
        optim__learning_rate=3e-2,  # high enough that late steps overshoot on held-out loss
    )
    summary = train_and_evaluate(cfg, str(tmp_path))
    evals = {r["step"]: r["eval_loss"] for r in read_metrics(str(tmp_path)) if "eval_loss" in r}
    assert sorted(evals) == [2, 4, 6, 8]
    best_two = sorted(evals, key=evals.get)[:2]
    assert step_dirs(tmp_path) == sorted({8, *best_two})
    kept = {int(k): v for k, v in summary["kept_eval_losses"].items()}
    assert sorted(kept) == step_dirs(tmp_path)
    for step, loss in kept.items():
        np.testing.assert_allclose(loss, evals[step], rtol=1e-6)
    assert summary["best_step"] == min(kept, key=kept.get)
    assert summary["best_eval_loss"] == kept[summary["best_step"]]
    # Rewinding ends in export: `--step best` picks the best kept checkpoint, not the last.
    from sft_jax.api import load_workdir
    from sft_jax.export import resolve_step

    best = resolve_step(str(tmp_path), "best")
    assert best == summary["best_step"]
    assert load_workdir(str(tmp_path), best).step == best


def test_early_stopping_on_eval_loss(small_train, tmp_path):
    """Skipped (NaN) steps leave the eval loss unchanged, so patience 2 stops after step 4."""
    cfg = config(
        small_train,
        eval__every_steps=1,
        eval__early_stopping_patience=2,
        faults__nan_at_step=3,
        faults__nan_steps=5,
        train__max_nonfinite_steps=10,
    )
    summary = train_and_evaluate(cfg, str(tmp_path))
    assert summary["stopped"] == "early_stopping"
    assert summary["steps"] == 4
    assert summary["best_periodic_eval"]["step"] == 2
    assert 4 in step_dirs(tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["stopped"] == "early_stopping"


def preempt_at(cfg_kwargs: dict, small_train: str, workdir, step: int, devices=None, **kw):
    """Runs in this process until a self-SIGTERM after `step` (exit 42's exception)."""
    cfg = config(small_train, faults__sigterm_at_step=step, **cfg_kwargs, **kw)
    with pytest.raises(faults.Preempted):
        train_and_evaluate(cfg, str(workdir))


@pytest.mark.slow  # the longest default test; CI's slow step runs it
def test_restore_onto_other_meshes_and_device_counts(small_train, tmp_path, monkeypatch):
    """8-device data mesh -> preempted at 2 -> 1 device -> preempted at 4 -> (2, 2, 2) mesh:
    every loss equals the uninterrupted 8-device run's within 1e-5."""
    common = {"checkpoint__every_steps": 0, "train__max_steps": 6}
    reference = tmp_path / "reference"
    train_and_evaluate(config(small_train, **common), str(reference))
    workdir = tmp_path / "moved"
    preempt_at(common, small_train, workdir, 2)

    make_mesh = preflight.sharding.make_mesh
    one_device = lambda cfg: make_mesh(cfg, jax.devices()[:1])
    monkeypatch.setattr(preflight.sharding, "make_mesh", one_device)
    preempt_at(common, small_train, workdir, 4, mesh__data=1)
    monkeypatch.setattr(preflight.sharding, "make_mesh", make_mesh)

    train_and_evaluate(
        config(small_train, mesh__data=2, mesh__fsdp=2, mesh__tensor=2, **common), str(workdir)
    )
    starts = [r for r in read_metrics(str(workdir)) if r.get("kind") == "start"]
    assert [s["resumed_from"] for s in starts] == [0, 2, 4]
    expected, got = losses(reference), losses(workdir)
    assert sorted(got) == sorted(expected) == list(range(1, 7))
    np.testing.assert_allclose(
        [got[s] for s in range(1, 7)], [expected[s] for s in range(1, 7)], rtol=1e-5
    )


# ----------------------------------------------------------------------------- storage failures


def _flags(small_train: str, workdir) -> list[str]:
    return [
        "train",
        "--config",
        str(REPO / "configs" / "tiny.py"),
        "--workdir",
        str(workdir),
        f"--config.data.train_files={small_train}",
        "--config.data.eval_files=",  # no evaluation: only saves matter here
        "--config.train.max_steps=4",
        "--config.checkpoint.every_steps=2",
    ]


def test_full_disk_at_a_save_exits_44_keeps_checkpoints_and_resumes(
    small_train, tmp_path, capsys, monkeypatch
):
    """ENOSPC while saving step 4, the last (the write is monkeypatched to fail): one line saying
    how far the run got and where a restart resumes, exit 44; step 2 is kept and the rerun
    resumes from it."""
    original = ocp.CheckpointManager.save

    def full_disk(self, step, *args, **kwargs):
        if step == 4:
            raise OSError(errno.ENOSPC, "No space left on device", f"{self.directory}/4")
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    code = main(_flags(small_train, tmp_path))
    err = capsys.readouterr().err
    assert code == 44, err
    assert "error: the checkpoint of step 4 could not be written: ENOSPC: No space left" in err
    assert "Trained to step 4" in err and "it resumes from step 2 (exit 44)" in err, err
    assert "Traceback" not in err
    assert step_dirs(tmp_path) == [2]
    assert not (tmp_path / "train.lock").exists()

    # The rerun also raises max_steps: resuming then warns that the schedule is re-stretched.
    monkeypatch.setattr(ocp.CheckpointManager, "save", original)
    assert main([*_flags(small_train, tmp_path), "--config.train.max_steps=6"]) == 0
    starts = [r for r in read_metrics(str(tmp_path)) if r.get("kind") == "start"]
    assert [s["resumed_from"] for s in starts] == [0, 2]
    err = capsys.readouterr().err
    assert "warning: resuming at step 2 of 4 with 6 steps instead of 4" in err, err


def test_schedule_change_says_what_changes():
    """Raising max_steps after a finished 100-step run: the cosine had reached its floor at step
    100; over 200 steps the rate at step 101 is back near the middle of the decay."""
    cfg = config("unused.jsonl").optim
    assert schedule_change(cfg, 100, 100, 100) is None and schedule_change(cfg, None, 9, 1) is None
    assert schedule_change(cfg, 100, 80, 100) is None  # nothing left to train
    message = schedule_change(cfg, 100, 200, 100)
    old, new = float(make_schedule(cfg, 100)(100)), float(make_schedule(cfg, 200)(100))
    assert new > 5 * old  # the floor (end_lr_ratio) vs about the middle of the cosine
    assert message.startswith("resuming after it finished with 200 steps instead of 100")
    assert f"rate at step 101 becomes {new:.3g} instead of {old:.3g}" in message


def test_unwritable_checkpoint_directory_fails_in_preflight(
    small_train, tmp_path, capsys, monkeypatch
):
    """A resumed run whose checkpoints/ cannot be written fails before compute (exit 2), not
    at its first save. As root permissions do not bind, so the write is refused by a patched
    open; elsewhere the directory really is read-only."""
    (tmp_path / "checkpoints").mkdir()
    if os.geteuid() == 0:
        real_open = open

        def read_only(path, *args, **kwargs):
            if "checkpoints" in str(path):
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(paths, "open", read_only, raising=False)  # shadows the builtin
    else:
        os.chmod(tmp_path / "checkpoints", 0o555)
    try:
        code = main(_flags(small_train, tmp_path))
    finally:
        os.chmod(tmp_path / "checkpoints", 0o755)
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"checkpoint directory '{tmp_path}/checkpoints' is not writable" in err
    assert not (tmp_path / "metrics.jsonl").exists()


def test_asynchronous_save_failure_surfaces_once_as_save_failed(tmp_path):
    """An asynchronous save fails in Orbax's thread and shows at the next wait, as TensorStore's
    ValueError with an os_error_code; it becomes SaveFailed once, and close() then does not
    raise it again (that would hide the first report). Other errors stay errors."""
    checkpointer = Checkpointer(str(tmp_path), keep=2, async_save=True)
    tensorstore = ValueError(
        'RESOURCE_EXHAUSTED: Error writing "params/0" in OCDBT database: Failed to write 77 '
        "bytes to file 20: No space left on device [os_error_code='28']"
    )

    def fails(*args, **kwargs):
        raise tensorstore

    checkpointer._manager.wait_until_finished = fails
    with pytest.raises(faults.SaveFailed, match="ENOSPC") as info:
        checkpointer.wait()
    assert info.value.committed is None and "starts from step 0" in str(info.value)
    checkpointer.close()
    assert storage_error(RuntimeError("shape mismatch")) is None
    assert storage_error(PermissionError(errno.EACCES, "Permission denied", "x")).startswith(
        "EACCES"
    )


def test_resume_refuses_changed_adapter_settings_naming_each_key():
    """lora.alpha and lora.rslora change no shape: a checkpoint restored under new values used
    to continue silently at another adapter scale. Shape-changing keys (rank, enabled) failed
    the restore with an orbax tree/shape message; all are now named before any restore."""
    from sft_jax.config import ConfigError, to_dict
    from sft_jax.training.train_setup import check_adapters_unchanged

    raw = load_config_file("configs/demo_lora.py")
    saved = json.loads(json.dumps(to_dict(parse(raw))))  # as the checkpoint stores it
    check_adapters_unchanged(saved, parse(raw))  # the same run resumes (tuples vs lists)
    raw.lora.alpha, raw.lora.rank = 8.0, 4
    with pytest.raises(ConfigError, match=r"lora\.rank was 16, now 4; lora\.alpha was 32\.0"):
        check_adapters_unchanged(saved, parse(raw))
    raw = load_config_file("configs/demo.py")
    full = json.loads(json.dumps(to_dict(parse(raw))))
    raw.lora.rank = 4  # adapters off before and now: their keys do not matter
    check_adapters_unchanged(full, parse(raw))
    raw.lora.enabled = True
    with pytest.raises(ConfigError, match=r"lora\.enabled was False, now True"):
        check_adapters_unchanged(full, parse(raw))


def test_resume_with_another_model_path_warns_naming_both(capsys):
    """A resumed run whose model.path differs from the latest checkpoint's warns once naming
    both paths, and still resumes: a workdir moved to another machine has another absolute
    path for the same model."""
    from sft_jax.config import to_dict
    from sft_jax.training import train_setup

    raw = load_config_file("configs/demo.py")
    raw.model.path = "/old/place/model"
    saved = json.loads(json.dumps(to_dict(parse(raw))))
    assert train_setup.model_path_change(saved, parse(raw)) is None
    assert train_setup.model_path_change({}, parse(raw)) is None  # no config saved with it

    class Saved:  # the latest committed checkpoint, as `restore` asks for it
        def committed_steps(self):
            return [4]

        def saved_config(self, step):
            return saved

        def restore_latest(self, state, shardings):
            return None

    raw.model.path = "/new/place/model"
    capsys.readouterr()
    train_setup.restore(Saved(), "state", None, None, parse(raw), steps=8)
    err = capsys.readouterr().err
    assert err.count("warning: model.path was '/old/place/model'") == 1, err
    assert "now '/new/place/model'; resuming anyway" in err
