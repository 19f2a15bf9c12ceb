"""Checkpoints with orbax-checkpoint (the only module that touches orbax).

The whole train state (step, parameters, batch statistics, optimiser state,
loss state, RNG) is one pytree saved every ``every`` steps, the last ``keep``
kept. The data position is the step itself (`train.input_pipeline.BatchSampler`
is a pure function of the step), so restoring the latest checkpoint and
continuing gives the same result as an uninterrupted run.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """A thin wrapper of `ocp.CheckpointManager` for one state pytree."""

    def __init__(self, directory: str, *, every: int, keep: int | None):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, save_interval_steps=every, create=True
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore(self, like, *, step: int | None = None):
        """Restores the latest checkpoint (or ``step``) into ``like``'s structure."""
        step = self.latest_step() if step is None else step
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except ValueError as e:
            if "not compatible with the stored shape" not in str(e):
                raise
            raise ValueError(
                f"The checkpoint of step {step} in {self.directory} was written "
                "by another model or config (a parameter's shape differs), so "
                "this run cannot resume from it. Use a new --workdir, or delete "
                f"that one. ({e})"
            ) from e

    def save(self, step: int, state, *, force: bool = False) -> bool:
        """Saves ``state`` (unreplicated) if ``step`` is due, or ``force``.

        The state is saved as host (NumPy) arrays: every process of a
        multi-host run holds the same copy and orbax writes it once.
        """
        if not (force or self._manager.should_save(step)):
            return False
        state = jax.device_get(state)
        return self._manager.save(step, args=ocp.args.StandardSave(state), force=force)

    def wait(self) -> None:
        """Blocks until the saves in flight are committed."""
        self._manager.wait_until_finished()

    def due(self, step: int) -> bool:
        """Whether `save` at ``step`` would write a checkpoint (without force)."""
        return self._manager.should_save(step)

    def delete(self, step: int) -> None:
        self._manager.delete(step)

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
