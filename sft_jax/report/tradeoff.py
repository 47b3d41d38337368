"""The stability-plasticity chart: a run's checkpoints in the task-vs-retention plane.

Fine-tuning buys task skill (validation loss falls) at the cost of general ability (the loss on
general text, eval.general_text_files, rises). One loss curve over steps hides that cost; this
chart puts each measured checkpoint at (general-text perplexity, validation loss), so the
trajectory from the base model (a star) shows what each step of progress cost, and the checkpoint
the rewind chose (checkpoint.rewind_rule) is ringed. Lower left is better on both axes. When the
rewind ranked by generation score (checkpoint.rewind_metric "generation"), the task axis is that
score instead (higher is better).

Where the points come from, most detailed first:
- summary.json's "rewind" entry (checkpoint.rewind_to_best with eval.general_text_files set):
  every kept checkpoint measured on both axes, and the chosen step;
- otherwise the end of the run: the last validation record and the `general_after` record at the
  same step (the forgetting check after training);
- the base model: the `baseline` record's eval_loss and general_loss.
General text is measured only there (not at periodic evaluations), so a run without
eval.general_text_files has no point to draw: `tradeoff_of` returns None and the page says so.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any

from sft_jax.report.data import RunData, number

NO_GENERAL_TEXT_NOTE = (
    "No stability-plasticity chart: the run has no general-text evaluation "
    "(eval.general_text_files is empty), so forgetting was not measured."
)


@dataclasses.dataclass
class Tradeoff:
    """A run's trajectory in the task-vs-retention plane (losses in nats)."""

    # [{"step", "eval_loss", "general_loss"}, plus "generation" when measured] by step
    points: list[dict[str, float]]
    base: dict[str, float] | None  # the base model's {"eval_loss", "general_loss"(, "generation")}
    chosen_step: int | None  # the rewind's choice, None without a rewind
    source: str  # "rewind" (kept checkpoints) or "final" (the end of the run only)
    # the retention rule's bound: base general loss + checkpoint.rewind_tolerance (else None)
    limit_general_loss: float | None = None
    metric: str = "eval_loss"  # the task axis: "eval_loss" or "generation" (the rewind's metric)


def _point(
    step: Any, eval_loss: Any, general_loss: Any, generation: Any = None
) -> dict[str, float] | None:
    values = [number(step), number(eval_loss), number(general_loss)]
    if any(v is None or not math.isfinite(v) for v in values):
        return None
    point = {"step": int(values[0]), "eval_loss": values[1], "general_loss": values[2]}
    score = number(generation)
    if score is not None and math.isfinite(score):
        point["generation"] = score
    return point


def rewind_points(summary: dict[str, Any] | None) -> tuple[list[dict[str, float]], int | None]:
    """The kept checkpoints measured on both axes by the rewind, and its chosen step."""
    rewind = (summary or {}).get("rewind")
    if not isinstance(rewind, dict):
        return [], None
    chosen = number(rewind.get("chosen_step"))
    points = []
    for p in rewind.get("trajectory") or []:
        if isinstance(p, dict):
            point = _point(
                p.get("step"), p.get("eval_loss"), p.get("general_loss"), p.get("generation")
            )
            if point is not None:
                points.append(point)
    return sorted(points, key=lambda p: p["step"]), None if chosen is None else int(chosen)


def tradeoff_of(data: RunData) -> Tradeoff | None:
    """The run's task-vs-retention trajectory (see the module docstring); None when nothing was
    measured on general text."""
    base = None
    if data.baseline:
        b = _point(0, data.baseline.get("eval_loss"), data.baseline.get("general_loss"))
        base = None if b is None else {k: b[k] for k in ("eval_loss", "general_loss")}
    points, chosen = rewind_points(data.summary)
    source = "rewind"
    if not points:
        chosen, source = None, "final"
        evals = {r["step"]: r for r in data.evals}
        for record in data.general:
            match = evals.get(record["step"])
            if match is not None:
                point = _point(record["step"], match.get("eval_loss"), record.get("general_loss"))
                points += [point] if point is not None else []
    if not points and base is None:
        return None
    limit, metric = None, "eval_loss"
    rewind = (data.summary or {}).get("rewind")
    if source == "rewind" and isinstance(rewind, dict):
        base_general, tolerance = (
            number(rewind.get("base_general_loss")),
            number(rewind.get("tolerance")),
        )
        if base_general is not None and tolerance is not None:
            limit = base_general + tolerance
        if rewind.get("metric") == "generation" and all("generation" in p for p in points):
            metric = "generation"
            before = data.baseline or {}
            score = number(before.get(f"generation_{rewind.get('generation_match')}"))
            if base is not None and score is not None:
                base["generation"] = score
            elif base is not None:
                base = None  # no base point on the generation axis
    return Tradeoff(points, base, chosen, source, limit, metric)


def draw(
    axes: Any,
    tradeoff: Tradeoff,
    label: str,
    color: Any = None,
    *,
    annotate: bool = True,
    linestyle: str = "-",
) -> Any:
    """One trajectory on matplotlib `axes`: x general-text perplexity, y the task metric
    (`tradeoff.metric`: validation loss or generation score); the base model a star, the
    rewind's choice ringed, points labelled by step when `annotate`. Returns the line's colour."""
    xs = [math.exp(p["general_loss"]) for p in tradeoff.points]
    ys = [p[tradeoff.metric] for p in tradeoff.points]
    if tradeoff.base is not None:
        xs.insert(0, math.exp(tradeoff.base["general_loss"]))
        ys.insert(0, tradeoff.base[tradeoff.metric])
    (line,) = axes.plot(xs, ys, marker="o", markersize=3, color=color, label=label,
                      linestyle=linestyle)  # fmt: skip
    color = line.get_color()
    if tradeoff.base is not None:
        axes.plot(xs[:1], ys[:1], marker="*", markersize=13, color="black", linestyle="none")
    for p in tradeoff.points:
        x, y = math.exp(p["general_loss"]), p[tradeoff.metric]
        if p["step"] == tradeoff.chosen_step:
            axes.plot([x], [y], marker="o", markersize=11, fillstyle="none", color=color,
                      markeredgewidth=2, linestyle="none")  # fmt: skip
        if annotate:
            axes.annotate(str(p["step"]), (x, y), textcoords="offset points", xytext=(4, 4),
                          fontsize=7, color=color)  # fmt: skip
    return color


def finish_axes(
    axes: Any,
    title: str,
    all_losses: list[float],
    *,
    outside: bool = False,
    metric: str = "eval_loss",
) -> None:
    """Log perplexity axis (forgetting multiplies it), log validation loss when it spans more
    than two decades, labels, and a legend that names the markers (right of the axes when
    `outside`: many curves)."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axes.set_xscale("log")
    plain = FuncFormatter(
        lambda value, _: f"{value:,.{0 if value >= 10 or value.is_integer() else 1}f}"
    )
    axes.xaxis.set_major_formatter(plain)  # 5.2, 40, 1,000: not 4 x 10^1
    low, high = axes.get_xlim()
    axes.xaxis.set_minor_formatter(plain if high / low < 20 else NullFormatter())
    finite = [v for v in all_losses if v > 0 and math.isfinite(v)]
    if metric == "eval_loss" and finite and max(finite) / min(finite) > 100:
        axes.set_yscale("log")
    axes.set_title(title)
    axes.set_xlabel("general-text perplexity (retention; log scale; lower = less forgetting)")
    axes.set_ylabel(
        "validation loss (task; lower = better)"
        if metric == "eval_loss"
        else "generation score (task; higher = better)"
    )
    axes.grid(alpha=0.3, which="both")
    handles, _ = axes.get_legend_handles_labels()
    handles += [
        Line2D([], [], marker="*", color="black", linestyle="none", markersize=11,
               label="base model"),
        Line2D([], [], marker="o", color="0.3", fillstyle="none", linestyle="none",
               markersize=10, markeredgewidth=2, label="rewound (chosen) checkpoint"),
    ]  # fmt: skip
    where = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if outside else {}
    axes.legend(handles=handles, fontsize="small", **where)


def plot_tradeoff(tradeoff: Tradeoff) -> bytes:
    """The single-run chart as PNG bytes (Agg, no pyplot state); points are labelled by step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.2), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    label = "kept checkpoints (step)" if tradeoff.source == "rewind" else "end of training"
    draw(axes, tradeoff, label)
    if tradeoff.limit_general_loss is not None:
        axes.axvline(math.exp(tradeoff.limit_general_loss), color="0.5", linestyle=":",
                     label="retention rule's limit (rewind_tolerance)")  # fmt: skip
    values = [p[tradeoff.metric] for p in tradeoff.points]
    values += [tradeoff.base[tradeoff.metric]] if tradeoff.base else []
    title = "Stability-plasticity: task vs retention"
    finish_axes(axes, title, values, metric=tradeoff.metric)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
