"""`loop.train` reads nothing back from the devices between log and checkpoint steps, prefetches
its batches without moving the data position a checkpoint saves, and names the first bad step
when nonfinite="stop" finds it at a later log step."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from agriclip_jax.commands import train as train_command
from agriclip_jax.train import loop
from agriclip_jax.train import prefetch
from agriclip_jax.train import steps as steps_lib
from agriclip_jax.train.metrics_writer import read_metrics

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/tiny.py")


def _config(**overrides):
  base = {"batch_size": 8, "mesh.data": 1, "clip.layers": 1, "tensorboard": False,
          "async_checkpoints": False}
  base.update(overrides)
  return train_command.build_config(f"{TINY}:contrastive", [(k, str(v)) for k, v in base.items()])


class _Clock:
  step = 0
  steady = False


class _Tripwire:
  """A step's output that fails the test when the host reads it while the loop is in a steady
  step (not a log or checkpoint step): the CPU backend has no device-to-host transfer for
  jax.transfer_guard to stop (its arrays are host memory), so reads are caught here instead."""

  def __init__(self, value, clock: _Clock):
    self._value, self._clock = value, clock

  def _read(self):
    if self._clock.steady:
      raise AssertionError(f"a step output was read on the host after steady step "
                           f"{self._clock.step}")
    return self._value

  def __array__(self, dtype=None, copy=None):
    return np.asarray(self._read(), dtype)

  def __int__(self):
    return int(self._read())

  def __float__(self):
    return float(self._read())

  def __bool__(self):
    return bool(self._read())

  def __index__(self):
    return int(self._read())

  def item(self):
    return self._read().item()

  def copy_to_host_async(self):
    self._read().copy_to_host_async()


def test_steady_state_steps_read_nothing_back_from_the_devices(tmp_path, monkeypatch):
  total, log_every = 9, 3
  host_steps = {3, 6, 9}  # log steps; the one checkpoint is at 9
  clock, guards, steady_steps = _Clock(), [], []
  real_jit = steps_lib.jit_train_step

  def watched_jit(*args, **kwargs):
    step_fn = real_jit(*args, **kwargs)

    def run(state, batch):
      while guards:
        guards.pop().__exit__(None, None, None)
      state, metrics = step_fn(state, batch)
      clock.step += 1
      clock.steady = clock.step not in host_steps
      if not clock.steady:
        return state, metrics
      steady_steps.append(clock.step)
      # On GPU / TPU the guard also catches reads of the state (on the CPU it cannot fire).
      guard = jax.transfer_guard_device_to_host("disallow_explicit")
      guard.__enter__()
      guards.append(guard)
      return state, {k: _Tripwire(v, clock) for k, v in metrics.items()}
    return run

  monkeypatch.setattr(steps_lib, "jit_train_step", watched_jit)
  cfg = _config(total_steps=total, log_every_steps=log_every, checkpoint_every_steps=total,
                nonfinite="stop")
  try:
    last = loop.train(cfg, tmp_path)
  finally:
    while guards:
      guards.pop().__exit__(None, None, None)
  assert steady_steps == [1, 2, 4, 5, 7, 8]
  assert [m["step"] for m in read_metrics(tmp_path)] == [3, 6, 9]
  assert last["step"] == total and np.isfinite(last["loss"])


def test_the_tripwire_catches_the_per_step_read_of_the_old_loop():
  # What the loop did after every step with nonfinite="stop" (and what this test file exists to
  # keep out): int(metrics["nonfinite"]).
  clock = _Clock()
  clock.steady, clock.step = True, 1
  wire = _Tripwire(jax.numpy.zeros((), jax.numpy.int32), clock)
  with pytest.raises(AssertionError, match="steady step 1"):
    int(wire)
  with pytest.raises(AssertionError):
    jax.device_get([wire])
  clock.steady = False
  assert int(wire) == 0 and jax.device_get([wire])[0] == 0


def test_nonfinite_stop_names_the_first_bad_step_found_at_a_later_log_step(tmp_path):
  # lr 1e30: step 1 sends the weights to ~1e30 and step 2 is the first non-finite one; the check
  # runs at step 3, a log and checkpoint step, and names step 2; nothing is saved.
  cfg = _config(total_steps=6, log_every_steps=3, checkpoint_every_steps=3, nonfinite="stop",
                **{"clip.optimizer.lr": 1e30, "clip.optimizer.warmup_steps": 0})
  with pytest.raises(loop.NonFiniteLossError) as err:
    loop.train(cfg, tmp_path)
  assert str(err.value) == (
      f"non-finite loss or gradient at step 2 (seen at step 3: checks run at log and checkpoint "
      f"steps); nothing after it was saved and no checkpoint had been saved in "
      f"{tmp_path / 'checkpoints'}")
  assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
  assert read_metrics(tmp_path) == []


def test_first_nonfinite_step():
  assert loop.first_nonfinite_step([0, 0, 1, 1], first_step=5) == 7
  assert loop.first_nonfinite_step(np.zeros(3, np.int32), first_step=1) is None


def test_the_prefetched_position_is_that_of_the_first_batch_not_yet_returned():
  import grain
  dataset = grain.MapDataset.range(10).to_iter_dataset()
  iterator = iter(dataset)
  batches = prefetch.DevicePrefetch(iterator, lambda x: x * 10, depth=2)
  assert [next(batches), next(batches), next(batches)] == [0, 10, 20]
  saved = batches.position().get_state()
  resumed = iter(dataset)
  resumed.set_state(saved)
  assert next(resumed) == 3  # the iterator itself is at 5: batches 3 and 4 are in flight
  assert next(iterator) == 5
