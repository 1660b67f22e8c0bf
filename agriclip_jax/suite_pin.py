"""Pinned suites: a suite file plus the content hash of every record each task evaluates.

`agriclip suite pin SUITE --out PINNED.json` writes

    {"format": "agriclip-pinned-suite/1",
     "suite": {"tasks": [...]},          # the suite's entries, data paths relative to PINNED's folder
     "pins": [{"task", "class_names", "images", "classes": {name: n}, "excluded": {name: n},
               "files_hash", "files": [[name, class, size, sha256], ...]}, ...],   # one per task
     "hash": sha256 of the canonical JSON of the rest, data locations left out}

A record's name is its path relative to the data (the ImageFolder root, a manifest's folder), its
absolute path outside it, or its key for sources that hold their images (tar, ArrayRecord, TFDS);
the list is sorted by name and `files_hash` is the sha256 of its canonical JSON. The records are
`tasks.entry_records` of each entry (the evaluation split, then the class subset), the same ones
an evaluation scores. Every file's bytes are hashed (a rewritten file of the same size is caught),
in chunks and in threads. The suite's hash leaves out where the data lies, so the same images
pinned on two machines give the same hash, and two results files that carry it were measured on
the same images. `check_suite` compares the data with the pin: a changed, missing or added record
is a ValueError naming the task and the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

FORMAT = "agriclip-pinned-suite/1"
_SHOWN_DIFFERENCES = 5  # an error names this many differing records, then counts the rest


def canonical_json(value: Any) -> bytes:
  return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_json(value: Any) -> str:
  return hashlib.sha256(canonical_json(value)).hexdigest()


def is_pinned(spec: Any) -> bool:
  return isinstance(spec, dict) and "format" in spec


def suite_hash(document: dict[str, Any]) -> str:
  """sha256 of the pinned document's canonical JSON without its "hash" and its data locations."""
  tasks = [{key: value for key, value in entry.items() if key != "data"}
           for entry in document["suite"]["tasks"]]
  return sha256_json({"format": document["format"], "suite": {**document["suite"], "tasks": tasks},
                      "pins": document["pins"]})


def _file_digest(path: str) -> tuple[int, str]:
  """(size in bytes, sha256) of a file, read in chunks."""
  with open(path, "rb") as handle:
    digest = hashlib.file_digest(handle, "sha256")  # chunked reads, the GIL released while hashing
    return os.fstat(handle.fileno()).st_size, digest.hexdigest()


def _record_name(path: str, base: Path) -> str:
  relative = os.path.relpath(path, base)
  if relative == os.pardir or relative.startswith(os.pardir + os.sep):
    return str(Path(path).resolve())
  return relative.replace(os.sep, "/")


def record_files(records, workers: int = 8) -> list[list[Any]]:
  """[[name, class, size, sha256], ...] of `records` (`tasks.TaskRecords`), sorted by name.
  A record that cannot be read (a missing file, a broken tar member) is a ValueError naming it."""
  from agriclip_jax import features
  from agriclip_jax.tasks import record_labels
  source, indices = records.source, records.indices
  names = records.class_names
  labels = record_labels(source, indices) if names is not None else [-1] * len(indices)
  classes = [names[label] if names is not None and 0 <= label < len(names) else None
             for label in labels]
  if callable(getattr(source, "entry", None)):  # files on disk: hashed where they lie
    spec = Path(records.spec)
    base = spec if spec.is_dir() else spec.parent
    paths = features.record_names(source, indices)

    def digest(path: str) -> tuple[int, str]:
      try:
        return _file_digest(path)
      except OSError as e:
        raise ValueError(f"{records.spec}: cannot read {path}: "
                         f"{e.strerror or type(e).__name__}") from e
    names_out = [_record_name(path, base) for path in paths]
  else:  # the source holds its images: hash the bytes each record carries
    keys = features.record_names(source, indices)

    def digest(index: int) -> tuple[int, str]:
      record = source[int(index)]
      if record.get("error") or record.get("image_bytes") is None:
        raise ValueError(f"{records.spec}: cannot read record {record.get('key')!r}: "
                         f"{record.get('error') or 'no image bytes'}")
      data = record["image_bytes"]
      return len(data), hashlib.sha256(data).hexdigest()
    paths, names_out = [int(i) for i in indices], keys
  with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
    digests = list(pool.map(digest, paths))
  rows = [[name, label, size, sha] for name, label, (size, sha) in zip(names_out, classes, digests)]
  rows.sort(key=lambda row: row[0])
  return rows


def pin_records(records) -> dict[str, Any]:
  """The pin of one task's records: counts, the file list and its hash."""
  files = record_files(records)
  counts = {name: 0 for name in records.class_names or []}
  for _, label, _, _ in files:
    if label is not None:
      counts[label] += 1
  return {"class_names": records.class_names, "images": len(files), "classes": counts,
          "excluded": records.excluded, "files_hash": sha256_json(files), "files": files}


def pin_suite(suite, out: str | os.PathLike) -> dict[str, Any]:
  """The pinned document of `suite` (`tasks.Suite`) to be written at `out`."""
  import time

  from agriclip_jax.tasks import entry_records
  out_folder = Path(out).resolve().parent
  tasks_out, pins = [], []
  for written, entry in zip(suite.spec["tasks"], suite.entries):
    started = time.perf_counter()
    pin = {"task": entry.task.name, **pin_records(entry_records(entry))}
    seconds = time.perf_counter() - started
    pins.append(pin)
    moved = dict(written)
    if entry.data is not None and os.path.isabs(entry.data):  # found again from the pinned file
      moved["data"] = os.path.relpath(entry.data, out_folder).replace(os.sep, "/")
    tasks_out.append(moved)
    print(f"[suite] {entry.task.name}: {pin['images']} images in {len(pin['classes'])} classes"
          + (f" ({sum(pin['excluded'].values())} of other classes left out)" if pin["excluded"] else "")
          + f", files hash {pin['files_hash'][:16]} ({pin['images'] / max(seconds, 1e-9):.0f} images/s)")
  document = {"format": FORMAT, "suite": {**suite.spec, "tasks": tasks_out}, "pins": pins}
  document["hash"] = suite_hash(document)
  return document


def read_pinned(document: dict[str, Any], path: Path):
  """The `tasks.Suite` of a pinned document read from `path`: its hash is checked against its
  contents, and each entry carries its task's pin."""
  import dataclasses

  from agriclip_jax.tasks import Suite, suite_entries
  if document.get("format") != FORMAT:
    raise ValueError(f"pinned suite {path}: format {document.get('format')!r} is not {FORMAT!r}")
  missing = [key for key in ("suite", "pins", "hash") if key not in document]
  if missing:
    raise ValueError(f"pinned suite {path}: missing {missing}")
  try:
    actual = suite_hash(document)
  except (KeyError, TypeError, AttributeError) as e:
    raise ValueError(f"pinned suite {path}: malformed ({e})") from e
  if actual != document["hash"]:
    raise ValueError(f"pinned suite {path}: its contents do not match its hash {document['hash']} "
                     f"(edited after pinning?); pin the suite again")
  entries = suite_entries(document["suite"], path)
  if len(entries) != len(document["pins"]):
    raise ValueError(f"pinned suite {path}: {len(entries)} tasks but {len(document['pins'])} pins")
  entries = [dataclasses.replace(entry, pin=pin) for entry, pin in zip(entries, document["pins"])]
  return Suite(path, entries, document["hash"], document["suite"])


def differences(pinned: list[list[Any]], current: list[list[Any]]) -> list[str]:
  """What differs between two file lists, one line per record, sorted by name."""
  before = {row[0]: row[1:] for row in pinned}
  after = {row[0]: row[1:] for row in current}
  lines = []
  for name in sorted(before.keys() | after.keys()):
    if name not in after:
      lines.append(f"{name} is missing (pinned, no longer in the data)")
    elif name not in before:
      lines.append(f"{name} was added (in the data, not in the pin)")
    elif before[name] != after[name]:
      (old_class, old_size, old_sha), (new_class, new_size, new_sha) = before[name], after[name]
      what = []
      if old_class != new_class:
        what.append(f"class {old_class!r} -> {new_class!r}")
      if old_size != new_size:
        what.append(f"size {old_size} -> {new_size} bytes")
      if old_sha != new_sha:
        what.append(f"sha256 {old_sha[:12]}.. -> {new_sha[:12]}..")
      lines.append(f"{name} changed ({', '.join(what)})")
  return lines


def check_entry(entry, where: str) -> None:
  """Raises ValueError naming the task and the records when `entry`'s data differs from its pin."""
  from agriclip_jax.tasks import entry_records
  records = entry_records(entry)
  if records.class_names != entry.pin["class_names"]:
    raise ValueError(f"{where}, task {entry.task.name!r}: the data's classes {records.class_names} "
                     f"differ from the pinned {entry.pin['class_names']}")
  current = record_files(records)
  if sha256_json(current) == entry.pin["files_hash"]:
    return
  lines = differences(entry.pin["files"], current)
  shown = "; ".join(lines[:_SHOWN_DIFFERENCES])
  more = f"; and {len(lines) - _SHOWN_DIFFERENCES} more" if len(lines) > _SHOWN_DIFFERENCES else ""
  raise ValueError(f"{where}, task {entry.task.name!r} ({records.spec}): {len(lines)} record(s) "
                   f"differ from the pin: {shown}{more}")


def check_suite(suite) -> None:
  """Checks every task of a pinned `tasks.Suite` against its pin (nothing for a plain suite)."""
  for entry in suite.entries:
    if entry.pin is not None:
      check_entry(entry, f"pinned suite {suite.path}")
