"""Mesh construction and the logical-axis rules table."""

import jax
import pytest

from configs import base
from sft_jax.config import ConfigError, MeshSection
from sft_jax.sharding import batch_shards, logical_to_spec, make_mesh

RULES = tuple(tuple(r) for r in base.get_config().mesh.rules)


def mesh_cfg(data, fsdp, tensor) -> MeshSection:
    return MeshSection(data=data, fsdp=fsdp, tensor=tensor, rules=RULES)


def test_mesh_fills_minus_one():
    assert jax.device_count() == 8
    mesh = make_mesh(mesh_cfg(-1, 2, 2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert batch_shards(mesh, RULES) == 4


@pytest.mark.parametrize("sizes", [(3, -1, 1), (2, 2, 1), (-1, -1, 1), (0, 8, 1)])
def test_impossible_mesh_fails_clearly(sizes):
    with pytest.raises(ConfigError, match="mesh"):
        make_mesh(mesh_cfg(*sizes))


def test_rules_shard_only_divisible_dims():
    mesh = make_mesh(mesh_cfg(1, 4, 2))
    spec = logical_to_spec(("vocab", "embed"), (512, 64), mesh, RULES)
    assert tuple(spec) == ("tensor", "fsdp")
    spec = logical_to_spec(("vocab", "embed"), (511, 6), mesh, RULES)
    assert tuple(spec) == (None, None)
    spec = logical_to_spec(("batch", "seq"), (8, 16), mesh, RULES)
    assert tuple(spec) == (("data", "fsdp"), None)
