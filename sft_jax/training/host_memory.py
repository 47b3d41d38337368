"""Host allocator settings for XLA:CPU: keep freed memory instead of handing it back every step.

Why: XLA:CPU allocates each step's temporaries as one block, and glibc serves a block that large
with mmap and returns it with munmap when the step ends. The next step then page-faults the whole
block in again, and the kernel zeroes every page, so a large share of the step's CPU time goes to
the kernel. With glibc told to keep freed memory (one arena, no mmap for large blocks, no
trimming), the block is reused from the heap: the same losses, faster steps (measured, with the
command, in docs/benchmarks.md, "Figures behind design choices").

Costs: the process keeps its peak host memory (freed blocks stay in the heap for reuse, as a
caching allocator's would), and every thread shares one malloc arena. Neither matters on a CPU
training run, whose memory peak is the step's; on a GPU or TPU host the step's memory lives on the
device, so "auto" leaves the allocator alone there.

The settings must be made before JAX starts its CPU backend: the backend's threads take their own
malloc arenas when they first allocate, and later settings do not move them. So only the command
line entry points (sft_jax.train, sft_jax.bench) call `configure_host_allocator`, first thing.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import pkgutil
import platform
import sys

MODES = ("auto", "retain", "system")
# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_NEVER_TRIM = 2**31 - 1  # bytes of free heap top kept before trimming (an int: mallopt's type)


def accelerator_plugins() -> list[str]:
    """Installed JAX accelerator backends (PJRT plugins, libtpu), found without starting JAX."""
    names = [entry.name for entry in importlib.metadata.entry_points(group="jax_plugins")]
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        names += [m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)]
    if importlib.util.find_spec("libtpu") is not None:
        names.append("libtpu")
    return sorted(set(names))


def runs_on_cpu(expected_platform: str) -> bool:
    """Whether this process's JAX will run on the CPU, judged before any backend starts:
    `expected_platform` (distributed.expected_platform) or JAX_PLATFORMS says so, or no
    accelerator backend is installed."""
    if expected_platform:
        return expected_platform == "cpu"
    requested = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if requested:
        return requested.split(",")[0] == "cpu"
    return not accelerator_plugins()


def _backends_started() -> bool:
    """True once JAX has created its backends (too late for the settings to reach its threads)."""
    try:
        from jax._src import xla_bridge
    except ImportError:
        return False
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started and started())


def configure_host_allocator(mode: str, expected_platform: str = "") -> str:
    """Applies `mode` (train.host_allocator) and returns what was done, for the log.

    "retain": glibc keeps freed memory for reuse (see the module docstring); "system": the
    allocator is left as it is; "auto": "retain" when the run is on the CPU (`runs_on_cpu`).
    Where the settings cannot apply (not Linux with glibc, or JAX's backend already started) the
    allocator is left alone and the returned text says why.
    """
    if mode not in MODES:
        raise ValueError(f"host allocator mode {mode!r}; choose one of {MODES}")
    if mode == "system" or (mode == "auto" and not runs_on_cpu(expected_platform)):
        return "system allocator"
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return f"system allocator (retaining needs Linux with glibc; this is {sys.platform})"
    if _backends_started():
        return "system allocator (JAX's backend had already started; settings would not apply)"
    libc = ctypes.CDLL("libc.so.6")
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM))
    if not all(libc.mallopt(param, value) == 1 for param, value in settings):
        return "system allocator (glibc refused the mallopt settings)"
    return "retaining host allocator (glibc: one arena, no mmap, no trim)"
