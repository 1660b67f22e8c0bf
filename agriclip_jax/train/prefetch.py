"""Global batches put on the mesh ahead of the step that uses them.

`DevicePrefetch` is flax's `jax_utils.prefetch_to_device` for global sharded arrays: it keeps
`depth` batches already transferred (`to_device`, e.g. `sharding.to_global_batch`) so that the
host decodes and copies batch k+depth while the device runs step k, and a step never waits for
its input's host-to-device copy.

A prefetched batch has left the data iterator, so the iterator's own state is `depth` batches
ahead of the training step. `position()` gives what a checkpoint must save instead: the state
the iterator had before the first batch still in the queue was drawn, so that a resumed run
draws exactly that batch next.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Iterator

import grain


class _SavedPosition(grain.DatasetIterator):
  """A data iterator's state frozen at one point, in the shape Grain's checkpoint handler saves
  (`get_state`); it yields nothing."""

  def __init__(self, state: dict[str, Any]):
    super().__init__()
    self._state = state

  def __next__(self):
    raise TypeError("a saved data position is not iterable")

  def get_state(self) -> dict[str, Any]:
    return self._state

  def set_state(self, state: dict[str, Any]) -> None:
    raise TypeError("a saved data position cannot be changed")


class DevicePrefetch:
  """next() -> the next global batch, already on the devices; `depth` batches in flight."""

  def __init__(self, iterator: Iterator[Any], to_device: Callable[[Any], Any], depth: int = 2):
    if depth < 1:
      raise ValueError(f"prefetch depth={depth} must be at least 1")
    self._iterator = iterator
    self._to_device = to_device
    self._depth = depth
    # (the iterator's state before the batch was drawn, the batch on the devices)
    self._queue: collections.deque[tuple[dict[str, Any], Any]] = collections.deque()
    self._fill()

  def _fill(self) -> None:
    while len(self._queue) < self._depth:
      before = self._iterator.get_state()
      try:
        local = next(self._iterator)
      except StopIteration:
        return
      # device_put is asynchronous: this returns once the copy is queued, not done.
      self._queue.append((before, self._to_device(local)))

  def __iter__(self) -> DevicePrefetch:
    return self

  def __next__(self) -> Any:
    if not self._queue:
      raise StopIteration
    _, batch = self._queue.popleft()
    self._fill()
    return batch

  def position(self) -> grain.DatasetIterator:
    """The data position to checkpoint after the batches returned so far were trained on."""
    state = self._queue[0][0] if self._queue else self._iterator.get_state()
    return _SavedPosition(state)
