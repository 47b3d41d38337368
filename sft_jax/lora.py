"""LoRA as pure functions over the parameter tree: adapters are a tree of their own.

Before (the model's parameters; layers stacked on a leading L axis):

    params/layers/attn/q_proj/kernel [L, D, N, H]    params/layers/mlp/up_proj/kernel [L, D, F]

After `init_adapters(params, targets, rank)`: a second tree with the same paths, holding for each
targeted kernel of shape [L, *in, *out] a down-projection `a` [L, *in, R] and an up-projection
`b` [L, R, *out] (B starts at zero, so the model is unchanged at step 0):

    adapters/layers/attn/q_proj/{a [L, D, R], b [L, R, N, H]}   adapters/layers/mlp/up_proj/{a, b}

Training differentiates only the adapter tree (the base tree is a constant of the loss, so no
weight gradient is ever formed for it: the model adds scale * (x @ a) @ b to x @ W instead of
materialising W + scale * a @ b). `merge` folds adapters into the kernels for export; PEFT
conversion maps each layer's a/b to `lora_A.weight` [R, in] and `lora_B.weight` [out, R].
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Kernels of the decoder: name -> (number of input dims after L, HF module path inside a layer).
KERNELS = {
    "q_proj": (1, "self_attn.q_proj"),
    "k_proj": (1, "self_attn.k_proj"),
    "v_proj": (1, "self_attn.v_proj"),
    "o_proj": (2, "self_attn.o_proj"),
    "gate_proj": (1, "mlp.gate_proj"),
    "up_proj": (1, "mlp.up_proj"),
    "down_proj": (1, "mlp.down_proj"),
}
ALL_LINEAR = tuple(KERNELS)


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA (keeps updates stable at large r)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def target_paths(params: dict, targets: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Paths (without the trailing "kernel") of the layer kernels whose module name matches a
    pattern in `targets` (fnmatch globs such as "*_proj" or exact names such as "q_proj")."""
    found = []
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = tuple(str(getattr(p, "key", p)) for p in path)
        if keys[0] != "layers" or keys[-1] != "kernel" or keys[-2] not in KERNELS:
            continue
        if any(fnmatch.fnmatchcase(keys[-2], pattern) for pattern in targets):
            found.append(keys[:-1])
    if not found:
        raise ValueError(f"LoRA targets {targets} match no layer kernel; choose from {ALL_LINEAR}")
    return found


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def init_adapters(
    params: dict, targets: tuple[str, ...], rank: int, rng: jax.Array, dtype: Any = jnp.float32
) -> dict:
    """A (Kaiming-uniform like PEFT, bound 1/sqrt(fan_in)) and B = 0 for every targeted kernel."""
    adapters: dict = {}
    paths = target_paths(params, targets)
    for i, path in enumerate(paths):
        kernel = _get(params, path)["kernel"]
        n_in = KERNELS[path[-1]][0]
        layers, in_shape = kernel.shape[0], kernel.shape[1 : 1 + n_in]
        out_shape = kernel.shape[1 + n_in :]
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        a = jax.random.uniform(
            jax.random.fold_in(rng, i), (layers, *in_shape, rank), dtype, -bound, bound
        )
        b = jnp.zeros((layers, rank, *out_shape), dtype)
        _set(adapters, path, {"a": a, "b": b})
    return adapters


def delta(adapter: dict, scale: float) -> jax.Array:
    """scale * a @ b in float32, shaped like the kernel [L, *in, *out]."""
    a = adapter["a"].astype(jnp.float32)  # [L, *in, R]
    b = adapter["b"].astype(jnp.float32)  # [L, R, *out]
    layers, rank = a.shape[0], a.shape[-1]
    flat = jnp.einsum("lir,lro->lio", a.reshape(layers, -1, rank), b.reshape(layers, rank, -1))
    return scale * flat.reshape(*a.shape[:-1], *b.shape[2:])


def merge(params: dict, adapters: dict, scale: float) -> dict:
    """A new parameter tree with W + scale * a @ b in every adapted kernel (pure)."""

    def visit(p: Any, ad: Any) -> Any:
        if isinstance(ad, dict) and "a" in ad and "b" in ad:
            kernel = p["kernel"]
            merged = (kernel.astype(jnp.float32) + delta(ad, scale)).astype(kernel.dtype)
            return {**p, "kernel": merged}
        return {k: visit(p[k], ad[k]) if k in ad else p[k] for k in p}

    return visit(params, adapters)


def count(adapters: dict) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(adapters))


# ------------------------------------------------------------------------- PEFT conversion


def to_peft_tensors(adapters: dict) -> dict[str, np.ndarray]:
    """PEFT state dict: per layer i, `...layers.{i}.self_attn.q_proj.lora_A.weight` [R, in] and
    `lora_B.weight` [out, R] (HF Linear layout, in = product of our input dims)."""
    tensors = {}
    for path, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]:
        keys = tuple(str(getattr(p, "key", p)) for p in path)
        if keys[-1] != "a":
            continue
        module = keys[-2]
        ad = _get(adapters, keys[:-1])
        a, b = np.asarray(ad["a"], np.float32), np.asarray(ad["b"], np.float32)
        layers, rank = a.shape[0], a.shape[-1]
        for layer in range(layers):
            prefix = f"base_model.model.model.layers.{layer}.{KERNELS[module][1]}"
            tensors[f"{prefix}.lora_A.weight"] = a[layer].reshape(-1, rank).T.copy()
            tensors[f"{prefix}.lora_B.weight"] = b[layer].reshape(rank, -1).T.copy()
    return tensors


def from_peft_tensors(
    tensors: dict[str, np.ndarray], params: dict, dtype: Any = jnp.float32
) -> dict:
    """Inverse of `to_peft_tensors`, shaped after the kernels of `params`."""
    by_module = {v[1]: k for k, v in KERNELS.items()}
    per_path: dict[tuple[str, ...], dict[str, dict[int, np.ndarray]]] = {}
    for name, value in tensors.items():
        parts = name.split(".")
        if "layers" not in parts or parts[-2] not in ("lora_A", "lora_B"):
            raise ValueError(f"unexpected PEFT tensor {name!r}")
        layer = int(parts[parts.index("layers") + 1])
        module = by_module.get(".".join(parts[parts.index("layers") + 2 : -2]))
        if module is None:
            raise ValueError(f"PEFT tensor {name!r} targets a module sft_jax does not adapt")
        group = "attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        per_path.setdefault(("layers", group, module), {"a": {}, "b": {}})
        per_path[("layers", group, module)]["a" if parts[-2] == "lora_A" else "b"][layer] = value
    adapters: dict = {}
    for path, parts in per_path.items():
        kernel = _get(params, path)["kernel"]
        n_in = KERNELS[path[-1]][0]
        in_shape, out_shape = kernel.shape[1 : 1 + n_in], kernel.shape[1 + n_in :]
        layers = kernel.shape[0]
        if sorted(parts["a"]) != list(range(layers)) or sorted(parts["b"]) != list(range(layers)):
            raise ValueError(
                f"PEFT adapter for {'/'.join(path)} does not cover all {layers} layers"
            )
        a = np.stack([parts["a"][i].T.reshape(*in_shape, -1) for i in range(layers)])
        b = np.stack([parts["b"][i].T.reshape(-1, *out_shape) for i in range(layers)])
        _set(adapters, path, {"a": jnp.asarray(a, dtype), "b": jnp.asarray(b, dtype)})
    return adapters
