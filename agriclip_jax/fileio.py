"""Atomic writes and JSON reading shared by every module that writes results or reads configs.

A write goes to a temporary name in the destination's own folder (so the final rename never
crosses a filesystem) and is renamed into place only after the writer returns: an interrupted or
failing write leaves the previous file or directory as it was and no temporary behind.

Standard library only: the input pipeline imports this without paying for jax or numpy.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable


def _create_empty_file(path: Path) -> None:
  os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _claim_temporary(final: Path, create: Callable[[Path], None]) -> Path:
  """Creates a fresh, unused temporary name beside `final` with `create` and returns it.

  Unlike tempfile.mkstemp/mkdtemp (mode 0600/0700), `create` asks for 0666/0777 and the
  process umask trims it, so the renamed result gets the same permissions a plain open() or
  mkdir() would have given: a shared model directory stays readable by the group.
  """
  for _ in range(100):
    candidate = final.with_name(f".{final.name}.tmp-{secrets.token_hex(4)}")
    try:
      create(candidate)
    except FileExistsError:
      continue  # another writer holds this name: draw again
    return candidate
  raise FileExistsError(f"no free temporary name beside {final} after 100 tries")


def atomic_directory(final: Path, write: Callable[[Path], None], keep_others: bool = False) -> Path:
  """Writes a directory under a temporary name beside `final`, then swaps it in.

  `write(tmp)` fills the (existing, empty) directory `tmp`. A failure while writing leaves
  `final` as it was (absent or the previous version).

  An existing `final` is replaced only when nothing in it would be lost: every entry it holds is
  one that `write` has just written again (a previous output of the same kind). Other entries
  make it an error naming them, before anything is moved; with `keep_others` they are moved into
  the new directory instead, so only the files this write produces are replaced.
  """
  final = Path(final)
  refuse_to_replace_with_directory(final)
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = _claim_temporary(final, lambda candidate: os.mkdir(candidate, 0o777))
  kept: list[str] = []  # entries of the old `final` moved into `tmp` (keep_others)
  try:
    write(tmp)
    if final.exists():
      others = sorted(set(os.listdir(final)) - set(os.listdir(tmp)))
      if others and not keep_others:
        raise FileExistsError(
            f"{final}: exists and holds files this output does not write ({_listing(others)}); "
            f"refusing to replace it. Choose a new or empty destination, or pass --overwrite to "
            f"replace only the files written here")
      for name in others:
        os.replace(final / name, tmp / name)
        kept.append(name)
      # Directories cannot be replaced by one rename: move the old one aside first.
      old = final.with_name(f".{final.name}.old-{os.getpid()}")
      os.replace(final, old)
      try:
        os.replace(tmp, final)
      except BaseException:
        os.replace(old, final)  # put the previous version back rather than leave none
        raise
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, final)
  except BaseException:
    for name in kept:  # the swap did not happen: the kept entries go back where they were
      os.replace(tmp / name, final / name)
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return final


def _listing(names: list[str], limit: int = 5) -> str:
  shown = ", ".join(names[:limit])
  return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def refuse_to_replace_with_directory(final: Path) -> None:
  """An existing file where a directory is to be written is an error, not something to replace."""
  if final.exists() and not final.is_dir():
    raise FileExistsError(f"{final}: exists and is a file; this output is a directory. Choose "
                          f"another destination or remove the file")


def refuse_to_replace_with_file(final: Path) -> None:
  """An existing directory where a file is to be written is an error naming it."""
  if final.is_dir():
    raise IsADirectoryError(f"{final}: exists and is a directory; this output is a file. Choose "
                            f"another destination (e.g. {final / 'out'}{final.suffix})")


def check_writable(final: str | os.PathLike, needed_bytes: int | None = None,
                   directory: bool = False, marker: str | None = None) -> Path:
  """Checks, before any compute, that `final` can be written: not the wrong kind of thing already,
  its folder can be created and written to, and (when the size is known) it has room for it.

  For a directory output, `marker` names the file every previous output of its kind holds (e.g.
  config.json): an existing, non-empty directory without it is refused here, before the work,
  instead of by atomic_directory after it. Raises FileExistsError / IsADirectoryError /
  PermissionError / OSError naming `final`.
  """
  final = Path(final)
  (refuse_to_replace_with_directory if directory else refuse_to_replace_with_file)(final)
  if directory and marker and final.is_dir() and any(final.iterdir()) and not (final / marker).exists():
    raise FileExistsError(f"{final}: exists, is not empty and holds no {marker}, so it is not a "
                          f"previous output of this kind ({_listing(sorted(os.listdir(final)))}); "
                          f"refusing to replace it. Choose a new or empty destination")
  try:
    final.parent.mkdir(parents=True, exist_ok=True)
    _claim_temporary(final, _create_empty_file).unlink()
  except OSError as e:  # read-only filesystem, no permission: name the folder, not the probe
    raise OSError(e.errno, f"{e.strerror} (cannot write output {final.name} there)",
                  str(final.parent)) from e
  if needed_bytes is not None:
    free = shutil.disk_usage(final.parent).free
    if free < needed_bytes:
      raise OSError(errno.ENOSPC, f"No space left on device: {needed_bytes / 2**20:.1f} MiB "
                    f"needed, {free / 2**20:.1f} MiB free", str(final))
  return final


def atomic_file(final: Path, write: Callable[[Path], None]) -> Path:
  """Writes a file under a temporary name in the same folder, then renames it into place.

  `write(tmp)` overwrites the file `tmp` (it exists, empty, when called).
  """
  final = Path(final)
  refuse_to_replace_with_file(final)
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = _claim_temporary(final, _create_empty_file)
  try:
    write(tmp)
    os.replace(tmp, final)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  return final


def atomic_torch_save(final: str | os.PathLike, obj: Any) -> Path:
  """torch.save(obj) to `final` atomically; a full disk is OSError(ENOSPC) naming `final`.

  torch's zip writer reports a failed write as RuntimeError ("unexpected pos 64 vs 0"); the
  free space left beside the file tells whether that was the disk filling up.
  """
  import torch  # only callers that write the reference .pth layouts need it
  final = Path(final)

  def write(tmp: Path) -> None:
    try:
      torch.save(obj, tmp)
    except RuntimeError as e:
      if shutil.disk_usage(tmp.parent).free < max(tmp.stat().st_size, 1) + 2**20:
        raise OSError(errno.ENOSPC, "No space left on device", str(final)) from e
      raise OSError(errno.EIO, f"torch.save failed ({e})", str(final)) from e

  return atomic_file(final, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
  """Writes `text` (UTF-8) to `path` atomically."""
  return atomic_file(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> Path:
  """Writes `obj` as JSON plus a final newline to `path` atomically.

  Serialisation happens before the temporary file is made, so an unserialisable `obj` raises
  without touching the folder.
  """
  return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> Path:
  """Streams one JSON object per line (UTF-8, non-ASCII kept as is) to `path` atomically."""

  def write(tmp: Path) -> None:
    with open(tmp, "w", encoding="utf-8") as handle:
      for record in records:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")

  return atomic_file(Path(path), write)


def read_json(path: str | os.PathLike, what: str) -> Any:
  """Parses the JSON file `path`; `what` says what the file should be, for the error message.

  Raises FileNotFoundError naming the file and `what` when it is missing, and ValueError naming
  the file and the parser's complaint (line, column) when it is not valid JSON.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: {what} not found")
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: {what} is not valid JSON ({e})") from e
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: {what} is not UTF-8 text ({e})") from e
