"""Orbax checkpoints of the whole run: train state (params, optimizer, teacher, centre, rng, step)
and the data iterator's position, saved asynchronously, the newest N kept.

Restoring takes an abstract state whose leaves carry the shardings of the *current* mesh, so a
run saved on 8 devices resumes on 1 (or on 16).

Integrity. Every step directory carries `agriclip_manifest.json`: the size and SHA-256 of each of
its files, written by the save itself just before Orbax renames the step's temporary directory to
its final name, so a committed step and its manifest appear together. SHA-256 rather than CRC32:
both are in the standard library and either catches a flipped byte, but SHA-256 also catches
changes that were made on purpose, costs about a second per GB in the background save thread,
and `sha256sum` can check a file by hand. (Orbax offers no checksum of the data itself: its zarr3
`crc32c` codec covers only the shard index.)

On restore, a step whose files differ from its manifest, is truncated or empty, cannot be read, or
holds non-finite values is moved aside to `WORKDIR/checkpoints-quarantine/` (never deleted) with
a warning naming it, and the newest good step is restored. A step whose bytes match its manifest
but that does not fit the current config is left where it is: that is the wrong workdir, not a
damaged checkpoint, and the error says so.

Cloud Storage (a gs:// workdir; `fileio.resolve_path`). Orbax writes the arrays with
tensorstore's gcs driver and commits a step its own way there: GCS has no rename, so the step is
written under its final name and committed by a `commit_success.txt` written last; a step without
it is never restored (Orbax's CommitFileTemporaryPath). The manifest is written before that file
(the post-finalisation callback runs before Orbax's commit), so a committed step has its manifest
on GCS as it has locally. Moving a damaged step aside copies its objects and deletes the source
(`fileio.move_tree`: not atomic there, but the step is no longer committed only once the copy
is whole). Verifying a step reads all its bytes once more (one download of the step per restore).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from agriclip_jax import fileio
from agriclip_jax.fileio import atomic_write_json

MANIFEST_NAME = "agriclip_manifest.json"
MANIFEST_FORMAT = "agriclip-checkpoint-manifest/1"
QUARANTINE_DIR = "checkpoints-quarantine"
# Orbax writes a step as `<step>.orbax-checkpoint-tmp` (some versions add `-<timestamp>`), then
# renames it to `<step>`.
_TMP_MARKER = ".orbax-checkpoint-tmp"
# Orbax rewrites the step's metadata file after the rename (it adds the commit time), so it is
# checked for being readable JSON instead of by its hash.
_REWRITTEN_AFTER_COMMIT = "_CHECKPOINT_METADATA"


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_state, shardings)


def warn(message: str) -> None:
  """Warnings go to stderr, apart from the progress lines."""
  print(f"warning: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Manifests
# ----------------------------------------------------------------------------------------------

def file_sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with path.open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _step_files(step_dir: Path) -> list[Path]:
  return [p for p in fileio.files_below(step_dir)
          if p.relative_to(step_dir).as_posix() not in (MANIFEST_NAME, _REWRITTEN_AFTER_COMMIT)]


def write_manifest(step_dir: Path, step: int) -> Path:
  files = {p.relative_to(step_dir).as_posix(): {"size": fileio.file_size(p),
                                                "sha256": file_sha256(p)}
           for p in _step_files(step_dir)}
  return atomic_write_json(step_dir / MANIFEST_NAME,
                           {"format": MANIFEST_FORMAT, "step": int(step), "files": files})


def verify_step(step_dir: Path) -> tuple[str, str]:
  """("verified" | "unverified" | "damaged", detail) for one committed step directory.

  "unverified": no manifest (written before manifests existed, or by a synchronous save killed
  between its commit and its manifest); the restore and the finiteness check still guard it.
  """
  if not any(step_dir.iterdir()):
    return "damaged", "the directory is empty"
  manifest_path = step_dir / MANIFEST_NAME
  if not manifest_path.is_file():
    return "unverified", f"no {MANIFEST_NAME}"
  try:
    manifest = json.loads(manifest_path.read_text())
    files = manifest["files"]
  except (OSError, ValueError, KeyError, TypeError) as err:
    return "damaged", f"{manifest_path} is unreadable ({type(err).__name__}: {err})"
  for name, expected in sorted(files.items()):
    if name == _REWRITTEN_AFTER_COMMIT:
      continue
    path = step_dir / name
    if not path.is_file():
      return "damaged", f"{path} is missing"
    size = fileio.file_size(path)
    if size != expected["size"]:
      return "damaged", f"{path} is {size} bytes, {expected['size']} when written (truncated?)"
    if file_sha256(path) != expected["sha256"]:
      return "damaged", f"{path} changed after it was written (its SHA-256 differs from the manifest)"
  metadata = step_dir / _REWRITTEN_AFTER_COMMIT
  if metadata.exists():
    try:
      json.loads(metadata.read_text())
    except (OSError, ValueError) as err:
      return "damaged", f"{metadata} is unreadable ({type(err).__name__}: {err})"
  return "verified", f"{len(files)} files match {MANIFEST_NAME}"


def all_finite(tree: Any) -> bool:
  """Whether every floating-point leaf is finite (one jitted reduction; sharded leaves welcome)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  if not leaves:
    return True
  result = jax.jit(lambda xs: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs])))(leaves)
  return bool(np.asarray(result.addressable_data(0)))


# ----------------------------------------------------------------------------------------------
# Errors of the asynchronous save
# ----------------------------------------------------------------------------------------------

def _root_oserror(error: BaseException) -> OSError | None:
  """The first OSError carrying an errno in an exception's cause/context chain (or its message:
  tensorstore reports a full disk as a ValueError whose text holds the strerror)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno is not None:
      return error
    text = str(error)
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
      if os.strerror(code) in text:
        return OSError(code, os.strerror(code))
    error = error.__cause__ or error.__context__
  return None


def _as_save_error(error: BaseException, directory: Path) -> BaseException:
  """A failed checkpoint write as one OSError naming the checkpoint directory (the CLI prints
  it as one line), or the error itself when it is not a file-system error."""
  root = _root_oserror(error)
  if root is None:
    return error
  return OSError(root.errno, f"{os.strerror(root.errno)} (writing a checkpoint)", str(directory))


class _DropOrbaxTracebacks(logging.Filter):
  """Orbax logs each failure of its background save threads with a traceback (a full disk:
  some 300 lines) and then raises the same error in the main thread, where it is reported as
  one line. Those logged copies are dropped; AGRICLIP_DEBUG=1 keeps them."""

  def filter(self, record: logging.LogRecord) -> bool:
    from_orbax = f"{os.sep}orbax{os.sep}" in record.pathname
    return not (from_orbax and record.levelno >= logging.ERROR and record.exc_info)


def _is_closed_loop_noise(unraisable: Any) -> bool:
  """After a failed save, tensorstore completes its remaining write futures into the asyncio
  loop Orbax has already closed; each prints 'Event loop is closed' as an unraisable error."""
  return (isinstance(unraisable.exc_value, RuntimeError)
          and str(unraisable.exc_value) == "Event loop is closed")


def _install_unraisable_filter() -> None:
  previous = sys.unraisablehook
  if getattr(previous, "_agriclip_filter", False):
    return

  def hook(unraisable):
    if not _is_closed_loop_noise(unraisable):
      previous(unraisable)

  hook._agriclip_filter = True
  sys.unraisablehook = hook


class _DropUnretrievedSaveErrors(logging.Filter):
  """asyncio logs "Future exception was never retrieved" for each tensorstore write that failed
  after Orbax stopped waiting for it: the same file-system error the main thread reports as one
  line. Only records whose exception is such an error (full disk, read-only, ...) are dropped."""

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    never_retrieved = "exception was never retrieved" in record.getMessage()
    return not (never_retrieved and error is not None and _root_oserror(error) is not None)


def quiet_save_tracebacks() -> None:
  """Installs the filters above, once per process: on the absl logger Orbax writes to, on
  asyncio's logger and as the unraisable-error hook. They stay: after a second Ctrl-C, the save
  threads Orbax leaves running log their failures while the interpreter shuts down, after the
  run has returned."""
  if os.environ.get("AGRICLIP_DEBUG"):
    return
  _install_unraisable_filter()
  # The write coroutines of a save that failed, still pending when the interpreter exits: Python
  # warns once per coroutine ("... was never awaited") after the one-line error was printed.
  warnings.filterwarnings("ignore", message=r"coroutine '.*write_fragment' was never awaited",
                          category=RuntimeWarning)
  for name, kind in (("absl", _DropOrbaxTracebacks), ("asyncio", _DropUnretrievedSaveErrors)):
    logger = logging.getLogger(name)
    if not any(isinstance(f, kind) for f in logger.filters):
      logger.addFilter(kind())


# ----------------------------------------------------------------------------------------------
# The checkpointer
# ----------------------------------------------------------------------------------------------

class Checkpointer:
  """A CheckpointManager with two items: `state` (a pytree) and `data` (a grain iterator)."""

  def __init__(self, directory: str | Path, keep: int, async_save: bool = True):
    directory = fileio.resolve_path(directory)
    self.directory = directory if fileio.is_url(directory) else directory.absolute()
    self.quarantine_dir = self.directory.parent / QUARANTINE_DIR
    self.moved_aside: list[Path] = []
    self._async = async_save
    self._pending_step: int | None = None
    # The manifest is written in the save's background thread after every file of the step is
    # written and before the rename that commits it (AsyncOptions' post-finalisation callback).
    async_options = (ocp.AsyncOptions(post_finalization_callback=self._write_pending_manifest)
                     if async_save else None)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save,
                                           async_options=async_options)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  # --- saving ---------------------------------------------------------------------------------

  def _write_pending_manifest(self) -> None:
    step = self._pending_step
    if step is None:
      return
    if fileio.is_url(self.directory):  # written under its final name there (module docstring)
      write_manifest(self.directory / str(step), step)
      return
    candidates = sorted(self.directory.glob(f"{step}{_TMP_MARKER}*"),
                        key=lambda p: p.stat().st_mtime)
    final = self.directory / str(step)
    # The newest temporary directory of this step is this save's (a killed run may have left an
    # older one); on a file system without atomic renames Orbax writes into the final name.
    target = candidates[-1] if candidates else final
    if target.is_dir():
      write_manifest(target, step)

  def save(self, step: int, state: Any, data_iterator: Any | None, force: bool = True) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    try:
      # Orbax finishes the previous asynchronous save first; its errors surface here.
      self._manager.wait_until_finished()
      self._pending_step = step
      saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
      if saved and not self._async and jax.process_index() == 0:
        write_manifest(self.directory / str(step), step)
    except Exception as err:  # noqa: BLE001 -- re-raised, as one OSError when it is the disk
      raise _as_save_error(err, self.directory) from err
    return saved

  def wait(self) -> None:
    try:
      self._manager.wait_until_finished()
    except Exception as err:  # noqa: BLE001
      raise _as_save_error(err, self.directory) from err

  def close(self) -> None:
    # No try/finally: after a failed or interrupted wait (a second Ctrl-C), closing the manager
    # would wait for the same save again.
    self.wait()
    self._manager.close()

  # --- listing --------------------------------------------------------------------------------

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  # --- restoring ------------------------------------------------------------------------------

  def restore(self, step: int, target: Any, data_iterator: Any | None) -> Any:
    items = {"state": ocp.args.StandardRestore(target)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def move_aside(self, step: int, reason: str) -> Path:
    """Moves a damaged step out of Orbax's sight (never deletes it) and says where it went."""
    source = self.directory / str(step)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    destination = self.quarantine_dir / f"{step}-{stamp}"
    if jax.process_index() == 0:
      self.quarantine_dir.mkdir(parents=True, exist_ok=True)
      suffix = 0
      while destination.exists():
        suffix += 1
        destination = self.quarantine_dir / f"{step}-{stamp}-{suffix}"
      fileio.move_tree(source, destination)
      (destination.parent / f"{destination.name}.reason.txt").write_text(reason + "\n")
    _sync_processes(f"agriclip-move-aside-{step}")
    self._manager.reload()
    self.moved_aside.append(destination)
    warn(f"checkpoint step {step} in {self.directory} {reason}; moved it aside to {destination} "
         f"and trying an earlier one")
    return destination

  def restore_latest(self, target: Any, data_iterator: Any | None) -> tuple[Any, int] | None:
    """(state, step) of the newest good checkpoint, or None when there is none.

    Damaged steps are moved aside on the way (see the module docstring). When any was, the data
    iterator may hold the position of a step that was then rejected: with None returned, the
    caller must make a fresh iterator.
    """
    for step in reversed(self.all_steps()):
      status, detail = verify_step(self.directory / str(step))
      if status == "damaged":
        self.move_aside(step, f"is damaged: {detail}")
        continue
      try:
        state = self.restore(step, target, data_iterator)
      except Exception as err:  # noqa: BLE001 -- sorted into damaged vs wrong config below
        message = f"{type(err).__name__}: {str(err)[:300]}"
        if status == "verified":
          raise ValueError(
              f"checkpoint step {step} in {self.directory} is intact (its files match "
              f"{MANIFEST_NAME}) but does not fit this config ({message}); it was written by "
              f"a run with another model or config: use another --workdir") from err
        self.move_aside(step, f"cannot be restored ({message})")
        continue
      if not all_finite(state):
        self.move_aside(step, "holds non-finite values (NaN or infinity)")
        continue
      if status == "unverified":
        warn(f"checkpoint step {step} in {self.directory} has no {MANIFEST_NAME} (written by an "
             f"older version, or a synchronous save stopped before its manifest); restored "
             f"without checking its bytes, its values are finite")
      return state, step
    if self.moved_aside:
      warn(f"no good checkpoint left in {self.directory}; starting from step 0")
    return None


def _sync_processes(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
