"""Mesh construction and the logical-axis rules table."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from helpers import tiny_model_config

from configs import base
from sft_jax.config import ConfigError, MeshSection
from sft_jax.model.decoder import Transformer
from sft_jax.training.sharding import (
    LOGICAL_AXES,
    activation_sharding,
    batch_shards,
    check_rules,
    logical_to_spec,
    make_mesh,
)

RULES = tuple(tuple(r) for r in base.get_config().mesh.rules)


def mesh_cfg(data, fsdp, tensor) -> MeshSection:
    return MeshSection(data=data, fsdp=fsdp, tensor=tensor, rules=RULES)


def test_mesh_fills_minus_one():
    assert jax.device_count() == 8
    mesh = make_mesh(mesh_cfg(-1, 2, 2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "context": 1, "tensor": 2}
    assert batch_shards(mesh, RULES) == 4


@pytest.mark.parametrize("sizes", [(3, -1, 1), (2, 2, 1), (-1, -1, 1), (0, 8, 1)])
def test_impossible_mesh_fails_clearly(sizes):
    with pytest.raises(ConfigError, match="mesh"):
        make_mesh(mesh_cfg(*sizes))


def test_rules_shard_only_divisible_dims():
    mesh = make_mesh(mesh_cfg(1, 4, 2))
    spec = logical_to_spec(("vocab", "embed"), (512, 64), mesh, RULES)
    assert tuple(spec) == ("tensor", ("fsdp", "context"))  # context is 1 here
    spec = logical_to_spec(("vocab", "embed"), (511, 6), mesh, RULES)
    assert tuple(spec) == (None, None)
    spec = logical_to_spec(("batch", "seq"), (8, 16), mesh, RULES)
    assert tuple(spec) == (("data", "fsdp"), None)


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ((*RULES[:-1], ("seq", "tensr")), r"'seq' maps to unknown mesh axis 'tensr' .*'tensor'"),
        ((*RULES[:1], ("vocab", ("data", "fsdpp")), *RULES[2:]), r"did you mean 'fsdp'"),
        (tuple(r if r[0] != "embed" else ("embd", "fsdp") for r in RULES), r"did you mean 'embed'"),
        ((*RULES, ("vocab", None)), r"'vocab' is given twice"),
        (RULES[:-1], r"no entry for \['seq'\]"),
        ((*RULES[:-1], "seq"), r"'seq' is not a \(logical, axes\) pair"),
    ],
)
def test_rule_typos_fail_before_compute(rules, message):
    """A typo in config.mesh.rules used to surface mid-setup as a bare KeyError (exit 1)."""
    with pytest.raises(ConfigError, match=message):
        check_rules(rules)


def test_a_rule_table_written_before_the_expert_axis_keeps_experts_replicated():
    """Rule tables in users' configs and saved workdirs predate the expert axis: accepted, and
    the expert dimension stays whole."""
    old = tuple(r for r in RULES if r[0] != "expert")
    check_rules(old)
    mesh = make_mesh(mesh_cfg(-1, 2, 2))
    assert tuple(logical_to_spec(("expert", "embed"), (8, 16), mesh, old)) == (
        None,
        ("fsdp", "context"),
    )


def test_rule_names_cover_every_logical_axis_of_the_model():
    """LOGICAL_AXES is what check_rules demands: it must list every name the weights carry."""
    model = Transformer(tiny_model_config(num_layers=2))
    boxed = jax.eval_shape(
        lambda: model.init(jax.random.key(0), *(jnp.zeros((1, 8), jnp.int32),) * 3)
    )
    names = {n for spec in jax.tree.leaves(nn.get_partition_spec(boxed)) for n in spec if n}
    assert names and names <= set(LOGICAL_AXES)
    check_rules(RULES)


def test_a_hand_built_mesh_without_some_axis_takes_the_default_rules():
    """API users build meshes by hand: one without the context axis (which the default rules
    shard weights over) shards as if that axis had size 1."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, PartitionSpec

    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(1, 4, 2), ("data", "fsdp", "tensor"))
    assert tuple(logical_to_spec(("vocab", "embed"), (512, 64), mesh, RULES)) == ("tensor", "fsdp")
    assert tuple(logical_to_spec(("batch", "seq"), (8, 16), mesh, RULES)) == (
        ("data", "fsdp"),
        None,
    )
    want = PartitionSpec(("data", "fsdp"), None, None)
    assert activation_sharding(mesh, RULES).spec == want
    assert batch_shards(mesh, RULES) == 4
