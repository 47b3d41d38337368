"""The real train step compiled for a TPU topology on a host without a TPU.

    python -m sft_jax.plan --config C --topology v5e:2x2 --compile [--num_slices 2]

Why: whether a config fits a pod, and how fast it can be at best, is the TPU compiler's answer,
not an estimate's; libtpu (`pip install -e ".[tpu]"`) compiles ahead of time for a topology that
is not attached (`jax.experimental.topologies`), as MaxText's train_compile.py does. The mesh is
built over those abstract devices by `sharding.make_mesh` (the trainer's own; with several
slices the hybrid ICI/DCN mesh), the state by `sft_jax.training.state.state_layout` (through
`plan_check.abstract_train_state`) and the step by `plan_check.compile_abstract_step`: the same
functions the trainer and the CPU check use.

Figures, per chip: the memory analysis' argument + output - alias + temp (`peak`); the HBM of
the generation (`flops.TPU_GENERATIONS`); and a roofline bound. XLA's cost analysis counts the
body of a loop once, and the step loops over layers (scan) and micro-batches, so the flops and
bytes of one step come from loop-free variants (layers unrolled, one micro-batch): the step at
1 and 2 layers (C1, C2) and the optimizer update alone at 1 and 2 layers (U1, U2), all linear
in the layer count L:

    step = micro_batches x (C(L) - U(L)) + U(L),   X(L) = X1 + (L - 1) (X2 - X1).

The bound on the step time is max(flops / peak, bytes accessed / HBM bandwidth) per chip; the
MFU it allows is the model flops of a step (`flops.flops_per_token`) over chips x peak x that
time. Communication is not in the bound; "bytes accessed" counts each fused op's operands and
results, so real HBM traffic can be lower; the unrolled variants need not recompute the forward
under remat (XLA keeps activations where it can), so the flops can miss the recomputation.
Layers that differ (Gemma's local and global attention) are taken as alike: `kernel_flops`
counts a sliding-window layer's splash work as a global layer's.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import time
from typing import Any

import jax

from sft_jax import hf
from sft_jax.config import Config, ConfigError
from sft_jax.model.attention import resolve_implementation
from sft_jax.model.decoder import ModelConfig
from sft_jax.planning.flops import TPU_GENERATIONS, TpuGeneration, flops_per_token, tpu_generation
from sft_jax.planning.plan_check import abstract_train_state, compile_abstract_step, memory_figures
from sft_jax.training import sharding
from sft_jax.training.preflight import check_train_batch
from sft_jax.training.step import apply_updates

GIB = 1024**3
# libtpu without an attached TPU: skip the cloud metadata query, and compile even while another
# process holds libtpu (its lockfile guards the chips, which compile-only use never opens).
COMPILE_ONLY_ENV = {"TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
# How the TPU compiler says a program does not fit: "... required for HLO temporaries (20.00G)
# exceeds available HBM (15.75G)" or "Used 20.5G of 15.75G hbm".
_OOM = re.compile(r"(?:[Uu]sed |required for [^(]*\()([\d.]+)([KMGT])?")


def libtpu_missing() -> str | None:
    """Why TPU compilation is unavailable here (libtpu not installed), or None."""
    # Looked up, not imported: libtpu is loaded once, by jax's topology API, when it is needed.
    if importlib.util.find_spec("libtpu") is None:
        return 'libtpu is not installed: pip install -e ".[tpu]"'
    return None


def parse_topology(topology: str) -> tuple[TpuGeneration, int]:
    """(generation, chips) of a topology name such as "v5e:2x4" or "v5p:4x4x4"."""
    name, _, shape = topology.partition(":")
    generation = tpu_generation(name)
    dims = shape.split("x")
    if generation is None or not shape or not all(d.isdigit() for d in dims):
        known = ", ".join(g.name for g in TPU_GENERATIONS)
        raise ConfigError(
            f"--topology {topology!r}: expected GENERATION:AxB[xC] with GENERATION one of {known}"
        )
    return generation, math.prod(int(d) for d in dims)


def topology_devices(topology: str, num_slices: int = 1) -> list[Any]:
    """The compile-only devices of `num_slices` slices of `topology` (multi-slice devices carry
    their `slice_index`, so `sharding.make_mesh` builds the hybrid mesh over them)."""
    reason = libtpu_missing()
    if reason:
        raise ConfigError(f"--compile for a TPU topology needs libtpu: {reason}")
    generation, _ = parse_topology(topology)
    for key, value in COMPILE_ONLY_ENV.items():
        os.environ.setdefault(key, value)
    from jax.experimental import topologies

    options: dict[str, Any] = {"num_slices": num_slices} if num_slices > 1 else {}
    if generation.name == "v4":  # one JAX device per v4 chip, as on a v4 VM (megacore)
        options["chip_config_name"] = "megacore"
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, **options)
    except jax.errors.JaxRuntimeError as e:
        raise ConfigError(f"--topology {topology!r}: {str(e).splitlines()[0]}") from e
    return list(desc.devices)


def step_attention(model_config: ModelConfig, seq_len: int, context: int = 1) -> str:
    """The attention the compiled step uses: the model resolves `model.attention` for its
    mesh's platform (TPU here, though traced on this host) at the step's sequence length,
    and for its context axis (splash with gathered keys and values where its blocks tile, else
    ring attention, XLA einsums whose flops XLA counts)."""
    return resolve_implementation(
        model_config.attention,
        platform="tpu",
        dtype=model_config.dtype,
        head_dim=model_config.head_dim,
        softcap=model_config.attn_softcap,
        sinks=model_config.attention_sinks,
        seq_len=seq_len,
        context=context,
    )


def _variant(config: Config, model_config: ModelConfig, layers: int) -> tuple[Config, Any]:
    """The step with `layers` unrolled layers and one micro-batch (no loop for XLA's cost
    analysis to count once)."""
    local = model_config.local_layers[:layers] if model_config.local_layers else ()
    mc = dataclasses.replace(model_config, num_layers=layers, scan_layers=False, local_layers=local)
    mc = dataclasses.replace(mc, nope_layers=model_config.nope_layers[:layers])
    rows = config.train.global_batch_size // config.train.micro_batches
    train = dataclasses.replace(config.train, global_batch_size=rows, micro_batches=1)
    return dataclasses.replace(config, train=train), mc


def _costs(compiled: Any) -> tuple[float, float]:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def step_cost(
    config: Config, model_config: ModelConfig, mesh: Any, attention: str
) -> tuple[float, float]:
    """(flops, bytes accessed) of one train step per device, from loop-free variants (see the
    module docstring), plus `kernel_flops` where attention is a Pallas kernel. The compiled
    step itself cannot stand for the 1-layer variant: with micro-batches its accumulation
    loop and scanned layers count differently (measured: a negative per-layer byte count)."""
    steps, updates = [], []
    for layers in (1, 2):
        cfg, mc = _variant(config, model_config, layers)
        state = abstract_train_state(cfg, mesh, mc)
        steps.append(_costs(compile_abstract_step(cfg, mesh, state, mc)))
        updates.append(_costs(jax.jit(apply_updates).lower(state, state.params).compile()))
    depth = model_config.num_layers - 1
    at_depth = lambda x: [a + depth * (b - a) for a, b in zip(*x, strict=True)]
    c, u = at_depth(steps), at_depth(updates)
    micro = config.train.micro_batches
    flops = micro * (c[0] - u[0]) + u[0]
    if attention == "splash":
        flops += kernel_flops(config, model_config) / mesh.size
    return flops, micro * (c[1] - u[1]) + u[1]


def kernel_flops(config: Config, model_config: ModelConfig) -> float:
    """Flops of splash attention in one step, all devices: XLA's cost analysis does not see
    inside a Pallas kernel. Per layer and row, the forward's two [T, T] matmuls over all heads
    (4 T^2 n h) halved by the causal mask (splash skips masked blocks); the backward about 2.5
    forwards (scores recomputed, then dV, dP, dQ, dK); remat "full" one forward more."""
    c, seq = model_config, config.data.seq_len
    forward = 4 * seq * seq * c.num_heads * c.head_dim / 2
    passes = 3.5 + (1.0 if c.remat == "full" else 0.0)
    return forward * passes * c.num_layers * config.train.global_batch_size


def _out_of_memory(error: Exception) -> int | None:
    """Bytes per device the TPU compiler says the step needs, when it refused for lack of HBM."""
    match = _OOM.search(str(error))
    if match is None:
        return None
    scale = {None: 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    return int(float(match.group(1)) * scale[match.group(2)])


def compile_for_topology(config: Config, topology: str, num_slices: int = 1) -> dict[str, Any]:
    """The TPU compiler's figures for `config`'s train step on `num_slices` x `topology`."""
    generation, chips_per_slice = parse_topology(topology)
    devices = topology_devices(topology, num_slices)
    sharding.check_rules(config.mesh.rules)
    mesh = sharding.make_mesh(config.mesh, devices)
    check_train_batch(config, mesh)
    model_config = hf.build_model_config(config.model)
    attention = step_attention(model_config, config.data.seq_len, sharding.context_shards(mesh))
    per_chip = generation.devices_per_chip
    start = time.perf_counter()
    try:
        compiled = compile_abstract_step(config, mesh, abstract_train_state(config, mesh))
        memory = memory_figures(compiled)
    except jax.errors.JaxRuntimeError as e:
        needed = _out_of_memory(e)
        if needed is None:
            raise
        memory = {"peak": needed, "refused": str(e).splitlines()[0][:300]}
    compile_s = time.perf_counter() - start
    flops, accessed = step_cost(config, model_config, mesh, attention)
    chips = chips_per_slice * num_slices
    hbm = int(generation.hbm_gib * GIB)
    peak_chip = memory["peak"] * per_chip
    tokens = config.train.global_batch_size * config.data.seq_len
    adapters = _adapter_params(config, mesh, model_config)
    model_flops = tokens * flops_per_token(model_config, config.data.seq_len, adapters)
    bounds = roofline(flops * len(devices), model_flops, accessed * per_chip, chips, generation)
    return {
        "topology": topology,
        "num_slices": num_slices,
        "chips": chips,
        "generation": generation.name,
        "mesh": dict(mesh.shape),
        "attention": attention,
        "peak_bytes_per_chip": peak_chip,
        "hbm_bytes_per_chip": hbm,
        "fits": "refused" not in memory and peak_chip <= hbm,
        "compile_s": round(compile_s, 2),
        "memory_per_device": memory,
        "flops_per_step": flops * len(devices),
        "flops_per_step_per_chip": flops * per_chip,
        "bytes_accessed_per_chip": accessed * per_chip,
        "model_flops_per_step": model_flops,
        **bounds,
        "roofline_tokens_per_s": tokens / bounds["roofline_step_s"],
        "peak_bf16_per_chip": generation.peak_bf16,
        "hbm_bytes_per_s_per_chip": generation.hbm_bytes_per_s,
        "hardware_source": generation.source,
    }


def roofline(
    step_flops: float,
    model_flops: float,
    bytes_per_chip: float,
    chips: int,
    generation: TpuGeneration,
) -> dict[str, Any]:
    """The step time a chip's peak flops and HBM bandwidth allow, and the MFU it bounds.

    The step does at least the model's flops (`model_flops`); XLA's count (`step_flops`,
    extrapolated from loop-free variants) can come out lower, and a bound from it alone would
    allow an MFU above 100%, so the larger count is used.
    """
    t_flops = max(step_flops, model_flops) / chips / generation.peak_bf16
    t_bytes = bytes_per_chip / generation.hbm_bytes_per_s
    bound = max(t_flops, t_bytes)
    return {
        "xla_flops_below_model": step_flops < model_flops,
        "roofline_compute_s": t_flops,
        "roofline_memory_s": t_bytes,
        "roofline_step_s": bound,
        "roofline_bound": "compute" if t_flops >= t_bytes else "memory",
        "roofline_mfu": model_flops / (chips * generation.peak_bf16 * bound),
    }


def _adapter_params(config: Config, mesh: Any, model_config: ModelConfig) -> int:
    """Trainable adapter parameters under LoRA (the 6A of the LoRA flop count), else 0."""
    if not config.lora.enabled:
        return 0
    params = abstract_train_state(config, mesh, model_config).params
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def format_compiled(r: dict[str, Any]) -> str:
    """The human summary of `compile_for_topology`'s result."""
    gib = lambda x: f"{x / GIB:.2f} GiB"
    m = r["memory_per_device"]
    if "refused" in m:
        memory = f"the TPU compiler refused it: {m['refused']}"
    else:
        memory = (
            f"arguments {gib(m['argument'])} + outputs {gib(m['output'])} - donated "
            f"{gib(m['alias'])} + temporaries {gib(m['temp'])} per device"
        )
    slices = f"{r['num_slices']} x " if r["num_slices"] > 1 else ""
    return "\n".join(
        [
            f"TPU compiler, {slices}{r['topology']} ({r['chips']} chips), mesh {r['mesh']}, "
            f"attention={r['attention']}, compiled in {r['compile_s']:.1f} s",
            f"  memory   {gib(r['peak_bytes_per_chip'])} of {gib(r['hbm_bytes_per_chip'])} HBM "
            f"per chip: {'FITS' if r['fits'] else 'DOES NOT FIT'} ({memory})",
            f"  roofline {r['roofline_step_s'] * 1e3:.1f} ms per step at best "
            f"({r['roofline_bound']}-bound: flops {r['roofline_compute_s'] * 1e3:.1f} ms, HBM "
            f"traffic {r['roofline_memory_s'] * 1e3:.1f} ms per chip); MFU at most "
            f"{r['roofline_mfu']:.1%}, {r['roofline_tokens_per_s']:,.0f} tokens/s"
            + (
                " (XLA counted fewer flops than the model's formula; the formula's count is used)"
                if r["xla_flops_below_model"]
                else ""
            ),
            f"  hardware {r['generation']}: {r['peak_bf16_per_chip'] / 1e12:.0f} TFLOP/s bf16, "
            f"{r['hbm_bytes_per_s_per_chip'] / 1e9:.0f} GB/s HBM per chip "
            f"({r['hardware_source']})",
        ]
    )
