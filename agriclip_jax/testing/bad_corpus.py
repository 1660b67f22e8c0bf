"""A generated corpus of bad and odd inputs, in every source format, with the expected outcome of
each record -- for the reliability tests and `agriclip data inspect` demonstrations.

`make_bad_corpus(root, good_images)` writes:
  root/folder/            ImageFolder: class `good` (real photos) and class `odd` (one file per kind)
  root/manifest.jsonl     every file kind + caption kinds (non-UTF-8, empty, 10,000 chars) +
                          a missing path, a duplicated key, a line that is not JSON, a bad label
  root/manifest_tab.csv   the same as a tab-separated CSV (the "other separator")
  root/missing_column.csv a CSV without the caption column
  root/shards/            tar shards of every byte-level kind, plus one shard cut short
and returns, per format, the expected number of good records and of skipped records by reason.
ArrayRecord and TFDS copies are made from the JSONL source by the writers (tests do that), so they
expect exactly what the JSONL source expects.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

GOOD = None  # expected reason of a good record


def _jpeg(image: Image.Image, **options) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, "JPEG", quality=90, **options)
  return buffer.getvalue()


def _png(image: Image.Image, **options) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, "PNG", **options)
  return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
  return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_claiming(width: int, height: int) -> bytes:
  """A tiny PNG whose header claims width x height pixels (a decompression-bomb header)."""
  header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  pixels = zlib.compress(b"\x00" * 16)
  return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", pixels) + _png_chunk(b"IEND", b"")


def exif_rotated_jpeg(base: Image.Image) -> bytes:
  """A landscape JPEG whose EXIF says 'rotate 90 degrees' (orientation 6): decoded upright portrait."""
  exif = Image.Exif()
  exif[0x0112] = 6
  return _jpeg(base.resize((80, 48)), exif=exif.tobytes())


def _sixteen_bit_png() -> bytes:
  ramp = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
  return _png(Image.fromarray(ramp))  # uint16 -> mode I;16


def _palette_png_with_transparency(base: Image.Image) -> bytes:
  palette = base.convert("P", palette=Image.ADAPTIVE, colors=16)
  return _png(palette, transparency=0)


def _webp(base: Image.Image) -> bytes:
  buffer = io.BytesIO()
  base.save(buffer, "WEBP", quality=80)
  return buffer.getvalue()


def _tiff(base: Image.Image) -> bytes:
  buffer = io.BytesIO()
  base.save(buffer, "TIFF")
  return buffer.getvalue()


def _gif(base: Image.Image) -> bytes:
  buffer = io.BytesIO()
  base.save(buffer, "GIF")
  return buffer.getvalue()


@dataclasses.dataclass(frozen=True)
class ByteCase:
  """A file whose bytes are the case: it can live in a folder, a manifest and a tar shard."""
  name: str
  filename: str
  make: Callable[[Image.Image], bytes]
  expected: str | None


def byte_cases() -> list[ByteCase]:
  return [
      ByteCase("truncated_jpeg", "truncated.jpg", lambda b: _jpeg(b)[: len(_jpeg(b)) // 2], "truncated_image"),
      ByteCase("jpeg_header_only", "header_only.jpg", lambda b: _jpeg(b)[:200], "corrupt_image"),
      ByteCase("zero_bytes", "zero.jpg", lambda b: b"", "empty_file"),
      ByteCase("text_named_jpg", "notes.jpg", lambda b: b"this is a text file, not a picture\n", "not_an_image"),
      ByteCase("html_error_page", "error_page.jpg", lambda b: b"<html><body>404 Not Found</body></html>", "not_an_image"),
      ByteCase("random_bytes_png", "noise.png", lambda b: bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "not_an_image"),
      ByteCase("one_pixel", "one_pixel.png", lambda b: _png(Image.new("RGB", (1, 1), (9, 9, 9))), "image_too_small"),
      ByteCase("bomb_header_40000", "bomb.png", lambda b: png_header_claiming(40000, 40000), "too_many_pixels"),
      ByteCase("cmyk_jpeg", "cmyk.jpg", lambda b: _jpeg(b.convert("CMYK")), GOOD),
      ByteCase("sixteen_bit_png", "sixteen_bit.png", lambda b: _sixteen_bit_png(), GOOD),
      ByteCase("palette_png_transparency", "palette_alpha.png", _palette_png_with_transparency, GOOD),
      ByteCase("rgba_png", "rgba.png", lambda b: _png(b.convert("RGBA")), GOOD),
      ByteCase("grayscale_jpeg", "gray.jpg", lambda b: _jpeg(b.convert("L")), GOOD),
      ByteCase("la_png", "gray_alpha.png", lambda b: _png(b.convert("LA")), GOOD),
      ByteCase("exif_rotated", "rotated.jpg", exif_rotated_jpeg, GOOD),
      ByteCase("webp_named_jpg", "webp_inside.jpg", _webp, GOOD),
      ByteCase("png_named_jpg", "png_inside.jpg", lambda b: _png(b), GOOD),
      ByteCase("tiff_named_jpg", "tiff_inside.jpg", _tiff, GOOD),
      ByteCase("gif_named_jpg", "gif_inside.jpg", _gif, GOOD),
      ByteCase("progressive_jpeg", "progressive.jpg", lambda b: _jpeg(b, progressive=True), GOOD),
  ]


# Cases that only exist in a file system: (name, filename, expected)
FILESYSTEM_CASES = [
    ("dangling_symlink", "dangling.jpg", "missing_file"),
    ("directory_named_jpg", "folder.jpg", "unreadable"),
    ("fifo_named_jpg", "pipe.jpg", "unreadable"),  # opening it would block forever: never opened
]

NON_UTF8_CAPTION = b"a photo of a leaf \xff\xfe with \xc3 spots"
LONG_CAPTION = "a photo of a leaf " + "with spots " * 908  # 10,000+ characters


def _make_filesystem_case(name: str, path: Path) -> None:
  if name == "dangling_symlink":
    os.symlink(path.parent / "does_not_exist.jpg", path)
  elif name == "directory_named_jpg":
    path.mkdir()
  elif name == "fifo_named_jpg":
    os.mkfifo(path)
  else:
    raise ValueError(name)


@dataclasses.dataclass
class CorpusExpectation:
  read: int
  skipped: dict[str, int]

  def as_summary(self) -> dict[str, object]:
    return {"read": self.read, "skipped": dict(sorted(self.skipped.items()))}


def _expect(outcomes: Sequence[str | None]) -> CorpusExpectation:
  counts = collections.Counter(o for o in outcomes if o is not None)
  return CorpusExpectation(sum(o is None for o in outcomes), dict(counts))


def _add_tar_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  archive.addfile(info, io.BytesIO(data))


def make_bad_corpus(root: str | Path, good_images: Sequence[str | Path], size: int = 64) -> dict[str, CorpusExpectation]:
  """Write the corpus under root; returns the expectation per format: folder, jsonl, csv, tar."""
  root = Path(root)
  bases = []
  for path in good_images:
    with Image.open(path) as image:
      bases.append(image.convert("RGB").resize((size, size), Image.BICUBIC))
  if len(bases) < 2:
    raise ValueError("make_bad_corpus needs at least 2 good images")
  base = bases[0]
  folder = root / "folder"
  (folder / "good").mkdir(parents=True)
  (folder / "odd").mkdir()
  good_files = []
  for index, image in enumerate(bases):
    target = folder / "good" / f"good_{index:03d}.jpg"
    target.write_bytes(_jpeg(image))
    good_files.append(target)
  folder_outcomes: list[str | None] = [GOOD] * len(bases)
  manifest_rows: list[dict] = []  # image (relative to root), caption bytes, key, label, expected
  for file in good_files:
    manifest_rows.append({"image": os.path.relpath(file, root), "caption": b"a photo of a corn leaf",
                          "key": f"good/{file.stem}", "label": 0, "expected": GOOD})
  for case in byte_cases():
    target = folder / "odd" / case.filename
    target.write_bytes(case.make(base))
    folder_outcomes.append(case.expected)
    manifest_rows.append({"image": os.path.relpath(target, root), "caption": b"a photo of a corn leaf",
                          "key": f"odd/{case.name}", "label": 1, "expected": case.expected})
  for name, filename, expected in FILESYSTEM_CASES:
    target = folder / "odd" / filename
    _make_filesystem_case(name, target)
    folder_outcomes.append(expected)
    manifest_rows.append({"image": os.path.relpath(target, root), "caption": b"a photo of a corn leaf",
                          "key": f"odd/{name}", "label": 1, "expected": expected})
  good_relative = os.path.relpath(good_files[0], root)
  manifest_rows += [
      {"image": good_relative, "caption": NON_UTF8_CAPTION, "key": "cap/non_utf8", "label": 0,
       "expected": "caption_not_utf8"},
      {"image": good_relative, "caption": b"", "key": "cap/empty", "label": 0, "expected": "empty_caption"},
      {"image": good_relative, "caption": b"   ", "key": "cap/blank", "label": 0, "expected": "empty_caption"},
      {"image": good_relative, "caption": LONG_CAPTION.encode(), "key": "cap/long", "label": 0,
       "expected": "caption_too_long"},
      {"image": "nowhere/missing.jpg", "caption": b"a photo of a corn leaf", "key": "missing/path",
       "label": 0, "expected": "missing_file"},
      {"image": good_relative, "caption": b"a photo of a corn leaf", "key": "good/good_000", "label": 0,
       "expected": "duplicate_key"},
  ]
  expectations = {"folder": _expect(folder_outcomes)}
  expectations.update(_write_manifests(root, manifest_rows))
  expectations["tar"] = _write_shards(root / "shards", bases, base)
  return expectations


def _write_manifests(root: Path, rows: list[dict]) -> dict[str, CorpusExpectation]:
  # JSONL is written as bytes so a non-UTF-8 caption stays non-UTF-8, as a scraped manifest would.
  lines = []
  for row in rows:
    head = json.dumps({"image": row["image"], "key": row["key"], "label": row["label"]})[:-1]
    lines.append(head.encode() + b', "caption": "' + row["caption"].replace(b'"', b'\\"') + b'"}')
  lines.append(b"{this line is not json")
  lines.append(json.dumps({"image": os.path.relpath(rows[0]["image"], "."), "caption": "a leaf",
                           "key": "bad/label", "label": "seven"}).encode())
  (root / "manifest.jsonl").write_bytes(b"\n".join(lines) + b"\n")
  jsonl_outcomes = [r["expected"] for r in rows] + ["bad_manifest_line", "bad_label"]
  # The CSV uses tabs, the separator open_clip defaults to and users mix up with commas.
  csv_lines = [b"filepath\ttitle\tlabel\tkey"]
  for row in rows:
    csv_lines.append(b"\t".join([row["image"].encode(), row["caption"], str(row["label"]).encode(),
                                 row["key"].encode()]))
  (root / "manifest_tab.csv").write_bytes(b"\n".join(csv_lines) + b"\n")
  (root / "missing_column.csv").write_bytes(b"filepath,caption\n" + rows[0]["image"].encode() + b",a leaf\n")
  return {"jsonl": _expect(jsonl_outcomes), "csv": _expect([r["expected"] for r in rows])}


def _write_shards(directory: Path, bases: Sequence[Image.Image], base: Image.Image) -> CorpusExpectation:
  directory.mkdir(parents=True)
  outcomes: list[str | None] = []
  with tarfile.open(directory / "shard-000000.tar", "w", format=tarfile.PAX_FORMAT) as archive:
    for index, image in enumerate(bases):
      _add_tar_member(archive, f"good_{index:03d}.jpg", _jpeg(image))
      _add_tar_member(archive, f"good_{index:03d}.txt", b"a photo of a corn leaf")
      outcomes.append(GOOD)
    for case in byte_cases():
      extension = case.filename.rsplit(".", 1)[1]
      _add_tar_member(archive, f"{case.name}.{extension}", case.make(base))
      _add_tar_member(archive, f"{case.name}.txt", b"a photo of a corn leaf")
      outcomes.append(case.expected)
    for key, caption, expected in [("cap_non_utf8", NON_UTF8_CAPTION, "caption_not_utf8"),
                                   ("cap_empty", b"", "empty_caption"),
                                   ("cap_long", LONG_CAPTION.encode(), "caption_too_long")]:
      _add_tar_member(archive, f"{key}.jpg", _jpeg(base))
      _add_tar_member(archive, f"{key}.txt", caption)
      outcomes.append(expected)
    _add_tar_member(archive, "caption_only.txt", b"a caption without its image")
    outcomes.append("missing_image")
    # The same key again, after other samples: a duplicate, not a continuation of the first one.
    _add_tar_member(archive, "good_000.jpg", _jpeg(base))
    _add_tar_member(archive, "good_000.txt", b"a photo of a corn leaf")
    outcomes.append("duplicate_key")
  # A second shard cut in the middle of its third image: two complete samples survive.
  full = io.BytesIO()
  with tarfile.open(fileobj=full, mode="w", format=tarfile.PAX_FORMAT) as archive:
    for index in range(3):
      _add_tar_member(archive, f"cut_{index}.jpg", _jpeg(bases[index % len(bases)]))
      _add_tar_member(archive, f"cut_{index}.txt", b"a photo of a corn leaf")
  data = full.getvalue()
  with tarfile.open(fileobj=io.BytesIO(data)) as archive:
    third = [m for m in archive.getmembers() if m.name == "cut_2.jpg"][0]
  (directory / "shard-000001.tar").write_bytes(data[: third.offset_data + third.size // 2])
  outcomes += [GOOD, GOOD, "truncated_shard"]
  return _expect(outcomes)
