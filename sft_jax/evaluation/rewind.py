"""Choosing the checkpoint a run rewinds to, on one axis or two (`checkpoint.rewind_rule`).

Every kept checkpoint is measured on the task and, when general text is configured, on
retention, whatever the rule: a trajectory point is {"step", "eval_loss"} plus "generation" (the
fraction of held-out prompts answered correctly under the first rule of eval.match) when
eval.generate_examples is on, and "general_loss" (the loss on eval.general_text_files, whose rise
over the base model's measures forgetting) when that is set.

The task metric (`checkpoint.rewind_metric`) is "eval_loss" (lower is better) or "generation"
(higher is better). The rules:

- "task": the best task metric (ties: the earlier step). "eval_loss" is its former name.
- "retention": the best task metric among the checkpoints whose general-text loss is at most
  `tolerance` (nats) above the base model's (the run's baseline); when none is, the one with the
  lowest general-text loss (the least forgetting), and the reason says so.
- "knee": the knee of the Pareto front of (task metric, general-text loss): both axes scaled to
  [0, 1] over the front's points, the front point nearest the ideal corner (best task metric and
  lowest general loss both at once). It needs no tolerance; a front of one point is that point.

Pure functions over the measured trajectory, so the choice is tested without training.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

RULES = ("task", "eval_loss", "retention", "knee")
METRICS = ("eval_loss", "generation")


def task_cost(metric: str) -> Callable[[dict[str, Any]], tuple[float, int]]:
    """Sort key of a point by its task metric, lower first (generation is negated), then step."""
    if metric not in METRICS:
        raise ValueError(f"rewind metric {metric!r}: choose from {METRICS}")
    if metric == "eval_loss":
        return lambda p: (p["eval_loss"], p["step"])
    return lambda p: (-p["generation"], p["step"])


def pareto_front(points: list[dict[str, Any]], cost: Callable) -> list[dict[str, Any]]:
    """The points no other point beats on both the task cost and the general-text loss (at
    least as good on both, better on one), by step."""

    def beats(a: dict[str, Any], b: dict[str, Any]) -> bool:
        ca, cb = cost(a)[0], cost(b)[0]
        ga, gb = a["general_loss"], b["general_loss"]
        return ca <= cb and ga <= gb and (ca < cb or ga < gb)

    return [p for p in points if not any(beats(q, p) for q in points)]


def knee(front: list[dict[str, Any]], cost: Callable) -> dict[str, Any]:
    """The front point nearest the ideal corner once both axes are scaled to [0, 1] over the
    front (an axis on which every point is equal counts 0 for all); ties: the earlier step."""

    def scaled(values: list[float]) -> list[float]:
        low, high = min(values), max(values)
        return [0.0 if high == low else (v - low) / (high - low) for v in values]

    xs = scaled([cost(p)[0] for p in front])
    ys = scaled([p["general_loss"] for p in front])
    distance = {p["step"]: math.hypot(x, y) for p, x, y in zip(front, xs, ys, strict=True)}
    return min(front, key=lambda p: (distance[p["step"]], p["step"]))


def choose(
    trajectory: list[dict[str, Any]],
    rule: str,
    *,
    metric: str = "eval_loss",
    base_general_loss: float | None = None,
    tolerance: float = 0.0,
) -> dict[str, Any]:
    """The rewind decision over `trajectory` (the kept checkpoints' points, see the module
    docstring): {"rule", "metric", "chosen_step", "reason", "trajectory"}; under "retention"
    each point is marked "eligible" and "tolerance" and "base_general_loss" are added, under
    "knee" each point is marked "pareto". A rule needing the general-text loss (retention
    without the base's, knee without every point's) falls back to the task rule, saying so."""
    if not trajectory:
        raise ValueError("no kept checkpoint to rewind to")
    if rule not in RULES:
        raise ValueError(f"rewind rule {rule!r}: choose from {RULES}")
    cost = task_cost(metric)
    if metric == "generation" and any("generation" not in p for p in trajectory):
        raise ValueError("rewind metric 'generation' needs a generation score at every point")
    measured = all("general_loss" in p for p in trajectory)
    decision = {"rule": rule, "metric": metric}
    if rule == "retention" and base_general_loss is not None and measured:
        return {**decision, **_retention(trajectory, cost, base_general_loss, tolerance)}
    if rule == "knee" and measured:
        points = trajectory
        front = pareto_front(points, cost)
        best = knee(front, cost)
        steps = {p["step"] for p in front}
        return {
            **decision,
            "chosen_step": best["step"],
            "reason": f"knee of the Pareto front of {metric} and general-text loss "
            f"(steps {sorted(steps)})",
            "trajectory": [{**p, "pareto": p["step"] in steps} for p in points],
        }
    best = min(trajectory, key=cost)
    reason = "lowest validation loss" if metric == "eval_loss" else "highest generation score"
    if rule == "retention":
        reason += " (no baseline general-text loss to measure retention against)"
    elif rule == "knee":
        reason += " (no general-text loss at every checkpoint to find the knee with)"
    return {**decision, "chosen_step": best["step"], "reason": reason, "trajectory": trajectory}


def _retention(
    trajectory: list[dict[str, Any]], cost: Callable, base_general_loss: float, tolerance: float
) -> dict[str, Any]:
    limit = base_general_loss + tolerance
    points = [{**p, "eligible": p["general_loss"] <= limit} for p in trajectory]
    eligible = [p for p in points if p["eligible"]]
    bound = f"general-text loss {limit:.4f} (base {base_general_loss:.4f} + {tolerance})"
    if eligible:
        best = min(eligible, key=cost)
        reason = (
            f"best task metric among {len(eligible)} of {len(points)} checkpoints within {bound}"
        )
    else:
        best = min(points, key=lambda p: (p["general_loss"], p["step"]))
        reason = f"no checkpoint within {bound}: the one with the lowest general-text loss"
    return {
        "chosen_step": best["step"],
        "reason": reason,
        "tolerance": tolerance,
        "base_general_loss": base_general_loss,
        "trajectory": points,
    }
