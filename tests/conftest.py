"""Test setup: 8 fake CPU devices and a persistent compilation cache, set before jax is
imported anywhere.

The cache lets identical programs compile once per test session: each train run builds fresh
jitted functions, so JAX's in-memory cache misses, and subprocesses (the CLI tests) start empty.
It lives in SFT_JAX_TEST_JAX_CACHE when set (.ci/run sets one directory for both of its pytest
steps and removes it), else in a new temporary directory removed when the session ends.
"""

import os
import pathlib
import shutil
import tempfile

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_OWN_CACHE = not os.environ.get("SFT_JAX_TEST_JAX_CACHE")
JAX_CACHE = os.environ.get("SFT_JAX_TEST_JAX_CACHE") or tempfile.mkdtemp(prefix="sft_jax_jit_")
# Environment variables rather than jax.config, so the subprocesses the tests start share it.
os.environ["JAX_COMPILATION_CACHE_DIR"] = JAX_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"

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
