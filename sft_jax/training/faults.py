"""Faults: how every way a run can go wrong ends in a known state, and hooks to provoke them.

Exit codes of `python -m sft_jax.train` (documented in docs/troubleshooting.md):

    0   finished (including an early stop on validation loss)
    2   bad config or data, nothing trained
    42  preempted or interrupted (SIGTERM, Ctrl-C = SIGINT, or JAX's preemption sync point).
        During the step loop, a checkpoint of the current step was committed first; during setup
        or the final evaluation the run stops at once with its committed checkpoints intact.
        Either way, restarting the same command resumes exactly
    43  aborted: `train.max_nonfinite_steps` steps in a row had a NaN/Inf loss or gradient norm;
        no non-finite state was saved, so a restart (e.g. with a lower learning rate) resumes from
        the last good checkpoint
    44  a checkpoint could not be written (disk full, read-only or permission denied): the
        committed checkpoints are kept, and once there is space the same command resumes from
        the last of them. Not 2: the input was fine, the storage failed mid-run
    130 a second Ctrl-C while the first one's checkpoint was pending: stopped without saving

Non-finite steps are decided inside the jitted step (see `step.train_step`): the update is
dropped, the batch is consumed. The host side here only counts them (`StepHealth`), because it
has to read one scalar per step anyway to stop after K in a row.

Fault injection (`config.faults`, all off by default) is how the test suite drives real
processes into these states: SIGKILL after a step (optionally right after an asynchronous save
started), self-SIGTERM, and NaN losses at chosen steps. Steps are counted as completed updates,
1-based, the same numbers metrics.jsonl and checkpoint directories use.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import threading
from typing import Any

import jax
import numpy as np

from sft_jax.config import FaultsSection

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 42
EXIT_NONFINITE = 43
EXIT_SAVE_FAILED = 44
EXIT_ABORTED = 130  # 128 + SIGINT, as shells report a process killed by Ctrl-C


class Preempted(Exception):
    """A preemption or interrupt ended the run in a state that a restart resumes exactly.

    phase "loop": raised after the checkpoint of `step` was committed; "setup" / "finish": raised
    from the signal handler itself (nothing is being written then that a restart would trust).
    """

    def __init__(self, step: int | None, signal_name: str = "SIGTERM", phase: str = "loop"):
        if phase == "loop":
            message = f"preempted at step {step} ({signal_name}); checkpoint saved, safe to restart"
        elif phase == "finish":
            message = (
                f"stopped by {signal_name} during the final evaluation after step {step}; "
                "restarting the same command resumes from the last checkpoint and finishes"
            )
        else:
            message = (
                f"stopped by {signal_name} during setup, before any step of this start; "
                "restarting the same command starts again from the last checkpoint (if any)"
            )
        super().__init__(message)
        self.step = step
        self.phase = phase


class SaveFailed(Exception):
    """Raised when the file system refused a checkpoint write; earlier committed steps stay."""

    def __init__(self, step: int, failed: int, committed: int | None, directory: str, reason: str):
        resume = (
            f"resumes from step {committed}"
            if committed is not None
            else "starts from step 0 (no checkpoint was committed)"
        )
        super().__init__(
            f"the checkpoint of step {failed} could not be written: {reason}. Trained to step "
            f"{step}; the committed checkpoints in {directory} are kept. Free disk space or make "
            f"the directory writable, then rerun the same command: it {resume}"
        )
        self.step = step  # how far training got
        self.failed = failed  # the step whose save failed (earlier when asynchronous)
        self.committed = committed


class NonFiniteAbort(Exception):
    """Raised when too many consecutive steps had a non-finite loss or gradient norm, or when
    the state about to be saved is non-finite (`unsaveable`)."""

    def __init__(self, step: int, in_a_row: int, message: str | None = None):
        super().__init__(
            message
            or f"aborting at step {step}: {in_a_row} steps in a row had a non-finite loss or "
            "gradient norm (updates were skipped; no non-finite state was saved). Lower "
            "optim.learning_rate or check the data, then restart to resume from the last "
            "checkpoint"
        )
        self.step = step
        self.in_a_row = in_a_row

    @classmethod
    def unsaveable(cls, step: int, in_a_row: int) -> NonFiniteAbort:
        """The state due to be saved holds NaN/Inf. Skipped steps never change the state, so an
        update whose loss and gradient norm were finite overflowed (a huge learning rate, or
        squared gradients beyond float32 in Adam's second moment): say that, not "skipped"."""
        skipped = f"; the {in_a_row} steps since were skipped" if in_a_row else ""
        return cls(
            step,
            in_a_row,
            f"aborting at step {step}: the parameters or optimizer state became non-finite "
            f"after an update whose loss and gradient norm were finite (it overflowed){skipped}. "
            "Nothing was saved at this step; lower optim.learning_rate (or keep optim.clip_norm "
            "on), then restart to resume from the last checkpoint",
        )


# ----------------------------------------------------------------------------- preemption


class PreemptionWatcher:
    """SIGTERM and SIGINT (Ctrl-C) -> a clean stop with exit code 42, never a raw traceback.

    `phase` says what a signal does. "loop": set a flag that the loop polls after every step, so
    it saves at a step boundary and stops (a handler may run between any two bytecodes, so it
    never saves itself); a second Ctrl-C raises KeyboardInterrupt at once (exit 130, no save).
    "setup" and "finish": raise Preempted right away, since no checkpoint is being written then
    (setup only reads; the final checkpoint is waited for on the way out).

    With several processes (`jax.distributed` initialised) each host may receive the signal at a
    different step, so JAX's preemption sync point decides instead: it returns True on every
    process at the same step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, phase: str = "setup") -> None:
        self.requested = False
        self.signal_name = "SIGTERM"  # of the signal that set `requested`
        self.phase = phase
        self.step: int | None = None  # the last finished step, for the "finish" message
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():  # else handlers can't be set
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.phase != "loop":
            raise Preempted(self.step, name, self.phase)
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.signal_name = True, name
        if signum == signal.SIGINT and jax.process_index() == 0:
            print(
                "\nCtrl-C: saving a checkpoint after this step, then stopping "
                "(Ctrl-C again: stop now without saving)",
                file=sys.stderr,
                flush=True,
            )

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step`; a collective call when multi-process."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:  # no preemption sync manager: fall back to the local signal
                pass
        return self.requested

    def close(self) -> None:
        """Restores the handlers that were there before (tests run several loops)."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


# ----------------------------------------------------------------------------- step health


@dataclasses.dataclass
class StepHealth:
    """Host-side counters of non-finite steps and loss spikes; saved in every checkpoint.

    `loss_ema` is an exponential moving average of finite losses; a loss above
    `spike_factor * loss_ema` and at least `min_delta` above it is reported as a spike (logged,
    not acted on). The absolute floor keeps near-zero losses quiet: 0.003 -> 0.01 is a factor
    of three, but no sign of trouble.
    """

    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0
    loss_ema: float | None = None
    spikes: int = 0

    EMA_DECAY = 0.9

    def observe(
        self,
        step: int,
        loss: float,
        nonfinite: bool,
        *,
        limit: int,
        spike_factor: float,
        min_delta: float = 0.0,
    ) -> bool:
        """Counts one step; returns True for a loss spike; raises NonFiniteAbort at the limit."""
        if nonfinite:
            self.skipped_steps += 1
            self.nonfinite_in_a_row += 1
            if self.nonfinite_in_a_row >= limit:
                raise NonFiniteAbort(step, self.nonfinite_in_a_row)
            return False
        self.nonfinite_in_a_row = 0
        spike = bool(
            spike_factor > 0
            and self.loss_ema is not None
            and loss > spike_factor * self.loss_ema
            and loss - self.loss_ema >= min_delta
        )
        self.spikes += spike
        if self.loss_ema is None:
            self.loss_ema = loss
        else:
            self.loss_ema = self.EMA_DECAY * self.loss_ema + (1 - self.EMA_DECAY) * loss
        return spike

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> StepHealth:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


# ----------------------------------------------------------------------------- injection


class FaultInjector:
    """Test hooks from `config.faults`; every method is a no-op when its fault is off."""

    def __init__(self, faults: FaultsSection):
        self.faults = faults

    def loss_scale(self, step: int) -> np.ndarray:
        """1.0, or NaN for a step chosen to fail; a jit argument, so the step compiles once."""
        first = self.faults.nan_at_step
        nan = first > 0 and first <= step < first + self.faults.nan_steps
        return np.float32(math.nan if nan else 1.0)

    def save_before_kill(self, step: int) -> bool:
        """Whether a save must start at `step` so that the kill lands during it."""
        return self.faults.kill_during_save and step == self.faults.kill_at_step

    def after_step(self, step: int) -> None:
        """Kills (SIGKILL) or preempts (SIGTERM) this process once `step` is done."""
        if step == self.faults.kill_at_step:
            print(f"fault injection: SIGKILL after step {step}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if step == self.faults.sigterm_at_step:
            print(f"fault injection: SIGTERM after step {step}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)


def tree_is_finite(tree: Any) -> bool:
    """Whether every floating-point leaf is free of NaN/Inf (the guard before each save)."""
    leaves = [x for x in jax.tree.leaves(tree) if jax.numpy.issubdtype(x.dtype, np.floating)]
    return bool(_all_finite(leaves))


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    checks = [jax.numpy.all(jax.numpy.isfinite(x)) for x in leaves]
    return jax.numpy.all(jax.numpy.stack(checks)) if checks else jax.numpy.bool_(True)
