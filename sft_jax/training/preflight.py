"""Preflight: everything about a config that can be checked before any compute.

Each check raises ConfigError with a message naming the key and the problem; `train.main` turns
that into exit code 2 with nothing trained. Value ranges are checked when the config is parsed
(sft_jax/config.py); what needs the filesystem or the devices is checked here.
"""

from __future__ import annotations

import glob
import os
import socket

import jax

from sft_jax import hf, paths
from sft_jax.config import Config, ConfigError
from sft_jax.data.mixture import parse_mixture
from sft_jax.data.source import DataError
from sft_jax.model.splash_attention import SPLASH_BLOCK
from sft_jax.training import sharding
from sft_jax.workdir import CONFIG_FILE, is_workdir


def check_workdir(workdir: str) -> None:
    """Fails before compute when the workdir cannot be created or written.

    The probe file is named per host and process: every process of a multi-process run probes
    the same shared workdir at the same moment, and a shared name let one process delete another's
    probe mid-check (a spurious "not writable" that left the other processes waiting forever).
    A workdir in an object store (gs://bucket/run) is probed the same way, through sft_jax.paths.
    A directory whose config.json is not a training run's (an export, the base model) is refused
    before the lock or any file is written: the run would overwrite that config.json with its
    own and leave the model unloadable.
    """
    try:
        _check_not_a_model_dir(workdir)
        paths.makedirs(workdir)
        _probe_write(workdir)
    except (OSError, ImportError) as e:  # ImportError: no fsspec backend (pip install gcsfs)
        raise ConfigError(f"workdir '{workdir}' is not writable: {e}") from e
    checkpoints = paths.join(workdir, "checkpoints")
    if paths.isdir(checkpoints):  # a resumed run saves there: find out now, not at step N
        try:
            _probe_write(checkpoints)
        except OSError as e:
            raise ConfigError(f"checkpoint directory '{checkpoints}' is not writable: {e}") from e


def _check_not_a_model_dir(workdir: str) -> None:
    """ConfigError when `workdir` holds a config.json that a training run did not write."""
    if not paths.isfile(paths.join(workdir, CONFIG_FILE)):
        return
    try:
        ours = is_workdir(workdir)
    except hf.ModelFileError as e:
        message = f"workdir '{workdir}' holds a config.json that is not a run's: {e}"
        raise ConfigError(message) from None
    if not ours:
        raise ConfigError(
            f"workdir '{workdir}' holds a Hugging Face model's config.json (an export or a model "
            "directory), which training would overwrite; choose another --workdir"
        )


def _probe_write(directory: str) -> None:
    """Creates and removes a file in `directory` (OSError when the file system refuses)."""
    probe = paths.join(directory, f".write_probe.{socket.gethostname()}.{os.getpid()}")
    paths.write_text(probe, "ok")
    paths.remove(probe)


def check_model(config: Config) -> None:
    """The model directory's config.json and safetensors headers (no tensor data) are read
    here, so that a broken or truncated model fails in one line before the data is tokenised.
    The weights themselves load later, into their shardings."""
    if not config.model.path:
        return
    try:
        hf.check_checkpoint(config.model.path, hf.build_model_config(config.model))
    except (hf.ModelFileError, hf.UnsupportedModelError) as e:
        raise ConfigError(str(e)) from None


def check_inputs(config: Config) -> None:
    """Model directory, tokenizer directory and data files exist (before data is read)."""
    model_path = config.model.path
    if model_path and not os.path.isfile(os.path.join(model_path, "config.json")):
        what = "has no config.json" if os.path.isdir(model_path) else "does not exist"
        raise ConfigError(f"model.path '{model_path}' {what} (a local Hugging Face model dir)")
    tokenizer = config.data.tokenizer
    if tokenizer and not os.path.isdir(tokenizer):
        raise ConfigError(f"data.tokenizer '{tokenizer}' is not a directory")
    for key in ("train_files", "eval_files"):
        files = getattr(config.data, key)
        if not files.strip():
            continue
        try:
            entries = parse_mixture(files)
        except DataError as e:
            raise ConfigError(f"data.{key}: {e}") from e
        for pattern, _weight in entries:
            if not _matches(pattern):
                raise ConfigError(f"data.{key}: '{pattern}' matches no file or directory")


def _matches(pattern: str) -> bool:
    """Whether a data pattern names an existing file or directory, or its glob matches any."""
    if not paths.is_url(pattern):
        return os.path.exists(pattern) or bool(glob.glob(pattern, recursive=True))
    wildcard = any(c in pattern for c in "*?[")
    return paths.exists(pattern) or (wildcard and bool(paths.glob_files(pattern)))


def check_batch_layout(config: Config, mesh: jax.sharding.Mesh) -> None:
    """The global and eval batches must split evenly into micro-batches, devices and processes."""
    check_train_batch(config, mesh)
    shards = sharding.batch_shards(mesh, config.mesh.rules)
    if config.eval.batch_size % shards:
        raise ConfigError(
            f"eval.batch_size={config.eval.batch_size} must be a multiple of the "
            f"{shards} batch shards"
        )


def check_train_batch(config: Config, mesh: jax.sharding.Mesh) -> None:
    """The global batch must split evenly into micro-batches, devices and processes (the
    benchmark, which runs no evaluation, checks only this)."""
    shards = sharding.batch_shards(mesh, config.mesh.rules)
    per_micro = config.train.global_batch_size // config.train.micro_batches
    if per_micro % shards or config.train.global_batch_size % jax.process_count():
        raise ConfigError(
            f"train.global_batch_size={config.train.global_batch_size} with "
            f"train.micro_batches={config.train.micro_batches} gives {per_micro} rows per "
            f"micro-batch, which must be a multiple of the {shards} batch shards of the mesh"
        )


def check_attention(config: Config, mesh: jax.sharding.Mesh) -> None:
    """An explicit `model.attention="splash"` must be able to run: on TPU devices, over rows its
    128-token blocks tile (otherwise the failure surfaces deep inside the first trace)."""
    if config.model.attention != "splash":
        return
    platform = mesh.devices.flat[0].platform
    if platform != "tpu":
        raise ConfigError(
            f"model.attention='splash' is a TPU kernel, but the mesh's devices are {platform}; "
            "use model.attention='auto'"
        )
    if config.data.seq_len % SPLASH_BLOCK:
        raise ConfigError(
            f"model.attention='splash' needs data.seq_len a multiple of {SPLASH_BLOCK}, got "
            f"{config.data.seq_len}"
        )


def check_faults(config: Config) -> None:
    """Fault injection that could not do what it says is a config error, not a silent no-op."""
    if config.faults.kill_during_save and not config.checkpoint.async_save:
        raise ConfigError(
            "faults.kill_during_save needs checkpoint.async_save=True (a synchronous save has "
            "committed before the kill)"
        )


def run(config: Config, workdir: str) -> jax.sharding.Mesh:
    """All preflight checks, in order of cost; returns the device mesh they validated."""
    check_workdir(workdir)
    check_inputs(config)
    check_model(config)
    check_faults(config)
    sharding.check_rules(config.mesh.rules)
    mesh = sharding.make_mesh(config.mesh)
    check_batch_layout(config, mesh)
    check_attention(config, mesh)
    return mesh
