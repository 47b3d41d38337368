"""Compiled cost of a LoRA train step against a full one at Llama-3.2-1B shapes, on CPU.

    PYTHONPATH=. python benchmarks/lora_cost.py [--layers 2,4] [--rank 16] [--quant none]

Compiles (never runs) the real jitted train step (`sft_jax.training.step.make_train_step`) of
configs/bench/gpu_llama1b.py (vocab 128256, hidden 2048, mlp 8192, 32/8 heads of 64, batch
4 x 2048, bf16 compute, fp32 master weights, "dots" remat, AdamW) for full fine-tuning and for
LoRA (r=16 on all seven projections, bf16 frozen base), from abstract ShapeDtypeStruct inputs, so
no weight is ever allocated. Reads XLA's `cost_analysis()` flops and `memory_analysis()` bytes.

The layers are unrolled (model.scan_layers=False): XLA's cost analysis counts a while-loop body
once, whatever its trip count. Compiling at two layer counts gives the per-layer cost, which is
extrapolated linearly to the 16 layers of the real model (layers are identical). These are
compiler estimates of work and buffer sizes, not timings: see benchmarks/bench_lora.py for a
measured CPU step-time ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.config import parse
from sft_jax.config_file import load_config_file
from sft_jax.data.pack import PACKED_KEYS
from sft_jax.model.decoder import model_config_from_arch
from sft_jax.training.optim import make_optimizer, make_schedule
from sft_jax.training.sharding import batch_sharding, make_mesh
from sft_jax.training.state import StateSpec, state_layout
from sft_jax.training.step import StepOptions, make_train_step

REPO = pathlib.Path(__file__).resolve().parents[1]
FULL_LAYERS = 16


def compiled_cost(layers: int, use_lora: bool, rank: int, quant: str) -> dict[str, float]:
    raw = load_config_file(str(REPO / "configs" / "bench" / "gpu_llama1b.py"))
    raw.model.arch.num_layers = layers
    raw.lora.enabled = use_lora
    raw.lora.rank, raw.lora.alpha, raw.lora.base_quant = rank, 2.0 * rank, quant
    config = parse(raw)
    model_config = model_config_from_arch(config.model.arch, config.model)
    model_config = dataclasses.replace(model_config, scan_layers=False)
    mesh = make_mesh(dataclasses.replace(config.mesh, data=1, fsdp=1, tensor=1), jax.devices()[:1])
    tx = make_optimizer(config.optim, 100, config.lora)
    lora_cfg = config.lora if use_lora else None
    state = state_layout(StateSpec(model_config, mesh, config.mesh.rules, tx, lora=lora_cfg))
    shardings = jax.tree.map(lambda x: x.sharding, state)
    b_sharding = batch_sharding(mesh, config.mesh.rules)
    step = make_train_step(
        shardings, b_sharding, options=StepOptions(), schedule=make_schedule(config.optim, 100)
    )
    rows, seq = config.train.global_batch_size, config.data.seq_len
    batch = {
        k: jax.ShapeDtypeStruct((rows, seq), jnp.bool_ if k == "loss_mask" else jnp.int32)
        for k in PACKED_KEYS
    }
    compiled = step.lower(state, batch, jax.ShapeDtypeStruct((), jnp.float32)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled.memory_analysis()
    return {
        "flops": float(cost["flops"]),
        "bytes accessed": float(cost.get("bytes accessed", np.nan)),
        "argument bytes": float(memory.argument_size_in_bytes),
        "temp bytes": float(memory.temp_size_in_bytes),
    }


def extrapolate(small: dict, large: dict, n_small: int, n_large: int) -> dict:
    """Linear in the layer count (identical layers): value(16) from two compiled depths."""
    out = {}
    for key in small:
        per_layer = (large[key] - small[key]) / (n_large - n_small)
        out[key] = small[key] + per_layer * (FULL_LAYERS - n_small)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", default="2,4", help="two compiled depths, e.g. 2,4")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--quant", default="none", choices=("none", "int8", "nf4"))
    args = parser.parse_args()
    n_small, n_large = (int(n) for n in args.layers.split(","))
    results = {}
    for name, use_lora in (("full", False), (f"LoRA r={args.rank}", True)):
        small = compiled_cost(n_small, use_lora, args.rank, args.quant)
        large = compiled_cost(n_large, use_lora, args.rank, args.quant)
        results[name] = extrapolate(small, large, n_small, n_large)
        print(f"{name}: {n_small} layers {small}\n{name}: {n_large} layers {large}", flush=True)
    full = results["full"]
    print(f"\nextrapolated to {FULL_LAYERS} layers (Llama-3.2-1B), base quant {args.quant}:")
    print("| setting | TFLOP per step | ratio | argument GiB | temp GiB | ratio of argument+temp |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        total = r["argument bytes"] + r["temp bytes"]
        full_total = full["argument bytes"] + full["temp bytes"]
        print(
            f"| {name} | {r['flops'] / 1e12:.2f} | {r['flops'] / full['flops']:.3f} "
            f"| {r['argument bytes'] / 2**30:.2f} | {r['temp bytes'] / 2**30:.2f} "
            f"| {total / full_total:.3f} |"
        )


if __name__ == "__main__":
    main()
