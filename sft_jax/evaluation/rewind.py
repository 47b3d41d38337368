"""Choosing the checkpoint a run rewinds to, on one axis or two (`checkpoint.rewind_rule`).

Each kept checkpoint has a task score (validation loss, lower is better) and, under the
"retention" rule, a retention loss: the loss on general text (eval.general_text_files), whose
rise over the base model's measures forgetting. The rules:

- "eval_loss": the lowest validation loss (ties: the earlier step).
- "retention": the lowest validation loss among the checkpoints whose general-text loss is at
  most `tolerance` (nats) above the base model's (the run's baseline); when none is, the one
  with the lowest general-text loss (the least forgetting), and the reason says so.

Pure functions over the measured trajectory, so the choice is tested without training.
"""

from __future__ import annotations

from typing import Any

RULES = ("eval_loss", "retention")


def choose(
    trajectory: list[dict[str, Any]],
    rule: str,
    *,
    base_general_loss: float | None = None,
    tolerance: float = 0.0,
) -> dict[str, Any]:
    """The rewind decision over `trajectory` ([{"step", "eval_loss", "general_loss"?}] of the
    kept checkpoints): {"rule", "chosen_step", "reason", "trajectory"} with each point marked
    "eligible" under the retention rule, plus "tolerance" and "base_general_loss" there. A
    retention rule without the base's general loss (no baseline of it) falls back to eval_loss,
    saying so."""
    if not trajectory:
        raise ValueError("no kept checkpoint to rewind to")
    if rule not in RULES:
        raise ValueError(f"rewind rule {rule!r}: choose from {RULES}")
    by_eval = lambda p: (p["eval_loss"], p["step"])
    if rule == "eval_loss" or base_general_loss is None:
        best = min(trajectory, key=by_eval)
        reason = "lowest validation loss"
        if rule == "retention":
            reason += " (no baseline general-text loss to measure retention against)"
        return {
            "rule": rule,
            "chosen_step": best["step"],
            "reason": reason,
            "trajectory": trajectory,
        }
    limit = base_general_loss + tolerance
    points = [{**p, "eligible": p["general_loss"] <= limit} for p in trajectory]
    eligible = [p for p in points if p["eligible"]]
    if eligible:
        best = min(eligible, key=by_eval)
        reason = (
            f"lowest validation loss among {len(eligible)} of {len(points)} checkpoints with "
            f"general-text loss <= {limit:.4f} (base {base_general_loss:.4f} + {tolerance})"
        )
    else:
        best = min(points, key=lambda p: (p["general_loss"], p["step"]))
        reason = (
            f"no checkpoint within general-text loss {limit:.4f} (base {base_general_loss:.4f} "
            f"+ {tolerance}): the one with the lowest general-text loss"
        )
    return {
        "rule": rule,
        "chosen_step": best["step"],
        "reason": reason,
        "tolerance": tolerance,
        "base_general_loss": base_general_loss,
        "trajectory": points,
    }
