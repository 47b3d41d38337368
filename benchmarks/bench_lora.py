"""LoRA versus full fine-tuning: step time and persistent memory on the same model and batch.

    python benchmarks/bench_lora.py [--steps 10] [--warmup 3] [--rank 16]

The guide's CPU workload shapes (Llama, vocab 8192, hidden 256, 4 layers, 8 heads, 4 kv heads,
mlp 688, sequence 512, batch 8, AdamW, fp32, random init), one device. Times `train_step`
(jitted, donated state) on one fixed random batch, median over `--steps` after `--warmup` steps,
for full fine-tuning and LoRA r=`--rank` on all seven linear layers (base stored in fp32 here so
the two differ only in what is trained). Persistent bytes = params + optimizer state (+ the
frozen base for LoRA). Prints one markdown table; numbers are from this command, not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import numpy as np

from configs import base
from sft_jax.config import LoraSection, MeshSection, OptimSection
from sft_jax.model.decoder import ModelConfig
from sft_jax.training.optim import make_optimizer, make_schedule
from sft_jax.training.sharding import batch_sharding, make_mesh
from sft_jax.training.state import StateSpec, create_train_state
from sft_jax.training.step import StepOptions, make_train_step

MODEL = ModelConfig(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=688,
    num_layers=4,
    num_heads=8,
    num_kv_heads=4,
    head_dim=32,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_embeddings=False,
    qk_norm=False,
    attention_bias=False,
    max_position_embeddings=2048,
    rope_scaling=None,
    dtype="float32",
    param_dtype="float32",
    remat="none",
)
SEQ, BATCH = 512, 8


def batch(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, MODEL.vocab_size, (BATCH, SEQ)).astype(np.int32)
    return {
        "inputs": tokens,
        "targets": np.roll(tokens, -1, axis=1),
        "loss_mask": rng.random((BATCH, SEQ)) < 0.6,
        "segment_ids": np.ones((BATCH, SEQ), np.int32),
        "positions": np.tile(np.arange(SEQ, dtype=np.int32), (BATCH, 1)),
    }


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))


def measure(lora_cfg: LoraSection | None, steps: int, warmup: int) -> dict[str, float]:
    """Median step seconds and persistent bytes of one setting."""
    rules = tuple(tuple(r) for r in base.get_config().mesh.rules)
    mesh = make_mesh(MeshSection(1, 1, 1, rules=rules), jax.devices()[:1])
    values = base.get_config().optim.to_dict()
    values.update(learning_rate=1e-4, warmup_steps=0)
    optim = OptimSection(**values)
    tx = make_optimizer(optim, 1000, lora_cfg)
    state, shardings = create_train_state(StateSpec(MODEL, mesh, rules, tx, lora=lora_cfg))
    persistent = nbytes((state.params, state.opt_state, state.frozen))
    trainable = sum(x.size for x in jax.tree.leaves(state.params))
    step = make_train_step(
        shardings,
        batch_sharding(mesh, rules),
        options=StepOptions(),
        schedule=make_schedule(optim, 1000),
    )
    b = batch()
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        state, metrics = step(state, b, np.float32(1.0))
        jax.block_until_ready(metrics["loss"])
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "bytes": persistent, "trainable": trainable}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    values = base.get_config().lora.to_dict()
    values.update(enabled=True, rank=args.rank, alpha=2.0 * args.rank, base_dtype="float32")
    values["targets"] = tuple(values["targets"])
    results = {
        "full": measure(None, args.steps, args.warmup),
        f"lora r={args.rank}": measure(LoraSection(**values), args.steps, args.warmup),
    }
    full = results["full"]["step_s"]
    print(f"load average before/after: {os.getloadavg()[0]:.2f}; devices: {jax.devices()}")
    print("| setting | trainable params | median step (s) | ratio to full | persistent MiB |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['trainable']:,} | {r['step_s']:.3f} | {r['step_s'] / full:.2f} "
            f"| {r['bytes'] / 2**20:.1f} |"
        )


if __name__ == "__main__":
    main()
