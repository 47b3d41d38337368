"""One attention layer's forward + backward per implementation, at the CPU workload's shapes.

    PYTHONPATH=. python benchmarks/bench_attention.py [--impl blocked,xla,reference]

Shapes of configs/bench/cpu_small.py (8 rows x 512, 8 query heads, 4 kv heads of 32) with the
bench's real packed segment ids (sft_jax.bench.packed_data, padding included), so the mask is
the one training uses. Times `jax.grad` of a weighted sum of the output with respect to q, k and
v, jitted, median of `--repeats` calls after a warm-up; prints one line per implementation, then
one JSON line {"impl": median ms, ...}. It compares implementations; it does not predict an
implementation's cost inside the whole train step, where XLA:CPU picks other fusions and
layouts and runs independent ops side by side (the transposed backward of
sft_jax/model/blocked_attention.py costs the same here but cut the step's attention op time by ~40%:
docs/benchmarks.md, levers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs.bench import cpu_small
from sft_jax.bench import packed_data
from sft_jax.model.attention import DENSE_MASK_IMPLEMENTATIONS, AttentionOptions, attend
from sft_jax.model.decoder import attention_mask


def workload_inputs(seed: int = 0) -> tuple[jax.Array, ...]:
    """(q, k, v, segment_ids, weights) at the CPU workload's shapes, float32."""
    config = cpu_small.get_config()
    arch, rows = config.model.arch, config.train.global_batch_size
    packed, _ = packed_data(config, rows, arch.vocab_size)
    segments = jnp.asarray(packed["segment_ids"][:rows])
    t, h = segments.shape[1], arch.head_dim
    rng = np.random.default_rng(seed)
    draw = lambda heads: jnp.asarray(rng.normal(size=(rows, t, heads, h)), jnp.float32)
    q, k, v = draw(arch.num_heads), draw(arch.num_kv_heads), draw(arch.num_kv_heads)
    return q, k, v, segments, draw(arch.num_heads)


def time_implementation(impl: str, inputs: tuple[jax.Array, ...], repeats: int) -> float:
    """Median ms of one jitted forward + backward (gradients of q, k and v)."""
    q, k, v, segments, weights = inputs

    def loss(q, k, v, segments):  # the mask is built inside the jit, as in the train step
        mask = attention_mask(segments) if impl in DENSE_MASK_IMPLEMENTATIONS else None
        out = attend(q, k, v, mask, AttentionOptions(impl), segment_ids=segments)
        return jnp.sum(out * weights)

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    jax.block_until_ready(step(q, k, v, segments))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(q, k, v, segments))
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", default="blocked,xla,reference")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    inputs = workload_inputs()
    q, k = inputs[0], inputs[1]
    print(f"q {q.shape}, k/v {k.shape}, devices {jax.devices()[0].platform}")
    result = {}
    for impl in args.impl.split(","):
        result[impl] = round(time_implementation(impl, inputs, args.repeats), 2)
        print(f"{impl:>10}: {result[impl]:8.2f} ms forward + backward (median of {args.repeats})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
