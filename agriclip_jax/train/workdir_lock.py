"""One live training run per workdir: `WORKDIR/train.lock`.

The lock file is created with O_CREAT | O_EXCL, so of two runs starting together exactly one
gets it. It holds the holder's host, pid, start time and, on Linux, the kernel's start time of
that pid, so that a pid reused by an unrelated process is not mistaken for the holder. A lock
whose holder is gone (same host, pid dead or reused: a run killed with `kill -9`) is taken over
with a notice; a lock held from another host cannot be checked and refuses the run, naming the
holder. The lock is removed when the run ends, by an error or a signal too.

A URL workdir (gs://) gets no lock: an object store has no O_EXCL create that this module could
use without a client of its own (a create-if-absent needs a generation-match precondition), so
two runs started on the same gs:// workdir are not stopped; a notice says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

LOCK_NAME = "train.lock"


class WorkdirLockedError(FileExistsError):
  """Another live run holds the workdir. An OSError without an errno, so the CLI prints its
  message as one line (exit code 2)."""


def _process_start_ticks(pid: int) -> int | None:
  """The kernel's start time of `pid` in clock ticks (Linux /proc), None where unknown."""
  try:
    stat = Path(f"/proc/{pid}/stat").read_text()
  except OSError:
    return None
  # The command name (field 2) may hold spaces and parentheses: count fields after the last ')'.
  fields = stat[stat.rindex(")") + 2:].split()
  return int(fields[19])


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


def _holder_record() -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
          "pid_start_ticks": _process_start_ticks(os.getpid())}


def describe_holder(holder: dict) -> str:
  return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"


def holder_is_gone(holder: dict) -> bool:
  """Whether the lock's holder certainly no longer runs (only decidable on the same host)."""
  if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
    return False
  pid = holder["pid"]
  if not _pid_alive(pid):
    return True
  recorded, current = holder.get("pid_start_ticks"), _process_start_ticks(pid)
  return recorded is not None and current is not None and recorded != current


def _create(path: Path, record: dict) -> bool:
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  except FileExistsError:
    return False
  try:
    os.write(fd, (json.dumps(record) + "\n").encode())
    os.fsync(fd)
  finally:
    os.close(fd)
  return True


def _read(path: Path) -> dict | None:
  try:
    text = path.read_text()
  except FileNotFoundError:
    return None
  try:
    holder = json.loads(text)
  except ValueError:
    holder = None
  # An unreadable lock (a writer killed between create and write) names no live holder.
  return holder if isinstance(holder, dict) else {"host": socket.gethostname(), "pid": -1,
                                                  "started": "unknown (unreadable lock file)"}


def _take_over(path: Path, stale: dict) -> bool:
  """Moves a stale lock aside under a name of our own and checks that it was the stale one (not
  a lock another run has just made after taking it over itself)."""
  aside = path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
  try:
    os.replace(path, aside)
  except FileNotFoundError:
    return False
  moved = _read(aside)
  if moved != stale:
    os.replace(aside, path)  # someone else's fresh lock: put it back
    return False
  aside.unlink()
  return True


def acquire(workdir: Path) -> Path:
  """Takes `workdir/train.lock`; raises WorkdirLockedError naming a live holder."""
  path = Path(workdir) / LOCK_NAME
  record = _holder_record()
  for _ in range(3):
    if _create(path, record):
      return path
    holder = _read(path)
    if holder is None:  # released between our two calls
      continue
    if not holder_is_gone(holder):
      raise WorkdirLockedError(
          f"{path}: another training run is using workdir {workdir} ({describe_holder(holder)}); "
          f"wait for it to finish or stop it. If that host is gone, remove {path}")
    if _take_over(path, holder):
      print(f"notice: {path} was left by a run that no longer runs ({describe_holder(holder)}); "
            f"taking it over", file=sys.stderr, flush=True)
  if _create(path, record):
    return path
  raise WorkdirLockedError(f"{path}: could not take the lock of workdir {workdir}; another run "
                           f"is starting there")


def release(path: Path) -> None:
  """Removes the lock if it is still ours (a run that took it over from us keeps its own)."""
  holder = _read(path)
  if holder is not None and holder.get("pid") == os.getpid() and \
      holder.get("host") == socket.gethostname():
    path.unlink(missing_ok=True)


@contextlib.contextmanager
def holding(workdir: Path, enabled: bool = True) -> Iterator[Path | None]:
  """The lock for the duration of a run (only process 0 of a multi-process run takes it)."""
  if not enabled:
    yield None
    return
  if "://" in str(workdir):
    print(f"notice: {workdir} is a URL: no {LOCK_NAME} there (object stores have no exclusive "
          f"create); make sure no other run uses this workdir", file=sys.stderr, flush=True)
    yield None
    return
  path = acquire(workdir)
  try:
    yield path
  finally:
    release(path)
