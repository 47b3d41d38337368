"""Stability-plasticity frontier per fine-tuning method on the demo task.

    python benchmarks/forgetting_pareto.py [--steps 40] [--save_every 8] [--out /tmp/pareto]
        [--methods full,lora,dora,oft,prefix] [--png docs/forgetting_pareto.png]

Trains configs/demo.py (real stories260K, bundled question-answering data, CPU) with full
fine-tuning, LoRA, DoRA, OFT and prefix tuning at a few learning rates each, for the same steps
and data order. Every `save_every` steps a checkpoint is kept; at the end the run's rewind
(checkpoint.rewind_rule "retention") measures every kept checkpoint on the validation split (the
task) and on the general stories (sft_jax/assets/general: the retention), so each run yields a
trajectory in the task-vs-retention plane, read back by the run report (sft_jax/report/tradeoff.py).

Prints, and writes to --out: a markdown table (pareto.md) and JSON (pareto.json) with per run the
final and the rewound checkpoint's validation loss and general-text perplexity, and the
stability-plasticity plot (validation loss vs general-text perplexity, one colour per method,
all its learning rates, the rewound checkpoints ringed) to --png. The adapters train alone (no
modules_to_save), so the frozen embedding is the same for every PEFT method.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import time
from typing import Any

from sft_jax.config import parse
from sft_jax.config_file import load_config_file
from sft_jax.report.data import load_run
from sft_jax.report.tradeoff import Tradeoff, draw, finish_axes, tradeoff_of
from sft_jax.train import train_and_evaluate

REPO = pathlib.Path(__file__).resolve().parents[1]

# (method, learning rates): around each method's usual rate on this tiny model (full fine-tuning
# 3e-3 in configs/demo.py, LoRA 1e-2 in configs/demo_lora.py); OFT and prefix tuning move the
# model through a rotation / a few key-value slots and take larger rates.
METHODS: dict[str, tuple[float, ...]] = {
    "full": (3e-4, 1e-3, 3e-3),
    "lora": (1e-3, 3e-3, 1e-2),
    "dora": (1e-3, 3e-3, 1e-2),
    "oft": (1e-3, 3e-3, 1e-2),
    "prefix": (3e-3, 1e-2, 3e-2),
}
COLORS = {"full": "tab:red", "lora": "tab:blue", "dora": "tab:cyan", "oft": "tab:green",
          "prefix": "tab:purple"}  # fmt: skip


def workdir_of(out: str, method: str, lr: float) -> str:
    return os.path.join(out, f"{method}_lr{lr:g}")


def config_for(method: str, lr: float, steps: int, save_every: int) -> Any:
    """configs/demo.py shortened, with kept checkpoints and the retention rewind."""
    c = load_config_file(str(REPO / "configs" / "demo.py"))
    c.optim.learning_rate = lr
    c.train.max_steps = steps
    c.train.progress_bar = False
    c.train.log_every = save_every
    c.eval.every_steps = 0  # the rewind measures every kept checkpoint itself
    c.eval.generate_examples = 0  # the task metric here is the validation loss
    c.eval.samples = 0
    c.checkpoint.every_steps = save_every
    c.checkpoint.keep = steps // save_every + 1
    c.checkpoint.async_save = False
    c.checkpoint.rewind_to_best = True
    c.checkpoint.rewind_rule = "retention"
    if method != "full":
        c.lora.enabled = True
        c.lora.base_dtype = "float32"
        c.lora.method = "lora" if method == "dora" else method
        c.lora.dora = method == "dora"
    return c


def row_of(method: str, lr: float, tradeoff: Tradeoff, wall_s: float) -> dict[str, Any]:
    """The table's row: base, final and rewound points (perplexity = exp(loss))."""
    last = tradeoff.points[-1]
    chosen = next(p for p in tradeoff.points if p["step"] == tradeoff.chosen_step)
    base_general = tradeoff.base["general_loss"] if tradeoff.base else math.nan
    return {
        "method": method,
        "lr": lr,
        "base_eval_loss": tradeoff.base["eval_loss"] if tradeoff.base else None,
        "base_general_ppl": math.exp(base_general),
        "final_step": last["step"],
        "final_eval_loss": last["eval_loss"],
        "final_general_ppl": math.exp(last["general_loss"]),
        "rewound_step": chosen["step"],
        "rewound_eval_loss": chosen["eval_loss"],
        "rewound_general_ppl": math.exp(chosen["general_loss"]),
        "wall_s": round(wall_s, 1),
        "trajectory": tradeoff.points,
    }


def fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def reference_ppl(rows: list[dict[str, Any]]) -> float:
    """The pretrained model's general-text perplexity: the lowest untrained one of the runs.
    Not each run's own: prefix tuning's untrained model already differs from the pretrained one
    (its freshly initialised prefix is attended to from step 0), so its own start is no base."""
    return min(r["base_general_ppl"] for r in rows)


def best_within(rows: list[dict[str, Any]], limit_ppl: float) -> tuple | None:
    """(validation loss, lr, step) of the best kept checkpoint of `rows` whose general-text
    perplexity is at most `limit_ppl`; None when none is."""
    found = [
        (p["eval_loss"], r["lr"], p["step"])
        for r in rows
        for p in r["trajectory"]
        if math.exp(p["general_loss"]) <= limit_ppl
    ]
    return min(found) if found else None


def markdown(rows: list[dict[str, Any]]) -> str:
    base = reference_ppl(rows)
    lines = [
        "| method | lr | untrained: val loss, general ppl | final step: val loss | final: general "
        f"ppl | rewound step | rewound: val loss | rewound: general ppl | best val loss with "
        f"general ppl <= 2x {base:.2f} | wall s |",
        "|---" * 10 + "|",
    ]
    for r in rows:
        best = best_within([r], 2.0 * base)
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {fmt(r['base_eval_loss'])}, "
            f"{fmt(r['base_general_ppl'], 2)} | {r['final_step']}: {fmt(r['final_eval_loss'])} "
            f"| {fmt(r['final_general_ppl'], 2)} | {r['rewound_step']} "
            f"| {fmt(r['rewound_eval_loss'])} | {fmt(r['rewound_general_ppl'], 2)} "
            f"| {fmt(best and best[0])} | {r['wall_s']} |"
        )
    return "\n".join(lines)


FRONTIER_RATIOS = (1.25, 2.0, 10.0)  # general-text perplexity at most this many times the base's


def frontier(rows: list[dict[str, Any]]) -> str:
    """Per method, over all its learning rates and kept checkpoints: the lowest validation loss
    reached while general-text perplexity stays within each FRONTIER_RATIOS x the pretrained
    model's (the stability-plasticity frontier read at a few retention budgets; "-": none)."""
    base = reference_ppl(rows)
    head = " | ".join(f"val loss at general ppl <= {r:g}x {base:.2f}" for r in FRONTIER_RATIOS)
    lines = [f"| method | {head} |", "|---" * (len(FRONTIER_RATIOS) + 1) + "|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        cells = []
        for ratio in FRONTIER_RATIOS:
            got = best_within(mine, ratio * base)
            cells.append("-" if got is None else f"{got[0]:.4f} (lr {got[1]:g}, step {got[2]})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: list[tuple[str, float, Tradeoff]], path: str) -> None:
    """All runs on one chart: a method's colour for all its learning rates (dotted, dashed,
    solid from the lowest rate up)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9.5, 5.2), dpi=90)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    losses = []
    for method, lr, tradeoff in runs:
        rates = sorted({rate for m, rate, _ in runs if m == method})
        style = ("-", "--", ":")[min(len(rates) - 1 - rates.index(lr), 2)]
        draw(axes, tradeoff, f"{method} lr {lr:g}", COLORS.get(method), annotate=False,
             linestyle=style)  # fmt: skip
        losses += [p["eval_loss"] for p in tradeoff.points]
        losses += [tradeoff.base["eval_loss"]] if tradeoff.base else []
    finish_axes(axes, "Stability-plasticity on the demo task (stories260K)", losses, outside=True)
    figure.tight_layout()
    figure.savefig(path, format="png")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--save_every", type=int, default=8)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default="/tmp/forgetting_pareto")
    parser.add_argument("--png", default=None, help="default OUT/forgetting_pareto.png")
    parser.add_argument(
        "--tables_only", action="store_true", help="re-read OUT/pareto.json: tables and plot"
    )
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    png = args.png or os.path.join(args.out, "forgetting_pareto.png")
    if args.tables_only:
        with open(os.path.join(args.out, "pareto.json")) as f:
            rows = json.load(f)
        runs = [
            (
                r["method"],
                r["lr"],
                tradeoff_of(load_run(workdir_of(args.out, r["method"], r["lr"]))),
            )
            for r in rows
        ]
        report(rows, runs, args.out, png)
        return
    rows, runs = [], []
    for method in [m for m in args.methods.split(",") if m]:
        for lr in METHODS[method]:
            workdir = workdir_of(args.out, method, lr)
            started = time.perf_counter()
            train_and_evaluate(parse(config_for(method, lr, args.steps, args.save_every)), workdir)
            tradeoff = tradeoff_of(load_run(workdir))
            if tradeoff is None or not tradeoff.points or tradeoff.chosen_step is None:
                raise RuntimeError(f"{workdir}: no retention trajectory in summary.json")
            rows.append(row_of(method, lr, tradeoff, time.perf_counter() - started))
            runs.append((method, lr, tradeoff))
            print(f"{method} lr {lr:g}: {json.dumps(rows[-1]['trajectory'])}", flush=True)
    with open(os.path.join(args.out, "pareto.json"), "w") as f:
        json.dump(rows, f, indent=1)
    report(rows, runs, args.out, png)


def report(rows: list[dict[str, Any]], runs: list, out: str, png: str) -> None:
    """Prints the per-run table and the frontier table, writes them to OUT/pareto.md, and draws
    the plot to `png`."""
    tables = markdown(rows) + "\n\n" + frontier(rows)
    plot(runs, png)
    with open(os.path.join(out, "pareto.md"), "w") as f:
        f.write(tables + "\n")
    print(tables)
    print(f"plot: {png}")


if __name__ == "__main__":  # the data pipeline's worker processes re-import this module
    main()
