"""What one start of a training run carries between the loop's sections.

`LoopState` holds the host-side counters that a resumed run must continue (health, best eval),
saved in every checkpoint; `Run` bundles everything `train_setup.setup` builds once (config, data,
the compiled train step, the evaluator, checkpointer, metrics writer) so the loop sections take
one argument.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from sft_jax import data, paths
from sft_jax.config import Config
from sft_jax.evaluation.eval_loop import Evaluator
from sft_jax.training.checkpoint import Checkpointer
from sft_jax.training.faults import FaultInjector, NonFiniteAbort, StepHealth, tree_is_finite
from sft_jax.training.metrics import MetricsWriter


@dataclasses.dataclass
class LoopState:
    """Host-side loop counters, saved in every checkpoint so that a resumed run continues them."""

    health: StepHealth = dataclasses.field(default_factory=StepHealth)
    best_eval_loss: float | None = None
    best_eval_step: int | None = None
    evals_since_best: int = 0
    last_loss: float | None = None  # last finite training loss, kept for the summary of a resume

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["health"] = self.health.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LoopState:
        values = dict(values)
        health = StepHealth.from_dict(values.pop("health", {}))
        names = {f.name for f in dataclasses.fields(cls)} - {"health"}
        return cls(health=health, **{k: v for k, v in values.items() if k in names})

    def observe_eval(self, step: int, loss: float, patience: int) -> bool:
        """Records a periodic eval; True when `patience` evals in a row brought no new best."""
        if self.best_eval_loss is None or loss < self.best_eval_loss:
            self.best_eval_loss, self.best_eval_step, self.evals_since_best = loss, step, 0
        else:
            self.evals_since_best += 1
        return patience > 0 and self.evals_since_best >= patience


@dataclasses.dataclass
class Run:
    """Everything the loop sections share, built once by `train_setup.setup`."""

    config: Config
    workdir: str
    steps: int
    shardings: Any
    bundle: data.DataBundle
    train_step: Callable
    evaluator: Evaluator  # every evaluation of the run: baseline, periodic, final, rewind
    checkpointer: Checkpointer
    writer: MetricsWriter
    resolved: dict[str, Any]
    loop: LoopState
    run_number: int
    faults: FaultInjector
    place: Callable[[dict], dict]

    def save(self, step: int, state: Any, eval_loss: float | None = None) -> bool:
        """Starts a checkpoint of `state` at `step`; never writes non-finite parameters."""
        if not tree_is_finite((state.params, state.opt_state)):
            raise NonFiniteAbort.unsaveable(step, self.loop.health.nonfinite_in_a_row)
        metrics = None if eval_loss is None else {"eval_loss": eval_loss}
        return self.checkpointer.save(
            step,
            state,
            self.bundle.train_iter.get_state(),
            self.resolved,
            loop=self.loop.to_dict(),
            metrics=metrics,
        )


def next_run_number(workdir: str) -> int:
    """0 for a fresh workdir, else one more than the starts recorded in metrics.jsonl."""
    path = paths.join(workdir, "metrics.jsonl")
    if not paths.exists(path):
        return 0
    return sum(1 for line in paths.read_text(path).splitlines() if '"kind": "start"' in line)
