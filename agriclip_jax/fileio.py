"""Atomic writes and JSON reading shared by every module that writes results or reads configs.

A write goes to a temporary name in the destination's own folder (so the final rename never
crosses a filesystem) and is renamed into place only after the writer returns: an interrupted or
failing write leaves the previous file or directory as it was and no temporary behind.

Standard library only: the input pipeline imports this without paying for jax or numpy.
"""

from __future__ import annotations

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


def atomic_directory(final: Path, write: Callable[[Path], None]) -> Path:
  """Writes a directory under a temporary name beside `final`, then swaps it in.

  `write(tmp)` fills the (existing, empty) directory `tmp`. A failure while writing leaves
  `final` as it was (absent or the previous version).
  """
  final = Path(final)
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = _claim_temporary(final, lambda candidate: os.mkdir(candidate, 0o777))
  try:
    write(tmp)
    if final.exists():
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
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return final


def atomic_file(final: Path, write: Callable[[Path], None]) -> Path:
  """Writes a file under a temporary name in the same folder, then renames it into place.

  `write(tmp)` overwrites the file `tmp` (it exists, empty, when called).
  """
  final = Path(final)
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = _claim_temporary(final, _create_empty_file)
  try:
    write(tmp)
    os.replace(tmp, final)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  return final


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
