"""The speed levers one by one on the CPU workload, in interleaved rounds.

    python benchmarks/levers.py [--rounds 3] [--steps 8] [--warmup 3]
        [--only base,remat_full,...] [--extra --config.lora.enabled=True]

Runs `python -m sft_jax.bench --config configs/bench/cpu_small.py` once per variant per round
(each variant = the workload with one lever flipped, table VARIANTS below), in an order rotated
each round so that no variant always runs at the same point of the VM's drift, and prints one
table row per variant, then one JSON line with every run.

Why rounds and not one long run each: this development machine is a shared VM whose speed drifts
by up to +-15% within minutes. A lever's effect is read from sums over rounds run in the same
minutes, from the process CPU time per step (`step_cpu_s`, which waiting for a core does not
inflate), and from the fraction of the peak that the bench measures around its own timed steps.
Memory figures (compiled temporaries, persistent bytes per parameter) are deterministic.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from trl_compare import REPO, run  # same directory: runs a bench process, returns its JSON line

CONFIG = os.path.join("configs", "bench", "cpu_small.py")
# name -> the flags that flip one lever against the workload's settings (cpu_small: unrolled
# layers, no remat, blocked attention, unchunked loss, fp32 compute and Adam moments, prefetch 2).
VARIANTS = {
    "base": [],
    "scan_layers": ["--config.model.scan_layers=True"],
    "attention_xla": ["--config.model.attention=xla"],
    "attention_reference": ["--config.model.attention=reference"],
    # Remat is measured on the scanned model (compare with scan_layers): unrolled, XLA:CPU keeps
    # the activations anyway (remat_full: recompute without the memory saving).
    "scan_remat_dots": ["--config.model.scan_layers=True", "--config.model.remat=dots"],
    "scan_remat_dots_saveable": [
        "--config.model.scan_layers=True",
        "--config.model.remat=dots_saveable",
    ],
    "scan_remat_full": ["--config.model.scan_layers=True", "--config.model.remat=full"],
    "remat_full": ["--config.model.remat=full"],
    "loss_chunk_128": ["--config.model.loss_chunk=128"],
    "bf16_compute": ["--config.model.dtype=bfloat16"],
    "bf16_adam": ["--config.optim.state_dtype=bfloat16"],
    "no_prefetch": ["--config.data.prefetch=0"],
}


def rotated(names: list[str], offset: int) -> list[str]:
    """`names` starting at position offset (mod len), wrapping around."""
    k = offset % len(names)
    return names[k:] + names[:k]


def row(name: str, runs: list[dict], base: list[dict]) -> str:
    """One Markdown table row: per-round tokens/s, sums and medians against the base variant."""
    tokens = [r["tokens_per_s"] for r in runs]
    cpu = statistics.median(r["step_cpu_s"] for r in runs)
    base_cpu = statistics.median(r["step_cpu_s"] for r in base)
    vs_base = sum(tokens) / sum(r["tokens_per_s"] for r in base) - 1
    mfus = [r["mfu"] for r in runs]
    first = runs[0]
    cells = [
        name,
        " / ".join(f"{t:,.0f}" for t in tokens),
        f"{vs_base:+.1%}",
        f"{cpu:.3f} ({cpu / base_cpu - 1:+.1%})",
        f"{min(mfus):.1%}-{max(mfus):.1%}",
        f"{statistics.median(r['compile_s'] for r in runs):.1f}",
        f"{first['compiled_temp_bytes'] / 2**20:,.0f}",
        f"{max(r['peak_bytes'] for r in runs) / 2**20:,.0f}",
        f"{first['bytes_per_param']}",
        f"{1e3 * statistics.median(r['data_wait_s'] for r in runs):.2f}",
        f"{first['final_loss']}",
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| variant | tokens/s per round | tokens/s vs base (sums) | CPU s/step (vs base) | "
    "of measured peak | compile s | compiled temp MiB | peak MiB | bytes/param | "
    "data wait ms | final loss |\n|" + "---|" * 11
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--only", default="", help="comma-separated variant names (base always)")
    parser.add_argument("--extra", action="append", default=[], help="flag added to every run")
    args = parser.parse_args()
    names = list(VARIANTS) if not args.only else ["base", *args.only.split(",")]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    names = list(dict.fromkeys(names))
    results: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in rotated(names, r):
            command = [sys.executable, "-m", "sft_jax.bench", "--config", args.config,
                       "--steps", str(args.steps), "--warmup", str(args.warmup),
                       *VARIANTS[name], *args.extra]  # fmt: skip
            print(f"round {r + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
            results[name].append({"round": r + 1, **run(command)})
    print(f"\n{args.config} {' '.join(args.extra)}, --steps {args.steps} --warmup {args.warmup}, "
          f"{args.rounds} interleaved rounds (cwd {REPO})\n")  # fmt: skip
    print(HEADER)
    for name in names:
        print(row(name, results[name], results["base"]))
    print(json.dumps({"variants": {n: VARIANTS[n] for n in names}, "runs": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
