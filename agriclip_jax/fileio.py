"""Atomic writes and JSON reading shared by every module that writes results or reads configs.

A write goes to a temporary name in the destination's own folder (so the final rename never
crosses a filesystem) and is renamed into place only after the writer returns: an interrupted or
failing write leaves the previous file or directory as it was and no temporary behind.

Standard library only (etils, for URLs, is imported when one is given): the input pipeline
imports this without paying for jax or numpy.

URLs. Every location a user gives (workdir, checkpoints, metrics, model directories, output files)
may also be a URL: gs:// (and the other etils.epath / fsspec schemes). `resolve_path` is the one
place that turns a user's string into a path object: a pathlib.Path for a local path, unchanged,
and an etils.epath.Path for a URL (gs:// through gcsfs). Cloud Storage has no rename and no
directories, only objects, so the writers here work differently on a URL, and say so:
- a file is written to a local temporary file first and then uploaded as one object write; GCS
  makes an object visible only when its upload has finished, so a reader sees the old object or
  the new one, never part of one (the same guarantee the local temporary name + rename gives);
- a directory is written locally, checked as above (nothing of another kind is replaced), then
  uploaded one object at a time, JSON files last (a model directory's config.json is its
  marker): the directory as a whole is not replaced atomically, and a reader may see old and new
  files mixed while the upload runs;
- free space is not checked (a bucket has no such limit); a probe object checks the permission.
Inputs on a URL (model directories, tokenizers, aligners) are mirrored to a local folder by
`local_input` for the readers that need a file on disk (safetensors, tokenizers).
"""

from __future__ import annotations

import atexit
import errno
import importlib.util
import json
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

# URL scheme -> the fsspec package etils.epath needs for it.
URL_PACKAGES = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs", "hf": "huggingface_hub"}


# ----------------------------------------------------------------------------------------------
# Paths and URLs
# ----------------------------------------------------------------------------------------------

def is_url(path: Any) -> bool:
  """Whether `path` is a URL (gs://bucket/...). str() of an etils.epath.Path keeps the '//'; a
  pathlib.Path never holds '://' (it folds the slashes)."""
  return "://" in str(path)


def resolve_path(path: str | os.PathLike) -> Any:
  """The path object of a user's location: pathlib.Path for a local path (as given, not made
  absolute), etils.epath.Path for a URL. A URL whose scheme is unknown, or whose fsspec package
  is missing, is an error naming the URL and what to install."""
  if not is_url(path):
    return Path(path)
  text = str(path)
  scheme = text.split("://", 1)[0]
  if scheme not in URL_PACKAGES:
    raise ValueError(f"{text}: unsupported URL scheme {scheme}://; supported: "
                     f"{', '.join(s + '://' for s in URL_PACKAGES)} or a local path")
  package = URL_PACKAGES[scheme]
  if importlib.util.find_spec(package) is None or importlib.util.find_spec("etils") is None:
    raise ModuleNotFoundError(f"{text}: {scheme}:// paths need the {package} package: "
                              f"pip install {package}")
  from etils import epath
  return epath.Path(text)


def file_size(path: Any) -> int:
  """The size in bytes of a local file or an object (epath's stat of an object has no st_size)."""
  stat = path.stat()
  return stat.st_size if hasattr(stat, "st_size") else int(stat.length)


def files_below(directory: Any) -> list[Any]:
  """Every file under `directory`, sorted. Locally `rglob`; on a URL one listing per folder
  (etils.epath refuses recursive globs on object stores)."""
  if not is_url(directory):
    return sorted(p for p in directory.rglob("*") if p.is_file())
  found = []
  for child in directory.iterdir():
    found.extend(files_below(child) if child.is_dir() else [child])
  return sorted(found, key=str)


def move_tree(source: Any, destination: Any) -> None:
  """Moves a file or directory. Locally one rename; on a URL (no renames in an object store)
  every object is copied, then the source deleted: not atomic, and a copy interrupted half-way
  leaves the source whole."""
  if not is_url(source):
    os.replace(source, destination)
    return
  for path in (files_below(source) if source.is_dir() else [source]):
    relative = str(path)[len(str(source)):].lstrip("/")
    target = destination / relative if relative else destination
    target.write_bytes(path.read_bytes())
  if source.is_dir():
    source.rmtree()
  else:
    source.unlink()


_MIRRORS: dict[str, Path] = {}


def local_input(path: str | os.PathLike) -> Path:
  """A local path for an input: a local path as pathlib.Path; a URL (a file or a directory and
  everything below it) downloaded once per process into a temporary folder that is removed at
  exit. Readers that need a file on disk (safetensors, tokenizers, torch) get it this way."""
  if not is_url(path):
    return Path(path)
  remote = resolve_path(path)
  key = str(remote).rstrip("/")
  if key in _MIRRORS:
    return _MIRRORS[key]
  if not remote.exists():
    raise FileNotFoundError(f"{key}: not found")
  scratch = Path(tempfile.mkdtemp(prefix="agriclip-mirror-"))
  atexit.register(shutil.rmtree, scratch, True)
  local = scratch / remote.name
  if remote.is_dir():
    for item in files_below(remote):
      target = local / str(item)[len(key):].lstrip("/")
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(item.read_bytes())
    local.mkdir(exist_ok=True)
  else:
    local.write_bytes(remote.read_bytes())
  print(f"[agriclip] read {key} through a local copy ({local})", file=sys.stderr, flush=True)
  _MIRRORS[key] = local
  return local


def display_name(local: str | os.PathLike) -> str:
  """How to name a file to the user: a file inside a `local_input` copy as the URL it came from
  (gs://bucket/photos/a.jpg, not /tmp/agriclip-mirror-.../photos/a.jpg); any other path as it is."""
  text = str(local)
  for key, root in _MIRRORS.items():
    root_text = str(root)
    if text == root_text:
      return key
    if text.startswith(root_text + os.sep):
      return key + "/" + text[len(root_text) + 1:].replace(os.sep, "/")
  return text


def input_path(text: str) -> Path:
  """argparse `type=` for an input flag (--model, --dino, ...): `local_input` of the value."""
  return local_input(text)


def _upload_file(local: Path, final: Any) -> None:
  """One object write: GCS shows the object only once its upload has finished."""
  final.write_bytes(local.read_bytes())


def _upload_directory(local: Path, final: Any) -> None:
  files = sorted((p for p in local.rglob("*") if p.is_file()),
                 key=lambda p: (p.suffix == ".json", p.as_posix()))
  for path in files:
    _upload_file(path, final / path.relative_to(local).as_posix())


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
  final = resolve_path(final)
  refuse_to_replace_with_directory(final)
  if is_url(final):
    return _atomic_url_directory(final, write, keep_others)
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


def _atomic_url_directory(final: Any, write: Callable[[Path], None], keep_others: bool) -> Any:
  """atomic_directory on a URL: written locally, checked, then uploaded (module docstring)."""
  with tempfile.TemporaryDirectory(prefix="agriclip-upload-") as scratch:
    tmp = Path(scratch) / final.name
    tmp.mkdir()
    write(tmp)
    if final.exists():
      others = sorted({c.name for c in final.iterdir()} - set(os.listdir(tmp)))
      if others and not keep_others:
        raise FileExistsError(
            f"{final}: exists and holds files this output does not write ({_listing(others)}); "
            f"refusing to replace it. Choose a new or empty destination, or pass --overwrite to "
            f"replace only the files written here")
    _upload_directory(tmp, final)
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
  final = resolve_path(final)
  (refuse_to_replace_with_directory if directory else refuse_to_replace_with_file)(final)
  if directory and marker and final.is_dir() and any(final.iterdir()) and not (final / marker).exists():
    names = sorted(c.name for c in final.iterdir())
    raise FileExistsError(f"{final}: exists, is not empty and holds no {marker}, so it is not a "
                          f"previous output of this kind ({_listing(names)}); "
                          f"refusing to replace it. Choose a new or empty destination")
  if is_url(final):
    probe = final.with_name(f".{final.name}.probe-{secrets.token_hex(4)}")
    try:  # a missing bucket or no permission shows here, before the work
      probe.write_bytes(b"")
      probe.unlink()
    except Exception as e:  # noqa: BLE001 -- fsspec backends raise their own types
      raise OSError(errno.EACCES, f"cannot write output {final.name} there ({type(e).__name__}: "
                    f"{e})", str(final.parent)) from e
    return final
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
  final = resolve_path(final)
  refuse_to_replace_with_file(final)
  if is_url(final):
    with tempfile.TemporaryDirectory(prefix="agriclip-upload-") as scratch:
      tmp = Path(scratch) / final.name
      _create_empty_file(tmp)
      write(tmp)
      _upload_file(tmp, final)
    return final
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
  final = resolve_path(final)

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
  return atomic_file(resolve_path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


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

  return atomic_file(resolve_path(path), write)


def read_json(path: str | os.PathLike, what: str) -> Any:
  """Parses the JSON file `path`; `what` says what the file should be, for the error message.

  Raises FileNotFoundError naming the file and `what` when it is missing, and ValueError naming
  the file and the parser's complaint (line, column) when it is not valid JSON.
  """
  path = resolve_path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: {what} not found")
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: {what} is not valid JSON ({e})") from e
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: {what} is not UTF-8 text ({e})") from e
