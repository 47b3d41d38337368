"""The planning command: exact parameter bytes per device, clear errors."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from sft_jax import hf
from sft_jax.config import load_config_file, parse
from sft_jax.model import Transformer
from sft_jax.plan import plan
from sft_jax.sharding import make_mesh
from sft_jax.state import init_params


@pytest.mark.parametrize("mesh", [(1, 8, 1), (2, 2, 2), (8, 1, 1)])
def test_param_bytes_equal_real_sharded_arrays(mesh):
    raw = load_config_file("configs/tiny.py")
    raw.mesh.data, raw.mesh.fsdp, raw.mesh.tensor = mesh
    config = parse(raw)
    result = plan(config, devices=8, device_memory_gib=1.0)
    model_config = hf.build_model_config(config.model)
    params = init_params(
        Transformer(model_config), "", make_mesh(config.mesh), config.mesh.rules, 0
    )
    device0 = jax.devices()[0]
    real = sum(
        s.data.nbytes
        for leaf in jax.tree.leaves(params)
        for s in leaf.addressable_shards
        if s.device == device0
    )
    assert result["param_bytes"] == real
    assert result["parameters"] == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert result["optimizer_bytes"] == 2 * real and result["fits"]


def test_remat_shrinks_the_activation_estimate():
    raw = load_config_file("configs/tiny.py")
    sizes = {}
    for remat in ("none", "dots", "full"):
        raw.model.remat = remat
        sizes[remat] = plan(parse(raw), 8, 1.0)["activation_bytes_estimate"]
    assert sizes["none"] > sizes["dots"] > sizes["full"] > 0


def test_cli_reports_fit_and_rejects_impossible_mesh():
    base = [sys.executable, "-m", "sft_jax.plan", "--config", "configs/tiny.py"]
    ok = subprocess.run([*base, "--devices", "8"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "FITS" in ok.stdout and "parameters" in ok.stdout
    bad = subprocess.run(
        [*base, "--devices", "6", "--config.mesh.fsdp=4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "mesh" in bad.stderr and "Traceback" not in bad.stderr
