"""What a shuffled element costs: grain's per-element index shuffle against one numpy permutation.

    python benchmarks/bench_grain_shuffle.py [--rows 10,100,1000] [--epochs 3]

Why sft_jax/data/loader.py keeps its own permutation per epoch instead of grain's
`MapDataset.shuffle(seed).repeat()`: grain computes the shuffled index of every element it
hands out, which on small datasets costs far more per element than gathering a row. For each
dataset size this reads `epochs` epochs of element indices both ways and prints the median time
per element (grain: `ds[i]` over `MapDataset.range(n).shuffle(seed).repeat()`; numpy: one
`default_rng([seed, epoch]).permutation(n)` per epoch, then plain indexing, as the loader does).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import time

import grain
import numpy as np


def grain_per_element(rows: int, epochs: int, seed: int = 0) -> float:
    dataset = grain.MapDataset.range(rows).shuffle(seed=seed).repeat()
    times = []
    for i in range(rows * epochs):
        start = time.perf_counter()
        dataset[i]
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def numpy_per_element(rows: int, epochs: int, seed: int = 0) -> float:
    times = []
    for epoch in range(epochs):
        start = time.perf_counter()
        perm = np.random.default_rng([seed, epoch]).permutation(rows)
        for q in range(rows):
            int(perm[q])
        times.append((time.perf_counter() - start) / rows)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="10,100,1000", help="dataset sizes, comma-separated")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    print(f"grain {importlib.metadata.version('grain')}, median time per element")
    for rows in (int(r) for r in args.rows.split(",")):
        g = grain_per_element(rows, args.epochs)
        n = numpy_per_element(rows, args.epochs)
        print(f"rows {rows:>6}: grain shuffle {g * 1e6:10.1f} us   numpy {n * 1e6:8.2f} us")


if __name__ == "__main__":
    main()
