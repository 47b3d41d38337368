"""Model flops and hardware peak: the two halves of MFU (model flops utilization).

Why its own module: the benchmark, the TRL comparison and the plan all need the same flop count
and the same peak table, and none of them should import the benchmark's run loop to get it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax

from sft_jax.model.decoder import ModelConfig

PEAK_MATMUL = 2048  # the CPU peak is measured as the best rate of [n, n] @ [n, n] fp32 matmuls


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    """One TPU generation's public per-chip figures (the roofline of `python -m sft_jax.plan
    --topology ... --compile` and the MFU peak of the benchmark)."""

    name: str  # as in a topology name, "v5e:2x2"
    device_kinds: tuple[str, ...]  # jax's device_kind of its chips, lower-cased
    hbm_gib: float  # HBM per chip
    hbm_bytes_per_s: float  # HBM bandwidth per chip
    peak_bf16: float  # dense bf16 flop/s per chip
    source: str
    devices_per_chip: int = 1  # JAX devices per chip (TPU7x: one per TensorCore)


# Google Cloud's per-generation system architecture pages (figures as published there).
TPU_GENERATIONS = (
    TpuGeneration("v4", ("tpu v4",), 32, 1200e9, 275e12, "https://cloud.google.com/tpu/docs/v4"),
    TpuGeneration(
        "v5e", ("tpu v5 lite", "tpu v5e"), 16, 819e9, 197e12, "https://cloud.google.com/tpu/docs/v5e"
    ),
    TpuGeneration(
        "v5p", ("tpu v5", "tpu v5p"), 95, 2765e9, 459e12, "https://cloud.google.com/tpu/docs/v5p"
    ),
    TpuGeneration(
        "v6e", ("tpu v6 lite", "tpu v6e"), 32, 1640e9, 918e12,
        "https://cloud.google.com/tpu/docs/v6e",
    ),
    TpuGeneration(
        "tpu7x", ("tpu7x",), 192, 7380e9, 2307e12, "https://cloud.google.com/tpu/docs/tpu7x", 2
    ),
)  # fmt: skip
# Dense bf16 peak per GPU, matched as substrings of `device_kind`, lower-cased;
# TPUs match their device kind exactly (`tpu_generation`).
ACCELERATOR_PEAK_FLOPS = (("h100", 989e12), ("h200", 989e12))


def tpu_generation(name_or_kind: str) -> TpuGeneration | None:
    """The generation named `name_or_kind` ("v5e", as in topology names) or whose chips JAX
    calls that ("TPU v5 lite"); None if unknown."""
    key = name_or_kind.lower()
    for generation in TPU_GENERATIONS:
        if key == generation.name or key in generation.device_kinds:
            return generation
    return None


def matmul_params(cfg: ModelConfig) -> int:
    """N of the MFU formula: weights that enter a matmul, the LM head included (also when tied,
    since the logits matmul is computed either way); embeddings lookups, norms and biases not.
    In a mixture of experts only the experts a token is routed to count (active parameters)."""
    d, h = cfg.hidden_size, cfg.head_dim
    attention = d * h * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)  # q, o and k, v
    mlp = 3 * d * cfg.active_mlp_width  # gate, up, down of the experts a token goes through
    if cfg.is_moe:  # the router, and the shared expert's gate
        mlp += d * cfg.num_experts + (d if cfg.shared_expert_intermediate_size else 0)
    return cfg.num_layers * (attention + mlp) + d * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int, adapter_params: int = 0) -> float:
    """Training flops per token (PaLM's MFU count): 6N + 12·L·D·T for full fine-tuning; with LoRA
    (`adapter_params` > 0) the frozen weights get no weight gradient: 4N + 12·L·D·T + 6·A."""
    attention = 12 * cfg.num_layers * cfg.hidden_size * seq_len
    n = matmul_params(cfg)
    if adapter_params:
        return float(4 * n + attention + 6 * adapter_params)
    return float(6 * n + attention)


def peak_flops(devices: list[Any], cpu_peak: float) -> float:
    """Peak flop/s of the machine: `cpu_peak` on CPU (all host devices share the same cores),
    else the device kind's dense bf16 peak times the number of devices."""
    device = devices[0]
    if device.platform == "cpu":
        return cpu_peak
    generation = tpu_generation(device.device_kind)
    if generation is not None:
        return generation.peak_bf16 / generation.devices_per_chip * len(devices)
    kind = device.device_kind.lower()
    for needle, peak in ACCELERATOR_PEAK_FLOPS:
        if needle in kind:
            return peak * len(devices)
    raise ValueError(f"no peak flop/s known for device kind {device.device_kind!r}; add it")


def measure_cpu_peak(n: int = PEAK_MATMUL, repeats: int = 7) -> float:
    """This host's fp32 peak as XLA reaches it: the best flop/s of `repeats` [n, n] @ [n, n]
    float32 matmuls on all cores, after a warm-up call. Why measured: a VM tells neither its
    clock under load nor its vector width (the guess first assumed was far below what the
    development machine reaches in this matmul, the best case of the kernels the step's matmuls
    use: docs/benchmarks.md, current figures), so MFU is a fraction of what this CPU can do, not
    of a datasheet."""
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def resolve_peak(devices: list[Any], cpu_peak: float, measured_before: float) -> tuple[float, str]:
    """(peak flop/s, where it comes from): on CPU `cpu_peak` if > 0, else the better of
    `measured_before` (taken before the timed steps) and a measurement now; elsewhere the
    device kind's peak (`peak_flops`)."""
    if devices[0].platform != "cpu":
        return peak_flops(devices, cpu_peak), "dense bf16 peak of the device kind"
    if cpu_peak > 0:
        return cpu_peak, "--peak_flops"
    measured = max(measured_before, measure_cpu_peak())
    return measured, f"measured: best fp32 {PEAK_MATMUL}^3 matmul through XLA on this host"


def mfu(tokens_per_s: float, per_token: float, peak: float) -> float:
    """Model flops utilisation: achieved model flop/s over peak flop/s."""
    return tokens_per_s * per_token / peak
