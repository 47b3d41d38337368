"""A run report a person can open: `python -m sft_jax.report --workdir W [--out FILE]`.

Writes W/report/*.png (matplotlib, Agg) and one self-contained HTML page (default
W/report/index.html; the PNGs are embedded as base64, no external URL) with the training and
validation loss, learning rate, gradient norm and tokens/s over steps, the stability-plasticity
chart (validation loss vs general-text perplexity per checkpoint, sft_jax/report/tradeoff.py), the
before/after table of summary.json, the eval records over steps, and sample generations. The
workdir's files are read by sft_jax/workdir.py and cleaned up by sft_jax/report/data.py, the page
is sft_jax/report/page.py; this module draws the charts.

The charts keep their axes honest: validation curves start at the step-0 baseline (the model
before training), rates (accuracy) are drawn on 0..1, and other quantities from 0, so a move from
0.84 to 0.92 does not fill the whole height; loss, which falls by orders of magnitude, gets a
labelled log axis when it spans more than two decades.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys

from sft_jax import paths
from sft_jax.report.data import (
    RunData,
    load_run,
    restarts_of,
    series,
    validation_points,
)
from sft_jax.report.page import Chart, render_html
from sft_jax.report.tradeoff import NO_GENERAL_TEXT_NOTE, plot_tradeoff, tradeoff_of

__all__ = ["build_report", "load_run", "main", "make_charts"]

LOG_AXIS_SPAN = 100.0  # max/min of a loss chart above which its y axis is logarithmic
Line = tuple[str, list[int], list[float]]


def y_axis(axis: str, values: list[float]) -> tuple[str, float | None, float | None]:
    """(scale, bottom, top) of a chart's y axis; None leaves the limits to matplotlib.

    "rate": 0 to 1 (a fraction drawn on its own range makes 0.84 -> 0.92 look like a leap);
    "loss": log when the values span more than LOG_AXIS_SPAN, else from 0; "count": from 0."""
    finite = [v for v in values if math.isfinite(v)]
    if axis == "rate":
        return "linear", 0.0, 1.05
    if not finite or min(finite) < 0:
        return "linear", None, None
    if axis == "loss" and min(finite) > 0 and max(finite) / min(finite) > LOG_AXIS_SPAN:
        return "log", None, None
    return "linear", 0.0, (max(finite) * 1.08) or 1.0


def plot(title: str, ylabel: str, lines: list[Line], restarts: list[int], axis: str) -> bytes:
    """One line chart as PNG bytes. Matplotlib's object API: no pyplot state, no GUI backend.

    axis: "rate" (0..1), "loss" (from 0, or log when it spans > LOG_AXIS_SPAN) or "count"
    (from 0). A point at step 0 is the baseline and is drawn as a star."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    figure = Figure(figsize=(6.4, 3.6), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, steps, values in lines:
        drawn = axes.plot(
            steps, values, marker="o" if len(steps) <= 30 else None, markersize=3, label=label
        )
        if steps and steps[0] == 0:
            axes.plot([0], values[:1], marker="*", markersize=11, color=drawn[0].get_color())
    for i, step in enumerate(restarts):
        axes.axvline(step, color="0.5", linestyle=":", label="restart" if i == 0 else None)
    scale, bottom, top = y_axis(axis, [v for _, _, values in lines for v in values])
    axes.set_yscale(scale)
    if bottom is not None:
        axes.set_ylim(bottom=bottom, top=top)
    if scale == "log":
        ylabel += " (log scale)"
    formatter = ScalarFormatter(useOffset=False)
    formatter.set_scientific(False)
    if axes.get_yscale() == "linear":
        axes.yaxis.set_major_formatter(formatter)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    if len(lines) > 1 or restarts:
        axes.legend(fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def make_charts(data: RunData) -> list[Chart]:
    """Loss (train and validation), learning rate, gradient norm, tokens/s, validation token
    accuracy, and the stability-plasticity chart; each only when some record has it. Validation
    starts at the step-0 baseline; restarts are dotted vertical lines."""
    restarts = [r["step"] for r in restarts_of(data)]
    validation = validation_points(data)
    with_baseline = bool(validation) and validation[0].get("kind") == "baseline"
    val_label = "validation (star: before training)" if with_baseline else "validation"
    specs = [
        ("Loss", "loss", "loss.png", "loss",
         [("train", data.train, "loss"), (val_label, validation, "eval_loss")]),
        ("Learning rate", "learning rate", "learning_rate.png", "count",
         [("train", data.train, "learning_rate")]),
        ("Gradient norm", "global norm", "grad_norm.png", "count",
         [("train", data.train, "grad_norm")]),
        ("Throughput", "tokens / s", "tokens_per_s.png", "count",
         [("train", data.train, "tokens_per_s")]),
        ("Validation token accuracy", "accuracy", "eval_token_accuracy.png", "rate",
         [(val_label, validation, "eval_token_accuracy")]),
    ]  # fmt: skip
    charts = []
    for title, ylabel, filename, axis, wanted in specs:
        lines = [(label, *series(records, field)) for label, records, field in wanted]
        lines = [line for line in lines if line[1]]
        if lines:
            charts.append(Chart(title, filename, plot(title, ylabel, lines, restarts, axis)))
    tradeoff = tradeoff_of(data)
    if tradeoff is not None:
        task = "validation loss" if tradeoff.metric == "eval_loss" else "generation score"
        title = f"Stability-plasticity: {task} vs general-text perplexity"
        charts.append(Chart(title, "tradeoff.png", plot_tradeoff(tradeoff)))
    return charts


def build_report(workdir: str, out: str | None = None) -> str:
    """Writes the PNGs into workdir/report/ and the HTML page to `out` (default
    workdir/report/index.html); returns the page's path."""
    if not paths.isdir(workdir):
        if paths.exists(workdir):  # "not found" misled about a path that exists
            raise NotADirectoryError(f"workdir {workdir} is a file, not a run's directory")
        raise FileNotFoundError(f"workdir not found: {workdir}")
    if out is not None:
        _check_out(out)
    data = load_run(workdir)
    charts = make_charts(data)
    if (data.train or data.evals) and tradeoff_of(data) is None:
        data.notes.append(NO_GENERAL_TEXT_NOTE)
    report_dir = paths.join(workdir, "report")
    paths.makedirs(report_dir)
    for chart in charts:
        paths.write_bytes(paths.join(report_dir, chart.filename), chart.png)
    out = out or paths.join(report_dir, "index.html")
    if not paths.is_url(out):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    paths.write_text(out, render_html(data, charts))
    return out


class ReportError(ValueError):
    """A command-line value the report refuses (exit 2)."""


def _check_out(out: str) -> None:
    """--out must name an HTML file: it is overwritten, and a slip of the flag
    (`--out WORKDIR/config.json`) used to replace a file of the run with the page."""
    if paths.isdir(out):
        raise ReportError(f"--out {out} is a directory; name an .html file")
    if not out.lower().endswith((".html", ".htm")):
        raise ReportError(f"--out {out} must name an .html file (it is overwritten)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sft_jax.report",
        description="Writes WORKDIR/report/*.png and a self-contained HTML page of a run: loss, "
        "learning rate, gradient norm, tokens/s, validation loss vs general-text perplexity, "
        "evaluation tables and sample generations.",
    )
    parser.add_argument("--workdir", required=True, help="the run's workdir (metrics.jsonl, ...)")
    parser.add_argument("--out", default=None, help="HTML file (default WORKDIR/report/index.html)")
    args = parser.parse_args(argv)
    try:
        path = build_report(args.workdir, args.out)
    except (FileNotFoundError, NotADirectoryError, PermissionError, ReportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
