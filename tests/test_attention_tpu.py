"""Splash attention on a device mesh, two ways.

1. Correctness, in Pallas' interpreter on the 8 fake CPU devices: the shard_mapped kernel equals
   the reference attention, forward and gradient, under every split of batch and heads the rules
   table allows (fsdp, data x tensor; GQA with kv heads split with the query heads or repeated
   to follow them; query heads that do not split), with a sliding window, logit soft-capping
   and packed rows.
2. Compilation for a TPU that is not here (v5e:2x2, four chips) with the TPU compiler from libtpu:
   the model's forward and backward with "auto" attention, which must resolve to splash on a TPU
   mesh and compile (XLA cannot partition a Mosaic kernel, so this fails without shard_map).
   Skipped where libtpu is not installed.
"""

import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from configs import base
from sft_jax import config as config_lib
from sft_jax import lora
from sft_jax.config_file import load_config_file
from sft_jax.model.attention import (
    AttentionOptions,
    attend,
    attention_mask,
    resolve_implementation,
    window_mask,
)
from sft_jax.model.decoder import Transformer
from sft_jax.model.splash_attention import kv_repeats
from sft_jax.planning import tpu
from sft_jax.training import preflight, sharding
from sft_jax.training.state import (
    abstract_boxed_params,
    adapter_shardings,
    init_params,
    param_shardings,
)
from sft_jax.training.step import StepOptions, loss_fn
from tests.helpers import model_only_state, tiny_model_config

REPO = pathlib.Path(__file__).resolve().parents[1]
RULES = tuple(tuple(r) for r in base.get_config().mesh.rules)
T, H = 128, 16  # one splash block; a small head dim keeps the interpreter quick
TOL = 2e-5
AXES = ("data", "fsdp", "context", "tensor")  # make_mesh's axes without an expert axis


def cpu_mesh(data: int, fsdp: int, tensor: int) -> Mesh:
    devices = np.asarray(jax.devices()[: data * fsdp * tensor])
    return Mesh(devices.reshape(data, fsdp, 1, tensor), AXES)


def packed_segments(rows: int, seed: int) -> np.ndarray:
    """Each row: a few examples of random lengths, then padding (segment 0) on some rows."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((rows, T), np.int32)
    for r in range(rows):
        cuts = np.sort(rng.choice(np.arange(8, T), size=3, replace=False))
        end = T if r % 2 else cuts[-1]  # odd rows full, even rows end in padding
        for i, (a, b) in enumerate(zip([0, *cuts[:-1]], [*cuts[:-1], end], strict=True)):
            seg[r, a:b] = i + 1
    return seg


# name: mesh (data, fsdp, tensor), batch rows, query heads N, kv heads K, window, softcap
CASES = {
    "fsdp": ((1, 8, 1), 8, 4, 2, None, None),
    "data_x_tensor_kv_heads_split": ((2, 1, 4), 2, 8, 4, None, None),
    "data_x_tensor_kv_heads_repeated": ((2, 1, 4), 2, 8, 2, None, None),
    "tensor_one_kv_head": ((1, 2, 4), 2, 4, 1, None, None),
    "heads_not_divisible_by_tensor": ((2, 1, 4), 2, 2, 1, None, None),
    "fsdp_x_tensor_sliding_window": ((1, 4, 2), 4, 4, 2, 24, None),
    "data_x_tensor_softcap": ((2, 1, 4), 2, 4, 2, None, 5.0),
}


# fsdp alone (fsdp x tensor below splits rows over fsdp too) and one kv head (the repeated-kv
# path of data_x_tensor_kv_heads_repeated) run in the slow tier.
SLOW_CASES = ("fsdp", "tensor_one_kv_head")


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in CASES]
)
def test_sharded_splash_equals_reference_forward_and_gradient(case):
    (data, fsdp, tensor), b, n, kv, window, softcap = CASES[case]
    mesh = cpu_mesh(data, fsdp, tensor)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(b, T, h, H)), jnp.float32) for h in (n, kv, kv))
    seg = jnp.asarray(packed_segments(b, seed=1))
    mask = attention_mask(seg)
    if window is not None:
        mask = window_mask(mask, jnp.arange(T), window)
    weights = jnp.asarray(rng.normal(size=(b, T, n, H)), jnp.float32)
    real = (seg > 0)[:, :, None, None]  # padding rows' outputs are never trained

    def loss(impl):
        def f(q, k, v, local):
            options = AttentionOptions(
                impl, softcap=softcap, window=window, mesh=mesh, rules=RULES, interpret=True
            )
            local = local if window is not None else None
            out = attend(q, k, v, mask, options, segment_ids=seg, local=local)
            return jnp.sum(jnp.where(real, out * weights, 0.0)), out

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

    flag = jnp.asarray(True)
    (_, got), got_grads = loss("splash")(q, k, v, flag)
    (_, want), want_grads = loss("reference")(q, k, v, flag)
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=TOL)
    for name, a, w in zip("qkv", got_grads, want_grads, strict=True):
        np.testing.assert_allclose(a, w, atol=TOL, err_msg=f"d{name}")


def test_kv_repeats_make_kv_heads_split_like_query_heads():
    assert kv_repeats(4, 4) == 1  # already split alike
    assert kv_repeats(8, 4) == 1
    assert kv_repeats(2, 4) == 2  # 2 kv heads over 4 shards: 4 copies, one per shard
    assert kv_repeats(1, 4) == 4  # MQA
    assert kv_repeats(6, 4) == 2  # 12 = lcm(6, 4) copies, 3 per shard
    assert kv_repeats(3, 1) == 1  # heads not split


def test_splash_on_a_length_it_cannot_tile_falls_back_or_says_why():
    common = dict(platform="tpu", dtype="bfloat16", head_dim=128, softcap=None)
    assert resolve_implementation("auto", seq_len=512, **common) == "splash"
    assert resolve_implementation("auto", seq_len=8, **common) == "xla"
    with pytest.raises(ValueError, match="multiple of 128, got 100"):
        resolve_implementation("splash", seq_len=100, **common)


def test_init_with_splash_gives_the_parameters_of_any_other_attention():
    """Init traces the model on a (1, 8) batch, a length splash cannot take; it must still run,
    and the parameters cannot depend on the attention implementation."""
    mesh = cpu_mesh(1, 1, 1)
    params = {}
    for impl in ("splash", "blocked"):
        config = sharding.pin_model_activations(tiny_model_config(attention=impl), mesh, RULES)
        params[impl] = init_params(Transformer(config), "", mesh, RULES, seed=3)
    jax.tree.map(np.testing.assert_array_equal, params["splash"], params["blocked"])


def test_abstract_params_of_a_splash_model_need_neither_tpu_nor_a_long_sequence():
    """What the planner traces: the boxed tree with logical names, on this CPU, no mesh."""
    boxed = abstract_boxed_params(Transformer(tiny_model_config(attention="splash")))
    spec = nn.get_partition_spec(boxed)["layers"]["attn"]["q_proj"]["kernel"]
    assert tuple(spec) == ("layers", "embed", "heads", "head_dim")


def splash_config(seq_len: int) -> config_lib.Config:
    raw = load_config_file(str(REPO / "configs" / "tiny.py"))
    raw.model.attention, raw.data.seq_len = "splash", seq_len
    return config_lib.parse(raw)


def test_preflight_refuses_splash_off_tpu_and_on_lengths_it_cannot_tile(tpu_devices):
    with pytest.raises(config_lib.ConfigError, match="TPU kernel, but the mesh's devices are cpu"):
        preflight.check_attention(splash_config(512), cpu_mesh(1, 8, 1))
    tpu = tpu_mesh(tpu_devices, 1, 4, 1)
    with pytest.raises(config_lib.ConfigError, match=r"data\.seq_len a multiple of 128, got 500"):
        preflight.check_attention(splash_config(500), tpu)
    preflight.check_attention(splash_config(512), tpu)


# --------------------------------------------------------------------------------------------
# Compilation for TPU v5e:2x2 (no TPU needed: libtpu's compiler, abstract devices).

TPU_SEQ, TPU_BATCH = 512, 4


@pytest.fixture(scope="module")
def tpu_devices() -> list:
    if tpu.libtpu_missing():
        pytest.skip(f"no TPU compiler: {tpu.libtpu_missing()}")
    return tpu.topology_devices("v5e:2x2")


def tpu_model(mesh: Mesh, **overrides):
    """A small bf16 model at TPU-native shapes (head_dim 128, sequence 512), pinned to `mesh`."""
    fields = dict(
        vocab_size=256, hidden_size=128, intermediate_size=256, head_dim=128,
        max_position_embeddings=TPU_SEQ, dtype="bfloat16", param_dtype="bfloat16",
        remat="full", attention="auto", num_layers=1,
    )  # fmt: skip
    config = tiny_model_config(**{**fields, **overrides})
    return Transformer(sharding.pin_model_activations(config, mesh, RULES))


def abstract(tree, shardings):
    to_struct = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    return jax.tree.map(to_struct, tree, shardings)


def compile_forward_backward(model: Transformer, mesh: Mesh, lora_rank: int = 0):
    """jit(grad of the train loss) lowered and compiled for `mesh` -> (compiled, HLO text).
    With `lora_rank`, the gradient is the adapters' over a frozen base, as LoRA trains."""
    params, shardings = param_shardings(model, mesh, RULES)
    params, frozen = abstract(params, shardings), None
    if lora_rank:
        frozen = params
        make = lambda p: lora.init_adapters(p, ("q_proj", "v_proj"), lora_rank, jax.random.key(0))
        adapters = jax.eval_shape(make, frozen)
        params = abstract(adapters, adapter_shardings(adapters, frozen, mesh))
    batch_spec = sharding.batch_sharding(mesh, RULES)
    row = jax.ShapeDtypeStruct((TPU_BATCH, TPU_SEQ), jnp.int32, sharding=batch_spec)
    batch = {k: row for k in ("inputs", "targets", "segment_ids", "positions")}
    batch["loss_mask"] = jax.ShapeDtypeStruct(row.shape, jnp.bool_, sharding=batch_spec)

    def grads(params, frozen, batch):
        state = model_only_state(model.apply, frozen)
        loss = lambda p: loss_fn(p, state, batch, jax.random.key(0), StepOptions())[0]
        return jax.grad(loss)(params)

    start = time.perf_counter()
    lowered = jax.jit(grads).lower(params, frozen, batch)
    compiled = lowered.compile()
    print(f"compiled for {dict(mesh.shape)} in {time.perf_counter() - start:.1f} s")
    return compiled, lowered.as_text()


def tpu_mesh(devices, data: int, fsdp: int, tensor: int) -> Mesh:
    return Mesh(np.asarray(devices).reshape(data, fsdp, 1, tensor), AXES)


SPLASH_CALL = "tpu_custom_call"  # the Mosaic kernel's custom call in the lowered program


@pytest.mark.parametrize(
    "mesh_shape, overrides",
    [
        # All in the slow tier: test_lora_compiles_splash_for_tpu compiles this model ("auto"
        # attention, data x tensor) for the TPU in the default one, and the kernel's windowed,
        # soft-capped and repeated-kv variants compile there on their own (tests/
        # test_gpt_oss_layers.py, tests/test_splash_context.py).
        pytest.param((1, 4, 1), {}, marks=pytest.mark.slow),  # fsdp=4
        # data=2 x tensor=2, two kv heads split over tensor
        pytest.param((2, 1, 2), {}, marks=pytest.mark.slow),
        # Gemma 2 style: alternating sliding-window layers, soft-capped scores, and one kv head
        # repeated to follow the query heads split over tensor
        pytest.param(
            (1, 2, 2),
            {
                "num_layers": 2,
                "num_kv_heads": 1,
                "sliding_window": 128,
                "local_layers": (True, False),
                "attn_softcap": 50.0,
            },
            marks=pytest.mark.slow,
        ),
    ],
    ids=["fsdp", "data_x_tensor", "fsdp_x_tensor_window_softcap_one_kv_head"],
)
def test_model_with_auto_attention_compiles_splash_for_tpu(tpu_devices, mesh_shape, overrides):
    mesh = tpu_mesh(tpu_devices, *mesh_shape)
    model = tpu_model(mesh, **overrides)
    compiled, hlo = compile_forward_backward(model, mesh)
    assert SPLASH_CALL in hlo
    assert compiled.memory_analysis().temp_size_in_bytes > 0


def test_lora_compiles_splash_for_tpu(tpu_devices):
    """The default tier's compile of the model with "auto" attention for a TPU mesh (data x
    tensor): splash is in the program, and the adapters' gradient is all it outputs."""
    mesh = tpu_mesh(tpu_devices, 2, 1, 2)
    model = tpu_model(mesh, lora_scale=2.0)
    compiled, hlo = compile_forward_backward(model, mesh, lora_rank=8)
    assert SPLASH_CALL in hlo
    assert compiled.memory_analysis().temp_size_in_bytes > 0
    # The step differentiates the adapters only: its outputs are no bigger than they are.
    q_adapter = 8 * (128 + 4 * 128)  # rank 8 x (D in + N*H out), one layer, float32
    v_adapter = 8 * (128 + 2 * 128)
    assert compiled.memory_analysis().output_size_in_bytes <= 4 * (q_adapter + v_adapter)


def test_auto_attention_resolves_to_splash_on_a_tpu_mesh(tpu_devices):
    """On a CPU host compiling for a TPU, "auto" follows the mesh's devices, not the host."""
    mesh = tpu_mesh(tpu_devices, 1, 4, 1)
    model = tpu_model(mesh)
    assert model.config.platform == "tpu"
    params = abstract(*param_shardings(model, mesh, RULES))
    row = jax.ShapeDtypeStruct((TPU_BATCH, TPU_SEQ), jnp.int32)
    hlo = jax.jit(model.apply).lower({"params": params}, row, row, row).as_text()
    assert SPLASH_CALL in hlo
