"""The TrainState's one description: `state_layout(spec)` is exactly what
`create_train_state(spec)` builds, and the memory plan and the compile check read that layout
(the frozen LoRA base, KL-to-base's reference copy)."""

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from sft_jax.config import parse
from sft_jax.config_file import load_config_file
from sft_jax.plan import plan
from sft_jax.planning import plan_check
from sft_jax.training.sharding import make_mesh
from sft_jax.training.state import StateSpec, create_train_state, state_layout


def _config(mesh=(2, 2, 2), kl_to_base=0.0, **lora):
    raw = load_config_file("configs/tiny.py")
    raw.mesh.data, raw.mesh.fsdp, raw.mesh.tensor = mesh
    raw.train.kl_to_base = kl_to_base
    raw.lora.rank = 4
    for key, value in lora.items():
        setattr(raw.lora, key, value)
    return parse(raw)


CASES = {
    "full": {},
    "lora": {"enabled": True, "modules_to_save": ("embed_tokens",)},
    "qlora": {"enabled": True, "base_quant": "nf4", "dora": True, "modules_to_save": ("norm",)},
    "kl_to_base": {"kl_to_base": 0.1},
}


def _leaves(tree):
    return jax.tree.leaves(tree)


def _model(apply_fn):
    """The Transformer an apply_fn runs: LoRA's `LoraApply.model`, else the bound module."""
    return apply_fn.model if hasattr(apply_fn, "model") else apply_fn.__self__


def _device0_bytes(tree):
    device0 = jax.devices()[0]
    return sum(
        s.data.nbytes
        for leaf in jax.tree.leaves(tree)
        for s in leaf.addressable_shards
        if s.device == device0
    )


@pytest.mark.parametrize(
    "case",
    # Plain LoRA in the slow tier: qlora runs the same frozen-base layout and adds NF4 and DoRA.
    [pytest.param(c, marks=pytest.mark.slow) if c == "lora" else c for c in CASES],
    ids=list(CASES),
)
def test_layout_is_the_materialised_state(case):
    """Same tree (apply_fn and tx included), and every leaf's shape, dtype and sharding; the
    shardings returned with the state are the layout's."""
    config = _config(**CASES[case])
    spec = StateSpec.from_config(config, None, make_mesh(config.mesh), 10)
    layout = state_layout(spec)
    state, shardings = create_train_state(spec)
    # apply_fn: the same model (a bound method equals only one of the very same module).
    assert _model(layout.apply_fn) == _model(state.apply_fn)
    without_apply = lambda s: jax.tree.structure(s.replace(apply_fn=None))
    assert without_apply(layout) == without_apply(state)
    for want, got in zip(_leaves(layout), _leaves(state), strict=True):
        assert (want.shape, want.dtype) == (got.shape, got.dtype)
        assert want.sharding == got.sharding, (want.sharding, got.sharding)
    assert _leaves(shardings) == [x.sharding for x in _leaves(layout)]
    assert (state.frozen is not None) == (case in ("lora", "qlora"))
    assert (state.reference is not None) == (case == "kl_to_base")
    if case == "qlora":  # the frozen layer kernels are NF4 codes + scales, sharded
        codes = [x for x in _leaves(layout.frozen) if x.dtype == np.uint8]
        assert codes and any(x.sharding.spec != jax.sharding.PartitionSpec() for x in codes)
    if case == "kl_to_base":  # the reference is a separate copy of the initial parameters
        for p, r in zip(_leaves(state.params), _leaves(state.reference), strict=True):
            np.testing.assert_array_equal(np.asarray(p), np.asarray(r))
            assert p is not r
        result = plan(config, devices=8, device_memory_gib=1.0)
        assert result["reference_bytes"] == _device0_bytes(state.reference) > 0


@pytest.mark.parametrize("case", ["full", "qlora", "kl_to_base"])
def test_layout_needs_no_devices(case):
    """On an AbstractMesh (the plan's) the layout has the same shapes and specs as on devices."""
    config = _config(**CASES[case])
    on_devices = state_layout(StateSpec.from_config(config, None, make_mesh(config.mesh), 2))
    abstract_mesh = AbstractMesh((2, 2, 1, 2), ("data", "fsdp", "context", "tensor"))
    abstract = state_layout(StateSpec.from_config(config, None, abstract_mesh, 2))
    arrays = lambda s: jax.tree.structure(s.replace(apply_fn=None, tx=None))  # two optimizers
    assert arrays(abstract) == arrays(on_devices)
    for a, d in zip(_leaves(abstract), _leaves(on_devices), strict=True):
        assert (a.shape, a.dtype, a.sharding.spec) == (d.shape, d.dtype, d.sharding.spec)
        assert a.sharding.mesh is abstract_mesh


def test_plan_counts_the_reference_copy_only_when_kl_to_base_keeps_one():
    """kl_to_base > 0 under full fine-tuning adds one parameter-sized term to the total; off, or
    under LoRA (where the frozen base is the reference), it adds nothing."""
    off = plan(_config(kl_to_base=0.0), 8, 1.0)
    on = plan(_config(kl_to_base=0.1), 8, 1.0)
    assert off["reference_bytes"] == 0
    assert on["reference_bytes"] == on["param_bytes"] > 0
    assert on["total_bytes"] == off["total_bytes"] + on["reference_bytes"]
    lora_on = plan(_config(kl_to_base=0.1, enabled=True), 8, 1.0)
    lora_off = plan(_config(kl_to_base=0.0, enabled=True), 8, 1.0)
    assert lora_on["reference_bytes"] == 0 and lora_on["total_bytes"] == lora_off["total_bytes"]


def test_compile_check_state_holds_the_reference_and_neftune():
    """The compile check's abstract state is training's: the reference copy under kl_to_base,
    and the model with NEFTune."""
    raw = load_config_file("configs/tiny.py")
    raw.train.kl_to_base, raw.train.neftune_alpha = 0.1, 5.0
    config = parse(raw)
    state = plan_check.abstract_train_state(config, make_mesh(config.mesh))
    assert state.reference is not None
    assert _leaves(state.reference) == _leaves(state.params)
    assert _model(state.apply_fn).config.neftune_alpha == 5.0
