"""Hugging Face import: `config.json` -> ModelConfig, safetensors -> our parameter tree.

Only what the decoder in `sft_jax.model` computes exactly is accepted; anything else (another
architecture, an unknown RoPE scaling, a sliding window that would actually cut attention, an
o_proj bias) fails loudly with `UnsupportedModelError` rather than loading into wrong logits.

Weights are read one tensor at a time from a single `model.safetensors` or from the shards listed
in `model.safetensors.index.json`, converted on the host (torch Linear [out, in] -> our einsum
kernels, per-layer tensors stacked on a leading L axis), cast to the parameter dtype and placed
straight into their target sharding, so a model is never materialised whole on one device.

The safetensors files are read by a small header-indexed reader rather than
`safe_open(framework="numpy")`, because numpy has no bfloat16 and safetensors' numpy backend
refuses BF16 tensors, the dtype most current checkpoints ship in (JAX's `ml_dtypes` has it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sft_jax.config import ModelSection
from sft_jax.model import ModelConfig, RopeScaling, model_config_from_arch

SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
_ARCH_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_SUPPORTED_ROPE_TYPES = ("default", "llama3")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved; recomputed


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its features is not implemented by our decoder."""


# --------------------------------------------------------------------------------------------
# config.json -> ModelConfig


def load_model_config(path: str, *, dtype: str, param_dtype: str, remat: str) -> ModelConfig:
    """Reads `path/config.json`; raises UnsupportedModelError for anything we cannot reproduce."""
    file = os.path.join(path, "config.json")
    with open(file, encoding="utf-8") as f:
        raw = json.load(f)
    arch = _architecture(raw, file)

    def unsupported(why: str) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"{file}: {arch} {why}; supported: {', '.join(SUPPORTED_ARCHITECTURES)} with "
            f"SiLU MLPs, rope types {_SUPPORTED_ROPE_TYPES} and no sliding-window attention"
        )

    def need(key: str) -> Any:
        if raw.get(key) is None:
            raise ValueError(f"{file}: required field '{key}' is missing")
        return raw[key]

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    max_pos, num_layers = need("max_position_embeddings"), need("num_hidden_layers")
    attention_bias = _check_features(raw, arch, max_pos, num_layers, unsupported)
    theta, scaling = _rope(raw, max_pos, unsupported)
    return ModelConfig(
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        intermediate_size=need("intermediate_size"),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or hidden // heads,
        rope_theta=float(theta),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qk_norm=arch == "Qwen3ForCausalLM",
        attention_bias=attention_bias,
        max_position_embeddings=max_pos,
        rope_scaling=scaling,
        dtype=dtype,
        param_dtype=param_dtype,
        remat=remat,
    )


def build_model_config(section: ModelSection) -> ModelConfig:
    """The model config of a run: from the HF directory when `path` is set, else from `arch`."""
    if section.path:
        return load_model_config(
            section.path, dtype=section.dtype, param_dtype=section.param_dtype, remat=section.remat
        )
    return model_config_from_arch(section.arch, section)


def _architecture(raw: dict, file: str) -> str:
    names = raw.get("architectures") or []
    if not names and raw.get("model_type") in _ARCH_BY_MODEL_TYPE:
        names = [_ARCH_BY_MODEL_TYPE[raw["model_type"]]]
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    found = names or f"model_type={raw.get('model_type')!r}"
    raise UnsupportedModelError(
        f"{file}: unsupported architecture {found}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _check_features(
    raw: dict, arch: str, max_pos: int, num_layers: int, unsupported: Callable
) -> bool:
    """Rejects features our decoder lacks; returns whether q/k/v carry biases."""
    act = raw.get("hidden_act", raw.get("hidden_activation", "silu"))
    if act != "silu":
        raise unsupported(f"uses hidden_act={act!r}")
    if raw.get("mlp_bias", False):
        raise unsupported("has MLP biases (mlp_bias=true)")
    if _sliding_window_in_use(raw, arch, max_pos, num_layers):
        raise unsupported(f"uses sliding-window attention (sliding_window={raw['sliding_window']})")
    if arch == "Qwen2ForCausalLM":
        return True  # Qwen2 always has q/k/v biases and never an o_proj bias.
    if arch == "MistralForCausalLM":
        return False  # Mistral's attention has no biases at all.
    if raw.get("attention_bias", False):  # Llama and Qwen3 then also have an o_proj bias
        raise unsupported("has attention_bias=true, which includes an o_proj bias")
    return False


def _sliding_window_in_use(raw: dict, arch: str, max_pos: int, num_layers: int) -> bool:
    """True when a sliding window would change attention for some layer and sequence length."""
    window = raw.get("sliding_window")
    if window is None or window >= max_pos:
        return False
    if arch == "MistralForCausalLM":
        return True  # Mistral applies any non-null window to every layer.
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        if not raw.get("use_sliding_window", False):
            return False
        layer_types = raw.get("layer_types")
        if layer_types:
            return "sliding_attention" in layer_types
        return raw.get("max_window_layers", num_layers) < num_layers
    return False


def _rope(raw: dict, max_pos: int, unsupported: Callable) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from transformers 5 `rope_parameters` or the older top-level fields."""
    params = {**(raw.get("rope_scaling") or {}), **(raw.get("rope_parameters") or {})}
    if any(isinstance(v, dict) for v in params.values()):
        raise unsupported("has per-layer-type rope parameters")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        raise unsupported(f"uses rope type {rope_type!r}")
    factor = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if factor != 1.0:
        raise unsupported(f"uses partial_rotary_factor={factor}")
    if rope_type == "default":
        return theta, None
    scaling = RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings") or max_pos
        ),
    )
    return theta, scaling


# --------------------------------------------------------------------------------------------
# safetensors -> parameter tree

_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(jnp.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}


class _SafetensorsFile:
    """Header index of one .safetensors file; reads one tensor at a time into host numpy."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        self.entries: dict[str, dict] = header
        self._data_start = 8 + size

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def get(self, key: str) -> np.ndarray:
        entry = self.entries[key]
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: tensor '{key}' has unsupported dtype {entry['dtype']}")
        dtype, shape = _DTYPES[entry["dtype"]], tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        count = math.prod(shape)
        if end - begin != count * dtype.itemsize:
            raise ValueError(f"{self.path}: tensor '{key}' has a corrupt header entry")
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            data = np.fromfile(f, dtype=dtype, count=count)
        if data.size != count:
            raise ValueError(f"{self.path}: tensor '{key}' is truncated")
        return data.reshape(shape)


class _Checkpoint:
    """All tensors of a HF model directory, single-file or sharded, by key."""

    def __init__(self, path: str):
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
            self.name = index
            files = {
                name: _SafetensorsFile(os.path.join(path, name))
                for name in set(weight_map.values())
            }
            self.files = {key: files[name] for key, name in weight_map.items()}
            for name, file in files.items():  # the index must describe the shards truthfully
                for key in file.entries:
                    if weight_map.get(key) != name:
                        raise ValueError(
                            f"{file.path}: tensor '{key}' is not mapped to it in {index}"
                        )
        elif os.path.exists(single):
            self.name = single
            file = _SafetensorsFile(single)
            self.files = dict.fromkeys(file.entries, file)
        else:
            raise FileNotFoundError(
                f"{path}: neither model.safetensors nor {os.path.basename(index)}"
            )

    def get(self, key: str, expected_shape: tuple[int, ...]) -> np.ndarray:
        file = self.files[key]
        if file.shape(key) != expected_shape:
            shape = file.shape(key)
            raise ValueError(
                f"{file.path}: tensor '{key}' has shape {shape}, expected {expected_shape}"
            )
        return file.get(key)


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """Where one leaf of our tree comes from: HF key ('{i}' = layer), its shape, the conversion."""

    key: str
    shape: tuple[int, ...]
    convert: Callable[[np.ndarray], np.ndarray] = lambda w: w
    per_layer: bool = True


def _tensor_specs(c: ModelConfig) -> dict[tuple[str, ...], _Tensor]:
    """Our flattened param path -> HF tensor. torch Linear weights are [out, in]."""
    d, f, n, kv, h = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    layer = "model.layers.{i}."
    attn = layer + "self_attn."
    specs = {
        ("embed", "embedding"): _Tensor(
            "model.embed_tokens.weight", (c.vocab_size, d), per_layer=False
        ),
        ("final_norm", "scale"): _Tensor("model.norm.weight", (d,), per_layer=False),
        ("layers", "attn_norm", "scale"): _Tensor(layer + "input_layernorm.weight", (d,)),
        ("layers", "mlp_norm", "scale"): _Tensor(layer + "post_attention_layernorm.weight", (d,)),
        ("layers", "attn", "q_proj", "kernel"): _Tensor(
            attn + "q_proj.weight", (n * h, d), lambda w: w.T.reshape(d, n, h)
        ),
        ("layers", "attn", "k_proj", "kernel"): _Tensor(
            attn + "k_proj.weight", (kv * h, d), lambda w: w.T.reshape(d, kv, h)
        ),
        ("layers", "attn", "v_proj", "kernel"): _Tensor(
            attn + "v_proj.weight", (kv * h, d), lambda w: w.T.reshape(d, kv, h)
        ),
        ("layers", "attn", "o_proj", "kernel"): _Tensor(
            attn + "o_proj.weight", (d, n * h), lambda w: w.T.reshape(n, h, d)
        ),
        ("layers", "mlp", "gate_proj", "kernel"): _Tensor(
            layer + "mlp.gate_proj.weight", (f, d), np.transpose
        ),
        ("layers", "mlp", "up_proj", "kernel"): _Tensor(
            layer + "mlp.up_proj.weight", (f, d), np.transpose
        ),
        ("layers", "mlp", "down_proj", "kernel"): _Tensor(
            layer + "mlp.down_proj.weight", (d, f), np.transpose
        ),
    }
    if c.attention_bias:
        for name, heads in (("q_proj", n), ("k_proj", kv), ("v_proj", kv)):
            specs["layers", "attn", name, "bias"] = _Tensor(
                attn + f"{name}.bias", (heads * h,), lambda w, heads=heads: w.reshape(heads, h)
            )
    if c.qk_norm:
        specs["layers", "attn", "q_norm", "scale"] = _Tensor(attn + "q_norm.weight", (h,))
        specs["layers", "attn", "k_norm", "scale"] = _Tensor(attn + "k_norm.weight", (h,))
    if not c.tie_embeddings:
        specs["lm_head", "kernel"] = _Tensor(
            "lm_head.weight", (c.vocab_size, d), np.transpose, per_layer=False
        )
    return specs


def _check_keys(ckpt: _Checkpoint, specs: dict, c: ModelConfig) -> None:
    """Every expected tensor present, nothing unexplained left over."""
    expected = set()
    for spec in specs.values():
        layers = range(c.num_layers) if spec.per_layer else [None]
        expected.update(spec.key.format(i=i) for i in layers)
    missing = sorted(expected - set(ckpt.files))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{ckpt.name}: missing tensor '{missing[0]}'{more}")
    for key in sorted(set(ckpt.files) - expected):
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        if key == "lm_head.weight" and c.tie_embeddings:
            shape = (c.vocab_size, c.hidden_size)
            embedding = ckpt.get("model.embed_tokens.weight", shape)
            if np.array_equal(ckpt.get(key, shape), embedding):
                continue  # a tied model saved with its (identical) head: harmless.
            raise ValueError(
                f"{ckpt.files[key].path}: tensor '{key}' differs from the embedding, but the "
                "config says tie_word_embeddings=true"
            )
        raise ValueError(f"{ckpt.files[key].path}: unexpected tensor '{key}'")


def _read_leaf(ckpt: _Checkpoint, spec: _Tensor, c: ModelConfig) -> np.ndarray:
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
    ckpt = _Checkpoint(path)
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
