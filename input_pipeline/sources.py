"""Random-access data sources (Grain's `__len__` / `__getitem__` protocol) over captioned images.

Every source yields the same record, whatever the storage:

    {"image_bytes": bytes | None, "path": str, "captions": list[str], "label": int, "key": str,
     "error": str | None}

Sources only read bytes; decoding and checks happen in the pipeline's transforms so that opening a
source stays cheap. A record a source already knows to be bad (missing file, duplicated key, a tar
member cut short, a manifest line that is not JSON ...) carries the reason in "error" instead of
raising: the pipeline skips and counts it, so one broken file never stops a run and nothing is
dropped silently. Problems with the source as a whole (a missing column, an unknown format) raise
ValueError naming the file and the column/value.

Captions are decoded as UTF-8 with `surrogateescape`, so a non-UTF-8 caption survives to the
validation step (which rejects it by reason) instead of failing the whole manifest.

Keys follow the webdataset convention: the path without directories' extensions, cut at the first
dot of the file name ("Blight/blight_0001.jpg" -> "Blight/blight_0001"), so every storage of the
same images gives the same keys.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import re
import stat
import struct
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

Record = dict[str, Any]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "avif")
# Reading a multi-GiB "image" into memory is itself the failure; no photo is near this size.
DEFAULT_MAX_FILE_BYTES = 256 * 1024 * 1024
_CANDIDATE_SEPARATORS = ("\t", ",", ";", "|")


def make_record(*, image_bytes: bytes | None, path: str, captions: Sequence[str], label: int = -1,
                key: str, error: str | None = None) -> Record:
  return {"image_bytes": image_bytes, "path": path, "captions": list(captions), "label": int(label),
          "key": key, "error": error}


def key_from_path(relative_path: str) -> str:
  """webdataset key: directories kept, file name cut at its first dot."""
  directory, _, name = relative_path.replace(os.sep, "/").rpartition("/")
  stem = name.split(".", 1)[0]
  return f"{directory}/{stem}" if directory else stem


def read_file_bytes(path: str | Path, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> tuple[bytes | None, str | None]:
  """(bytes, None) or (None, reason). Never blocks on FIFOs/devices: only regular files are opened."""
  try:
    info = os.stat(path)  # follows symlinks: a dangling one raises FileNotFoundError
  except (FileNotFoundError, NotADirectoryError):
    return None, "missing_file"
  except OSError:
    return None, "unreadable"
  if not stat.S_ISREG(info.st_mode):
    return None, "unreadable"
  if info.st_size > max_bytes:
    return None, "file_too_large"
  try:
    with open(path, "rb") as handle:
      return handle.read(), None
  except OSError:
    return None, "unreadable"


def _decode_text(raw: bytes) -> str:
  return raw.decode("utf-8", errors="surrogateescape")


def _mark_duplicate_keys(entries: list[dict[str, Any]]) -> None:
  """The first record of a key wins; later ones are counted as 'duplicate_key', not silently merged."""
  seen: set[str] = set()
  for entry in entries:
    if entry.get("error") is None and entry["key"] in seen:
      entry["error"] = "duplicate_key"
    seen.add(entry["key"])


class _FileListSource:
  """Shared by sources whose entries point at image files on disk."""

  def __init__(self, entries: list[dict[str, Any]], max_file_bytes: int):
    _mark_duplicate_keys(entries)
    self._entries = entries
    self._max_file_bytes = max_file_bytes

  def __len__(self) -> int:
    return len(self._entries)

  def entry(self, index: int) -> dict[str, Any]:
    """Path, captions, label, key and known error of a record, without reading the file."""
    return dict(self._entries[index])

  def __getitem__(self, index: int) -> Record:
    entry = self._entries[index]
    image_bytes, error = None, entry.get("error")
    if error is None:
      image_bytes, error = read_file_bytes(entry["path"], self._max_file_bytes)
    return make_record(image_bytes=image_bytes, path=entry["path"], captions=entry["captions"],
                       label=entry["label"], key=entry["key"], error=error)


# ------------------------------------------------------------------------------------------------
# ImageFolder
# ------------------------------------------------------------------------------------------------

def default_class_captions(class_name: str) -> list[str]:
  from agriclip_jax import prompts  # local import: prompts is light, but keeps sources standalone
  return [prompts.simple_caption(class_name)]


def has_image_extension(name: str) -> bool:
  return name.rpartition(".")[2].lower() in IMAGE_EXTENSIONS and "." in name


def list_image_folder(root: str | Path) -> tuple[list[str], list[list[str]]]:
  """The one reading of an ImageFolder tree `root/<class>/<entry>`: (sorted class names, per class
  the sorted names of its entries).

  Class folders are the root's sub-directories whose names do not start with '.'. A class's
  entries are everything directly inside its folder (not below it), except names starting with
  '.': every entry becomes a record, so a file that is not a readable image is counted by whoever
  decodes it, never left out here. A class with no entry that has an image extension
  (`IMAGE_EXTENSIONS`) is an error naming its folder: it would have no examples."""
  root = Path(root)
  if root.is_file():
    raise ValueError(f"{root} is a file, not an ImageFolder (ROOT/<class>/<image>)")
  if not root.is_dir():
    raise FileNotFoundError(f"ImageFolder root not found: {root}")
  class_names = sorted(entry.name for entry in os.scandir(root)
                       if entry.is_dir() and not entry.name.startswith("."))
  if not class_names:
    raise ValueError(f"ImageFolder root {root} has no class folders (expected ROOT/<class>/<image>)")
  entries = []
  for name in class_names:
    names = sorted(n for n in os.listdir(root / name) if not n.startswith("."))
    if not any(has_image_extension(n) for n in names):
      raise ValueError(f"class folder {root / name} holds no images (looked for "
                       f"{', '.join('.' + e for e in IMAGE_EXTENSIONS)})")
    entries.append(names)
  return class_names, entries


def list_image_files(folder: str | Path) -> list[Path]:
  """The image files below an unlabelled folder (every depth, links followed, by extension),
  sorted; for photos without classes (`embed`, `predict`)."""
  folder = Path(folder)
  paths = [Path(directory) / name for directory, _, names in os.walk(folder, followlinks=True)
           for name in names if has_image_extension(name) and not name.startswith(".")]
  if not paths:
    raise FileNotFoundError(f"{folder}: no image files ({', '.join('.' + e for e in IMAGE_EXTENSIONS)}) "
                            f"found")
  return sorted(paths)


class ImageFolderSource(_FileListSource):
  """`root/<class>/<file>` as `list_image_folder` reads it: labels are indices into the sorted
  class folder names. Captions come from `captions_for_class` (a mapping or callable class name
  -> captions), by default a plain "a photo of {class}" template.
  """

  def __init__(self, root: str | Path,
               captions_for_class: Mapping[str, Sequence[str]] | Callable[[str], Sequence[str]] | None = None,
               max_file_bytes: int = DEFAULT_MAX_FILE_BYTES):
    self.root = Path(root)
    self.class_names, class_entries = list_image_folder(self.root)
    entries = []
    for label, (class_name, names) in enumerate(zip(self.class_names, class_entries)):
      if captions_for_class is None:
        captions = default_class_captions(class_name)
      elif callable(captions_for_class):
        captions = list(captions_for_class(class_name))
      elif class_name in captions_for_class:
        captions = list(captions_for_class[class_name])
      else:
        raise ValueError(f"ImageFolder {self.root}: no captions given for class folder {class_name!r}")
      for name in names:
        entries.append({"path": str(self.root / class_name / name), "captions": captions,
                        "label": label, "key": key_from_path(f"{class_name}/{name}"), "error": None})
    super().__init__(entries, max_file_bytes)


# ------------------------------------------------------------------------------------------------
# CSV / TSV manifests
# ------------------------------------------------------------------------------------------------

def _detect_separator(header_line: str, required: Sequence[str], path: Path) -> str:
  """The separator whose split of the header holds every required column (tab/comma mix-ups)."""
  best_missing: dict[str, list[str]] = {}
  for separator in _CANDIDATE_SEPARATORS:
    columns = next(csv.reader([header_line], delimiter=separator))
    missing = [name for name in required if name not in columns]
    if not missing:
      return separator
    best_missing[separator] = missing
  columns = next(csv.reader([header_line], delimiter="\t" if "\t" in header_line else ","))
  missing = min(best_missing.values(), key=len)
  raise ValueError(f"{path}: missing column {', '.join(repr(m) for m in missing)}; header has "
                   f"columns {columns} (tried separators tab, comma, semicolon, bar)")


def _parse_label(value: Any) -> int | None:
  if value is None or value == "":
    return -1
  try:
    return int(value)
  except (TypeError, ValueError):
    return None


def _resolve(path_text: str, root: Path) -> str:
  path = Path(path_text)
  return str(path if path.is_absolute() else root / path)


class CsvSource(_FileListSource):
  """CSV/TSV manifest (open_clip style: `filepath`, `title`); the separator is detected."""

  def __init__(self, path: str | Path, image_column: str = "filepath", caption_column: str = "title",
               label_column: str | None = None, key_column: str | None = None,
               separator: str | None = None, root: str | Path | None = None,
               max_file_bytes: int = DEFAULT_MAX_FILE_BYTES):
    self.manifest = Path(path)
    try:
      text = _decode_text(self.manifest.read_bytes())
    except OSError as error:
      raise ValueError(f"cannot read manifest {self.manifest}: {error}") from None
    lines = text.splitlines()
    if not lines:
      raise ValueError(f"{self.manifest}: empty manifest (no header line)")
    required = [c for c in (image_column, caption_column, label_column, key_column) if c]
    separator = separator or _detect_separator(lines[0], required, self.manifest)
    base = Path(root) if root is not None else self.manifest.parent
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=separator)
    header = next(reader)
    missing = [c for c in required if c not in header]
    if missing:
      raise ValueError(f"{self.manifest}: missing column {', '.join(map(repr, missing))}; header has {header}")
    column = {name: header.index(name) for name in required}
    entries = []
    for row_number, row in enumerate(reader, start=2):
      if not row:
        continue  # blank line, not a record
      where = f"{self.manifest}:{row_number}"
      if len(row) != len(header):
        entries.append({"path": where, "captions": [], "label": -1, "key": where, "error": "bad_manifest_row"})
        continue
      image_text = row[column[image_column]]
      label = _parse_label(row[column[label_column]]) if label_column else -1
      entries.append({
          "path": _resolve(image_text, base),
          "captions": [row[column[caption_column]]],
          "label": -1 if label is None else label,
          "key": row[column[key_column]] if key_column else key_from_path(image_text),
          "error": None if label is not None else "bad_label",
      })
    super().__init__(entries, max_file_bytes)


# ------------------------------------------------------------------------------------------------
# JSONL manifests
# ------------------------------------------------------------------------------------------------

class JsonlSource(_FileListSource):
  """One JSON object per line: {"image": path, "captions": [...] | "caption": str, "label", "key"}."""

  def __init__(self, path: str | Path, image_field: str = "image", root: str | Path | None = None,
               max_file_bytes: int = DEFAULT_MAX_FILE_BYTES):
    self.manifest = Path(path)
    try:
      raw = self.manifest.read_bytes()
    except OSError as error:
      raise ValueError(f"cannot read manifest {self.manifest}: {error}") from None
    base = Path(root) if root is not None else self.manifest.parent
    entries = []
    for line_number, line in enumerate(raw.splitlines(), start=1):
      if not line.strip():
        continue
      where = f"{self.manifest}:{line_number}"
      entry = self._parse_line(_decode_text(line), image_field, base)
      if isinstance(entry, str):
        entries.append({"path": where, "captions": [], "label": -1, "key": where, "error": entry})
      else:
        entries.append(entry)
    if entries and all(e["error"] == "bad_manifest_line" for e in entries):
      raise ValueError(f"{self.manifest}: no line is a JSON object with field {image_field!r}")
    super().__init__(entries, max_file_bytes)

  @staticmethod
  def _parse_line(line: str, image_field: str, base: Path) -> dict[str, Any] | str:
    try:
      item = json.loads(line)
    except json.JSONDecodeError:
      return "bad_manifest_line"
    if not isinstance(item, dict) or not isinstance(item.get(image_field), str):
      return "bad_manifest_line"
    captions = item.get("captions", [item["caption"]] if "caption" in item else [])
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
      return "bad_manifest_line"
    label = _parse_label(item.get("label"))
    return {"path": _resolve(item[image_field], base), "captions": captions,
            "label": -1 if label is None else label,
            "key": str(item.get("key") or key_from_path(item[image_field])),
            "error": None if label is not None else "bad_label"}


# ------------------------------------------------------------------------------------------------
# webdataset tar shards
# ------------------------------------------------------------------------------------------------

_BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_BRACE_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
  """'shard-{000..009}.tar' and '{a,b}' expansion (zero padding kept), as webdataset writes it."""
  matches = [m for m in (_BRACE_RANGE.search(pattern), _BRACE_LIST.search(pattern)) if m]
  if not matches:
    return [pattern]
  match = min(matches, key=lambda m: m.start())  # left to right, as a shell expands
  if match.re is _BRACE_RANGE:
    first, last = match.group(1), match.group(2)
    width = len(first) if first.startswith("0") else 0
    options = [str(i).zfill(width) for i in range(int(first), int(last) + 1)]
  else:
    options = match.group(1).split(",")
  head, tail = pattern[:match.start()], pattern[match.end():]
  return list(itertools.chain.from_iterable(expand_braces(head + o + tail) for o in options))


def _split_member_name(name: str) -> tuple[str, str]:
  directory, _, base = name.rpartition("/")
  stem, _, extension = base.partition(".")
  return (f"{directory}/{stem}" if directory else stem), extension.lower()


class TarShardSource:
  """webdataset shards: consecutive members `key.jpg` (or png/webp...), `key.txt`, optional
  `key.json` ({"captions": [...]}) and `key.cls`. Shards are indexed once (member offsets), members
  are read with seek + read. A shard cut short yields its complete samples plus one
  'truncated_shard' record for what was lost."""

  def __init__(self, shards: Sequence[str | Path]):
    self.shards = [str(s) for s in shards]
    if not self.shards:
      raise ValueError("no tar shards given")
    entries: list[dict[str, Any]] = []
    for shard_id, shard in enumerate(self.shards):
      entries.extend(self._index_shard(shard_id, shard))
    _mark_duplicate_keys(entries)
    self._entries = entries

  @staticmethod
  def _index_shard(shard_id: int, shard: str) -> list[dict[str, Any]]:
    try:
      size = os.path.getsize(shard)
      archive = tarfile.open(shard, mode="r:")
    except (OSError, tarfile.TarError) as error:
      raise ValueError(f"cannot open tar shard {shard}: {error}") from None
    groups: list[dict[str, Any]] = []
    truncated = False
    with archive:
      while True:
        try:
          member = archive.next()
        except (tarfile.TarError, EOFError, OSError):
          truncated = True
          break
        if member is None:
          break
        if not member.isfile():
          continue  # directory entries carry no sample
        key, extension = _split_member_name(member.name)
        if member.offset_data + member.size > size:
          truncated = True
          break
        if not groups or groups[-1]["key"] != key:
          groups.append({"key": key, "members": {}, "shard": shard_id, "error": None,
                         "path": f"{shard}:{key}"})
        groups[-1]["members"][extension] = (member.offset_data, member.size)
      end_offset = archive.offset
    if not truncated:
      # A complete archive ends with two zero blocks; a cut on a header boundary looks otherwise fine.
      with open(shard, "rb") as handle:
        handle.seek(end_offset)
        trailer = handle.read(1024)
      truncated = len(trailer) < 1024 or any(trailer)
    if truncated:
      groups.append({"key": f"{shard}#truncated", "members": {}, "shard": shard_id,
                     "error": "truncated_shard", "path": shard})
    return groups

  def __len__(self) -> int:
    return len(self._entries)

  def _read_member(self, entry: dict[str, Any], extension: str) -> bytes:
    offset, size = entry["members"][extension]
    with open(self.shards[entry["shard"]], "rb") as handle:
      handle.seek(offset)
      return handle.read(size)

  def __getitem__(self, index: int) -> Record:
    entry = self._entries[index]
    members = entry["members"]
    error = entry["error"]
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if error is None and image_ext is None:
      error = "missing_image"
    captions: list[str] = []
    label = -1
    if error is None:
      if "json" in members:
        try:
          meta = json.loads(_decode_text(self._read_member(entry, "json")))
          captions = list(meta.get("captions", []))
        except (json.JSONDecodeError, AttributeError, TypeError):
          error = "bad_manifest_line"
      if not captions and "txt" in members:
        captions = [_decode_text(self._read_member(entry, "txt")).strip()]
      if "cls" in members:
        parsed = _parse_label(_decode_text(self._read_member(entry, "cls")).strip())
        label, error = (label, error or "bad_label") if parsed is None else (parsed, error)
    image_bytes = self._read_member(entry, image_ext) if error is None else None
    return make_record(image_bytes=image_bytes, path=entry["path"], captions=captions, label=label,
                       key=entry["key"], error=error)


# ------------------------------------------------------------------------------------------------
# ArrayRecord
# ------------------------------------------------------------------------------------------------

_RECORD_MAGIC = b"AGR1"


def serialize_record(record: Mapping[str, Any]) -> bytes:
  """magic | uint32 header length | JSON header | image bytes. No pickle: safe to read from anyone."""
  header = {"path": record["path"], "captions": list(record["captions"]), "label": int(record["label"]),
            "key": record["key"], "error": record.get("error"),
            "has_image": record["image_bytes"] is not None}
  # ensure_ascii escapes lone surrogates, so non-UTF-8 captions round-trip unchanged.
  header_bytes = json.dumps(header, ensure_ascii=True).encode("ascii")
  return _RECORD_MAGIC + struct.pack("<I", len(header_bytes)) + header_bytes + (record["image_bytes"] or b"")


def deserialize_record(data: bytes, where: str) -> Record:
  if data[:4] != _RECORD_MAGIC or len(data) < 8:
    return make_record(image_bytes=None, path=where, captions=[], key=where, error="bad_serialized_record")
  (length,) = struct.unpack("<I", data[4:8])
  try:
    header = json.loads(data[8:8 + length].decode("ascii"))
  except (UnicodeDecodeError, json.JSONDecodeError):
    return make_record(image_bytes=None, path=where, captions=[], key=where, error="bad_serialized_record")
  image_bytes = data[8 + length:] if header["has_image"] else None
  return make_record(image_bytes=image_bytes, path=header["path"], captions=header["captions"],
                     label=header["label"], key=header["key"], error=header["error"])


class ArrayRecordSource:
  """ArrayRecord files written by `input_pipeline.writers.write_array_record`."""

  def __init__(self, paths: Sequence[str | Path]):
    import grain  # heavy import only when this format is used
    self.paths = [str(p) for p in paths]
    for path in self.paths:
      if not os.path.isfile(path):
        raise ValueError(f"ArrayRecord file {path} does not exist")
    self._source = grain.sources.ArrayRecordDataSource(self.paths)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Record:
    return deserialize_record(self._source[index], f"{self.paths[0]}[{index}]")

  def __getstate__(self):
    return {"paths": self.paths}

  def __setstate__(self, state):
    self.__init__(state["paths"])


# ------------------------------------------------------------------------------------------------
# TFDS (through tfds.data_source: no TensorFlow needed)
# ------------------------------------------------------------------------------------------------

def _text(value: Any) -> str:
  return _decode_text(value) if isinstance(value, bytes) else str(value)


def _encode_png(pixels: np.ndarray) -> bytes:
  """Lossless re-encoding, so decoded TFDS images take the same checked decode path as files."""
  from PIL import Image
  buffer = io.BytesIO()
  Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buffer, format="PNG")
  return buffer.getvalue()


class TfdsSource:
  """A prepared TFDS dataset in ArrayRecord format, e.g. one made by `input_pipeline.tfds_builder`.

  Datasets of that builder map one to one; other image datasets work when they have an encoded
  image feature named by `image_feature` and a label; their captions then come from
  `captions_for_label`.
  """

  def __init__(self, name: str, split: str = "train", data_dir: str | Path | None = None,
               image_feature: str = "image_bytes",
               captions_for_label: Callable[[int], Sequence[str]] | None = None):
    import tensorflow_datasets as tfds
    self.name, self.split, self.data_dir = name, split, None if data_dir is None else str(data_dir)
    self.image_feature = image_feature
    self.captions_for_label = captions_for_label
    try:
      self._source = tfds.data_source(name, split=split, data_dir=self.data_dir)
    except Exception as error:  # tfds raises many types (DatasetNotFoundError, ValueError, ...)
      raise ValueError(f"cannot open TFDS dataset {name!r} split {split!r} in {self.data_dir}: {error}") from None

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Record:
    item = self._source[index]
    where = f"tfds:{self.name}:{self.split}[{index}]"
    label = int(item.get("label", -1))
    if "captions" in item:
      captions = [_text(c) for c in item["captions"]]
    elif self.captions_for_label is not None and label >= 0:
      captions = list(self.captions_for_label(label))
    else:
      captions = []
    has_image = bool(item.get("has_image", True))
    image = item.get(self.image_feature)
    error = _text(item.get("error", b"")) or None
    if isinstance(image, np.ndarray) and image.ndim == 3:
      image = _encode_png(image)  # standard TFDS image features arrive decoded
    return make_record(image_bytes=bytes(image) if has_image and image is not None else None,
                       path=_text(item.get("path", where)), captions=captions, label=label,
                       key=_text(item.get("key", where)), error=error)

  def __getstate__(self):
    return {k: getattr(self, k) for k in ("name", "split", "data_dir", "image_feature", "captions_for_label")}

  def __setstate__(self, state):
    self.__init__(**state)


# ------------------------------------------------------------------------------------------------
# open_source: pick the source type from the spec
# ------------------------------------------------------------------------------------------------

_CSV_OPTIONS = ("image_column", "caption_column", "label_column", "key_column", "separator", "root",
                "max_file_bytes")
_JSONL_OPTIONS = ("image_field", "root", "max_file_bytes")
_FOLDER_OPTIONS = ("captions_for_class", "max_file_bytes")
_TFDS_OPTIONS = ("data_dir", "image_feature", "captions_for_label")


def _pick(options: Mapping[str, Any], allowed: Iterable[str], kind: str, spec: Any) -> dict[str, Any]:
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise ValueError(f"option(s) {unknown} do not apply to {kind} source {spec}; allowed: {sorted(allowed)}")
  return dict(options)


def _is_array_record(path: Path) -> bool:
  return ".array_record" in path.name


def open_source(spec: str | Path, **options: Any):
  """Open a source from its spec:

  - `tfds:NAME[:SPLIT]` (option data_dir);
  - a directory of class folders (ImageFolder), of `.tar` shards, or of `.array_record` files;
  - `x.csv` / `x.tsv`, `x.jsonl`, `x.tar`, `x.array_record`, or a brace pattern `shard-{000..009}.tar`.

  Any of these but TFDS may be a URL (gs://...): the file, or the folder and all below it, is read
  through a local copy made at open (`fileio.local_input`). ArrayRecord files, tar shards and
  folders hold their images; a CSV / JSONL manifest copied alone must list absolute local paths.
  """
  from agriclip_jax.fileio import local_input
  text = str(spec)
  if text.startswith("tfds:"):
    parts = text[len("tfds:"):].split(":")
    if not parts[0] or len(parts) > 2:
      raise ValueError(f"bad TFDS spec {text!r}; expected tfds:NAME[:SPLIT]")
    split = parts[1] if len(parts) == 2 else "train"
    return TfdsSource(parts[0], split, **_pick(options, _TFDS_OPTIONS, "TFDS", text))
  if "{" in text:
    paths = [local_input(p) for p in expand_braces(text)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
      raise ValueError(f"{text}: {len(missing)} shard(s) do not exist, e.g. {missing[0]}")
    if all(_is_array_record(p) for p in paths):
      return ArrayRecordSource(paths, **_pick(options, (), "ArrayRecord", text))
    return TarShardSource(paths, **_pick(options, (), "tar", text))
  path = local_input(text)
  if path.is_dir():
    children = sorted(path.iterdir())
    tars = [c for c in children if c.is_file() and c.suffix == ".tar"]
    records = [c for c in children if c.is_file() and _is_array_record(c)]
    if tars and not records:
      return TarShardSource(tars, **_pick(options, (), "tar", text))
    if records and not tars:
      return ArrayRecordSource(records, **_pick(options, (), "ArrayRecord", text))
    return ImageFolderSource(path, **_pick(options, _FOLDER_OPTIONS, "ImageFolder", text))
  if not path.exists():
    raise ValueError(f"data source {text} does not exist")
  suffix = path.suffix.lower()
  if suffix in (".csv", ".tsv"):
    return CsvSource(path, **_pick(options, _CSV_OPTIONS, "CSV", text))
  if suffix == ".jsonl":
    return JsonlSource(path, **_pick(options, _JSONL_OPTIONS, "JSONL", text))
  if suffix == ".tar":
    return TarShardSource([path], **_pick(options, (), "tar", text))
  if _is_array_record(path):
    return ArrayRecordSource([path], **_pick(options, (), "ArrayRecord", text))
  raise ValueError(f"cannot tell the format of data source {text}: expected a directory, .csv, .tsv, "
                   ".jsonl, .tar, .array_record, a brace pattern or tfds:NAME[:SPLIT]")
