"""Reliability gaps of issue 9 closed here (docs/reliability.md has the table and the figures):

1. kill -9 at three seeded-random steps of a tiny run, resuming each time: every loss ever logged
   and the final parameters equal an uninterrupted run's, bit for bit.
2. Two processes, one killed: the other stops; restarting both resumes from the last checkpoint and
   the losses equal an uninterrupted run's.
3. A `.pth` holding a pickled callable (os.system) is refused by every reader of .pth files, and
   the callable never runs.
4. A writer that fails midway leaves its destination absent or unchanged and no temporary behind.
5. The text summary of `agriclip data inspect` carries the same counts as its JSON.

Test-file helpers of tests/test_checkpoint_resume.py and tests/test_multihost.py are reused.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import test_checkpoint_resume as resume_helpers
import test_multihost as multihost_helpers

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# 1. kill -9 at three random points
# ----------------------------------------------------------------------------------------------

KILL_TOTAL = 16
KILL_SEED = 20261128
KILL_ARGS = ["--config", str(REPO / "configs/tiny.py:contrastive"),
             f"--config.total_steps={KILL_TOTAL}", "--config.log_every_steps=1",
             "--config.checkpoint_every_steps=2", "--config.keep_checkpoints=3",
             "--config.clip.layers=1", "--config.batch_size=8", "--config.tensorboard=False"]


def _start_logged(workdir: Path, log: Path, args: list[str] = KILL_ARGS) -> subprocess.Popen:
  """A `train` subprocess whose output goes to `log` (so each attempt's progress is its own)."""
  handle = log.open("w")
  return subprocess.Popen([sys.executable, "-m", "agriclip_jax", "train", "--workdir",
                           str(workdir), *args], cwd=REPO, env=resume_helpers._env(),
                          stdout=handle, stderr=subprocess.STDOUT, text=True)


def _printed_steps(log: Path) -> list[int]:
  return [int(m) for m in re.findall(r"^step (\d+)/", log.read_text(), flags=re.M)]


def _wait_printed(process: subprocess.Popen, log: Path, step: int, timeout: float = 300) -> int:
  """Waits until this attempt printed `step` (or a later one); returns the last step it printed."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    printed = _printed_steps(log)
    if printed and printed[-1] >= step:
      return printed[-1]
    if process.poll() is not None:
      pytest.fail(f"the run ended before step {step}:\n{log.read_text()[-3000:]}")
    time.sleep(0.01)
  process.kill()
  pytest.fail(f"step {step} not printed within {timeout}s:\n{log.read_text()[-3000:]}")


def _resumed_step(log: Path) -> int:
  found = re.search(r"resumed from .* at step (\d+)", log.read_text())
  return int(found.group(1)) if found else 0


def test_kill_9_at_three_random_steps_resumes_bit_identically(tmp_path):
  reference_dir = tmp_path / "uninterrupted"
  reference_run = _start_logged(reference_dir, tmp_path / "reference.log")
  assert reference_run.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()[-3000:]
  reference = {m["step"]: m["loss"] for m in resume_helpers._logged_steps(reference_dir)}
  assert sorted(reference) == list(range(1, KILL_TOTAL + 1))

  rng = np.random.default_rng(KILL_SEED)
  kill_steps = sorted(int(k) for k in rng.choice(np.arange(2, KILL_TOTAL - 1), 3, replace=False))
  workdir = tmp_path / "interrupted"
  every_logged: list[dict] = []  # every line any attempt logged, including steps later redone
  history = []
  for attempt, kill_step in enumerate(kill_steps):
    log = tmp_path / f"attempt{attempt}.log"
    process = _start_logged(workdir, log)
    _wait_printed(process, log, kill_step)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = _printed_steps(log)[-1]
    every_logged += resume_helpers._logged_steps(workdir)
    # Committed checkpoints are the step directories under their final name; one still being
    # written (asynchronously) when the kill came is under a temporary name and does not count.
    committed = resume_helpers._checkpoint_steps(workdir) if (workdir / "checkpoints").is_dir() else []
    history.append({"kill_after": kill_step, "killed_at": killed_at, "resumed_at": _resumed_step(log),
                    "newest_committed": max(committed, default=0)})

  log = tmp_path / "final.log"
  final_run = _start_logged(workdir, log)
  assert final_run.wait(timeout=600) == 0, log.read_text()[-3000:]
  resumed_at = _resumed_step(log)
  assert resumed_at > 0, "the last attempt did not resume from a checkpoint"
  history.append({"resumed_at": resumed_at})
  final_logged = resume_helpers._logged_steps(workdir)
  every_logged += final_logged
  print(f"kill -9 history (seed {KILL_SEED}): {history}")

  # Each resume starts from the newest checkpoint the killed attempt had committed: nothing saved
  # is lost; only the steps after that checkpoint are redone.
  for before, after in zip(history, history[1:]):
    assert after["resumed_at"] == before["newest_committed"] <= before["killed_at"], history
  assert [m["step"] for m in final_logged] == list(range(1, KILL_TOTAL + 1))
  for m in every_logged:
    assert m["loss"] == reference[m["step"]], (m, reference[m["step"]])
  final, expected = resume_helpers._final_params(workdir), resume_helpers._final_params(reference_dir)
  assert final.keys() == expected.keys()
  for name in expected:
    np.testing.assert_array_equal(final[name], expected[name], err_msg=name)


# ----------------------------------------------------------------------------------------------
# 2. Multi-host: a dead peer stops the run; restarting both resumes
# ----------------------------------------------------------------------------------------------

HOSTS_TOTAL = 16  # far beyond the kill at step 4, so the survivor cannot finish before it notices
HEARTBEAT = 5


def _two_process_args(workdir: Path) -> list[str]:
  return multihost_helpers._args("contrastive", workdir) + [
      f"--config.total_steps={HOSTS_TOTAL}", "--config.checkpoint_every_steps=2",
      "--config.mesh.data=-1", "--config.mesh.fsdp=1",
      f"--config.distributed.heartbeat_timeout_seconds={HEARTBEAT}"]


def _start_pair(workdir: Path, logs: list[Path]) -> list[subprocess.Popen]:
  port = multihost_helpers._free_port()
  base = _two_process_args(workdir) + ["--coordinator", f"127.0.0.1:{port}", "--num-processes",
                                       "2", "--cpu-collectives", "gloo"]
  return [subprocess.Popen(base + ["--process-id", str(i)], cwd=REPO,
                           env=multihost_helpers._env(2), stdout=logs[i].open("w"),
                           stderr=subprocess.STDOUT, text=True) for i in range(2)]


def _kill_all(processes: list[subprocess.Popen]) -> None:
  for process in processes:
    if process.poll() is None:
      process.kill()
      process.wait()


def test_restart_after_a_dead_process_resumes_with_the_same_losses(tmp_path):
  single = subprocess.run(_two_process_args(tmp_path / "single"), cwd=REPO,
                          env=multihost_helpers._env(4), capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stdout[-3000:]
  reference = multihost_helpers._losses(tmp_path / "single")
  assert len(reference) == HOSTS_TOTAL

  workdir = tmp_path / "multi"
  logs = [tmp_path / "p0.log", tmp_path / "p1.log"]
  processes = _start_pair(workdir, logs)
  try:
    _wait_printed(processes[0], logs[0], 4)
    processes[1].kill()
    killed_at = time.time()
    processes[0].wait(timeout=HEARTBEAT + 60)
    detected_after = time.time() - killed_at
  finally:
    _kill_all(processes)
  survivor_log = logs[0].read_text()
  assert processes[0].returncode != 0, survivor_log[-3000:]
  # A clear error instead of a hang: JAX's coordination service names the dead task.
  assert "another task died" in survivor_log or "unhealthy" in survivor_log, survivor_log[-3000:]
  stopped_at = _printed_steps(logs[0])[-1]
  assert stopped_at < HOSTS_TOTAL, "the survivor finished instead of stopping"
  before_restart = multihost_helpers._losses(workdir)
  committed = resume_helpers._checkpoint_steps(workdir)

  logs = [tmp_path / "p0_restart.log", tmp_path / "p1_restart.log"]
  processes = _start_pair(workdir, logs)
  try:
    for process, log in zip(processes, logs):
      assert process.wait(timeout=600) == 0, log.read_text()[-3000:]
  finally:
    _kill_all(processes)
  resumed_at = _resumed_step(logs[0])
  print(f"peer killed after step {stopped_at}; survivor stopped {detected_after:.1f}s later "
        f"(heartbeat {HEARTBEAT}s); committed checkpoints {committed}; restart resumed at step "
        f"{resumed_at}")
  assert resumed_at == max(committed) <= stopped_at  # the newest committed checkpoint, nothing lost
  assert (workdir / "checkpoints" / str(HOSTS_TOTAL)).is_dir()
  after_restart = multihost_helpers._losses(workdir)
  assert len(after_restart) == HOSTS_TOTAL
  # Two processes against one with the same four devices: equal up to the order of reductions.
  np.testing.assert_allclose(after_restart, reference, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(before_restart, reference[:len(before_restart)], rtol=1e-5, atol=1e-6)
  # Steps logged before the kill and redone after the restart give the same losses.
  np.testing.assert_array_equal(after_restart[:resumed_at], before_restart[:resumed_at])


# ----------------------------------------------------------------------------------------------
# 3. A pickled callable in a .pth is refused everywhere and never runs
# ----------------------------------------------------------------------------------------------

class _RunsACommand:
  """Unpickling this calls os.system(command): what a hostile checkpoint would carry."""

  def __init__(self, command: str):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


def _hostile_pth(path: Path, marker: Path, wrap=lambda payload: payload) -> Path:
  import torch
  path.parent.mkdir(parents=True, exist_ok=True)
  torch.save(wrap(_RunsACommand(f"touch {shlex.quote(str(marker))}")), path)
  return path


def test_the_hostile_payload_is_live_when_loaded_unsafely(tmp_path):
  """Control: the file really runs its command under plain pickle loading, so the refusals below
  are what keeps it from running."""
  import torch
  marker = tmp_path / "ran"
  path = _hostile_pth(tmp_path / "evil.pth", marker)
  torch.load(path, weights_only=False)
  assert marker.exists()


def _hf_dir_with_hostile_bin(directory: Path, marker: Path) -> Path:
  from agriclip_jax.convert.clip_formats import hf_config_from_ours
  from agriclip_jax.models.configs import clip_config
  directory.mkdir(parents=True)
  (directory / "config.json").write_text(json.dumps(hf_config_from_ours(clip_config("tiny"), None)))
  _hostile_pth(directory / "pytorch_model.bin", marker, lambda p: {"state_dict": p})
  return directory


CONVERT_READERS = {
    "openclip": (lambda d, m: _hostile_pth(d / "openclip.pt", m, lambda p: {"visual.proj": p}),
                 ["--model-name", "ViT-B-16"]),
    "hf": (lambda d, m: _hf_dir_with_hostile_bin(d / "hf_clip", m), []),
    "dino-vit": (lambda d, m: _hostile_pth(d / "dino_vits16.pth", m, lambda p: {"cls_token": p}), []),
    "dino-rn50": (lambda d, m: _hostile_pth(d / "dino_resnet50.pth", m, lambda p: {"conv1.weight": p}), []),
    "dino-checkpoint": (lambda d, m: _hostile_pth(d / "checkpoint.pth", m, lambda p: {"teacher": p}), []),
    "agriclip-aligner": (lambda d, m: _hostile_pth(d / "aligner.pth", m, lambda p: {"W": p, "b": p}), []),
}


@pytest.mark.parametrize("src_format", list(CONVERT_READERS))
def test_convert_refuses_a_pth_with_a_pickled_callable(tmp_path, capsys, src_format):
  from agriclip_jax import cli
  make, extra = CONVERT_READERS[src_format]
  marker = tmp_path / "ran"
  src = make(tmp_path, marker)
  dst = tmp_path / "out"
  code = cli.main(["convert", "--src", str(src), "--src-format", src_format, "--dst", str(dst),
                   "--dst-format", "flax", *extra])
  err = capsys.readouterr().err
  assert code == 2, err
  assert not marker.exists(), "the pickled callable ran"
  assert not dst.exists()
  assert "weights_only=True" in err and ("pytorch_model.bin" if src_format == "hf" else src.name) in err, err
  assert "Traceback" not in err


def test_load_aligner_refuses_a_pth_with_a_pickled_callable(tmp_path):
  from agriclip_jax.align import load_aligner
  marker = tmp_path / "ran"
  path = _hostile_pth(tmp_path / "aligner.pth", marker, lambda p: {"W": p, "b": p})
  with pytest.raises(ValueError, match=r"aligner\.pth: cannot be loaded safely with torch\.load\(weights_only=True\)"):
    load_aligner(path)
  assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# 4. Nothing half-written on a failed export
# ----------------------------------------------------------------------------------------------

def _fail_midway(real_save, path_argument: int):
  """A save function that writes the real bytes, cuts them in half, then fails like a full disk."""

  def save(*args, **kwargs):
    real_save(*args, **kwargs)
    path = Path(args[path_argument])
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    raise OSError(28, "No space left on device (simulated)")
  return save


def _snapshot(folder: Path) -> dict[str, bytes]:
  """Every file under `folder` (hidden ones too) with its bytes."""
  return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
          for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def tiny_clip_models():
  """Two tiny CLIP models with different weights: the new export and the previous version."""
  from agriclip_jax import model_io
  from agriclip_jax.convert.registry import ConvertedModel
  from agriclip_jax.models.configs import clip_config
  config = clip_config("tiny").to_dict()
  return [ConvertedModel("clip", config, model_io.init_variables("clip", config, seed=seed))
          for seed in (0, 1)]


def _aligner_model(seed: int):
  from agriclip_jax.convert.registry import ConvertedModel
  rng = np.random.default_rng(seed)
  params = {"kernel": rng.normal(size=(6, 4)).astype(np.float32),
            "bias": rng.normal(size=(4,)).astype(np.float32)}
  return ConvertedModel("linear_aligner", {"in_dim": 6, "out_dim": 4}, {"params": params})


# writer format -> (destination name, module and attribute of the save call to break, path arg)
FAILING_WRITERS = {
    "flax": ("aligner_dir", "safetensors.numpy", "save_file", 1),
    "hf": ("hf_clip", "safetensors.numpy", "save_file", 1),
    "openclip": ("open_clip.pth", "torch", "save", 1),
    "agriclip-aligner": ("aligner.pth", "torch", "save", 1),
}


@pytest.mark.parametrize("dst_format", list(FAILING_WRITERS))
@pytest.mark.parametrize("previous", [False, True], ids=["fresh", "over-previous"])
def test_a_writer_failing_midway_leaves_nothing_half_written(tmp_path, monkeypatch, tiny_clip_models,
                                                             dst_format, previous):
  import importlib

  from agriclip_jax.convert import registry
  name, module_name, attribute, path_argument = FAILING_WRITERS[dst_format]
  writer = registry.get_writer(dst_format)
  is_aligner = dst_format in ("flax", "agriclip-aligner")
  model, older = (_aligner_model(0), _aligner_model(1)) if is_aligner else tiny_clip_models
  out = tmp_path / "out"
  out.mkdir()
  dst = out / name
  if previous:
    writer(older, dst, {})
  before = _snapshot(out)

  module = importlib.import_module(module_name)
  monkeypatch.setattr(module, attribute, _fail_midway(getattr(module, attribute), path_argument))
  with pytest.raises(OSError, match="No space left on device"):
    writer(model, dst, {})
  monkeypatch.undo()

  assert _snapshot(out) == before  # the old version intact (or still absent), no temporary left
  assert dst.exists() == previous
  # Control: the same writer succeeds once the disk is back, so the failure above was midway.
  writer(model, dst, {})
  assert _snapshot(out) != before and dst.exists()


# ----------------------------------------------------------------------------------------------
# 5. `agriclip data inspect`: the text summary carries the JSON counts
# ----------------------------------------------------------------------------------------------

def _parse_inspect_text(text: str) -> dict:
  header = re.search(r"^source: .* \((\w+), (\d+) records\)$", text, flags=re.M)
  read = re.search(r"^read: (\d+)$", text, flags=re.M)
  skipped_total = re.search(r"^skipped: (\d+) \(", text, flags=re.M)
  reasons = {m.group(1): int(m.group(2))
             for m in re.finditer(r"^  (\w+): (\d+)  e\.g\. ", text, flags=re.M)}
  assert header and read and skipped_total, text
  assert sum(reasons.values()) == int(skipped_total.group(1)), text
  return {"records": int(header.group(2)), "read": int(read.group(1)), "skipped": reasons}


def test_data_inspect_text_summary_equals_its_json(shared_corn_dir, tmp_path_factory, capsys):
  from agriclip_jax import cli
  from agriclip_jax.testing import bad_corpus
  root = tmp_path_factory.mktemp("bad_corpus_inspect")
  good = sorted((shared_corn_dir / "lab" / "Blight").glob("*.jpg"))[:3]
  expected = bad_corpus.make_bad_corpus(root, good)
  figures = []
  for spec, key in (("folder", "folder"), ("manifest.jsonl", "jsonl")):
    assert cli.main(["data", "inspect", str(root / spec), "--json"]) == 0
    as_json = json.loads(capsys.readouterr().out)
    assert cli.main(["data", "inspect", str(root / spec)]) == 0
    as_text = _parse_inspect_text(capsys.readouterr().out)
    assert as_text == {"records": as_json["records"], "read": as_json["read"],
                       "skipped": as_json["skipped"]}
    assert {"read": as_text["read"], "skipped": as_text["skipped"]} == expected[key].as_summary()
    figures.append(f"inspect {spec}: {as_json['records']} records, {as_json['read']} read, "
                   f"{sum(as_json['skipped'].values())} skipped in {len(as_json['skipped'])} reasons")
  print("\n".join(figures))  # after the last capture, so the figures reach `pytest -s`
