"""Pack any source into another storage: ArrayRecord, JSONL, CSV, webdataset tar shards.

Every writer writes to a temporary name and renames at the end, so an interrupted write never
leaves a half-written file under the final name; on a URL (gs://...) each file is written locally
and uploaded as one object (agriclip_jax.fileio.atomic_file). Records a storage cannot hold (no image bytes,
because the source marked them bad) are not written but counted by reason in the returned summary;
ArrayRecord keeps them, error and all, so the reader reports them again.
"""

from __future__ import annotations

import collections
import csv
import functools
import io
import itertools
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from agriclip_jax.fileio import atomic_file, is_url, resolve_path
from input_pipeline.sources import Record, serialize_record

WriteSummary = dict[str, Any]  # {"written": int, "skipped": {reason: count}, "paths": [str]}


def _records(source: Any) -> Iterable[Record]:
  for index in range(len(source)):
    yield source[index]


def _summary(written: int, skipped: collections.Counter, paths: Sequence[str]) -> WriteSummary:
  return {"written": written, "skipped": dict(skipped), "paths": [str(p) for p in paths]}


def image_extension(data: bytes, fallback: str = "jpg") -> str:
  """The extension that matches the bytes' format (webdataset readers go by extension)."""
  if data.startswith(b"\xff\xd8\xff"):
    return "jpg"
  if data.startswith(b"\x89PNG\r\n\x1a\n"):
    return "png"
  if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
    return "webp"
  if data[:6] in (b"GIF87a", b"GIF89a"):
    return "gif"
  if data.startswith(b"BM"):
    return "bmp"
  return fallback


def write_array_record(source: Any, path: str | Path) -> WriteSummary:
  """One serialized record per entry (see sources.serialize_record), bad ones included."""
  from array_record.python.array_record_module import ArrayRecordWriter
  path = resolve_path(path)
  written = 0

  def write(temporary: Path) -> None:
    nonlocal written
    # group_size 1: every record is its own chunk, the cheapest random access (what Grain does).
    writer = ArrayRecordWriter(str(temporary), "group_size:1")
    try:
      for record in _records(source):
        writer.write(serialize_record(record))
        written += 1
    finally:
      writer.close()

  atomic_file(path, write)
  return _summary(written, collections.Counter(), [path])


def _relative_or_absolute(image_path: str, manifest_dir: Any) -> str:
  """The image as a manifest names it: relative to a local manifest's folder; absolute in a
  manifest on a URL, which can only point at local images by their full path."""
  if is_url(manifest_dir):
    return os.path.abspath(image_path)
  try:
    return os.path.relpath(image_path, manifest_dir)
  except ValueError:  # another drive on Windows
    return image_path


def write_jsonl(source: Any, path: str | Path) -> WriteSummary:
  """{"image", "captions", "label", "key"} per line; image paths relative to the manifest."""
  path = resolve_path(path)
  written, skipped = 0, collections.Counter()

  def write(temporary: Path) -> None:
    nonlocal written
    with open(temporary, "w", encoding="utf-8", errors="surrogateescape") as handle:
      for record in _records(source):
        if record.get("error"):
          skipped[record["error"]] += 1
          continue
        line = {"image": _relative_or_absolute(record["path"], path.parent),
                "captions": record["captions"], "label": record["label"], "key": record["key"]}
        handle.write(json.dumps(line, ensure_ascii=False) + "\n")
        written += 1

  atomic_file(path, write)
  return _summary(written, skipped, [path])


def write_csv(source: Any, path: str | Path, separator: str = ",") -> WriteSummary:
  """open_clip columns `filepath`, `title` (the first caption), plus `label` and `key`."""
  path = resolve_path(path)
  written, skipped = 0, collections.Counter()

  def write(temporary: Path) -> None:
    nonlocal written
    with open(temporary, "w", encoding="utf-8", errors="surrogateescape", newline="") as handle:
      writer = csv.writer(handle, delimiter=separator)
      writer.writerow(["filepath", "title", "label", "key"])
      for record in _records(source):
        if record.get("error") or not record["captions"]:
          skipped[record.get("error") or "empty_caption"] += 1
          continue
        writer.writerow([_relative_or_absolute(record["path"], path.parent), record["captions"][0],
                         record["label"], record["key"]])
        written += 1

  atomic_file(path, write)
  return _summary(written, skipped, [path])


def _add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  info.mode = 0o644
  archive.addfile(info, io.BytesIO(data))


def _records_with_image(source: Any, skipped: collections.Counter) -> Iterator[Record]:
  """The records a webdataset shard can hold; the others are counted in `skipped` by reason."""
  for record in _records(source):
    if record.get("error") or record["image_bytes"] is None:
      skipped[record.get("error") or "missing_image"] += 1
      continue
    yield record


def _add_sample(archive: tarfile.TarFile, record: Record) -> None:
  key = record["key"]
  _add_member(archive, f"{key}.{image_extension(record['image_bytes'])}", record["image_bytes"])
  captions = record["captions"]
  if captions:
    _add_member(archive, f"{key}.txt", captions[0].encode("utf-8", "surrogateescape"))
  if len(captions) > 1:
    _add_member(archive, f"{key}.json", json.dumps({"captions": captions}).encode("ascii"))
  if record["label"] >= 0:
    _add_member(archive, f"{key}.cls", str(record["label"]).encode("ascii"))


def write_tar_shards(source: Any, out_dir: str | Path, records_per_shard: int = 1000,
                     prefix: str = "shard") -> WriteSummary:
  """webdataset shards `prefix-000000.tar`: key.<ext> (by content), key.txt (first caption),
  key.json ({"captions": [...]}) and key.cls (label, when known)."""
  if records_per_shard < 1:
    raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
  out_dir = resolve_path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  written, skipped, shard_paths = 0, collections.Counter(), []

  def write_shard(temporary: Path, records: Iterable[Record]) -> None:
    nonlocal written
    with tarfile.open(temporary, "w", format=tarfile.PAX_FORMAT) as archive:
      for record in records:
        _add_sample(archive, record)
        written += 1

  usable = _records_with_image(source, skipped)
  # Each shard streams its records from the source (a shard's images never sit in memory at once)
  # and is renamed into place when complete, so a failure leaves only whole shards behind.
  first = next(usable, None)
  while first is not None:
    shard_paths.append(out_dir / f"{prefix}-{len(shard_paths):06d}.tar")
    shard_records = itertools.chain([first], itertools.islice(usable, records_per_shard - 1))
    atomic_file(shard_paths[-1], functools.partial(write_shard, records=shard_records))
    first = next(usable, None)
  return _summary(written, skipped, shard_paths)
