"""Orbax checkpoints of the train state, the data iterator position and the resolved config.

One checkpoint per saved step, written asynchronously and committed atomically by Orbax (a
half-written step directory is never listed as a checkpoint). Restores go straight into the
target shardings, so a run can resume on the mesh it is started with.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from sft_jax.step import TrainState


class Checkpointer:
    """Saves and restores (train state, data iterator state, config) under `workdir/checkpoints`."""

    def __init__(self, workdir: str, *, keep: int, async_save: bool):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "config")
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: TrainState, data_state: dict, config: dict) -> None:
        """Starts a (possibly asynchronous) save; a save of an already saved step is a no-op."""
        if step in self._manager.all_steps():
            return
        arrays = {"params": state.params, "opt_state": state.opt_state, "step": state.step}
        arrays["rng"] = state.rng
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(arrays),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config),
            ),
        )

    def restore(
        self, step: int, target: TrainState, shardings: TrainState
    ) -> tuple[TrainState, dict]:
        """Restores `step` into the structure and shardings of `target` -> (state, data state)."""

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
                state=ocp.args.StandardRestore(tree), data=ocp.args.JsonRestore()
            ),
        )
        arrays = restored["state"]
        state = target.replace(
            step=arrays["step"],
            params=arrays["params"],
            opt_state=arrays["opt_state"],
            rng=arrays["rng"],
        )
        return state, restored["data"]

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
        return restored["state"]["params"]

    def wait(self) -> None:
        """Blocks until any asynchronous save has been committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
