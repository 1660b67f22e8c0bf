"""Tiny runs through `loop.train` learn: contrastive retrieval on the training pairs, DINO without
collapse; the logs (metrics.jsonl, TensorBoard events) hold what they promise."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import numpy as np
import pytest

from agriclip_jax import model_io
from agriclip_jax.commands import train as train_command
from agriclip_jax.models.clip import CLIP
from agriclip_jax.models.configs import CLIPConfig
from agriclip_jax.train.loop import train
from agriclip_jax.train.metrics_writer import read_metrics
from agriclip_jax.testing.toy_data import N_CAPTIONS, ToyRecords, caption_tokens

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/tiny.py")


def _config(kind: str, **overrides: str):
  pairs = [(k, str(v)) for k, v in overrides.items()]
  return train_command.build_config(f"{TINY}:{kind}", pairs)


def _image_to_caption_accuracy(model_dir: Path, n_records: int, image_size: int) -> float:
  """Each training image against all 64 distinct captions: is its own caption the best?"""
  _, cfg, variables = model_io.load_model_dir(model_dir)
  model = CLIP(CLIPConfig.from_dict(cfg))
  records = ToyRecords(n_records, image_size, seed=0)
  images = np.stack([records[i]["image"] for i in range(n_records)])
  labels = np.array([records[i]["label"] for i in range(n_records)])
  captions = np.stack([caption_tokens(label) for label in range(N_CAPTIONS)])
  out = jax.jit(model.apply)(variables, images, captions)
  predicted = np.argmax(np.asarray(out["image_embeddings"] @ out["text_embeddings"].T), axis=1)
  return float(np.mean(predicted == labels))


def test_tiny_contrastive_learns_the_pairs(tmp_path):
  cfg = _config("contrastive", total_steps=200, batch_size=32, log_every_steps=20,
                checkpoint_every_steps=1000, **{"clip.optimizer.lr": 2e-3, "mesh.data": 1})
  train(cfg, tmp_path)
  logged = read_metrics(tmp_path)
  assert [m["step"] for m in logged] == list(range(20, 201, 20))
  for key in ("loss", "contrastive_loss", "lr_clip", "images_per_sec", "logit_scale"):
    assert all(key in m and math.isfinite(m[key]) for m in logged), key
  start = math.log(cfg.batch_size)
  assert logged[0]["loss"] < start + 0.5
  assert logged[-1]["loss"] < 0.35 * start  # batches repeat captions, so 0 is not reachable
  accuracy = _image_to_caption_accuracy(tmp_path / "models/clip", cfg.data.toy_records,
                                        cfg.data.image_size)
  assert accuracy > 0.9, accuracy

  # TensorBoard event files, read back without TensorFlow.
  from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
  from tensorboard.util.tensor_util import make_ndarray
  event_files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert len(event_files) == 1
  # The loader migrates scalar summaries to tensors.
  losses = {e.step: float(make_ndarray(v.tensor)) for e in EventFileLoader(str(event_files[0])).Load()
            for v in e.summary.value if v.tag == "loss"}
  assert sorted(losses) == [m["step"] for m in logged]
  assert losses[200] == pytest.approx(logged[-1]["loss"], rel=1e-6)


def test_tiny_dino_does_not_collapse(tmp_path):
  cfg = _config("dino", total_steps=40, batch_size=32, log_every_steps=10,
                checkpoint_every_steps=1000, **{"mesh.data": 1})
  train(cfg, tmp_path)
  logged = read_metrics(tmp_path)
  log_k = math.log(cfg.dino.out_dim)
  for m in logged:
    # Uniform collapse: per-sample entropy -> log K. One-hot collapse: marginal entropy -> 0.
    assert 0.1 * log_k < m["teacher_entropy"] < 0.9 * log_k, m
    assert m["teacher_marginal_entropy"] > 0.5 * log_k, m
  assert (tmp_path / "models/dino/model.safetensors").is_file()


def test_typo_in_override_is_an_error_naming_the_key():
  with pytest.raises(KeyError, match="total_step.*did you mean total_steps"):
    _config("contrastive", total_step=3)
  with pytest.raises(KeyError, match="optimizer.*lrr"):
    _config("contrastive", **{"clip.optimizer.lrr": 1.0})
  with pytest.raises(ValueError, match="tiny.py:nope"):
    train_command.build_config(f"{TINY}:nope", [])
  cfg = _config("dino", **{"dino.optimizer.lr": "0.5", "mesh.fsdp": "2"})
  assert cfg.dino.optimizer.lr == 0.5 and cfg.mesh.fsdp == 2


def test_nonfinite_stop_policy_names_the_step_and_keeps_the_last_checkpoint(tmp_path):
  from agriclip_jax.train.loop import NonFiniteLossError
  # An absurd learning rate: step 1 sends the weights to ~1e30, step 2's loss is not finite.
  cfg = _config("contrastive", total_steps=5, batch_size=8, log_every_steps=1,
                checkpoint_every_steps=1, nonfinite="stop", tensorboard=False,
                async_checkpoints=False, **{"mesh.data": 1, "clip.layers": 1,
                                            "clip.optimizer.lr": 1e30,
                                            "clip.optimizer.warmup_steps": 0})
  with pytest.raises(NonFiniteLossError, match=r"at step (\d+).*checkpoint \((\d+)\)") as err:
    train(cfg, tmp_path)
  import re
  bad_step, kept = map(int, re.search(r"at step (\d+).*\((\d+)\)", str(err.value)).groups())
  assert kept == bad_step - 1
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) [-1] == kept
