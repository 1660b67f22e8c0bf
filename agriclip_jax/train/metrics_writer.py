"""Metrics to `metrics.jsonl` (one JSON object per logged step) and TensorBoard event files.

TensorBoard files are written with the `tensorboard` package's own event writer and protos,
which need no TensorFlow. Only process 0 writes. On resume the lines of steps after the restored
checkpoint (logged by the interrupted run, about to be redone) are dropped, so the file reads as
one uninterrupted run. Each line is appended with a single write, so it is whole or absent; a
line cut short by an older version or a crash is dropped on resume with a warning.

On a URL workdir (gs://) nothing can be appended to an object: the lines are kept in memory and
metrics.jsonl is uploaded whole (one object write, `fileio.atomic_write_text`) at every
checkpoint (`sync`) and at the end; TensorBoard writes its event file to a local folder, uploaded
the same way. A run killed between checkpoints loses the lines since the last one, the lines a
resume drops anyway.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from agriclip_jax import fileio
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


def read_metrics(workdir: str | Path, warn: Any = None) -> list[dict[str, Any]]:
  """The logged records. A line that is not a JSON object (the last one, cut short by a crash
  or a full disk before lines were written whole) is dropped, each with a warning naming the
  file and the line number through `warn(message)` (default: stderr)."""
  path = fileio.resolve_path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  records = []
  # bytes, decoded here: an epath.Path (gs://) read_text takes no `errors`
  text = path.read_bytes().decode("utf-8", errors="replace")
  for number, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError:
      record = None
    if not isinstance(record, dict):
      (warn or _warn)(f"{path} line {number} is not a whole JSON record ({line[:60]!r}); "
                      f"dropping it")
      continue
    records.append(record)
  return records


def _warn(message: str) -> None:
  print(f"warning: {message}", file=sys.stderr, flush=True)


class MetricsWriter:

  def __init__(self, workdir: str | Path, enabled: bool = True, resume_step: int = 0,
               tensorboard: bool = True):
    self._enabled = enabled
    workdir = fileio.resolve_path(workdir)
    self._path = workdir / METRICS_FILE
    self._tb = None
    self._fd: int | None = None
    # A URL workdir: the whole file's lines, uploaded at sync(); the local event folder.
    self._remote_lines: list[str] | None = [] if fileio.is_url(workdir) else None
    self._remote_tb: tuple[Path, Any] | None = None
    if not enabled:
      return
    self._drop_after(resume_step)
    if tensorboard:
      from tensorboard.summary.writer.event_file_writer import EventFileWriter
      tb_dir = workdir / "tensorboard"
      if self._remote_lines is not None:
        import tempfile
        local = Path(tempfile.mkdtemp(prefix="agriclip-tensorboard-"))
        self._remote_tb = (local, tb_dir)
        tb_dir = local
      self._tb = EventFileWriter(str(tb_dir))

  def _drop_after(self, step: int) -> None:
    kept = [json.dumps(m) + "\n" for m in read_metrics(self._path.parent) if m.get("step", 0) <= step]
    atomic_write_text(self._path, "".join(kept))
    if self._remote_lines is not None:
      self._remote_lines = kept

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self._enabled:
      return
    record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    self._append((json.dumps(record) + "\n").encode())
    if self._tb is not None:
      from tensorboard.compat.proto import event_pb2, summary_pb2
      values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                for k, v in record.items() if k != "step" and isinstance(v, (int, float))]
      self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                         summary=summary_pb2.Summary(value=values)))
      self._tb.flush()

  def _append(self, line: bytes) -> None:
    """One os.write on an O_APPEND descriptor: a line is whole or absent. A short write (the disk
    filled mid-line) is cut back off before the error is raised."""
    if self._remote_lines is not None:
      self._remote_lines.append(line.decode())
      return
    if self._fd is None:
      self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    size = os.fstat(self._fd).st_size
    try:
      written = os.write(self._fd, line)
    except OSError as err:
      os.ftruncate(self._fd, size)
      raise OSError(err.errno, err.strerror, str(self._path)) from err
    if written != len(line):
      os.ftruncate(self._fd, size)
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self._path))

  def sync(self) -> None:
    """Flushes the lines written so far to the disk (called at checkpoints); uploads them (and the
    TensorBoard events) on a URL workdir."""
    if self._fd is not None:
      os.fsync(self._fd)
    if self._remote_tb is not None:
      self._tb.flush()
    self._publish()

  def _publish(self) -> None:
    if not self._enabled or self._remote_lines is None:
      return
    atomic_write_text(self._path, "".join(self._remote_lines))
    if self._remote_tb is not None:
      local, remote = self._remote_tb
      for event_file in sorted(local.iterdir()):
        fileio.atomic_file(remote / event_file.name,
                           lambda tmp, source=event_file: shutil.copyfile(source, tmp))

  def close(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None
    if self._tb is not None:
      self._tb.close()
    self._publish()
    if self._remote_tb is not None:
      shutil.rmtree(self._remote_tb[0], ignore_errors=True)
      self._remote_tb = None
