"""Multi-process start-up: `jax.distributed` initialisation and the accelerator guard.

Every host runs the same command. When several processes take part, `jax.distributed.initialize`
must run before anything touches devices, so `python -m sft_jax.train` calls
`initialize_distributed` first. Where the cluster says how many processes there are (Cloud TPU
VMs, SLURM, GKE/Kubernetes JobSets, Open MPI), JAX's own cluster detection fills in the
coordinator, process count and index; elsewhere the config names them explicitly.

On an accelerator host JAX silently falls back to CPU when the TPU is held by another process or
the GPU plugin is missing; `check_platform` turns that into an error before any compute.
"""

from __future__ import annotations

import os

import jax

from sft_jax.config import ConfigError, DistributedSection

# Environment variables whose presence means a multi-process launcher started us.
_CLUSTER_MARKERS = {
    "SLURM_NTASKS": lambda v: int(v) > 1,
    "OMPI_COMM_WORLD_SIZE": lambda v: int(v) > 1,
    "TPU_WORKER_HOSTNAMES": lambda v: "," in v,  # Cloud TPU VM slice of several hosts
    "JOBSET_NAME": lambda v: bool(v),  # GKE JobSet
    "JAX_COORDINATOR_ADDRESS": lambda v: bool(v),
}


def detected_cluster() -> str | None:
    """Name of the environment variable that marks a multi-process launch, if any."""
    for name, is_multi in _CLUSTER_MARKERS.items():
        value = os.environ.get(name)
        if value:
            try:
                if is_multi(value):
                    return name
            except ValueError:
                continue
    return None


def initialize_distributed(cfg: DistributedSection) -> bool:
    """Initialises jax.distributed when this is a multi-process run; returns whether it did.

    Explicit settings (coordinator_address, num_processes, process_id) win over detection.
    `initialization_timeout_s` bounds the wait for the other hosts, so one dead host fails the
    job with a message instead of hanging it.
    """
    if cfg.num_processes == 1:
        return False
    explicit = bool(cfg.coordinator_address)
    if not explicit and detected_cluster() is None:
        return False
    if explicit and (cfg.num_processes < 1 or cfg.process_id < 0):
        raise ConfigError(
            "distributed.coordinator_address is set, so distributed.num_processes (>= 1) and "
            "distributed.process_id (>= 0) must be set too"
        )
    kwargs: dict = {"initialization_timeout": cfg.initialization_timeout_s}
    if explicit:
        kwargs.update(
            coordinator_address=cfg.coordinator_address,
            num_processes=cfg.num_processes,
            process_id=cfg.process_id,
        )
    jax.distributed.initialize(**kwargs)
    return True


def check_platform(expected: str) -> None:
    """Fails unless the default backend is `expected` ("" accepts anything)."""
    if not expected:
        return
    actual = jax.default_backend()
    if actual != expected:
        raise ConfigError(
            f"distributed.expected_platform is '{expected}' but JAX is running on '{actual}' "
            f"({len(jax.devices())} devices). On a TPU VM this usually means another process "
            "holds the TPU; on a GPU host that the CUDA plugin (jax[cuda12]) is missing. "
            "Set --config.distributed.expected_platform='' to allow it."
        )
