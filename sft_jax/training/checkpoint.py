"""Orbax checkpoints of the train state, the data iterator position, loop counters and config.

Each saved step holds four items: `state` (params, optimizer state, step, rng: arrays),
`data` (the train iterator's exact position), `loop` (host-side counters: skipped steps, loss EMA,
early-stopping bests; see run_state.LoopState) and `config` (the resolved config, for humans and
export). Saves are asynchronous when configured and committed atomically by Orbax: on a local
filesystem a step is written under `<step>.orbax-checkpoint-tmp-*` and renamed when complete,
and a committed step has `commit_success.txt`; anything else is not a checkpoint.

Retention: the last `keep` steps, plus (when `keep_best` > 0) the `keep_best` steps with the
lowest `eval_loss` passed at save time. Orbax combines both as one preservation policy (a step
is deleted only when neither keeps it).

Orbax stores no checksums, and a step whose bytes rotted (not truncated) restores without error:
NaN in an Adam moment then aborted every restart with exit 43. So each save also writes
`integrity`: per array, the sum of its raw bits (as uint32, modulo 2^32: exact and independent of
sharding and reduction order, so a restore onto another mesh reproduces it), and each restore
recomputes and compares them, and checks that every float is finite (saves are guaranteed
finite). A mismatch is a broken step like any other.

Restore goes straight into the target shardings, so a run resumes on whatever mesh it is started
with. `restore_latest` walks back from the newest step: a step that fails to restore (truncated,
missing or altered files) is reported, and if an older step restores, the broken newer ones are
moved to `checkpoints.corrupt/` so later saves of those step numbers do not collide with them.
If no step restores, nothing is moved and the run stops with the errors: that is a config change
(another model shape, say), not corruption.

A save the file system refuses (disk full, read-only, permission denied) raises
faults.SaveFailed (exit 44) with how far the run got and the step a restart resumes from, from
`save` or, for an asynchronous save, from the next `save`, `wait` or `close`. Orbax writes
under a temporary name, so the failed step never looks committed and the earlier steps stay.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import time
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from sft_jax import paths
from sft_jax.config import ConfigError
from sft_jax.training.faults import SaveFailed, tree_is_finite
from sft_jax.training.optim import schedule_steps
from sft_jax.training.state import TrainState

COMMIT_MARKER = "commit_success.txt"


def _warn(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


class Checkpointer:
    """Saves and restores (train state, data position, loop counters, config) in a workdir."""

    def __init__(self, workdir: str, *, keep: int, async_save: bool, keep_best: int = 0):
        self.directory = paths.join(paths.absolute(workdir), "checkpoints")
        self.corrupt_directory = self.directory + ".corrupt"
        keep_policy: policies.PreservationPolicy = policies.LatestN(n=keep)
        if keep_best > 0:
            best = policies.BestN(
                get_metric_fn=lambda m: m["eval_loss"],
                reverse=True,  # BestN keeps the tail of the sort: descending -> lowest losses
                n=keep_best,
                keep_checkpoints_without_metrics=False,
            )
            keep_policy = policies.AnyPreservationPolicy([keep_policy, best])
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            create=True,
            preservation_policy=keep_policy,
            # Orbax writes metrics (needed by BestN) only when it tracks a best_fn.
            best_fn=(lambda m: m["eval_loss"]) if keep_best > 0 else None,
            best_mode="min",
            cleanup_tmp_directories=True,  # leftovers of a save killed before its commit
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_names=("state", "data", "loop", "config", "integrity"),
        )
        self._last_save: int | None = None  # the step of the latest save started
        self._failed = False  # a SaveFailed was raised: close() then only releases resources

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(
        self,
        step: int,
        state: TrainState,
        data_state: dict,
        config: dict,
        *,
        loop: dict | None = None,
        metrics: dict[str, float] | None = None,
    ) -> bool:
        """Starts a (possibly asynchronous) save; returns False if `step` is already saved.

        `metrics` ({"eval_loss": x}) rank the step for `keep_best`.
        """
        if step in self._manager.all_steps():
            return False
        arrays = {"params": state.params, "opt_state": state.opt_state, "step": state.step}
        arrays["rng"] = state.rng
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(arrays),
                    data=ocp.args.JsonSave(data_state),
                    loop=ocp.args.JsonSave(loop or {}),
                    config=ocp.args.JsonSave(config),
                    integrity=ocp.args.JsonSave(checksums(arrays)),
                ),
                metrics=metrics,
                force=True,  # the training loop decides when to save
            )
        except Exception as e:  # this save, or a previous asynchronous one, failed
            self._storage_failure(step, e)
        self._last_save = step
        return True

    def committed_steps(self) -> list[int]:
        """Steps whose save committed (`commit_success.txt`), read from the directory."""
        if not paths.isdir(self.directory):
            return []
        names = paths.listdir(self.directory)
        steps = [int(n) for n in names if n.isdigit()]
        return sorted(s for s in steps if paths.exists(self._commit_marker(s)))

    def _commit_marker(self, step: int) -> str:
        return paths.join(self.directory, str(step), COMMIT_MARKER)

    def _storage_failure(self, step: int, error: Exception) -> NoReturn:
        """Re-raises `error` as SaveFailed when the file system refused a write, else as is."""
        reason = storage_error(error)
        if reason is None:
            raise error
        self._failed = True
        committed = self.committed_steps()
        last = committed[-1] if committed else None
        # An asynchronous save reports its failure at the next call: then the step is its own.
        failed = self._last_save if self._last_save not in (None, *committed) else step
        raise SaveFailed(step, failed, last, self.directory, reason) from None

    def restore_latest(
        self, target: TrainState, shardings: TrainState
    ) -> tuple[int, TrainState, dict, dict] | None:
        """Newest step that restores -> (step, state, data state, loop); None without steps.

        Broken newer steps are reported and moved aside once an older one restored (see the
        module docstring); if none restores, raises ConfigError listing why each failed.
        """
        failures: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            path = paths.join(self.directory, str(step))
            try:
                if not paths.exists(paths.join(path, COMMIT_MARKER)):
                    raise FileNotFoundError(f"no {COMMIT_MARKER}: the save never committed")
                state, data_state, loop = self.restore(step, target, shardings)
            except Exception as e:  # any failure to read a step makes it unusable
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400]
                failures.append((step, reason))
                _warn(
                    f"checkpoint {path} cannot be restored ({reason}); "
                    "falling back to the previous checkpoint"
                )
                continue
            if failures:
                self._quarantine([s for s, _ in failures])
            return step, state, data_state, loop
        if failures:
            listing = "; ".join(f"step {s}: {r}" for s, r in failures)
            raise ConfigError(
                f"no checkpoint in {self.directory} can be restored into this run's model and "
                f"mesh ({listing}). If the config changed, use a new workdir."
            )
        return None

    def saved_config(self, step: int) -> dict:
        """The resolved config the run that saved `step` wrote with it ({} when absent)."""
        saved = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return saved["config"] or {}

    def planned_steps(self, step: int, steps_per_epoch: int) -> int | None:
        """The schedule length the run that saved `step` had (from its saved config), or None
        when the saved config does not say."""
        train = self.saved_config(step).get("train", {})
        if "max_steps" not in train or "epochs" not in train:
            return None
        return schedule_steps(train["max_steps"], train["epochs"], steps_per_epoch)

    def _quarantine(self, steps: list[int]) -> None:
        """Moves broken step directories to `checkpoints.corrupt/<step>-<time>` (process 0)."""
        if jax.process_index() == 0:
            paths.makedirs(self.corrupt_directory)
            for step in steps:
                source = paths.join(self.directory, str(step))
                target = paths.join(self.corrupt_directory, f"{step}-{int(time.time())}")
                paths.move(source, target)
                _warn(f"moved unreadable checkpoint {source} to {target}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("sft_jax_checkpoint_quarantine")
        self._manager.reload()

    def restore(
        self, step: int, target: TrainState, shardings: TrainState
    ) -> tuple[TrainState, dict, dict]:
        """Restores `step` into the structure and shardings of `target`.

        Returns (state, data iterator state, loop counters).
        """

        def abstract(x: jax.Array, s: jax.sharding.Sharding) -> jax.ShapeDtypeStruct:
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

        tree = {
            "params": jax.tree.map(abstract, target.params, shardings.params),
            "opt_state": jax.tree.map(abstract, target.opt_state, shardings.opt_state),
            "step": abstract(target.step, shardings.step),
            "rng": abstract(target.rng, shardings.rng),
        }
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(tree),
                data=ocp.args.JsonRestore(),
                loop=ocp.args.JsonRestore(),
            ),
        )
        arrays = restored["state"]
        self._verify(step, arrays)
        state = target.replace(
            step=arrays["step"],
            params=arrays["params"],
            opt_state=arrays["opt_state"],
            rng=arrays["rng"],
        )
        return state, restored["data"], restored["loop"] or {}

    def restore_params(self, step: int | None, abstract_params: Any) -> Any:
        """Only the parameters of `step` (latest when None), into `abstract_params`' shardings.

        `abstract_params` is a tree of jax.ShapeDtypeStruct with `sharding` set. Used by export
        and generation, which need no optimizer state.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item={"params": abstract_params},
                    restore_args=jax.tree.map(
                        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding),
                        {"params": abstract_params},
                    ),
                    partial_restore=True,
                )
            ),
        )
        self._verify(step, restored["state"])
        return restored["state"]["params"]

    def _verify(self, step: int, arrays: dict) -> None:
        """Raises ValueError when restored arrays are not what step `step` saved (see the module
        docstring). Steps saved before checksums existed get only the finiteness check."""
        if not tree_is_finite(arrays):
            raise ValueError(f"step {step} holds NaN or Inf, which no save writes: corrupt data")
        path = paths.join(self.directory, str(step), "integrity")
        if not paths.exists(path):
            return
        saved = self._manager.restore(
            step, args=ocp.args.Composite(integrity=ocp.args.JsonRestore())
        )["integrity"]
        for name, (dtype, value) in checksums(arrays).items():
            expected = saved.get(name)
            if expected is not None and expected[0] == dtype and expected[1] != value:
                raise ValueError(f"checksum mismatch in {name}: the saved bytes were altered")

    def wait(self) -> None:
        """Blocks until any asynchronous save has been committed; SaveFailed if it failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            self._storage_failure(self._last_save or 0, e)

    def close(self) -> None:
        """Waits for the last save, then releases Orbax's threads. After a SaveFailed was
        raised, a repeat of the same failure is not raised again (it would hide the first)."""
        reported = self._failed
        try:
            self.wait()
        except SaveFailed:
            if not reported:
                raise
        finally:
            try:
                self._manager.close()
            except Exception as e:
                if not (self._failed and storage_error(e)):
                    raise


def storage_error(error: BaseException) -> str | None:
    """A one-line reason when `error` is the file system refusing a write, else None: an
    OSError, or TensorStore's error (a ValueError) carrying an `os_error_code`."""
    if isinstance(error, OSError) and error.errno is not None:
        name = errno.errorcode.get(error.errno, str(error.errno))
        where = f" ({error.filename})" if error.filename else ""
        return f"{name}: {error.strerror or os.strerror(error.errno)}{where}"
    match = re.search(r"os_error_code='?(\d+)", str(error))
    if match:
        code = int(match.group(1))
        return f"{errno.errorcode.get(code, code)}: {os.strerror(code)}"
    return None


def checksums(arrays: dict) -> dict[str, tuple[str, int]]:
    """Array path -> (dtype, sum of its raw bits modulo 2^32) for every leaf of `arrays`."""
    flat = jax.tree_util.tree_flatten_with_path(arrays)[0]
    leaves = [jax.random.key_data(x) if _is_key(x) else x for _, x in flat]
    sums = jax.device_get(_bit_sums(leaves))
    return {
        jax.tree_util.keystr(path): (str(leaf.dtype), int(total))
        for (path, leaf), total in zip(flat, sums, strict=True)
    }


def _is_key(x: Any) -> bool:
    return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


@jax.jit
def _bit_sums(leaves: list[jax.Array]) -> list[jax.Array]:
    """Integer sums of each array's bits: exact, so any reduction order gives the same value."""
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}

    def bits(x: jax.Array) -> jax.Array:
        if x.dtype == jnp.bool_:
            return x.astype(jnp.uint32)
        as_uint = jax.lax.bitcast_convert_type(x, unsigned[np.dtype(x.dtype).itemsize])
        return as_uint.astype(jnp.uint32)

    return [jnp.sum(bits(x), dtype=jnp.uint32) for x in leaves]
