"""How long the training step waits for its host batch, with and without the prefetch thread.

    python benchmarks/bench_data_prefetch.py [--steps 8] [--rounds 2]

Runs the real jitted train step of configs/bench/cpu_small.py (through `sft_jax.bench.build`) on
the bench's synthetic packed rows, fed by `TrainIterator` with data.prefetch = 0 and 2,
alternating A/B rounds so that machine load drifts hit both alike. Per step it times `next()`
(the wait for the host batch: what prefetch hides) and `place` (host -> device transfer, done by
the training loop, not prefetched), and prints medians per setting. The first step of each round
is not timed (the prefetch thread starts on it).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import jax
import numpy as np

from sft_jax.bench import build, packed_data
from sft_jax.config import parse
from sft_jax.config_file import load_config_file
from sft_jax.data import TrainIterator

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CONFIG = os.path.join(REPO, "configs", "bench", "cpu_small.py")
sys.path.insert(0, REPO)  # configs/bench/*.py import `configs.base`


def run_round(state, compiled, place, packed, config, prefetch: int, steps: int):
    """`steps` timed steps after one untimed one -> (state, next() waits, place times, steps)."""
    batches = TrainIterator(
        packed, global_batch_size=config.train.global_batch_size, seed=1, prefetch=prefetch
    )
    waits, places, step_times = [], [], []
    for i in range(steps + 1):
        start = time.perf_counter()
        host = next(batches)
        fetched = time.perf_counter()
        batch = place(host)
        placed = time.perf_counter()
        state, metrics = compiled(state, batch, np.float32(1.0))
        jax.block_until_ready(metrics)
        if i:
            waits.append(fetched - start)
            places.append(placed - fetched)
            step_times.append(time.perf_counter() - start)
    batches.close()
    return state, waits, places, step_times


def main(argv: list[str]) -> None:
    steps = int(argv[argv.index("--steps") + 1]) if "--steps" in argv else 8
    rounds = int(argv[argv.index("--rounds") + 1]) if "--rounds" in argv else 2
    config = parse(load_config_file(CONFIG))
    state, step, place, model_config, _ = build(config, 10_000)
    rows = (rounds * 2 * (steps + 1) + 1) * config.train.global_batch_size
    packed, _ = packed_data(config, rows, model_config.vocab_size)
    first = TrainIterator(packed, global_batch_size=config.train.global_batch_size, seed=0)
    compiled = step.lower(state, place(next(first)), np.float32(1.0)).compile()
    results: dict[int, tuple[list, list, list]] = {0: ([], [], []), 2: ([], [], [])}
    print(f"load before: {os.getloadavg()}", flush=True)
    for _ in range(rounds):
        for prefetch in (0, 2):
            state, waits, places, times = run_round(
                state, compiled, place, packed, config, prefetch, steps
            )
            for acc, new in zip(results[prefetch], (waits, places, times), strict=True):
                acc.extend(new)
    print(f"load after: {os.getloadavg()}")
    for prefetch, (waits, places, times) in results.items():
        print(
            f"data.prefetch={prefetch}: next() wait median {statistics.median(waits) * 1e6:8.1f} us"
            f" (max {max(waits) * 1e6:8.1f} us), place median "
            f"{statistics.median(places) * 1e6:8.1f} us, step median {statistics.median(times):.3f}"
            f" s, {len(waits)} steps"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
