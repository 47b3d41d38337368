"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"
STORIES = REPO / "sft_jax" / "assets" / "stories260K"
SHARED_ASSETS = REPO.parent / "shared" / "assets"


@pytest.fixture(scope="session")
def stories_dir() -> pathlib.Path:
    return STORIES


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
    return GOLDEN


@pytest.fixture(scope="session")
def shared_assets() -> pathlib.Path:
    if not SHARED_ASSETS.is_dir():
        pytest.skip(f"../shared/assets not found at {SHARED_ASSETS}")
    return SHARED_ASSETS
