"""Metrics to `metrics.jsonl` (one JSON object per logged step) and TensorBoard event files.

TensorBoard files are written with the `tensorboard` package's own event writer and protos,
which need no TensorFlow. Only process 0 writes. On resume the lines of steps after the restored
checkpoint (logged by the interrupted run, about to be redone) are dropped, so the file reads as
one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Mapping

from agriclip_jax.fileio import atomic_write_text

METRICS_FILE = "metrics.jsonl"


def _plain(value: Any) -> Any:
  try:
    number = float(value)
  except (TypeError, ValueError):
    return value
  if float(number).is_integer() and not isinstance(value, float) and abs(number) < 2 ** 53:
    return int(number)
  return number if math.isfinite(number) else str(number)


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
  path = Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsWriter:

  def __init__(self, workdir: str | Path, enabled: bool = True, resume_step: int = 0,
               tensorboard: bool = True):
    self._enabled = enabled
    self._path = Path(workdir) / METRICS_FILE
    self._tb = None
    if not enabled:
      return
    self._drop_after(resume_step)
    if tensorboard:
      from tensorboard.summary.writer.event_file_writer import EventFileWriter
      self._tb = EventFileWriter(str(Path(workdir) / "tensorboard"))

  def _drop_after(self, step: int) -> None:
    kept = [m for m in read_metrics(self._path.parent) if m.get("step", 0) <= step]
    atomic_write_text(self._path, "".join(json.dumps(m) + "\n" for m in kept))

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self._enabled:
      return
    record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    with self._path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      from tensorboard.compat.proto import event_pb2, summary_pb2
      values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                for k, v in record.items() if k != "step" and isinstance(v, (int, float))]
      self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                         summary=summary_pb2.Summary(value=values)))
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
