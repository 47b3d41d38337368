"""Ring attention (sequence over 8 fake CPU devices) against dense attention: memory and time.

    PYTHONPATH=. python benchmarks/bench_context_attention.py [--lengths 2048,8192,32768]
        [--dense_max 8192] [--dense_run_max 2048] [--repeats 2]

One attention layer's forward + backward (`jax.grad` of a weighted sum of the output, with
respect to q, k and v) at the CPU workload's head shapes (8 query heads, 4 kv heads of 32), one
row of T tokens packed with four examples, float32. "ring" is `context_attention` on a mesh
context=8 with the load-balancing reorder; "dense" is `attention.grouped_attention` with the
dense [T, T] mask on one device, unsharded (what a context-parallel layer replaces). Per-device
temporaries come from the compiled program's memory analysis (the SPMD program is per device);
time is the median wall time of `--repeats` calls after one warm-up. The 8 fake devices share
this host's cores, so ring times are the whole ring's work on these cores, not a device's.
Dense is compiled up to `--dense_max` and run up to `--dense_run_max` (its [T, T] scores grow
quadratically: at T = 8192 the run was killed on a 23 GiB host).
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from sft_jax.model.attention import attention_mask, grouped_attention
from sft_jax.model.context_attention import context_attention, reorder_for_context

HEADS, KV_HEADS, HEAD_DIM, CONTEXT = 8, 4, 32, 8


def inputs(t: int, seed: int = 0) -> tuple[jax.Array, ...]:
    """(q, k, v, segment_ids, weights): one row of four packed examples, float32."""
    rng = np.random.default_rng(seed)
    q, k, v, w = (
        jnp.asarray(rng.normal(size=(1, t, h, HEAD_DIM)), jnp.float32)
        for h in (HEADS, KV_HEADS, KV_HEADS, HEADS)
    )
    seg = np.ones((1, t), np.int32)
    for i, cut in enumerate(sorted(rng.choice(np.arange(1, t), 3, replace=False))):
        seg[0, cut:] = i + 2
    return q, k, v, jnp.asarray(seg), w


def ring_grad(seg: jax.Array):
    """jit(grad) of the ring layer on balanced-reordered inputs (reordered once, outside)."""
    mesh = Mesh(np.asarray(jax.devices()[:CONTEXT]).reshape(1, CONTEXT), ("data", "context"))
    seg = reorder_for_context(seg, CONTEXT)
    pos = reorder_for_context(jnp.arange(seg.shape[1], dtype=jnp.int32)[None], CONTEXT)

    def loss(q, k, v, w):
        return jnp.sum(context_attention(q, k, v, seg, pos, mesh=mesh) * w)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def dense_grad(seg: jax.Array):
    """jit(grad) of the dense reference layer on one device."""
    mask = attention_mask(seg)

    def loss(q, k, v, w):
        return jnp.sum(grouped_attention(q, k, v, mask) * w)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def measure(name: str, make, t: int, repeats: int, run: bool = True) -> dict:
    q, k, v, seg, w = inputs(t)
    fn = make(seg)
    start = time.perf_counter()
    compiled = fn.lower(q, k, v, w).compile()
    compile_s = time.perf_counter() - start
    temp = compiled.memory_analysis().temp_size_in_bytes
    if run:
        jax.block_until_ready(compiled(q, k, v, w))  # warm-up
    times = []
    for _ in range(repeats if run else 0):
        start = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v, w))
        times.append(time.perf_counter() - start)
    row = dict(impl=name, T=t, temp_mib=round(temp / 2**20, 1), compile_s=round(compile_s, 1))
    row["median_s"] = round(statistics.median(times), 3) if times else "not run"
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,8192,32768")
    parser.add_argument("--dense_max", type=int, default=8192)
    parser.add_argument("--dense_run_max", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    for t in (int(x) for x in args.lengths.split(",")):
        if t <= args.dense_max:
            measure("dense", dense_grad, t, args.repeats, run=t <= args.dense_run_max)
        measure("ring", ring_grad, t, args.repeats)


if __name__ == "__main__":
    main()
