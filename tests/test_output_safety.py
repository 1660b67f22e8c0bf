"""Outputs never destroy what they did not write, through the commands a user types: `convert`
into a folder that holds other files (the source among them), onto a regular file, over a previous
output of the same kind, with --overwrite; and output locations checked before any work."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from agriclip_jax import align, cli, fileio


def _snapshot(folder: Path) -> dict[str, str]:
  """Every file under `folder` (hidden ones too) by relative path -> sha256."""
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def aligner_file(tmp_path) -> Path:
  rng = np.random.default_rng(0)
  aligner = align.LinearAligner(rng.normal(size=(4, 6)).astype(np.float32),
                                rng.normal(size=(4,)).astype(np.float32))
  return align.save_aligner(aligner, tmp_path / "work" / "aligner.safetensors")


def _convert(src: Path, dst: Path, *extra: str) -> int:
  return cli.main(["convert", "--src", str(src), "--src-format", "agriclip-aligner",
                   "--dst", str(dst), "--dst-format", "flax", *extra])


def test_convert_into_the_folder_of_its_source_is_refused_and_nothing_is_lost(
    aligner_file, tmp_path, capsys):
  folder = aligner_file.parent
  (folder / "notes.txt").write_text("field trial 3")
  before = _snapshot(tmp_path)
  assert _convert(aligner_file, folder) == 2
  message = capsys.readouterr().err.strip()
  assert message.startswith(f"agriclip convert: error: {folder}: exists, is not empty and holds "
                            f"no config.json") and "aligner.safetensors" in message
  assert len(message.splitlines()) == 1
  assert _snapshot(tmp_path) == before  # byte-identical, and no temporaries


def test_convert_onto_a_regular_file_is_refused(aligner_file, tmp_path, capsys):
  target = tmp_path / "model"
  target.write_text("not a directory")
  before = _snapshot(tmp_path)
  assert _convert(aligner_file, target) == 2
  assert f"{target}: exists and is a file" in capsys.readouterr().err
  assert _snapshot(tmp_path) == before


def test_a_previous_output_of_the_same_kind_is_replaced(aligner_file, tmp_path):
  target = tmp_path / "model"
  assert _convert(aligner_file, target) == 0
  first = _snapshot(target)
  assert _convert(aligner_file, target) == 0
  assert _snapshot(target) == first and sorted(os.listdir(tmp_path)) == ["model", "work"]


def test_a_model_directory_with_a_file_of_the_user_is_refused_after_the_work_too(
    aligner_file, tmp_path, capsys):
  # It holds config.json, so it passes the early check; the swap itself still refuses to drop
  # the user's file.
  target = tmp_path / "model"
  assert _convert(aligner_file, target) == 0
  (target / "my_eval.csv").write_text("a,b\n")
  before = _snapshot(tmp_path)
  assert _convert(aligner_file, target) == 2
  assert "holds files this output does not write (my_eval.csv)" in capsys.readouterr().err
  assert _snapshot(tmp_path) == before


def test_overwrite_replaces_only_the_files_it_writes(aligner_file, tmp_path):
  folder = aligner_file.parent
  (folder / "model.safetensors").write_bytes(b"stale weights")
  source_bytes = aligner_file.read_bytes()
  assert _convert(aligner_file, folder, "--overwrite") == 0
  assert sorted(os.listdir(folder)) == ["aligner.safetensors", "config.json", "model.safetensors"]
  assert aligner_file.read_bytes() == source_bytes
  assert (folder / "model.safetensors").read_bytes() != b"stale weights"
  assert sorted(os.listdir(tmp_path)) == ["work"]  # no temporaries beside it


def test_the_source_itself_as_destination_is_refused(aligner_file, tmp_path, capsys):
  before = _snapshot(tmp_path)
  code = cli.main(["convert", "--src", str(aligner_file), "--src-format", "agriclip-aligner",
                   "--dst", str(aligner_file), "--dst-format", "agriclip-aligner"])
  assert code == 2 and "is the source itself" in capsys.readouterr().err
  assert _snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------------------
# Read-only and full filesystems, for real: small tmpfs mounts (the suite runs as root in CI)
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def small_mount(tmp_path):
  """A 1 MiB tmpfs at tmp_path/mnt; yields (path, remount) where remount('ro') makes it read-only."""
  if os.geteuid() != 0:
    pytest.skip("mounting a tmpfs needs root (CI runs as root)")
  mount = tmp_path / "mnt"
  mount.mkdir()
  subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)

  def remount(mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mount)], check=True)

  try:
    yield mount, remount
  finally:
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_check_writable_names_a_read_only_folder(small_mount):
  mount, remount = small_mount
  remount("ro")
  with pytest.raises(OSError) as error:
    fileio.check_writable(mount / "results.json")
  assert error.value.filename == str(mount) and "Read-only file system" in str(error.value)
  assert cli.describe_error(error.value).startswith(f"{mount}: Read-only file system")


def test_check_writable_knows_when_the_output_cannot_fit(small_mount):
  mount, _ = small_mount
  fileio.check_writable(mount / "small.bin", needed_bytes=100_000)
  with pytest.raises(OSError, match=r"8.0 MiB needed, 1.0 MiB free") as error:
    fileio.check_writable(mount / "big.bin", needed_bytes=8 * 2**20)
  assert error.value.filename == str(mount / "big.bin")
  assert os.listdir(mount) == []


def test_a_write_that_fills_the_disk_leaves_nothing_behind(small_mount):
  mount, _ = small_mount
  (mount / "results.json").write_text('{"previous": true}\n')
  with pytest.raises(OSError) as error:
    fileio.atomic_file(mount / "results.json",
                       lambda tmp: tmp.write_bytes(b"x" * (4 * 2**20)))
  assert error.value.errno == 28
  assert os.listdir(mount) == ["results.json"]
  assert (mount / "results.json").read_text() == '{"previous": true}\n'


def test_sigterm_during_a_write_leaves_no_temporary(tmp_path):
  # The command's SIGTERM handler turns the signal into SystemExit, so an interrupted atomic write
  # removes its hidden temporary (before, `.NAME.tmp-*` stayed behind after `kill`).
  import signal
  import sys
  script = ("import sys, time\n"
            "from pathlib import Path\n"
            "from agriclip_jax import cli, fileio\n"
            "cli.exit_on_sigterm()\n"
            "def write(tmp):\n"
            "  tmp.write_bytes(b'partial')\n"
            "  print('writing', flush=True)\n"
            "  time.sleep(120)\n"
            f"fileio.atomic_file(Path({str(tmp_path / 'embeddings.npz')!r}), write)\n")
  process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
  assert process.stdout.readline().strip() == "writing"
  assert len(os.listdir(tmp_path)) == 1 and os.listdir(tmp_path)[0].startswith(".embeddings.npz.tmp-")
  process.send_signal(signal.SIGTERM)
  assert process.wait(timeout=60) == 128 + signal.SIGTERM
  assert os.listdir(tmp_path) == []


def test_torch_save_on_a_full_disk_is_one_line_naming_the_file(small_mount):
  # torch's own message is "unexpected pos 64 vs 0"; the project's says what happened and where.
  import torch
  mount, _ = small_mount
  with pytest.raises(OSError) as error:
    fileio.atomic_torch_save(mount / "dino_rn50.pth", {"w": torch.zeros(600_000)})  # 2.4 MB
  assert error.value.errno == 28 and error.value.filename == str(mount / "dino_rn50.pth")
  assert cli.describe_error(error.value) == f"{mount / 'dino_rn50.pth'}: No space left on device"
  assert os.listdir(mount) == []


def test_garbage_bytes_named_as_a_pth_are_not_called_pickled_objects(tmp_path, capsys):
  src = tmp_path / "dino_pretrain.pth"
  src.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
                  .replace(b"\x80", b"\x81").replace(b"PK", b"QK"))
  code = cli.main(["convert", "--src", str(src), "--src-format", "dino-rn50",
                   "--dst", str(tmp_path / "out"), "--dst-format", "flax"])
  message = capsys.readouterr().err.strip()
  assert code == 2 and message.startswith(f"agriclip convert: error: {src}: not a PyTorch file")
  assert "pickled" not in message and sorted(os.listdir(tmp_path)) == ["dino_pretrain.pth"]
