"""Test setup: 8 fake CPU devices, a fast-compiling XLA:CPU and a persistent compilation
cache, set before jax is imported anywhere.

Compiling dominates the suite's time (each test builds and jits its own tiny programs), so
XLA:CPU's LLVM code generation runs at optimisation level 0 (XLA_FLAGS), which about halves the
tests' compile time; the tests that read compiled memory figures and HLO text pass at either
level. XLA:CPU's older fusion code generation (xla_cpu_use_fusion_emitters=false) compiles the
tiny models' programs several times faster again than the MLIR fusion emitters, with the same
values in the tests. A value already set in XLA_FLAGS for either flag is kept.

The cache lets identical programs compile once per test session: each train run builds fresh
jitted functions, so JAX's in-memory cache misses, and subprocesses (the CLI tests) start empty.
Every program is cached, however quick its compile (JAX's default keeps only those over a second):
the tiny models' programs each compile in well under a second, and it is their number, rebuilt
test after test, that costs the time; reading one back is cheaper than compiling it again.
It lives in SFT_JAX_TEST_JAX_CACHE when set (.ci/run sets one directory for both of its pytest
steps and removes it), else in a new temporary directory that this process exports in
SFT_JAX_TEST_JAX_CACHE, so that pytest-xdist workers (started after this file is imported) and
subprocesses share it, and removes when the session ends.
"""

import os
import pathlib
import shutil
import tempfile

import pytest


def _with_xla_flag(flags: str, name: str, value: str, replace: bool) -> str:
    """XLA_FLAGS with `--name=value`: replacing the flag's value when `replace`, else added only
    when the flag is absent. Idempotent: pytest-xdist workers inherit the controller's
    environment and import this file again."""
    if f"--{name}=" in flags:
        if not replace:
            return flags
        flags = " ".join(f for f in flags.split() if not f.startswith(f"--{name}="))
    return f"{flags} --{name}={value}".strip()


_flags = os.environ.get("XLA_FLAGS", "")
_flags = _with_xla_flag(_flags, "xla_force_host_platform_device_count", "8", replace=True)
_flags = _with_xla_flag(_flags, "xla_backend_optimization_level", "0", replace=False)
_flags = _with_xla_flag(_flags, "xla_cpu_use_fusion_emitters", "false", replace=False)
os.environ["XLA_FLAGS"] = _flags
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_OWN_CACHE = not os.environ.get("SFT_JAX_TEST_JAX_CACHE")
if _OWN_CACHE:
    os.environ["SFT_JAX_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="sft_jax_jit_")
JAX_CACHE = os.environ["SFT_JAX_TEST_JAX_CACHE"]
# Environment variables rather than jax.config, so the subprocesses the tests start share it.
os.environ["JAX_COMPILATION_CACHE_DIR"] = JAX_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

REPO = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"
STORIES = REPO / "sft_jax" / "assets" / "stories260K"
SHARED_ASSETS = REPO.parent / "shared" / "assets"


@pytest.fixture(scope="session")
def stories_dir() -> pathlib.Path:
    return STORIES


@pytest.fixture(scope="session")
def small_train(tmp_path_factory) -> str:
    """300 rows of the bundled demo data: enough for the tiny config's short runs, and quick to
    tokenise in every run and subprocess that trains on it."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    lines = (REPO / "sft_jax" / "assets" / "demo" / "train.jsonl").read_text(encoding="utf-8")
    path.write_text("".join(lines.splitlines(keepends=True)[:300]), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
    return GOLDEN


@pytest.fixture(scope="session")
def shared_assets() -> pathlib.Path:
    if not SHARED_ASSETS.is_dir():
        pytest.skip(f"../shared/assets not found at {SHARED_ASSETS}")
    return SHARED_ASSETS


def pytest_sessionfinish(session, exitstatus) -> None:
    if _OWN_CACHE:
        shutil.rmtree(JAX_CACHE, ignore_errors=True)
