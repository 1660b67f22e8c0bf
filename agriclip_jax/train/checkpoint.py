"""Orbax checkpoints of the whole run: train state (params, optimizer, teacher, centre, rng, step)
and the data iterator's position, saved asynchronously, the newest N kept.

Restoring takes an abstract state whose leaves carry the shardings of the *current* mesh, so a
run saved on 8 devices resumes on 1 (or on 16). A step directory that cannot be read (a host died
mid-write on a file system without atomic renames, a truncated file) is reported and skipped:
the newest readable step is restored.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_state, shardings)


class Checkpointer:
  """A CheckpointManager with two items: `state` (a pytree) and `data` (a grain iterator)."""

  def __init__(self, directory: str | Path, keep: int, async_save: bool = True):
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state: Any, data_iterator: Any | None, force: bool = True) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, step: int, target: Any, data_iterator: Any | None) -> Any:
    items = {"state": ocp.args.StandardRestore(target)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def restore_latest(self, target: Any, data_iterator: Any | None) -> tuple[Any, int] | None:
    """(state, step) of the newest readable checkpoint, or None when there is none."""
    steps = self.all_steps()
    for step in reversed(steps):
      try:
        return self.restore(step, target, data_iterator), step
      except Exception as err:  # noqa: BLE001 -- any unreadable step: fall back to an older one
        log.warning("checkpoint step %d in %s cannot be restored (%s: %s); trying an earlier one",
                    step, self.directory, type(err).__name__, err)
        print(f"warning: checkpoint step {step} in {self.directory} cannot be restored "
              f"({type(err).__name__}: {str(err)[:200]}); trying an earlier one", flush=True)
    if steps:
      raise RuntimeError(f"none of the checkpoints {steps} in {self.directory} can be restored")
    return None

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
