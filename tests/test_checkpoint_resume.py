"""Faults during `agriclip train`: kill -9, SIGTERM and a half-written checkpoint, then resume.

Every logged loss and the final parameters equal those of an uninterrupted run. Each run is a
real `python -m agriclip_jax train` subprocess on one CPU device with the tiniest config; one
trains joint on real photos with the views rendered on the device (data.augment_on=device).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TOTAL = 24
ARGS = ["--config", str(REPO / "configs/tiny.py:contrastive"), f"--config.total_steps={TOTAL}",
        "--config.log_every_steps=1", "--config.checkpoint_every_steps=4",
        "--config.keep_checkpoints=3", "--config.clip.layers=1", "--config.batch_size=8",
        "--config.tensorboard=False"]


def _env(**extra: str) -> dict[str, str]:
  env = dict(os.environ)
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO), **extra)
  return env


def _start(workdir: Path, args: list[str] = ARGS, env: dict[str, str] | None = None
           ) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "agriclip_jax", "train", "--workdir", str(workdir),
                           *args], cwd=REPO, env=env or _env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _logged_steps(workdir: Path) -> list[dict]:
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  lines = path.read_text().splitlines()
  return [json.loads(line) for line in lines if line.strip().endswith("}")]


def _wait_for_step(process: subprocess.Popen, workdir: Path, step: int, timeout: float = 240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    logged = _logged_steps(workdir)
    if logged and logged[-1]["step"] >= step:
      return logged[-1]["step"]
    if process.poll() is not None:
      pytest.fail(f"the run ended before step {step}:\n{process.stdout.read()[-3000:]}")
    time.sleep(0.02)
  process.kill()
  pytest.fail(f"step {step} not reached within {timeout}s")


def _finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
  out, _ = process.communicate(timeout=timeout)
  return process.returncode, out


def _final_params(workdir: Path, part: str = "clip") -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  return load_file(str(workdir / f"models/{part}/model.safetensors"))


def _checkpoint_steps(workdir: Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _kill_after_first_checkpoint(process: subprocess.Popen, workdir: Path) -> int:
  """kill -9 once a checkpoint is committed (Orbax renames a step directory to its number only
  when complete); returns the last logged step."""
  deadline = time.time() + 240
  while not (workdir / "checkpoints").is_dir() or not _checkpoint_steps(workdir):
    assert process.poll() is None, "the run ended before its first checkpoint was committed"
    assert time.time() < deadline, "no checkpoint within 240 s"
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  process.wait()
  return _logged_steps(workdir)[-1]["step"]


def test_kill_sigterm_and_half_written_checkpoint_resume_exactly(tmp_path):
  reference_dir = tmp_path / "uninterrupted"
  code, out = _finish(_start(reference_dir))
  assert code == 0, out[-3000:]
  reference = {m["step"]: m["loss"] for m in _logged_steps(reference_dir)}
  assert sorted(reference) == list(range(1, TOTAL + 1))

  workdir = tmp_path / "interrupted"
  # 1. kill -9 in the middle of the run.
  process = _start(workdir)
  _wait_for_step(process, workdir, 6)
  killed_at = _kill_after_first_checkpoint(process, workdir)
  assert killed_at < TOTAL

  # 2. resume, then SIGTERM: a checkpoint within one step, exit code 0.
  process = _start(workdir)
  signalled_at = _wait_for_step(process, workdir, killed_at + 3)
  process.send_signal(signal.SIGTERM)
  code, out = _finish(process)
  assert code == 0, out[-3000:]
  assert "resumed from" in out
  saved = _checkpoint_steps(workdir)[-1]
  assert signalled_at <= saved <= signalled_at + 2, (signalled_at, saved)
  assert saved < TOTAL

  # 3. a newer step directory left half-written (its state files gone) is skipped.
  broken = workdir / "checkpoints" / str(saved + 1)
  shutil.copytree(workdir / "checkpoints" / str(saved), broken)
  shutil.rmtree(broken / "state")
  code, out = _finish(_start(workdir))
  assert code == 0, out[-3000:]
  assert f"checkpoint step {saved + 1}" in out and "resumed from" in out

  resumed = {m["step"]: m["loss"] for m in _logged_steps(workdir)}
  assert sorted(resumed) == sorted(reference)
  np.testing.assert_allclose([resumed[s] for s in sorted(resumed)],
                             [reference[s] for s in sorted(reference)], rtol=0, atol=0)
  final, expected = _final_params(workdir), _final_params(reference_dir)
  assert final.keys() == expected.keys()
  for name in expected:
    np.testing.assert_array_equal(final[name], expected[name], err_msg=name)


def test_checkpoint_restores_onto_a_different_mesh_with_the_data_position(tmp_path):
  import jax
  from jax.sharding import PartitionSpec as P

  from agriclip_jax.train.checkpoint import Checkpointer, abstract_with_shardings
  from agriclip_jax.train.sharding import make_mesh, state_shardings
  from agriclip_jax.testing.toy_data import make_toy_dataset

  def toy_iterator():
    return iter(make_toy_dataset("contrastive", global_batch_size=4, seed=0, n_records=32,
                                 image_size=16, global_crop_size=16, local_crop_size=8,
                                 n_local_crops=0))

  rng = np.random.default_rng(0)
  host = {"params": {"kernel": rng.normal(size=(64, 32)).astype(np.float32),
                     "bias": rng.normal(size=(32,)).astype(np.float32)},
          "step": np.int32(7)}
  mesh8 = make_mesh(2, 4, jax.devices()[:8])
  shardings8 = state_shardings(host, mesh8, min_size=16)
  assert shardings8["params"]["kernel"].spec == P("fsdp", None)
  state8 = jax.tree.map(lambda x, s: jax.device_put(x, s), host, shardings8)
  iterator = toy_iterator()
  next(iterator), next(iterator)
  checkpointer = Checkpointer(tmp_path / "ckpt", keep=2)
  checkpointer.save(7, state8, iterator)
  checkpointer.wait()
  expected_next = next(iterator)

  for mesh in (make_mesh(1, 1, jax.devices()[:1]), make_mesh(4, 2, jax.devices()[:8])):
    shardings = state_shardings(host, mesh, min_size=16)
    target = abstract_with_shardings(jax.eval_shape(lambda: host), shardings)
    resumed_iterator = toy_iterator()
    restored, step = Checkpointer(tmp_path / "ckpt", keep=2).restore_latest(target,
                                                                            resumed_iterator)
    assert step == 7
    assert restored["params"]["kernel"].sharding == shardings["params"]["kernel"]
    assert len(restored["params"]["kernel"].sharding.device_set) == mesh.size
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), host)
    batch = next(resumed_iterator)
    np.testing.assert_array_equal(batch["tokens"], expected_next["tokens"])


def test_kill_9_with_views_rendered_on_the_device_resumes_exactly(tmp_path):
  """Joint training on the 12 vendored photos with data.augment_on=device: the Grain iterator
  ships uint8 canvases and crop plans, the loop renders the CLIP view and the multi-crop jitted.
  Killed after its first checkpoint and resumed, the run logs the losses of an uninterrupted one
  bit for bit (the same views, the same steps) and exports the same CLIP and DINO weights."""
  from agriclip_jax.tokenizer import train_bpe_tokenizer
  photos = sorted((REPO / "tests" / "data" / "corn").rglob("*.jpg"))
  assert len(photos) == 12
  captions = [f"a {p.parent.name.replace('_', ' ').lower()} leaf" for p in photos]
  manifest = tmp_path / "corn.jsonl"
  manifest.write_text("".join(json.dumps({"image": str(p), "captions": [c]}) + "\n"
                              for p, c in zip(photos, captions)))
  tokenizer = train_bpe_tokenizer(captions * 4, vocab_size=600, out_dir=tmp_path / "tokenizer")
  total = 30
  args = ["--config", str(REPO / "configs/tiny.py:joint"), f"--config.total_steps={total}",
          "--config.log_every_steps=1", "--config.checkpoint_every_steps=6",
          "--config.keep_checkpoints=3", "--config.clip.layers=1", "--config.batch_size=4",
          "--config.tensorboard=False", f"--config.data.source={manifest}",
          f"--config.data.tokenizer={tmp_path / 'tokenizer'}",
          f"--config.clip.vocab_size={tokenizer.vocab_size}", "--config.data.augment_on=device"]
  # The later runs load the uninterrupted run's compiled programs from JAX's persistent cache:
  # the same executables, a third of the CPU time.
  env = _env(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  reference_dir, workdir = tmp_path / "uninterrupted", tmp_path / "interrupted"
  code, out = _finish(_start(reference_dir, args, env))
  assert code == 0, out[-3000:]
  killed_at = _kill_after_first_checkpoint(_start(workdir, args, env), workdir)
  assert killed_at < total
  code, out = _finish(_start(workdir, args, env))
  assert code == 0, out[-3000:]
  assert "resumed from" in out

  reference = {m["step"]: m for m in _logged_steps(reference_dir)}
  resumed = {m["step"]: m for m in _logged_steps(workdir)}
  assert sorted(reference) == sorted(resumed) == list(range(1, total + 1))
  for name in ("loss", "contrastive_loss", "dino_loss"):
    assert [resumed[s][name] for s in range(1, total + 1)] == \
        [reference[s][name] for s in range(1, total + 1)], name
  for part in ("clip", "dino"):
    final, expected = _final_params(workdir, part), _final_params(reference_dir, part)
    assert final.keys() == expected.keys()
    for name in expected:
      np.testing.assert_array_equal(final[name], expected[name], err_msg=f"{part}/{name}")
