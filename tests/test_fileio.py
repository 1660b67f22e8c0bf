"""fileio: atomic writes keep the previous version on failure and leave no temporaries; JSON
round-trips; read_json errors name the file; the module imports without jax or numpy."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from agriclip_jax import fileio

REPO_ROOT = Path(__file__).resolve().parents[1]


class WriteFailed(RuntimeError):
  pass


def _names(folder: Path) -> list[str]:
  return sorted(p.name for p in folder.iterdir())


def _failing_write(tmp: Path) -> None:
  tmp.write_text("half written")
  raise WriteFailed("disk full")


def test_atomic_file_failure_keeps_previous_file_and_leaves_no_temporary(tmp_path):
  target = tmp_path / "out.txt"
  target.write_text("previous")
  with pytest.raises(WriteFailed):
    fileio.atomic_file(target, _failing_write)
  assert target.read_text() == "previous"
  assert _names(tmp_path) == ["out.txt"]


def test_atomic_file_failure_creates_nothing_when_target_absent(tmp_path):
  with pytest.raises(WriteFailed):
    fileio.atomic_file(tmp_path / "sub" / "out.txt", _failing_write)
  assert _names(tmp_path / "sub") == []


def test_atomic_file_replaces_content_with_plain_open_permissions(tmp_path):
  target = tmp_path / "out.bin"
  target.write_bytes(b"old content, longer than the new one")
  fileio.atomic_file(target, lambda tmp: tmp.write_bytes(b"new"))
  assert target.read_bytes() == b"new"
  assert _names(tmp_path) == ["out.bin"]
  # Reference: what a plain open() in the same folder gives under this process's umask.
  plain = tmp_path / "plain"
  plain.write_bytes(b"")
  assert target.stat().st_mode == plain.stat().st_mode


def test_atomic_directory_failure_keeps_previous_directory(tmp_path):
  target = tmp_path / "model"
  target.mkdir()
  (target / "config.json").write_text("{}")

  def write(tmp: Path) -> None:
    (tmp / "config.json").write_text('{"new": true}')
    raise WriteFailed("interrupted")

  with pytest.raises(WriteFailed):
    fileio.atomic_directory(target, write)
  assert _names(tmp_path) == ["model"]
  assert _names(target) == ["config.json"]
  assert (target / "config.json").read_text() == "{}"


def test_atomic_directory_replaces_a_previous_output_of_the_same_files(tmp_path):
  target = tmp_path / "model"
  target.mkdir()
  (target / "weights.bin").write_bytes(b"old")
  fileio.atomic_directory(target, lambda tmp: (tmp / "weights.bin").write_bytes(b"w"))
  assert _names(tmp_path) == ["model"]
  assert _names(target) == ["weights.bin"] and (target / "weights.bin").read_bytes() == b"w"
  plain = tmp_path / "plain"
  plain.mkdir()
  assert target.stat().st_mode == plain.stat().st_mode


def test_atomic_directory_refuses_to_drop_files_it_does_not_write(tmp_path):
  target = tmp_path / "model"
  target.mkdir()
  (target / "notes.txt").write_bytes(b"mine")
  (target / "weights.bin").write_bytes(b"old")
  with pytest.raises(FileExistsError, match=r"model: exists and holds files this output does not "
                                            r"write \(notes.txt\)"):
    fileio.atomic_directory(target, lambda tmp: (tmp / "weights.bin").write_bytes(b"w"))
  assert _names(tmp_path) == ["model"]
  assert {p.name: p.read_bytes() for p in target.iterdir()} == {"notes.txt": b"mine",
                                                                "weights.bin": b"old"}


def test_atomic_directory_keep_others_replaces_only_its_own_files(tmp_path):
  target = tmp_path / "model"
  target.mkdir()
  (target / "notes.txt").write_bytes(b"mine")
  (target / "weights.bin").write_bytes(b"old")
  fileio.atomic_directory(target, lambda tmp: (tmp / "weights.bin").write_bytes(b"w"),
                          keep_others=True)
  assert _names(tmp_path) == ["model"]
  assert {p.name: p.read_bytes() for p in target.iterdir()} == {"notes.txt": b"mine",
                                                                "weights.bin": b"w"}


def test_atomic_directory_keep_others_gives_them_back_when_the_swap_fails(tmp_path, monkeypatch):
  target = tmp_path / "model"
  target.mkdir()
  (target / "notes.txt").write_bytes(b"mine")
  real_replace = os.replace

  def replace(src, dst):
    if Path(dst) == target and ".tmp-" in Path(src).name:  # the swap of the new directory in
      raise OSError(28, "No space left on device")
    real_replace(src, dst)

  monkeypatch.setattr(fileio.os, "replace", replace)
  with pytest.raises(OSError):
    fileio.atomic_directory(target, lambda tmp: (tmp / "weights.bin").write_bytes(b"w"),
                            keep_others=True)
  monkeypatch.undo()
  assert _names(tmp_path) == ["model"]
  assert {p.name: p.read_bytes() for p in target.iterdir()} == {"notes.txt": b"mine"}


def test_existing_file_and_directory_of_the_wrong_kind_are_refused(tmp_path):
  a_file = tmp_path / "out"
  a_file.write_bytes(b"keep")
  with pytest.raises(FileExistsError, match="out: exists and is a file"):
    fileio.atomic_directory(a_file, lambda tmp: (tmp / "x").write_bytes(b"x"))
  a_dir = tmp_path / "dir.json"
  a_dir.mkdir()
  with pytest.raises(IsADirectoryError, match="dir.json: exists and is a directory"):
    fileio.atomic_write_json(a_dir, {"a": 1})
  assert a_file.read_bytes() == b"keep" and a_dir.is_dir()
  assert _names(tmp_path) == ["dir.json", "out"]


def test_atomic_write_json_round_trips(tmp_path):
  obj = {"name": "maïs — feuille", "values": [1, 2.5, None, True], "nested": {"k": []}}
  path = fileio.atomic_write_json(tmp_path / "a.json", obj)
  text = path.read_text(encoding="utf-8")
  assert json.loads(text) == obj
  assert text == json.dumps(obj, indent=1) + "\n"
  assert fileio.read_json(path, "test object") == obj


def test_atomic_write_json_unserialisable_keeps_previous(tmp_path):
  target = tmp_path / "a.json"
  target.write_text('{"kept": 1}')
  with pytest.raises(TypeError):
    fileio.atomic_write_json(target, {"bad": object()})
  assert json.loads(target.read_text()) == {"kept": 1}
  assert _names(tmp_path) == ["a.json"]


def test_atomic_write_jsonl_streams_and_keeps_previous_on_failure(tmp_path):
  target = tmp_path / "m.jsonl"
  records = [{"image": "a/ü.png", "captions": ["ça"]}, {"image": "b.png", "captions": []}]
  fileio.atomic_write_jsonl(target, iter(records))
  assert [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()] == records
  assert "ü" in target.read_text(encoding="utf-8")  # non-ASCII kept as is, not \\u-escaped

  def broken():
    yield {"image": "c.png"}
    raise WriteFailed("source died")

  before = target.read_bytes()
  with pytest.raises(WriteFailed):
    fileio.atomic_write_jsonl(target, broken())
  assert target.read_bytes() == before
  assert _names(tmp_path) == ["m.jsonl"]


def test_read_json_missing_file_names_path_and_what(tmp_path):
  missing = tmp_path / "nowhere" / "config.json"
  with pytest.raises(FileNotFoundError) as info:
    fileio.read_json(missing, "model directory config")
  assert str(missing) in str(info.value)
  assert "model directory config" in str(info.value)


def test_read_json_directory_is_not_a_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="task listing"):
    fileio.read_json(tmp_path, "task listing")


def test_read_json_invalid_names_path_and_position(tmp_path):
  bad = tmp_path / "config.json"
  bad.write_text('{"a": 1,\n "b": }')
  with pytest.raises(ValueError) as info:
    fileio.read_json(bad, "HF CLIPModel config")
  message = str(info.value)
  assert str(bad) in message and "not valid JSON" in message
  assert "line 2" in message  # the parser's own position survives


def test_read_json_not_utf8_names_path(tmp_path):
  bad = tmp_path / "config.json"
  bad.write_bytes(b'{"a": "\xff\xfe"}')
  with pytest.raises(ValueError, match="not UTF-8"):
    fileio.read_json(bad, "config")


def test_model_io_names_are_the_fileio_functions():
  from agriclip_jax import model_io
  assert model_io.atomic_file is fileio.atomic_file
  assert model_io.atomic_directory is fileio.atomic_directory


def test_import_pulls_in_no_heavy_modules():
  code = ("import sys, agriclip_jax.fileio; "
          "print(sorted(m for m in ('jax', 'numpy', 'flax', 'torch') if m in sys.modules))")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                          text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
  assert result.stdout.strip() == "[]"


class _ListSource:
  """A source whose record `fail_at` raises, as a reader hitting a broken disk would."""

  def __init__(self, records, fail_at: int | None = None):
    self._records, self._fail_at = records, fail_at

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int):
    if index == self._fail_at:
      raise WriteFailed(f"record {index} unreadable")
    return self._records[index]


def _record(index: int, error: str | None = None):
  from input_pipeline.sources import make_record
  return make_record(image_bytes=None if error else b"\x89PNG\r\n\x1a\n" + bytes([index]),
                     path=f"/data/{index}.png", captions=[f"caption {index}"], label=index % 2,
                     key=f"k{index:03d}", error=error)


def test_tar_shards_are_whole_or_absent(tmp_path):
  from input_pipeline import writers
  records = [_record(i, error="bad_image" if i == 2 else None) for i in range(8)]
  summary = writers.write_tar_shards(_ListSource(records), tmp_path / "ok", records_per_shard=3)
  assert summary["written"] == 7 and summary["skipped"] == {"bad_image": 1}
  members = [sorted(tarfile.open(p).getnames()) for p in summary["paths"]]
  assert [len(m) for m in members] == [3 * 3, 3 * 3, 1 * 3]  # image, .txt, .cls per record
  assert members[0][:3] == ["k000.cls", "k000.png", "k000.txt"]
  assert _names(tmp_path / "ok") == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]

  # Record 5 fails inside the second shard: the first shard is complete, the second never appears.
  with pytest.raises(WriteFailed):
    writers.write_tar_shards(_ListSource(records, fail_at=5), tmp_path / "broken", records_per_shard=3)
  assert _names(tmp_path / "broken") == ["shard-000000.tar"]
  assert len(tarfile.open(tmp_path / "broken" / "shard-000000.tar").getnames()) == 9
