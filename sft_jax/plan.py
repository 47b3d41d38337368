"""Sizing a run before paying for it: bytes per device for a config on a target device count.

    python -m sft_jax.plan --config configs/x.py --devices 64 --device_memory_gib 95 \
        [--platform gpu] [--config.mesh.fsdp=-1 --config.mesh.data=1 --config.model.remat=full]
    python -m sft_jax.plan --config configs/x.py --check_compiled   (compare with XLA, see below)
    python -m sft_jax.plan --config configs/x.py --topology v5p:2x4x4 --compile [--num_slices 2]
        (the TPU compiler's answer for a TPU topology, on a host without one:
        sft_jax/planning/tpu.py)

Nothing is allocated: the state is the one training builds, traced abstractly on the planned
mesh without its devices (`sft_jax.training.state.state_layout`), and each array's bytes per device
follow from its sharding (a dimension is split only where the mesh axes divide it, exactly as
in training). A Hub id in `model.path` is fetched first (the
model files, as training would; only config.json is read here).

Full fine-tuning: gradients follow the parameters (float32 accumulators with micro-batches) and
Adam's two moments are stored in `optim.state_dtype`; `train.kl_to_base` > 0 keeps a copy of
the initial parameters (the KL reference, `reference_bytes`). LoRA: only the adapters (and the
`lora.modules_to_save` copies, float32) get gradients and Adam state; the frozen base is stored
in `lora.base_dtype`, its layer kernels as int8 / NF4 codes plus float32 block scales under
`lora.base_quant` (the layout of sft_jax/lora/quant.py). Those figures are exact.

Activations are an estimate (`activation_bytes`), calibrated against the compiled train step's
own memory analysis; `--check_compiled` compiles the real step for abstract inputs on the local
devices (sft_jax/planning/plan_check.py) and prints XLA's figure beside the plan's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh

from sft_jax import hf
from sft_jax.cli import absl_help, wants_help
from sft_jax.config import Config, ConfigError
from sft_jax.config_file import config_from_argv
from sft_jax.model.attention import resolve_implementation, ring_block
from sft_jax.model.blocked_attention import BLOCK, LOOP_FROM, TILE
from sft_jax.model.decoder import ModelConfig
from sft_jax.model.grouped_matmul import BLOCK_ROWS
from sft_jax.training import sharding, state
from sft_jax.training.loss import resolve_loss_chunk

GIB = 1024**3
HEADROOM = 0.9  # plan fits when its total is within 90% of the device (allocator slack)
# Keep no [T, S] scores for the backward (blocked and ring hold one block's scores at a time).
FLASH_ATTENTION = ("cudnn", "splash", "blocked", "ring")
# Float32 [.., S, block] score-sized buffers blocked attention's backward holds for its widest
# query block (probabilities, their gradient before and after the softmax backward).
BLOCKED_BACKWARD_BUFFERS = 3
# Float32 [block, block] tiles per query head and row ring attention's backward holds for the
# one tile it works on (scores, probabilities, their gradient before and after the softmax).
RING_TILE_BUFFERS = 4


def planned_mesh(config: Config, devices: int) -> AbstractMesh:
    """The config's mesh (the axes and sizes `sharding.make_mesh` gives it) on `devices`
    devices, without the devices."""
    shape = sharding.mesh_shape(config.mesh, devices)
    return AbstractMesh(tuple(shape.values()), tuple(shape))


def _shards(spec: tuple, mesh: AbstractMesh) -> int:
    """How many pieces a PartitionSpec cuts an array into."""
    factor = 1
    for axes in spec:
        for axis in (axes,) if isinstance(axes, str) else (axes or ()):
            factor *= mesh.shape[axis]
    return factor


def _tree_bytes(tree: Any, mesh: AbstractMesh, dtype: Any = None) -> int:
    """Bytes of a placed abstract tree on the most loaded device (dimensions are only split
    evenly), each leaf in its own dtype or in `dtype`."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        itemsize = jnp.dtype(dtype or leaf.dtype).itemsize
        total += math.prod(leaf.shape) * itemsize // _shards(leaf.sharding.spec, mesh)
    return total


def _layer_bytes(tree: Any, mesh: AbstractMesh) -> int:
    """Bytes of one decoder layer of a placed tree as FSDP gathers it on a device: the stacked
    layer leaves (leading L axis) split only where a tensor-parallel axis splits them; 0 when
    no layer leaf is split over another axis (nothing is gathered)."""
    total, gathered = 0, False
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if "layers" not in jax.tree_util.keystr(path) or leaf.ndim < 2:
            continue
        spec = leaf.sharding.spec
        named = [(a,) if isinstance(a, str) else (a or ()) for a in spec[1:]]
        tensor = math.prod(mesh.shape["tensor"] for axes in named if "tensor" in axes)
        gathered |= _shards(spec, mesh) > tensor
        total += math.prod(leaf.shape[1:]) * leaf.dtype.itemsize // tensor
    return total if gathered else 0


def _count(tree: Any) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def activation_bytes(
    c: ModelConfig,
    rows: int,
    seq_len: int,
    remat: str,
    tensor: int,
    attention: str,
    loss_chunk: int,
    context: int = 1,
    expert: int = 1,
) -> int:
    """Estimated bytes the step holds for the backward pass on one device, for `rows` packed
    rows of `seq_len` tokens (one micro-batch), each row's sequence split over `context`
    devices (context parallelism: every per-token term below is per local token), the experts
    of a mixture split over `expert` devices (expert parallelism: each device's grouped
    buffers hold the assignments of its whole expert group's tokens, `expert` times its own).

    One layer's activations per token (compute dtype b bytes; heads and mlp divided by the
    tensor-parallel size): both norms' inputs and outputs, q, k, v and their float32 RoPE'd
    copies, the attention output, o, gate, up, act(gate), act * up and down (a mixture of
    experts: over the K chosen experts' widths, plus the token's K gathered copies and outputs
    and the router's logits and probabilities; on the CPU also each expert's rows padded to
    whole blocks, sft_jax/model/grouped_matmul.py); with a non-flash
    attention (xla, reference) also the float32 scores and the probabilities, S per query and
    head. Then, per remat policy:
      none: every layer's activations are kept, plus one layer's worth of their gradients;
      dots, dots_saveable: only matmul outputs are kept (and the scores), plus one layer's
            activations while it is recomputed and differentiated;
      full: only each layer's input is kept, plus the recomputed layer's activations.
    Blocked attention (CPU) adds to that one layer's working set the float32 score blocks its
    backward holds for the widest query block, S x `BLOCK` per query head and row (from
    `LOOP_FROM` tokens on, one `TILE` x `TILE` tile). Ring
    attention keeps its float32 output and log-sum-exp per layer when nothing is
    rematerialised (its custom VJP's residuals), and its backward holds, per local token, the
    key/value chunk it passes on and the one arriving, with their float32 dK/dV accumulators,
    and, whatever the length, `RING_TILE_BUFFERS` float32 tiles of [block, block] scores.
    The loss adds the float32 logits and their gradient (2 x V x 4 bytes per token, or per
    token of one `loss_chunk` piece when chunked). `plan` adds, under remat, one more
    gradient-sized buffer (the rematerialised scan's weight gradients), and, where FSDP shards
    the layers, its per-layer buffers (`state_bytes`'s `fsdp_layer_bytes`): a layer's weights
    are all-gathered before its matmuls and its weight gradient exists unsharded before the
    reduce-scatter, so one layer's trainable weights count twice (gathered, gradient) and one
    layer of a frozen base once (gathered), each in its stored dtype. These do not shrink with
    more chips: at 70B (a layer is 3.2 GiB in float32) they are what the TPU compiler's
    temporaries held beyond the rest of the estimate, the same on 64 and 128 chips.
    Calibrated against XLA's figure for the compiled step: within 0.9-1.2 of it on data and
    tensor parallel meshes on XLA:CPU, 1.0-1.35 of the TPU compiler's for full fine-tuning and
    LoRA at real shapes except Gemma 3's 262k-vocabulary loss (docs/benchmarks.md, "Memory plan
    against XLA" and "TPU compiler", has the tables).
    """
    b = jnp.dtype(c.dtype).itemsize
    d, n, k, h = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    # MLP width per device: the routed experts run whole on each device for its own tokens
    # (sft_jax/model/moe.py), the dense MLP and a shared expert are split by tensor parallelism.
    f = c.intermediate_size / tensor
    group = expert if c.is_moe and c.num_experts % expert == 0 else 1
    if c.is_moe:
        routed = c.num_experts_per_tok * c.moe_intermediate_size * group
        f = routed + c.shared_expert_intermediate_size / tensor
    tokens = rows * seq_len / context
    heads = (n + 2 * k + n) * h / tensor  # q, k, v, attention output
    rope = 4 * (n + k) * h / tensor
    scores = 0 if attention in FLASH_ATTENTION else (4 + b) * n * seq_len / tensor
    layer = b * (6 * d + heads + 4 * f) + rope + scores
    dots = b * (2 * d + heads + 3 * f) + scores
    if c.is_moe:  # each token's input gathered and output kept once per chosen expert, and
        # the router's logits and float32 probabilities
        routed = b * 2 * c.num_experts_per_tok * d * group + (b + 4) * c.num_experts
        layer, dots = layer + routed, dots + routed
    saved, working = {
        "none": (layer, layer),
        "dots": (dots, layer),
        "dots_saveable": (dots, layer),
        "full": (b * d, layer),
    }[remat]
    if attention == "blocked":  # one layer's backward at a time: score blocks of S x block,
        # or, on the looped path of long sequences, one tile x tile block per row
        width = min(BLOCK, seq_len) if seq_len < LOOP_FROM else TILE * TILE / seq_len
        working += BLOCKED_BACKWARD_BUFFERS * 4 * n * width / tensor
    if attention == "ring":
        saved += 4 * n * (h + 1) / tensor if remat == "none" else 0  # output and lse, float32
        working += 2 * 2 * k * h * (b + 4) / tensor  # two chunks of k, v and their dk, dv
        tile = ring_block(seq_len // context)  # one [tile, tile] of every row at a time
        working += RING_TILE_BUFFERS * 4 * n * tile * tile / tensor / (seq_len / context)
    if attention == "splash" and context > 1:  # the whole row's k, v gathered, and their grads
        working += 4 * context * k * h * b / tensor
    vocab = c.vocab_size / tensor
    # A chunked loss takes `loss_chunk` positions of each device's part of every row per piece.
    loss_tokens = rows * min(loss_chunk, seq_len / context) if loss_chunk > 0 else tokens
    padding = 0
    if c.is_moe and c.platform == "cpu":  # each expert's rows padded to whole blocks, per layer
        per_layer = c.num_experts * BLOCK_ROWS * (2 * d + 3 * c.moe_intermediate_size) * b
        padding = per_layer * (c.num_layers if remat == "none" else 1)
    return int(tokens * (saved * c.num_layers + working) + 2 * 4 * vocab * loss_tokens + padding)


def state_bytes(config: Config, model_config: ModelConfig, mesh: AbstractMesh) -> dict[str, int]:
    """Exact per-device bytes of what lives between steps (the state training builds:
    `sft_jax.training.state.state_layout`), and the step's gradients."""
    # The schedule's length (2 steps here) changes neither the state nor its bytes.
    spec = state.StateSpec.from_config(config, model_config, mesh, 2)
    layout = state.state_layout(spec)
    own = _tree_bytes(layout.params, mesh)
    frozen = _tree_bytes(layout.frozen, mesh)
    accumulate = config.train.micro_batches > 1
    moments = [x for x in jax.tree.leaves(layout.opt_state) if x.ndim > 0]  # not step counts
    return {
        "parameters": _count(state.param_layout(spec)),
        "trainable_parameters": _count(layout.params),
        "param_bytes": own + frozen,
        "frozen_bytes": frozen,
        # KL-to-base under full fine-tuning: a copy of the initial parameters.
        "reference_bytes": _tree_bytes(layout.reference, mesh),
        # Gradients: float32 accumulators over micro-batches, else in each leaf's dtype.
        "grad_bytes": _tree_bytes(layout.params, mesh, "float32" if accumulate else None),
        "optimizer_bytes": _tree_bytes(moments, mesh),
        # FSDP's per-layer buffers (see `activation_bytes`): one layer's trainable weights
        # gathered and their unsharded gradient before the reduce-scatter, and one layer of
        # the frozen base (LoRA) gathered.
        "fsdp_layer_bytes": 2 * _layer_bytes(layout.params, mesh)
        + _layer_bytes(layout.frozen, mesh),
    }


def plan(
    config: Config, devices: int, device_memory_gib: float, platform: str = "cpu"
) -> dict[str, Any]:
    """The per-device memory budget of `config` on `devices` devices of `platform`."""
    model_config = hf.build_model_config(config.model)
    mesh = planned_mesh(config, devices)
    result = state_bytes(config, model_config, mesh)
    batch_split = sharding.batch_shards(mesh, config.mesh.rules)
    rows = math.ceil(config.train.global_batch_size / config.train.micro_batches / batch_split)
    attention = resolve_implementation(
        model_config.attention,
        platform=platform,
        dtype=model_config.dtype,
        head_dim=model_config.head_dim,
        softcap=model_config.attn_softcap,
        sinks=model_config.attention_sinks,
        seq_len=config.data.seq_len,
        context=mesh.shape["context"],
    )
    loss_chunk = resolve_loss_chunk(
        config.model.loss_chunk,
        rows=rows,
        seq_len=config.data.seq_len // mesh.shape["context"],
        vocab_size=model_config.vocab_size,
        kl_to_base=config.train.kl_to_base > 0,
    )
    act = activation_bytes(
        model_config,
        rows,
        config.data.seq_len,
        config.model.remat,
        mesh.shape["tensor"],
        attention,
        loss_chunk,
        mesh.shape["context"],
        dict(mesh.shape).get("expert", 1),
    )
    if config.model.remat != "none":  # the rematerialised scan's own weight-gradient buffer
        act += result["grad_bytes"]
    act += result["fsdp_layer_bytes"]  # one layer gathered (and its gradient) under FSDP
    total = (
        result["param_bytes"]
        + result["reference_bytes"]
        + result["grad_bytes"]
        + result["optimizer_bytes"]
        + act
    )
    return {
        **result,
        "devices": devices,
        "mesh": dict(mesh.shape),
        "lora": config.lora.enabled,
        "attention": attention,
        "activation_bytes_estimate": act,
        "total_bytes": total,
        "device_bytes": int(device_memory_gib * GIB),
        "fits": total <= device_memory_gib * GIB * HEADROOM,
        "tokens_per_device_per_micro_batch": rows * config.data.seq_len // mesh.shape["context"],
        "loss_chunk": loss_chunk,
        "caution": _caution(model_config, config, platform),
    }


def _caution(model_config: ModelConfig, config: Config, platform: str) -> str:
    """What the estimate is known to miss, said next to it: the TPU compiler keeps more
    temporaries for mixture-of-experts full fine-tuning than the activation model counts
    (docs/benchmarks.md, "Mixture of experts"), a gap not yet explained."""
    if platform == "tpu" and model_config.is_moe and not config.lora.enabled:
        return (
            "caution: for mixture-of-experts full fine-tuning the TPU compiler has needed up to "
            "1.25x this total (its temporaries exceed the activation estimate); confirm with "
            "--topology ... --compile before launching"
        )
    return ""


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
        f"{result['tokens_per_device_per_micro_batch']} tokens per device per micro-batch; "
        + (
            f"loss in pieces of {result['loss_chunk']} positions)"
            if result["loss_chunk"]
            else "whole logits)"
        ),
        f"  total       {gib(result['total_bytes'])}  of {gib(result['device_bytes'])} per device",
        "  FITS (with 10% headroom)"
        if result["fits"]
        else "  DOES NOT FIT: add devices, shard more (mesh.fsdp), use remat, fewer rows per "
        "micro-batch, model.loss_chunk, bf16 params or LoRA",
    ]
    if result.get("caution"):
        lines.append(f"  {result['caution']}")
    if result["reference_bytes"]:
        copy = "(exact: train.kl_to_base's copy of the initial parameters)"
        lines.insert(2, f"  reference   {gib(result['reference_bytes'])}  {copy}")
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
    compiler's figures too (sft_jax/planning/tpu.py), then one JSON line with both."""
    from sft_jax.planning import tpu

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
            from sft_jax.planning.plan_check import compare, format_comparison

            print(format_comparison(compare(config, result)))
    except (ConfigError, hf.UnsupportedModelError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
