"""Rank sweep: LoRA r = 8/16/32/64 and full fine-tuning on the demo task, one table.

    python benchmarks/lora_rank_sweep.py [--ranks 8,16,32,64] [--epochs 1.0] [--out /tmp/sweep]
        [--modules_to_save embed_tokens]   (default: configs/demo_lora.py's; "" for none)

Trains configs/demo_lora.py (real stories260K, bundled question-answering data) once per rank
and configs/demo.py for full fine-tuning, for the same steps and data order, and prints the
validation loss and held-out exact match of greedy answers per setting as a markdown table, so
LoRA versus full fine-tuning can be decided on measured numbers.
"""

from __future__ import annotations

import argparse
import os
import pathlib

from sft_jax.config import parse
from sft_jax.config_file import load_config_file
from sft_jax.train import train_and_evaluate

REPO = pathlib.Path(__file__).resolve().parents[1]


def run(
    name: str, config_file: str, rank: int | None, epochs: float, out: str, saved: tuple | None
) -> dict:
    c = load_config_file(str(REPO / "configs" / config_file))
    c.train.epochs = epochs
    c.train.progress_bar = False
    c.eval.every_steps = 0
    c.checkpoint.every_steps = 0
    if rank is not None:
        c.lora.rank = rank
        c.lora.alpha = 2.0 * rank
    if saved is not None:
        c.lora.modules_to_save = saved
    return train_and_evaluate(parse(c), os.path.join(out, name))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", default="8,16,32,64")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--out", default="/tmp/lora_rank_sweep")
    parser.add_argument("--modules_to_save", default=None, help="comma-separated HF names")
    args = parser.parse_args()
    saved = None
    if args.modules_to_save is not None:
        saved = tuple(m for m in args.modules_to_save.split(",") if m)
    extra = "" if saved is None else f", modules_to_save {saved or 'none'}"
    rows = []
    for rank in [int(r) for r in args.ranks.split(",") if r]:
        summary = run(f"lora_r{rank}", "demo_lora.py", rank, args.epochs, args.out, saved)
        rows.append((f"LoRA r={rank} (alpha {2 * rank}, lr 1e-2{extra})", summary))
    full = run("full", "demo.py", None, args.epochs, args.out, None)
    rows.append(("full fine-tuning (lr 3e-3)", full))
    print("| setting | steps | validation loss | held-out exact match | wall s |")
    print("|---|---|---|---|---|")
    for name, s in rows:
        print(
            f"| {name} | {s['steps']} | {s['eval_loss']:.4f} | {s['accuracy_after']:.3f} "
            f"| {s['wall_s']} |"
        )


if __name__ == "__main__":  # the data pipeline's worker processes re-import this module
    main()
