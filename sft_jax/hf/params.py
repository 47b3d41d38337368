"""HF safetensors <-> our parameter tree, one tensor at a time in both directions.

Import reads each HF tensor, converts it on the host (torch Linear [out, in] -> our einsum
kernels, per-layer tensors stacked on a leading L axis), casts it to the parameter dtype and puts
it straight into its target sharding, so a model is never materialised whole on one device.
Export walks the same table backwards: one leaf is copied to the host, split into its per-layer
HF tensors, and streamed into the shard files (see `sft_jax.export`).

Mixture-of-experts checkpoints come in several layouts (`MoeLayout`), told apart by their keys:
the Hub's one tensor per expert (`mlp.experts.{e}.gate_proj.weight`; Mixtral's
`block_sparse_moe.experts.{e}.w1/w3/w2.weight` with its router at `block_sparse_moe.gate`), and
transformers 5's fused `experts.gate_up_proj` [E, 2F, D] / `experts.down_proj` [E, D, F] (what
`save_pretrained(save_original_format=False)` writes). Every layout loads; export writes the
family's Hub layout, which transformers and vLLM both read.

gpt-oss stores each layer's experts fused: `experts.gate_up_proj` [E, D, 2F] with gate and up
interleaved (even columns gate, odd up), `experts.down_proj` [E, F, D], and their biases; its
router is `mlp.router` (weight and bias). The Hub's checkpoints hold the two expert matrices as
MXFP4 (`*_blocks` [E, R, C/32, 16] uint8, two e2m1 values a byte, low nibble first, and
`*_scales` [E, R, C/32] uint8, a power-of-two exponent biased by 127 per 32 values, rows R of
the [E, R, C] matrix transformers transposes to [E, C, R]): they are dequantized on import,
exactly (every MXFP4 value is a bfloat16), to the parameter dtype. Export writes them
dequantized in the fused layout, which transformers loads without a quantization_config.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sft_jax.hf.config import ModelFileError
from sft_jax.hf.gemma4 import gemma4_moe_specs
from sft_jax.hf.layout import (  # noqa: F401  (re-exported: where each layout is told apart)
    HUB_LAYOUT,
    MIXTRAL_LAYOUT,
    MoeLayout,
    checkpoint_layout,
    export_layout,
)
from sft_jax.hf.mxfp4 import dequantize_mxfp4, scales_key
from sft_jax.hf.safetensors import Checkpoint
from sft_jax.hf.tensor_spec import TensorSpec, linear_spec
from sft_jax.model.decoder import ModelConfig
from sft_jax.model.gemma4_config import first_shared_layer, layer_view
from sft_jax.model.hybrid import LINEAR

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved; recomputed
# Qwen3.5's Hub checkpoints: the vision tower and the multi-token-prediction head, which text-only
# fine-tuning leaves out (transformers' Qwen3_5ForCausalLM ignores them too); its language model
# sits under model.language_model., as a multimodal layout (sft_jax/hf/layout.py) names it.
_HYBRID_IGNORED_PREFIXES = ("model.visual.", "mtp.")


def _tensor_specs(
    c: ModelConfig, layout: MoeLayout = HUB_LAYOUT
) -> dict[tuple[str, ...], TensorSpec]:
    """Our flattened param path -> HF tensor (`layout`: of the expert tensors, if any)."""
    if c.is_hybrid:
        return _hybrid_specs(c, layout)
    if c.gemma4 is not None:
        return _gemma4_specs(c, layout)
    d, f, n, kv, h = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    layer = "model.layers.{i}."
    attn = layer + "self_attn."
    mlp_norm = "pre_feedforward_layernorm" if c.sandwich_norms else "post_attention_layernorm"
    specs = {
        ("embed", "embedding"): TensorSpec(
            "model.embed_tokens.weight", (c.vocab_size, d), per_layer=False
        ),
        ("final_norm", "scale"): TensorSpec("model.norm.weight", (d,), per_layer=False),
        ("layers", "attn_norm", "scale"): TensorSpec(layer + "input_layernorm.weight", (d,)),
        ("layers", "mlp_norm", "scale"): TensorSpec(layer + mlp_norm + ".weight", (d,)),
        ("layers", "attn", "q_proj", "kernel"): linear_spec(
            (n, 2 * h if c.attn_output_gate else h), (d,), attn + "q_proj.weight"
        ),
        ("layers", "attn", "k_proj", "kernel"): linear_spec((kv, h), (d,), attn + "k_proj.weight"),
        ("layers", "attn", "v_proj", "kernel"): linear_spec((kv, h), (d,), attn + "v_proj.weight"),
        ("layers", "attn", "o_proj", "kernel"): linear_spec((d,), (n, h), attn + "o_proj.weight"),
    }
    if c.is_moe:
        specs.update(_moe_specs(c, layout))
    else:
        specs.update(
            {("layers", "mlp", *k): v for k, v in _mlp_specs(d, f, layer + "mlp.").items()}
        )
    if c.sandwich_norms:
        for ours, theirs in (
            ("post_attn_norm", "post_attention_layernorm"),
            ("post_mlp_norm", "post_feedforward_layernorm"),
        ):
            specs["layers", ours, "scale"] = TensorSpec(layer + theirs + ".weight", (d,))
    if c.attention_sinks:
        specs["layers", "attn", "sinks"] = TensorSpec(attn + "sinks", (n,))
    if c.o_proj_bias:
        specs["layers", "attn", "o_proj", "bias"] = TensorSpec(attn + "o_proj.bias", (d,))
    if c.attention_bias:
        for name, heads in (("q_proj", n), ("k_proj", kv), ("v_proj", kv)):
            specs["layers", "attn", name, "bias"] = TensorSpec(
                attn + f"{name}.bias",
                (heads * h,),
                lambda w, heads=heads: w.reshape(heads, h),
                lambda b: b.reshape(-1),
            )
    if c.qk_norm:  # per head (H), or over all heads (N*H, K*H: OLMoE)
        q_width, k_width = (n * h, kv * h) if c.qk_norm_full else (h, h)
        specs["layers", "attn", "q_norm", "scale"] = TensorSpec(attn + "q_norm.weight", (q_width,))
        specs["layers", "attn", "k_norm", "scale"] = TensorSpec(attn + "k_norm.weight", (k_width,))
    if not c.tie_embeddings:
        specs["lm_head", "kernel"] = linear_spec((c.vocab_size,), (d,), "lm_head.weight")
        specs["lm_head", "kernel"] = dataclasses.replace(
            specs["lm_head", "kernel"], per_layer=False
        )
    if layout.fused_proj:
        specs.update(_fused_specs(c))
    if not c.pre_norms:  # OLMo 2/3: only the sandwich's post norms
        del specs["layers", "attn_norm", "scale"], specs["layers", "mlp_norm", "scale"]
    if layout.model != HUB_LAYOUT.model:  # a multimodal checkpoint's language model
        specs = {k: dataclasses.replace(v, key=_renamed(v.key, layout)) for k, v in specs.items()}
    return specs


def _fused_specs(c: ModelConfig) -> dict[tuple[str, ...], TensorSpec]:
    """Phi-3's qkv_proj [(N+2K)H, D] (rows q, k, v) and gate_up_proj [2F, D] (rows gate, up):
    each leaf reads its rows; export concatenates them again."""
    d, f, n, kv, h = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    attn, mlp = ("layers", "attn"), ("layers", "mlp")
    groups = {
        "model.layers.{i}.self_attn.qkv_proj.weight": [
            ((*attn, "q_proj", "kernel"), (n, h)),
            ((*attn, "k_proj", "kernel"), (kv, h)),
            ((*attn, "v_proj", "kernel"), (kv, h)),
        ],
        "model.layers.{i}.mlp.gate_up_proj.weight": [
            ((*mlp, "gate_proj", "kernel"), (f,)),
            ((*mlp, "up_proj", "kernel"), (f,)),
        ],
    }
    specs = {}
    for key, parts in groups.items():
        ends = np.cumsum([int(np.prod(dims)) for _, dims in parts]).tolist()
        shape = (ends[-1], d)
        fuse = lambda *kernels: np.concatenate([k.reshape(d, -1).T for k in kernels])
        for j, (path, dims) in enumerate(parts):
            lo, hi = ([0, *ends])[j], ends[j]
            rows = lambda w, lo=lo, hi=hi, dims=dims: w[lo:hi].T.reshape(d, *dims)
            others = tuple(p for p, _ in parts[1:]) if j == 0 else ()
            specs[path] = TensorSpec(key, shape, rows, fuse if j == 0 else None, joins=others)
            specs[path] = dataclasses.replace(specs[path], joined=j > 0)
    return specs


def _renamed(key: str, layout: MoeLayout) -> str:
    """A language-model key ("model.*", "lm_head.weight") as `layout` names it."""
    if key == HUB_LAYOUT.lm_head:
        return layout.lm_head
    return layout.model + key.removeprefix(HUB_LAYOUT.model)


def _hybrid_specs(c: ModelConfig, layout: MoeLayout) -> dict[tuple[str, ...], TensorSpec]:
    """A hybrid model's tree (layers/layer_{j}/... per sub-layer j of the period): each
    sub-layer's leaves are the plain layer's, with a linear-attention layer's `linear_attn`
    in place of `attn`, reading every period-th HF layer from j."""
    plain = _tensor_specs(dataclasses.replace(c, layer_types=(), linear_attention=None), layout)
    period = c.period
    specs = {path: spec for path, spec in plain.items() if path[0] != "layers"}
    for j, kind in enumerate(period):
        at = {"period": len(period), "offset": j}
        for path, spec in plain.items():
            if path[0] == "layers" and not (kind == LINEAR and path[1] == "attn"):
                specs["layers", f"layer_{j}", *path[1:]] = dataclasses.replace(spec, **at)
        if kind == LINEAR:
            for path, spec in _linear_attention_specs(c).items():
                key = _renamed(spec.key, layout)  # a multimodal checkpoint's language model
                specs["layers", f"layer_{j}", "linear_attn", *path] = dataclasses.replace(
                    spec, key=key, **at
                )
    return specs


def _gemma4_specs(c: ModelConfig, layout: MoeLayout) -> dict[tuple[str, ...], TensorSpec]:
    """Gemma 4's tree (sft_jax/model/gemma4.py): layer j's leaves (layers/layer_{j}) read HF
    layer j with that layer's own head shape and MLP width; a K/V-sharing layer has no key or
    value projection or k_norm, a full layer with k_eq_v no v_proj."""
    g, d, p, n = c.gemma4, c.hidden_size, c.gemma4.per_layer_input_size, c.num_layers
    specs, layer = {}, "model.layers.{i}."
    dropped = {"k_proj", "v_proj", "k_norm"}
    for j in range(n):
        plain = _tensor_specs(dataclasses.replace(layer_view(c, j), gemma4=None, num_experts=0))
        at = {"period": n, "offset": j}
        skip = dropped if j >= first_shared_layer(c) else set()
        if g.k_eq_v and not c.local_layers[j]:
            skip = skip | {"v_proj"}
        for path, spec in plain.items():
            if path[0] != "layers":
                specs[path] = spec
            elif not (path[1] == "attn" and path[2] in skip):
                specs["layers", f"layer_{j}", *path[1:]] = dataclasses.replace(spec, **at)
        ours = {("layer_scalar",): TensorSpec(layer + "layer_scalar", (1,))}
        if p:
            ours["per_layer_input_gate", "kernel"] = linear_spec(
                (p,), (d,), layer + "per_layer_input_gate.weight"
            )
            ours["per_layer_projection", "kernel"] = linear_spec(
                (d,), (p,), layer + "per_layer_projection.weight"
            )
            ours["post_per_layer_norm", "scale"] = TensorSpec(
                layer + "post_per_layer_input_norm.weight", (d,)
            )
        if c.is_moe:
            ours.update(gemma4_moe_specs(c))
        for path, spec in ours.items():
            joins = tuple(("layers", f"layer_{j}", *other) for other in spec.joins)
            specs["layers", f"layer_{j}", *path] = dataclasses.replace(spec, joins=joins, **at)
    if p:
        whole = {"per_layer": False}
        base = ("per_layer_inputs",)
        table = "model.embed_tokens_per_layer.weight"
        specs[(*base, "embedding")] = TensorSpec(table, (g.per_layer_vocab_size, n * p), **whole)
        proj = linear_spec((n * p,), (d,), "model.per_layer_model_projection.weight")
        specs[(*base, "projection", "kernel")] = dataclasses.replace(proj, **whole)
        norm = "model.per_layer_projection_norm.weight"
        specs[(*base, "norm", "scale")] = TensorSpec(norm, (p,), **whole)
    if layout.model != HUB_LAYOUT.model:  # a multimodal checkpoint's language model
        specs = {k: dataclasses.replace(v, key=_renamed(v.key, layout)) for k, v in specs.items()}
    return specs


def _linear_attention_specs(c: ModelConfig) -> dict[tuple[str, ...], TensorSpec]:
    """A Gated DeltaNet layer's leaves (sft_jax/model/gated_deltanet.py) and their HF tensors;
    the conv1d weight [P, 1, K] is ours [K, P]."""
    la, d = c.linear_attention, c.hidden_size
    n, k, p = la.num_value_heads, la.conv_kernel, la.conv_dim
    base = "model.layers.{i}.linear_attn."
    specs = {
        (name, "kernel"): linear_spec((width,), (d,), f"{base}{name}.weight")
        for name, width in (
            ("in_proj_qkv", p), ("in_proj_z", la.value_dim), ("in_proj_b", n), ("in_proj_a", n)
        )
    }  # fmt: skip
    specs["out_proj", "kernel"] = linear_spec((d,), (la.value_dim,), base + "out_proj.weight")
    specs["conv1d",] = TensorSpec(
        base + "conv1d.weight", (p, 1, k), lambda w: w[:, 0, :].T, lambda w: w.T[:, None, :]
    )
    specs["A_log",] = TensorSpec(base + "A_log", (n,))
    specs["dt_bias",] = TensorSpec(base + "dt_bias", (n,))
    specs["norm",] = TensorSpec(base + "norm.weight", (la.value_head_dim,))
    return specs


def _mlp_specs(
    d: int, f: int, prefix: str, names: tuple[str, str, str] = HUB_LAYOUT.names
) -> dict[tuple[str, ...], TensorSpec]:
    """A gated MLP's three kernels (the dense MLP, an expert, Qwen2-MoE's shared expert) under
    `prefix`, HF names `names` for our gate_proj, up_proj, down_proj."""
    gate, up, down = names
    return {
        ("gate_proj", "kernel"): linear_spec((f,), (d,), f"{prefix}{gate}.weight"),
        ("up_proj", "kernel"): linear_spec((f,), (d,), f"{prefix}{up}.weight"),
        ("down_proj", "kernel"): linear_spec((d,), (f,), f"{prefix}{down}.weight"),
    }


def _moe_specs(c: ModelConfig, layout: MoeLayout) -> dict[tuple[str, ...], TensorSpec]:
    """The router, the experts (stacked [E, ...] leaves) and a shared expert, in `layout`."""
    if c.expert_bias:
        return _gpt_oss_moe_specs(c, layout.mxfp4)
    d, f, e = c.hidden_size, c.moe_intermediate_size, c.num_experts
    base = "model.layers.{i}." + layout.prefix + "."
    mlp = ("layers", "mlp")
    specs = {(*mlp, "router", "kernel"): linear_spec((e,), (d,), base + "gate.weight")}
    experts = (*mlp, "experts")
    if layout.fused:  # [E, 2F, D] (gate rows, then up rows) and [E, D, F]: read, never written
        fused = base + "experts.gate_up_proj"
        swap = lambda w: w.transpose(0, 2, 1)
        specs[(*experts, "gate_proj")] = TensorSpec(
            fused, (e, 2 * f, d), lambda w: swap(w[:, :f]), None
        )
        specs[(*experts, "up_proj")] = TensorSpec(
            fused, (e, 2 * f, d), lambda w: swap(w[:, f:]), None
        )
        specs[(*experts, "down_proj")] = TensorSpec(
            base + "experts.down_proj", (e, d, f), swap, swap
        )
    else:
        per_expert = _mlp_specs(d, f, base + "experts.{e}.", layout.names)
        for (name, _), spec in per_expert.items():
            specs[(*experts, name)] = dataclasses.replace(spec, experts=e)
    if c.shared_expert_intermediate_size:  # Qwen2-MoE
        fs = c.shared_expert_intermediate_size
        shared = _mlp_specs(d, fs, "model.layers.{i}.mlp.shared_expert.")
        specs.update({(*mlp, "shared_expert", *k): v for k, v in shared.items()})
        gate = linear_spec((1,), (d,), "model.layers.{i}.mlp.shared_expert_gate.weight")
        specs[(*mlp, "shared_expert_gate", "kernel")] = gate
    return specs


def _interleave(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[..., F] and [..., F] -> [..., 2F] with a in the even and b in the odd columns."""
    return np.stack([a, b], axis=-1).reshape(*a.shape[:-1], 2 * a.shape[-1])


def _gpt_oss_moe_specs(c: ModelConfig, mxfp4: bool) -> dict[tuple[str, ...], TensorSpec]:
    """gpt-oss's router and fused experts (module docstring); `mxfp4`: the Hub's quantized
    expert matrices, read only (export writes them dequantized)."""
    d, f, e = c.hidden_size, c.moe_intermediate_size, c.num_experts
    base = "model.layers.{i}.mlp."
    mlp, experts = ("layers", "mlp"), ("layers", "mlp", "experts")
    even, odd = (lambda w: w[..., 0::2]), (lambda w: w[..., 1::2])
    up, up_bias = (*experts, "up_proj"), (*experts, "up_bias")
    if mxfp4:  # read as [E, R, C] matrices; transposed to transformers' [E, C, R] first
        gate_up = TensorSpec(
            base + "experts.gate_up_proj_blocks", (e, 2 * f, d // 32, 16), even, None, mxfp4=True
        )
        down = TensorSpec(
            base + "experts.down_proj_blocks", (e, d, f // 32, 16), to_hf=None, mxfp4=True
        )
    else:
        gate_up = TensorSpec(
            base + "experts.gate_up_proj", (e, d, 2 * f), even, _interleave, joins=(up,)
        )
        down = TensorSpec(base + "experts.down_proj", (e, f, d))
    bias = TensorSpec(
        base + "experts.gate_up_proj_bias", (e, 2 * f), even, _interleave, joins=(up_bias,)
    )
    return {
        (*mlp, "router", "kernel"): linear_spec((e,), (d,), base + "router.weight"),
        (*mlp, "router", "bias"): TensorSpec(base + "router.bias", (e,)),
        (*experts, "gate_proj"): gate_up,
        up: dataclasses.replace(gate_up, convert=odd, joins=(), joined=True),
        (*experts, "down_proj"): down,
        (*experts, "gate_bias"): bias,
        up_bias: dataclasses.replace(bias, convert=odd, joins=(), joined=True),
        (*experts, "down_bias"): TensorSpec(base + "experts.down_proj_bias", (e, d)),
    }


def _instances(spec: TensorSpec, c: ModelConfig) -> list[tuple[str, int | None, int | None]]:
    """(HF key, index on the leaf's layer axis, expert) of every HF tensor behind one leaf."""
    layers = enumerate(spec.hf_layers(c.num_layers)) if spec.per_layer else [(None, None)]
    experts = range(spec.experts) if spec.experts else [None]
    return [(spec.key.format(i=i, e=e), s, e) for s, i in layers for e in experts]


def check_checkpoint(path: str, config: ModelConfig) -> None:
    """Reads only the headers of `path`'s safetensors files: each one complete, every expected
    tensor present with its expected shape, nothing unexplained. Preflight runs this so that a
    broken model directory fails in one line before data is read; raises ModelFileError."""
    ckpt = Checkpoint(path)
    layout = checkpoint_layout(ckpt)
    specs = _tensor_specs(config, layout)
    _check_keys(ckpt, specs, config, layout, compare_tied=False)  # that reads tensor data
    for spec in specs.values():
        for key, _, _ in _instances(spec, config):
            for name, shape in _stored(spec, key):
                if ckpt.files[name].shape(name) != shape:
                    raise ModelFileError(
                        f"{ckpt.files[name].path}: tensor '{name}' has shape "
                        f"{ckpt.files[name].shape(name)}, expected {shape} from config.json"
                    )


def _stored(spec: TensorSpec, key: str) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of the stored tensors behind one HF tensor: MXFP4 adds its scales."""
    if spec.mxfp4:
        return [(key, spec.shape), (scales_key(key), spec.shape[:-1])]
    return [(key, spec.shape)]


def _check_keys(
    ckpt: Checkpoint, specs: dict, c: ModelConfig, layout: MoeLayout, compare_tied: bool = True
) -> None:
    """Every expected tensor present, nothing unexplained left over (a multimodal checkpoint's
    other modules are not ours to check)."""
    expected = set()
    for spec in specs.values():
        for key, _, _ in _instances(spec, c):
            expected.update(name for name, _ in _stored(spec, key))
    missing = sorted(expected - set(ckpt.files))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelFileError(f"{ckpt.name}: missing tensor '{missing[0]}'{more}")
    for key in sorted(set(ckpt.files) - expected):
        if key.endswith(_IGNORED_SUFFIXES) or (layout.copied and key.startswith(layout.copied)):
            continue
        if c.is_hybrid and key.startswith(_HYBRID_IGNORED_PREFIXES):
            continue
        if key == layout.lm_head and c.tie_embeddings:
            if not compare_tied:
                continue
            shape = (c.vocab_size, c.hidden_size)
            embedding = ckpt.get(layout.model + "embed_tokens.weight", shape)
            if np.array_equal(ckpt.get(key, shape), embedding):
                continue  # a tied model saved with its (identical) head: harmless.
            raise ModelFileError(
                f"{ckpt.files[key].path}: tensor '{key}' differs from the embedding, but the "
                "config says tie_word_embeddings=true"
            )
        raise ModelFileError(f"{ckpt.files[key].path}: unexpected tensor '{key}'")


def _read_layer(ckpt: Checkpoint, spec: TensorSpec, i: int | None) -> np.ndarray:
    """One layer's slice of a leaf (the whole leaf when not per-layer), experts stacked."""
    if spec.mxfp4:  # [E, R, C] dequantized, as transformers' [E, C, R]
        key = spec.key.format(i=i)
        blocks = ckpt.get(key, spec.shape)
        scales = ckpt.get(scales_key(key), spec.shape[:-1])
        return spec.convert(np.swapaxes(dequantize_mxfp4(blocks, scales), -1, -2))
    if not spec.experts:
        return spec.convert(ckpt.get(spec.key.format(i=i), spec.shape))
    return np.stack(
        [spec.convert(ckpt.get(spec.key.format(i=i, e=e), spec.shape)) for e in range(spec.experts)]
    )


def _read_leaf(ckpt: Checkpoint, spec: TensorSpec, c: ModelConfig) -> np.ndarray:
    """One leaf on the host: converted, stacked over layers when per-layer, in param dtype."""
    dtype = jnp.dtype(c.param_dtype)
    if not spec.per_layer:
        return np.ascontiguousarray(_read_layer(ckpt, spec, None), dtype=dtype)
    layers = spec.hf_layers(c.num_layers)
    first = _read_layer(ckpt, spec, layers[0])
    out = np.empty((len(layers), *first.shape), dtype)  # filled in place: one host copy
    out[0] = first
    for s, i in enumerate(layers[1:], start=1):
        out[s] = _read_layer(ckpt, spec, i)
    return out


def load_params(path: str, config: ModelConfig, shardings: Any = None) -> dict:
    """Loads HF safetensors into our (unboxed) parameter tree, cast to `config.param_dtype`.

    `shardings`: None (default device) or a tree of jax.sharding.Sharding with the same structure
    as the parameters; each leaf is built on the host and placed directly into its sharding.
    """
    ckpt = Checkpoint(path)
    layout = checkpoint_layout(ckpt)
    specs = _tensor_specs(config, layout)
    _check_keys(ckpt, specs, config, layout)
    flat_shardings = None
    if shardings is not None:
        flat_shardings = traverse_util.flatten_dict(shardings)
        if set(flat_shardings) != set(specs):
            diff = sorted(set(flat_shardings) ^ set(specs))
            raise ValueError(f"shardings tree does not match the parameter tree: {diff}")
    params = {}
    for name, spec in specs.items():
        leaf = _read_leaf(ckpt, spec, config)
        if flat_shardings is None:
            params[name] = jnp.asarray(leaf)
        else:
            params[name] = jax.device_put(leaf, flat_shardings[name])
    return traverse_util.unflatten_dict(params)


@dataclasses.dataclass(frozen=True)
class HfTensor:
    """One tensor of the exported checkpoint: its key and shape, and where it comes from."""

    key: str
    shape: tuple[int, ...]
    leaf: tuple[str, ...]  # our flattened param path
    layer: int | None  # index into the leaf's leading L axis, None for whole leaves
    expert: int | None = None  # then index into the layer's expert axis
    joins: tuple[tuple[str, ...], ...] = ()  # further leaves fused into it (gpt-oss, Phi-3)

    @property
    def leaves(self) -> tuple[tuple[str, ...], ...]:
        """Every leaf this tensor is made from (several for a fused tensor)."""
        return (self.leaf, *self.joins)


def hf_tensor_plan(config: ModelConfig, layout: MoeLayout = HUB_LAYOUT) -> list[HfTensor]:
    """Every HF tensor of the model, grouped by our leaf (so each leaf is fetched once)."""
    plan = []
    for path, spec in _tensor_specs(config, layout).items():
        if spec.joined:  # written with the leaf it is fused with
            continue
        if spec.to_hf is None:
            raise ValueError(f"{layout} is a layout we read, not one we write")
        for key, i, e in _instances(spec, config):
            plan.append(HfTensor(key, spec.shape, path, i, e, spec.joins))
    return plan


def to_hf_tensor(
    config: ModelConfig,
    tensor: HfTensor,
    leaf: np.ndarray,
    layout: MoeLayout = HUB_LAYOUT,
    joined: tuple[np.ndarray, ...] = (),
) -> np.ndarray:
    """The HF tensor `tensor` from its host leaf (the whole [L, ...] leaf when per-layer), and
    from the leaves `tensor.joins` names (`joined`) when it fuses several."""
    spec = _tensor_specs(config, layout)[tensor.leaf]
    parts = [leaf, *joined]
    parts = [p if tensor.layer is None else p[tensor.layer] for p in parts]
    parts = [p if tensor.expert is None else p[tensor.expert] for p in parts]
    return spec.to_hf(*parts)
