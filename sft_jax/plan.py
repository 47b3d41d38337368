"""Sizing a run before paying for it: bytes per device for a config on a target device count.

    python -m sft_jax.plan --config configs/x.py --devices 64 --device_memory_gib 95 \
        [--platform gpu] [--config.mesh.fsdp=-1 --config.mesh.data=1 --config.model.remat=full]
    python -m sft_jax.plan --config configs/x.py --check_compiled   (compare with XLA, see below)
    python -m sft_jax.plan --config configs/x.py --topology v5p:2x4x4 --compile [--num_slices 2]
        (the TPU compiler's answer for a TPU topology, on a host without one: sft_jax/tpu.py)

Nothing is allocated: the model is traced abstractly, and each array's bytes per device follow
from its logical axes, the rules table and the planned mesh (a dimension is split only where the
mesh axes divide it, exactly as in training). A Hub id in `model.path` is fetched first (the
model files, as training would; only config.json is read here).

Full fine-tuning: gradients follow the parameters (float32 accumulators with micro-batches) and
Adam's two moments are stored in `optim.state_dtype`. LoRA: only the adapters (and the
`lora.modules_to_save` copies, float32) get gradients and Adam state; the frozen base is stored
in `lora.base_dtype`, its layer kernels as int8 / NF4 codes plus float32 block scales under
`lora.base_quant` (the layout of sft_jax/lora/quant.py). Those figures are exact.

Activations are an estimate (`activation_bytes`), calibrated against the compiled train step's
own memory analysis; `--check_compiled` compiles the real step for abstract inputs on the local
devices (sft_jax/plan_check.py) and prints XLA's figure beside the plan's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sft_jax import hf, lora, state
from sft_jax.attention import resolve_implementation
from sft_jax.blocked_attention import BLOCK
from sft_jax.cli import absl_help, wants_help
from sft_jax.config import Config, ConfigError, config_from_argv
from sft_jax.model import ModelConfig, Transformer
from sft_jax.sharding import MESH_AXES, logical_to_spec

GIB = 1024**3
HEADROOM = 0.9  # plan fits when its total is within 90% of the device (allocator slack)
# Keep no [T, S] scores for the backward (blocked holds one block's scores at a time).
FLASH_ATTENTION = ("cudnn", "splash", "blocked")
# Float32 [.., S, block] score-sized buffers blocked attention's backward holds for its widest
# query block (probabilities, their gradient before and after the softmax backward).
BLOCKED_BACKWARD_BUFFERS = 3


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


def _shards(spec: tuple, mesh: PlannedMesh) -> int:
    """How many pieces a PartitionSpec cuts an array into."""
    factor = 1
    for axes in spec:
        for axis in (axes,) if isinstance(axes, str) else (axes or ()):
            factor *= mesh.shape[axis]
    return factor


def _bytes(leaf: Any, spec: tuple, mesh: PlannedMesh, dtype: Any = None) -> int:
    """Bytes of `leaf` on the most loaded device (dimensions are only split evenly)."""
    itemsize = jnp.dtype(dtype or leaf.dtype).itemsize
    return math.prod(leaf.shape) * itemsize // _shards(spec, mesh)


def param_layout(model_config: ModelConfig, mesh: PlannedMesh, rules) -> tuple[Any, Any]:
    """(abstract unboxed parameters, tree of their mesh PartitionSpecs as tuples)."""
    boxed = state.abstract_boxed_params(Transformer(model_config))
    params = nn.unbox(boxed)

    def spec(logical: Any, leaf: Any) -> tuple:
        names = tuple(logical) + (None,) * (len(leaf.shape) - len(tuple(logical)))
        return tuple(logical_to_spec(names, leaf.shape, mesh, rules))

    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
    specs = jax.tree.map(spec, nn.get_partition_spec(boxed), params, is_leaf=is_spec)
    return params, specs


def _tree_bytes(tree: Any, specs: Any, mesh: PlannedMesh, dtype: Any = None) -> int:
    leaves = jax.tree.leaves(tree)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, tuple))
    return sum(_bytes(x, s, mesh, dtype) for x, s in zip(leaves, spec_leaves, strict=True))


def param_bytes_per_device(model_config: ModelConfig, mesh: PlannedMesh, rules) -> tuple[int, int]:
    """(total parameter count, parameter bytes on the most loaded device)."""
    params, specs = param_layout(model_config, mesh, rules)
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    return count, _tree_bytes(params, specs, mesh)


def frozen_base_bytes(params: Any, specs: Any, cfg: Any, mesh: PlannedMesh) -> int:
    """Per-device bytes of the frozen LoRA base: `lora.base_dtype`, layer kernels as blockwise
    codes + float32 scales when `lora.base_quant` is int8 / nf4 (sft_jax/lora/quant.py)."""
    quantize = lambda p: lora.quantize_kernels(p, cfg.base_quant, jnp.dtype(cfg.base_dtype))
    frozen = jax.eval_shape(quantize, params)
    is_q = lambda x: isinstance(x, lora.Quantized)
    flat_frozen = jax.tree.leaves(frozen, is_leaf=is_q)
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, tuple))
    total = 0
    for q, spec in zip(flat_frozen, flat_specs, strict=True):
        if not is_q(q):
            total += _bytes(q, spec, mesh)
            continue
        blocks = q.scales.shape[-1]
        q_specs = lora.quantized_specs(spec, len(q.shape), blocks, mesh.shape)
        total += _bytes(q.codes, q_specs["codes"], mesh) + _bytes(q.scales, q_specs["scales"], mesh)
    return total


def adapter_layout(params: Any, specs: Any, cfg: Any) -> tuple[Any, Any]:
    """(abstract adapter tree as training builds it, their PartitionSpecs): a / b (and DoRA's m)
    per targeted kernel, following the kernel's sharding (`lora.adapter_specs`), plus the
    float32 `modules_to_save` copies, which follow their frozen leaf."""

    def make(p: Any) -> Any:
        adapters = lora.init_adapters(p, cfg.targets, cfg.rank, jax.random.key(0))
        if cfg.dora:
            adapters = lora.init_magnitudes(p, adapters)
        return lora.add_saved_modules(p, adapters, cfg.modules_to_save)

    try:
        adapters = jax.eval_shape(make, params)
    except ValueError as e:
        raise ConfigError(f"lora.targets / lora.modules_to_save: {e}") from e

    def visit(ad: dict, sp: dict, name: str) -> dict:
        if "a" not in ad:
            return {k: visit(v, sp[k], k) for k, v in ad.items() if k != lora.SAVED}
        kernel = sp["kernel"]
        per = lora.adapter_specs(kernel, len(kernel), lora.KERNELS[name][0])
        return {k: per[k] for k in ad}

    out = visit(adapters, specs, "")
    if lora.SAVED in adapters:
        table = lora.saved_module_table(params)
        leaf = lambda path: _get(specs, path)
        out[lora.SAVED] = {m: leaf(table[m][0]) for m in adapters[lora.SAVED]}
    return adapters, out


def _get(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def activation_bytes(
    c: ModelConfig,
    rows: int,
    seq_len: int,
    remat: str,
    tensor: int,
    attention: str,
    loss_chunk: int,
) -> int:
    """Estimated bytes the step holds for the backward pass on one device, for `rows` packed
    rows of `seq_len` tokens (one micro-batch).

    One layer's activations per token (compute dtype b bytes; heads and mlp divided by the
    tensor-parallel size): both norms' inputs and outputs, q, k, v and their float32 RoPE'd
    copies, the attention output, o, gate, up, act(gate), act * up and down; with a non-flash
    attention (xla, reference) also the float32 scores and the probabilities, S per query and
    head. Then, per remat policy:
      none: every layer's activations are kept, plus one layer's worth of their gradients;
      dots, dots_saveable: only matmul outputs are kept (and the scores), plus one layer's
            activations while it is recomputed and differentiated;
      full: only each layer's input is kept, plus the recomputed layer's activations.
    Blocked attention (CPU) adds to that one layer's working set the float32 score blocks its
    backward holds for the widest query block, S x `BLOCK` per query head and row.
    The loss adds the float32 logits and their gradient (2 x V x 4 bytes per token, or per
    token of one `loss_chunk` piece when chunked). `plan` adds, under remat, one more
    gradient-sized buffer (the rematerialised scan's weight gradients). Calibrated against XLA's
    figure for the compiled step: within 0.9-1.2 of it on data and tensor parallel meshes
    (sft_jax/plan_check.py has the table).
    """
    b = jnp.dtype(c.dtype).itemsize
    d, f, n, k, h = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    tokens = rows * seq_len
    heads = (n + 2 * k + n) * h / tensor  # q, k, v, attention output
    rope = 4 * (n + k) * h / tensor
    scores = 0 if attention in FLASH_ATTENTION else (4 + b) * n * seq_len / tensor
    layer = b * (6 * d + heads + 4 * f / tensor) + rope + scores
    dots = b * (2 * d + heads + 3 * f / tensor) + scores
    saved, working = {
        "none": (layer, layer),
        "dots": (dots, layer),
        "dots_saveable": (dots, layer),
        "full": (b * d, layer),
    }[remat]
    if attention == "blocked":  # one layer's backward at a time: score blocks of S x block
        working += BLOCKED_BACKWARD_BUFFERS * 4 * n * min(BLOCK, seq_len) / tensor
    vocab = c.vocab_size / tensor
    loss_tokens = rows * min(loss_chunk, seq_len) if loss_chunk > 0 else tokens
    return int(tokens * (saved * c.num_layers + working) + 2 * 4 * vocab * loss_tokens)


def state_bytes(config: Config, model_config: ModelConfig, mesh: PlannedMesh) -> dict[str, int]:
    """Exact per-device bytes of what lives between steps, and the step's gradients."""
    params, specs = param_layout(model_config, mesh, config.mesh.rules)
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    moment = jnp.dtype(config.optim.state_dtype)
    accumulate = config.train.micro_batches > 1
    if config.lora.enabled:
        adapters, adapter_specs = adapter_layout(params, specs, config.lora)
        trainable = adapters
        trainable_specs = adapter_specs
        base = frozen_base_bytes(params, specs, config.lora, mesh)
    else:
        trainable, trainable_specs, base = params, specs, 0
    own = _tree_bytes(trainable, trainable_specs, mesh)
    return {
        "parameters": count,
        "trainable_parameters": sum(math.prod(x.shape) for x in jax.tree.leaves(trainable)),
        "param_bytes": own + base,
        "frozen_bytes": base,
        # Gradients: float32 accumulators over micro-batches, else in each leaf's dtype.
        "grad_bytes": _tree_bytes(
            trainable, trainable_specs, mesh, "float32" if accumulate else None
        ),
        "optimizer_bytes": 2 * _tree_bytes(trainable, trainable_specs, mesh, moment),
    }


def plan(
    config: Config, devices: int, device_memory_gib: float, platform: str = "cpu"
) -> dict[str, Any]:
    """The per-device memory budget of `config` on `devices` devices of `platform`."""
    model_config = hf.build_model_config(config.model)
    mesh = planned_mesh(config, devices)
    result = state_bytes(config, model_config, mesh)
    rules = dict(config.mesh.rules)
    batch_axes = rules.get("batch") or ()
    batch_axes = (batch_axes,) if isinstance(batch_axes, str) else batch_axes
    batch_split = math.prod(mesh.shape[a] for a in batch_axes)
    rows = math.ceil(config.train.global_batch_size / config.train.micro_batches / batch_split)
    attention = resolve_implementation(
        model_config.attention,
        platform=platform,
        dtype=model_config.dtype,
        head_dim=model_config.head_dim,
        softcap=model_config.attn_softcap,
        seq_len=config.data.seq_len,
    )
    act = activation_bytes(
        model_config,
        rows,
        config.data.seq_len,
        config.model.remat,
        mesh.shape["tensor"],
        attention,
        config.model.loss_chunk,
    )
    if config.model.remat != "none":  # the rematerialised scan's own weight-gradient buffer
        act += result["grad_bytes"]
    total = result["param_bytes"] + result["grad_bytes"] + result["optimizer_bytes"] + act
    return {
        **result,
        "devices": devices,
        "mesh": mesh.shape,
        "lora": config.lora.enabled,
        "attention": attention,
        "activation_bytes_estimate": act,
        "total_bytes": total,
        "device_bytes": int(device_memory_gib * GIB),
        "fits": total <= device_memory_gib * GIB * HEADROOM,
        "tokens_per_device_per_micro_batch": rows * config.data.seq_len,
    }


def format_plan(result: dict[str, Any], remat: str) -> str:
    gib = lambda x: f"{x / GIB:8.2f} GiB" if x >= GIB / 10 else f"{x / 2**20:8.2f} MiB"
    count = lambda n: f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.3f}M"
    trainable = ""
    if result["lora"]:
        trainable = f" ({count(result['trainable_parameters'])} trainable: LoRA)"
    lines = [
        f"{count(result['parameters'])} parameters{trainable} on {result['devices']} "
        f"devices, mesh {result['mesh']}, remat={remat}, attention={result['attention']}",
        f"  parameters  {gib(result['param_bytes'])}  (exact"
        + (f"; frozen base {gib(result['frozen_bytes']).strip()})" if result["lora"] else ")"),
        f"  gradients   {gib(result['grad_bytes'])}  (exact)",
        f"  optimizer   {gib(result['optimizer_bytes'])}  (exact: Adam mu + nu)",
        f"  activations {gib(result['activation_bytes_estimate'])}  (estimate, "
        f"{result['tokens_per_device_per_micro_batch']} tokens per device per micro-batch)",
        f"  total       {gib(result['total_bytes'])}  of {gib(result['device_bytes'])} per device",
        "  FITS (with 10% headroom)"
        if result["fits"]
        else "  DOES NOT FIT: add devices, shard more (mesh.fsdp), use remat, fewer rows per "
        "micro-batch, model.loss_chunk, bf16 params or LoRA",
    ]
    return "\n".join(lines)


def resolve_model_path(config: Config) -> Config:
    """`model.path` as a local directory: a Hub id is fetched, as `python -m sft_jax.train`
    would (sft_jax.hf.resolve_model_dir)."""
    if not hf.looks_like_hub_id(config.model.path):
        return config
    print(f"fetching {config.model.path} from the Hugging Face Hub ...", file=sys.stderr)
    model = dataclasses.replace(config.model, path=hf.resolve_model_dir(config.model.path))
    return dataclasses.replace(config, model=model)


def plan_topology(config: Config, topology: str, num_slices: int, compile_step: bool) -> int:
    """The plan for every chip of `num_slices` x `topology`; with `compile_step` the TPU
    compiler's figures too (sft_jax/tpu.py), then one JSON line with both."""
    from sft_jax import tpu

    generation, chips = tpu.parse_topology(topology)
    chips *= num_slices
    result = plan(config, chips * generation.devices_per_chip,
                  generation.hbm_gib / generation.devices_per_chip, "tpu")  # fmt: skip
    print(format_plan(result, config.model.remat))
    if not compile_step:
        return 0
    compiled = tpu.compile_for_topology(config, topology, num_slices)
    print(tpu.format_compiled(compiled))
    planned = result["total_bytes"] * generation.devices_per_chip
    compiled["plan_bytes_per_chip"] = planned
    compiled["plan_over_compiled"] = planned / compiled["peak_bytes_per_chip"]
    print(f"  plan / TPU compiler = {compiled['plan_over_compiled']:.2f}")
    print(json.dumps(compiled), flush=True)
    return 0


PLAN_HELP = (
    "Prints parameter, gradient, optimizer and activation bytes per device for a config on N\n"
    "devices of a platform, and whether it fits in --device_memory_gib. Nothing is trained."
)


def main(argv: list[str] | None = None) -> int:
    from absl import flags

    flag_values = flags.FlagValues()
    flags.DEFINE_integer("devices", None, "Target device count.", flag_values=flag_values)
    flags.DEFINE_float("device_memory_gib", 80.0, "Memory per device.", flag_values=flag_values)
    flags.DEFINE_enum(
        "platform", None, ["cpu", "gpu", "tpu"],
        "Target platform (decides model.attention=auto); default: "
        "distributed.expected_platform, else this machine's.", flag_values=flag_values,
    )  # fmt: skip
    flags.DEFINE_string(
        "topology", None, "TPU topology (v5e:2x4, v5p:4x4x4, ...): plan for its chips and HBM "
        "(sets --devices, --device_memory_gib and --platform tpu).", flag_values=flag_values,
    )  # fmt: skip
    flags.DEFINE_integer(
        "num_slices", 1, "Slices of --topology (multi-slice: data parallel across slices).",
        flag_values=flag_values,
    )  # fmt: skip
    flags.DEFINE_bool(
        "compile", False, "With --topology: compile the real train step with the TPU compiler "
        "(needs libtpu, no TPU) and print its memory and roofline; last line JSON.",
        flag_values=flag_values,
    )  # fmt: skip
    flags.DEFINE_bool(
        "check_compiled", False, "Also compile the train step for abstract inputs on the local "
        "devices and print XLA's memory analysis next to the plan.", flag_values=flag_values,
    )  # fmt: skip
    argv = sys.argv if argv is None else argv
    if wants_help(argv[1:]):
        usage = "python -m sft_jax.plan --config FILE[:ARG] [--devices N] [--config.KEY=VALUE ...]"
        print(absl_help(usage, PLAN_HELP, flag_values), end="")
        return 0
    try:
        config = resolve_model_path(config_from_argv(argv, flag_values))
        platform = (
            flag_values.platform or config.distributed.expected_platform or jax.default_backend()
        )
        devices = flag_values.devices or jax.device_count()
        memory_gib = flag_values.device_memory_gib
        if flag_values.compile and not flag_values.topology:
            raise ConfigError("--compile compiles for a TPU topology: add --topology (v5e:2x4)")
        if flag_values.topology:
            return plan_topology(config, flag_values.topology, flag_values.num_slices,
                                 flag_values.compile)  # fmt: skip
        result = plan(config, devices, memory_gib, platform)
        print(format_plan(result, config.model.remat))
        if flag_values.check_compiled:
            from sft_jax.plan_check import compare, format_comparison

            print(format_comparison(compare(config, result)))
    except (ConfigError, hf.UnsupportedModelError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
