"""HF safetensors <-> our parameter tree, one tensor at a time in both directions.

Import reads each HF tensor, converts it on the host (torch Linear [out, in] -> our einsum
kernels, per-layer tensors stacked on a leading L axis), casts it to the parameter dtype and puts
it straight into its target sharding, so a model is never materialised whole on one device.
Export walks the same table backwards: one leaf is copied to the host, split into its per-layer
HF tensors, and streamed into the shard files (see `sft_jax.export`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sft_jax.hf.config import ModelFileError
from sft_jax.hf.safetensors import Checkpoint
from sft_jax.model.decoder import ModelConfig

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved; recomputed


def _identity(w: np.ndarray) -> np.ndarray:
    return w


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """Where one leaf of our tree comes from: HF key ('{i}' = layer), its shape, and the
    conversions HF -> ours (`convert`) and ours -> HF (`to_hf`) of one layer's slice."""

    key: str
    shape: tuple[int, ...]
    convert: Callable[[np.ndarray], np.ndarray] = _identity
    to_hf: Callable[[np.ndarray], np.ndarray] = _identity
    per_layer: bool = True


def _linear(out_dims: tuple[int, ...], in_dims: tuple[int, ...], key: str) -> _Tensor:
    """A torch Linear [prod(out), prod(in)] as our kernel [*in, *out]."""
    o, i = int(np.prod(out_dims)), int(np.prod(in_dims))
    return _Tensor(
        key,
        (o, i),
        lambda w: w.T.reshape(*in_dims, *out_dims),
        lambda k: k.reshape(i, o).T,
    )


def _tensor_specs(c: ModelConfig) -> dict[tuple[str, ...], _Tensor]:
    """Our flattened param path -> HF tensor."""
    d, f, n, kv, h = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    layer = "model.layers.{i}."
    attn = layer + "self_attn."
    mlp_norm = "pre_feedforward_layernorm" if c.sandwich_norms else "post_attention_layernorm"
    specs = {
        ("embed", "embedding"): _Tensor(
            "model.embed_tokens.weight", (c.vocab_size, d), per_layer=False
        ),
        ("final_norm", "scale"): _Tensor("model.norm.weight", (d,), per_layer=False),
        ("layers", "attn_norm", "scale"): _Tensor(layer + "input_layernorm.weight", (d,)),
        ("layers", "mlp_norm", "scale"): _Tensor(layer + mlp_norm + ".weight", (d,)),
        ("layers", "attn", "q_proj", "kernel"): _linear((n, h), (d,), attn + "q_proj.weight"),
        ("layers", "attn", "k_proj", "kernel"): _linear((kv, h), (d,), attn + "k_proj.weight"),
        ("layers", "attn", "v_proj", "kernel"): _linear((kv, h), (d,), attn + "v_proj.weight"),
        ("layers", "attn", "o_proj", "kernel"): _linear((d,), (n, h), attn + "o_proj.weight"),
        ("layers", "mlp", "gate_proj", "kernel"): _linear(
            (f,), (d,), layer + "mlp.gate_proj.weight"
        ),
        ("layers", "mlp", "up_proj", "kernel"): _linear((f,), (d,), layer + "mlp.up_proj.weight"),
        ("layers", "mlp", "down_proj", "kernel"): _linear(
            (d,), (f,), layer + "mlp.down_proj.weight"
        ),
    }
    if c.sandwich_norms:
        for ours, theirs in (
            ("post_attn_norm", "post_attention_layernorm"),
            ("post_mlp_norm", "post_feedforward_layernorm"),
        ):
            specs["layers", ours, "scale"] = _Tensor(layer + theirs + ".weight", (d,))
    if c.attention_bias:
        for name, heads in (("q_proj", n), ("k_proj", kv), ("v_proj", kv)):
            specs["layers", "attn", name, "bias"] = _Tensor(
                attn + f"{name}.bias",
                (heads * h,),
                lambda w, heads=heads: w.reshape(heads, h),
                lambda b: b.reshape(-1),
            )
    if c.qk_norm:
        specs["layers", "attn", "q_norm", "scale"] = _Tensor(attn + "q_norm.weight", (h,))
        specs["layers", "attn", "k_norm", "scale"] = _Tensor(attn + "k_norm.weight", (h,))
    if not c.tie_embeddings:
        specs["lm_head", "kernel"] = _linear((c.vocab_size,), (d,), "lm_head.weight")
        specs["lm_head", "kernel"] = dataclasses.replace(
            specs["lm_head", "kernel"], per_layer=False
        )
    return specs


def check_checkpoint(path: str, config: ModelConfig) -> None:
    """Reads only the headers of `path`'s safetensors files: each one complete, every expected
    tensor present with its expected shape, nothing unexplained. Preflight runs this so that a
    broken model directory fails in one line before data is read; raises ModelFileError."""
    ckpt = Checkpoint(path)
    specs = _tensor_specs(config)
    _check_keys(ckpt, specs, config, compare_tied=False)  # that comparison reads tensor data
    for spec in specs.values():
        for i in range(config.num_layers) if spec.per_layer else [None]:
            key = spec.key.format(i=i)
            if ckpt.files[key].shape(key) != spec.shape:
                raise ModelFileError(
                    f"{ckpt.files[key].path}: tensor '{key}' has shape "
                    f"{ckpt.files[key].shape(key)}, expected {spec.shape} from config.json"
                )


def _check_keys(ckpt: Checkpoint, specs: dict, c: ModelConfig, compare_tied: bool = True) -> None:
    """Every expected tensor present, nothing unexplained left over."""
    expected = set()
    for spec in specs.values():
        layers = range(c.num_layers) if spec.per_layer else [None]
        expected.update(spec.key.format(i=i) for i in layers)
    missing = sorted(expected - set(ckpt.files))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelFileError(f"{ckpt.name}: missing tensor '{missing[0]}'{more}")
    for key in sorted(set(ckpt.files) - expected):
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        if key == "lm_head.weight" and c.tie_embeddings:
            if not compare_tied:
                continue
            shape = (c.vocab_size, c.hidden_size)
            embedding = ckpt.get("model.embed_tokens.weight", shape)
            if np.array_equal(ckpt.get(key, shape), embedding):
                continue  # a tied model saved with its (identical) head: harmless.
            raise ModelFileError(
                f"{ckpt.files[key].path}: tensor '{key}' differs from the embedding, but the "
                "config says tie_word_embeddings=true"
            )
        raise ModelFileError(f"{ckpt.files[key].path}: unexpected tensor '{key}'")


def _read_leaf(ckpt: Checkpoint, spec: _Tensor, c: ModelConfig) -> np.ndarray:
    """One leaf on the host: converted, stacked over layers when per-layer, in param dtype."""
    dtype = jnp.dtype(c.param_dtype)
    if not spec.per_layer:
        return np.ascontiguousarray(spec.convert(ckpt.get(spec.key, spec.shape)), dtype=dtype)
    first = spec.convert(ckpt.get(spec.key.format(i=0), spec.shape))
    out = np.empty((c.num_layers, *first.shape), dtype)  # filled in place: one host copy
    out[0] = first
    for i in range(1, c.num_layers):
        out[i] = spec.convert(ckpt.get(spec.key.format(i=i), spec.shape))
    return out


def load_params(path: str, config: ModelConfig, shardings: Any = None) -> dict:
    """Loads HF safetensors into our (unboxed) parameter tree, cast to `config.param_dtype`.

    `shardings`: None (default device) or a tree of jax.sharding.Sharding with the same structure
    as the parameters; each leaf is built on the host and placed directly into its sharding.
    """
    ckpt = Checkpoint(path)
    specs = _tensor_specs(config)
    _check_keys(ckpt, specs, config)
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


def hf_tensor_plan(config: ModelConfig) -> list[HfTensor]:
    """Every HF tensor of the model, grouped by our leaf (so each leaf is fetched once)."""
    plan = []
    for path, spec in _tensor_specs(config).items():
        layers = range(config.num_layers) if spec.per_layer else [None]
        for i in layers:
            plan.append(HfTensor(spec.key.format(i=i), spec.shape, path, i))
    return plan


def to_hf_tensor(config: ModelConfig, tensor: HfTensor, leaf: np.ndarray) -> np.ndarray:
    """The HF tensor `tensor` from its host leaf (the whole [L, ...] leaf when per-layer)."""
    spec = _tensor_specs(config)[tensor.leaf]
    part = leaf if tensor.layer is None else leaf[tensor.layer]
    return spec.to_hf(part)
