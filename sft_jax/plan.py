"""Sizing a run before paying for it: bytes per device for a config on a target device count.

    python -m sft_jax.plan --config configs/x.py --devices 64 --device_memory_gib 95 \
        [--config.mesh.fsdp=-1 --config.mesh.data=1 --config.model.remat=full ...]

Nothing is allocated: the model is traced abstractly, and each parameter's bytes per device follow
from its logical axes, the rules table and the planned mesh (a dimension is split only where the
mesh axes divide it, exactly as in training). Gradients and Adam's two moments follow the
parameters. Activations are an estimate per remat policy (see `activation_bytes`); the output
says which numbers are exact and which are estimates.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sft_jax import hf
from sft_jax.config import Config, ConfigError, config_from_argv
from sft_jax.model import ModelConfig, Transformer
from sft_jax.sharding import MESH_AXES, logical_to_spec

GIB = 1024**3


class PlannedMesh:
    """Stands in for a jax Mesh where only axis sizes matter (no devices needed)."""

    def __init__(self, sizes: dict[str, int]):
        self.shape = sizes


def planned_mesh(config: Config, devices: int) -> PlannedMesh:
    sizes = [config.mesh.data, config.mesh.fsdp, config.mesh.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if devices % known:
            raise ConfigError(f"mesh {tuple(sizes)} does not divide {devices} devices")
        sizes[sizes.index(-1)] = devices // known
    if math.prod(sizes) != devices:
        raise ConfigError(f"mesh {tuple(sizes)} needs {math.prod(sizes)} devices, not {devices}")
    return PlannedMesh(dict(zip(MESH_AXES, sizes, strict=True)))


def abstract_boxed_params(model_config: ModelConfig) -> Any:
    model = Transformer(model_config)
    tokens = jnp.zeros((1, 8), jnp.int32)
    init = lambda rng: model.init(rng, tokens, tokens, jnp.ones_like(tokens))["params"]
    return jax.eval_shape(init, jax.random.key(0, impl="rbg"))


def param_bytes_per_device(model_config: ModelConfig, mesh: PlannedMesh, rules) -> tuple[int, int]:
    """(total parameter count, parameter bytes on the most loaded device)."""
    boxed = abstract_boxed_params(model_config)
    specs = nn.get_partition_spec(boxed)
    leaves = jax.tree.leaves(nn.unbox(boxed))
    count, per_device = 0, 0
    for spec, leaf in zip(jax.tree.leaves(specs), leaves, strict=True):
        names = tuple(spec) + (None,) * (len(leaf.shape) - len(tuple(spec)))
        sharded = logical_to_spec(names, leaf.shape, mesh, rules)
        factor = 1
        for axes in sharded:
            for axis in (axes,) if isinstance(axes, str) else (axes or ()):
                factor *= mesh.shape[axis]
        count += math.prod(leaf.shape)
        per_device += math.prod(leaf.shape) * leaf.dtype.itemsize // factor
    return count, per_device


def activation_bytes(c: ModelConfig, tokens: int, seq_len: int, remat: str, tensor: int) -> int:
    """Estimated bytes kept for the backward pass per device, for `tokens` tokens per device.

    Per layer and token (compute dtype bytes b; fp32 attention scores):
      none: inputs of both norms and every matmul output, SwiGLU intermediates, scores and probs;
      dots: only matmul outputs (q, k, v, attention out, o, gate, up, down) and scores;
      full: the layer input only (one layer is recomputed at a time; its working set is added).
    Head and mlp terms are divided by the tensor-parallel size. Logits add 2 x V x 4 bytes per
    token (fp32 logits and their gradient).
    """
    b = jnp.dtype(c.dtype).itemsize
    d, f, n, k, h = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    heads = (2 * n * h + 2 * k * h) / tensor
    scores = 8 * n * seq_len / tensor  # scores + probs, fp32, per query token
    everything = b * (4 * d + heads + 4 * f / tensor) + scores
    saved = {
        "none": everything,
        "dots": b * (2 * d + heads + 3 * f / tensor) + scores / 2,
        "full": b * d,
    }[remat]
    working_set = everything * tokens if remat == "full" else 0
    logits = 2 * c.vocab_size * 4 / tensor
    return int(tokens * (saved * c.num_layers + logits) + working_set)


def plan(config: Config, devices: int, device_memory_gib: float) -> dict[str, Any]:
    """The per-device memory budget of `config` on `devices` devices."""
    model_config = hf.build_model_config(config.model)
    mesh = planned_mesh(config, devices)
    params, param_bytes = param_bytes_per_device(model_config, mesh, config.mesh.rules)
    accumulate = config.train.micro_batches > 1
    # Gradients are accumulated in float32 over micro-batches, else kept in the parameter dtype.
    widen = 4 // jnp.dtype(config.model.param_dtype).itemsize
    grad_bytes = param_bytes * (widen if accumulate else 1)
    optimizer_bytes = 2 * param_bytes  # Adam mu and nu, in the parameter dtype
    batch_split = np.prod([mesh.shape[a] for a in ("data", "fsdp")])
    rows = config.train.global_batch_size / config.train.micro_batches / batch_split
    tokens = math.ceil(rows) * config.data.seq_len
    act = activation_bytes(
        model_config, tokens, config.data.seq_len, config.model.remat, mesh.shape["tensor"]
    )
    total = param_bytes + grad_bytes + optimizer_bytes + act
    return {
        "devices": devices,
        "mesh": mesh.shape,
        "parameters": params,
        "param_bytes": param_bytes,
        "grad_bytes": grad_bytes,
        "optimizer_bytes": optimizer_bytes,
        "activation_bytes_estimate": act,
        "total_bytes": total,
        "device_bytes": int(device_memory_gib * GIB),
        "fits": total <= device_memory_gib * GIB * 0.9,  # 10% headroom for XLA temporaries
        "tokens_per_device_per_micro_batch": tokens,
    }


def format_plan(result: dict[str, Any], remat: str) -> str:
    gib = lambda x: f"{x / GIB:8.2f} GiB"
    lines = [
        f"{result['parameters'] / 1e9:.3f}B parameters on {result['devices']} devices, "
        f"mesh {result['mesh']}, remat={remat}",
        f"  parameters  {gib(result['param_bytes'])}  (exact)",
        f"  gradients   {gib(result['grad_bytes'])}  (exact)",
        f"  optimizer   {gib(result['optimizer_bytes'])}  (exact: Adam mu + nu)",
        f"  activations {gib(result['activation_bytes_estimate'])}  (estimate, "
        f"{result['tokens_per_device_per_micro_batch']} tokens per device per micro-batch)",
        f"  total       {gib(result['total_bytes'])}  of {gib(result['device_bytes'])} per device",
        "  FITS (with 10% headroom)"
        if result["fits"]
        else "  DOES NOT FIT: add devices, "
        "shard more (mesh.fsdp), use remat, fewer rows per micro-batch or bf16 params",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from absl import flags

    flag_values = flags.FlagValues()
    flags.DEFINE_integer("devices", None, "Target device count.", flag_values=flag_values)
    flags.DEFINE_float("device_memory_gib", 80.0, "Memory per device.", flag_values=flag_values)
    argv = sys.argv if argv is None else argv
    try:
        config = config_from_argv(argv, flag_values)
        devices = flag_values.devices or jax.device_count()
        result = plan(config, devices, flag_values.device_memory_gib)
    except (ConfigError, hf.UnsupportedModelError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_plan(result, config.model.remat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
