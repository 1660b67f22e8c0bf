"""DINO with a ResNet backbone through the training core (configs/tiny.py:dino_resnet).

- a few train steps on 8 simulated devices equal the same steps on 1 device: params, teacher and
  the BatchNorm running statistics of student and teacher (global-batch statistics = SyncBatchNorm);
- the configured crop scales reach the multi-crop transforms (toy data and the input pipeline);
- checkpoints carry the BatchNorm statistics;
- the exported model directory converts to a torchvision state dict (`dino-rn50`) that a plain
  torch.nn ResNet loads strictly and that gives the same features.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from agriclip_jax import model_io, param_rules
from agriclip_jax.convert import registry
from agriclip_jax.models.dino import DINO, DINOConfig
from agriclip_jax.train import checkpoint as ckpt_lib
from agriclip_jax.train import config as config_lib
from agriclip_jax.train import loop
from agriclip_jax.train import state as state_lib
from agriclip_jax.train import steps as steps_lib
from agriclip_jax.testing import toy_data
from agriclip_jax.train.sharding import make_mesh
from test_resnet import TorchResNet, nchw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configs import dino_rn50_alive, tiny  # noqa: E402

N_STEPS = 2


def _config(data: int):
  cfg = tiny.get_config("dino_resnet")
  cfg.batch_size = 8
  cfg.data.toy_records = 32
  cfg.mesh.data, cfg.mesh.fsdp = data, 1
  cfg.dino.freeze_last_layer_epochs = 0  # let the prototypes move too
  cfg.dino.optimizer.warmup_steps = 0
  return cfg


def _batches(cfg, n: int) -> list[dict]:
  dataset, _ = loop.make_dataset(cfg, 0, 1)
  it = iter(dataset)
  return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def runs():
  """The same steps from the same start on 1 and on 8 devices (one init, two step compilations)."""
  cfg1, cfg8 = _config(1), _config(8)
  task = state_lib.build_task(cfg1, steps_per_epoch=4)
  mesh1 = make_mesh(1, 1, jax.devices()[:1])
  mesh8 = make_mesh(8, 1, jax.devices()[:8])
  start, shardings1 = state_lib.create_sharded_state(task, mesh1, cfg1)
  start = jax.device_get(start)
  shardings8 = state_lib.state_shardings_for(task, mesh8, cfg8)
  batches = _batches(cfg8, N_STEPS)
  finals = {}
  for n, mesh, shardings in ((1, mesh1, shardings1), (8, mesh8, shardings8)):
    step = steps_lib.jit_train_step(task, mesh, shardings, cfg1.fast_compile)
    state = jax.device_put(start, shardings)
    for batch in batches:
      state, metrics = step(state, batch)
    assert int(metrics["nonfinite"]) == 0
    finals[n] = jax.device_get(state)
  return task, cfg8, start, finals


def test_state_carries_student_and_teacher_batch_stats(runs):
  task, _, start, _ = runs
  assert task.dino_model.config.has_batch_norm
  names = param_rules.flatten_names(start["batch_stats"])
  assert "dino/backbone/bn1/mean" in names and "dino/backbone/layer4_1/bn2/var" in names
  # The teacher starts as a full copy of the student, running statistics included.
  jax.tree.map(np.testing.assert_array_equal, start["teacher_batch_stats"], start["batch_stats"])


def test_eight_devices_equal_one_device_with_batch_norm(runs):
  _, _, start, finals = runs
  keys = ("params", "teacher", "batch_stats", "teacher_batch_stats", "centre")
  flat1 = param_rules.flatten_names({k: finals[1][k] for k in keys})
  flat8 = param_rules.flatten_names({k: finals[8][k] for k in keys})
  assert flat1.keys() == flat8.keys()
  for name, value in flat1.items():
    np.testing.assert_allclose(flat8[name], value, rtol=1e-5, atol=1e-5, err_msg=name)
  # The steps did something: parameters and both sets of running statistics moved.
  before = param_rules.flatten_names({k: start[k] for k in keys})
  for prefix in ("params/", "batch_stats/", "teacher_batch_stats/"):
    moved = [n for n in before if n.startswith(prefix) and not np.allclose(before[n], flat1[n])]
    assert len(moved) > 0.5 * sum(n.startswith(prefix) for n in before), prefix
  # Teacher statistics come from the teacher's own passes, not from the student's.
  assert not np.allclose(flat1["teacher_batch_stats/dino/backbone/bn1/mean"],
                         flat1["batch_stats/dino/backbone/bn1/mean"])
  assert int(finals[8]["step"]) == N_STEPS


def test_checkpoint_restores_batch_stats(runs, tmp_path):
  task, cfg, _, finals = runs
  mesh = make_mesh(8, 1, jax.devices()[:8])
  shardings = state_lib.state_shardings_for(task, mesh, cfg)
  checkpointer = ckpt_lib.Checkpointer(tmp_path / "ckpt", keep=1, async_save=False)
  checkpointer.save(N_STEPS, jax.device_put(finals[8], shardings), None)
  target = ckpt_lib.abstract_with_shardings(state_lib.abstract_state(task, cfg.seed), shardings)
  restored, step = checkpointer.restore_latest(target, None)
  checkpointer.close()
  assert step == N_STEPS
  for key in ("batch_stats", "teacher_batch_stats"):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored[key]), finals[8][key])


def test_exported_backbone_loads_strictly_into_torch_resnet(runs, tmp_path):
  task, cfg, _, finals = runs
  loop.export_models(task, finals[8], tmp_path, cfg)
  model_type, config, variables = model_io.load_model_dir(tmp_path / "models" / "dino")
  assert model_type == "dino" and config["backbone_type"] == "resnet"
  # The released model is the teacher, with the teacher's own running statistics.
  np.testing.assert_array_equal(variables["batch_stats"]["backbone"]["bn1"]["var"],
                                finals[8]["teacher_batch_stats"]["dino"]["backbone"]["bn1"]["var"])

  pth = tmp_path / "dino_resnet18.pth"
  registry.convert(tmp_path / "models" / "dino", "flax", pth, "dino-rn50")
  torch_model = TorchResNet(18)
  torch_model.load_state_dict(torch.load(pth, weights_only=True), strict=True)
  torch_model.eval()

  images = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
  expected = DINO(DINOConfig.from_dict(config)).apply(variables, images, method=DINO.features)
  with torch.no_grad():
    got = torch_model(nchw(images)).numpy()
  assert got.shape == (3, 512)
  np.testing.assert_allclose(got, np.asarray(expected), atol=1e-4, rtol=1e-4)

  # The DINO training-checkpoint layout (teacher: backbone.* + head.*) round-trips exactly.
  checkpoint = tmp_path / "checkpoint.pth"
  registry.convert(tmp_path / "models" / "dino", "flax", checkpoint, "dino-checkpoint")
  teacher = torch.load(checkpoint, weights_only=True)["teacher"]
  assert "backbone.layer4.1.bn2.running_var" in teacher and "head.last_layer.weight_v" in teacher
  back = registry.get_reader("dino-checkpoint")(checkpoint, {})
  assert back.model_type == "dino" and back.config["backbone_type"] == "resnet"
  flat_back, flat_saved = param_rules.flatten_names(back.variables), param_rules.flatten_names(
      variables)
  assert flat_back.keys() == flat_saved.keys()
  for name, value in flat_saved.items():
    np.testing.assert_array_equal(np.asarray(flat_back[name]), np.asarray(value), err_msg=name)


# ---------------------------------------------------------------------------------------------
# Crop scales (numpy only)
# ---------------------------------------------------------------------------------------------

def test_configured_crop_scales_reach_the_toy_multi_crop(monkeypatch):
  cfg = _config(1)
  cfg.data.n_local_crops = 4
  cfg.data.image_size = 64  # a finer pixel grid, so the area fractions are close to continuous
  sampled: list[tuple[float, tuple[float, float]]] = []
  original = toy_data.sample_crop_box

  def recording(full, scale, rng):
    box = original(full, scale, rng)
    sampled.append((box[2] ** 2 / full ** 2, tuple(scale)))
    return box

  monkeypatch.setattr(toy_data, "sample_crop_box", recording)
  _batches(cfg, 2)
  n_images = 2 * cfg.batch_size
  by_scale = {}
  for fraction, scale in sampled:
    by_scale.setdefault(scale, []).append(fraction)
  assert sorted(by_scale) == [(0.05, 0.14), (0.14, 1.0)]
  # Every image of the batches drawn got 2 global and 4 local crops (Grain may prefetch more).
  assert len(by_scale[(0.14, 1.0)]) >= 2 * n_images
  assert len(by_scale[(0.05, 0.14)]) >= 4 * n_images
  for (low, high), fractions in by_scale.items():
    fractions = np.asarray(fractions)
    assert np.all((fractions >= low) & (fractions <= high)), (low, high, fractions)
  # The ResNet local range is narrow: none of the ViT recipe's larger local crops (up to 0.4).
  assert max(by_scale[(0.05, 0.14)]) <= 0.14 and max(by_scale[(0.14, 1.0)]) > 0.4


def test_configured_crop_scales_reach_the_input_pipeline(monkeypatch):
  from input_pipeline import pipeline, sources
  captured = {}

  def fake_make_train_dataset(source, **kwargs):
    captured.update(kwargs)
    return "dataset"

  monkeypatch.setattr(sources, "open_source", lambda spec: [None] * 64)
  monkeypatch.setattr(pipeline, "make_train_dataset", fake_make_train_dataset)
  cfg = dino_rn50_alive.get_config("sgd")
  cfg.data.source = "/nowhere/manifest.jsonl"
  loop.make_dataset(cfg, 0, 1)
  multicrop = captured["multicrop"]
  assert multicrop.global_scale == (0.14, 1.0) and multicrop.local_scale == (0.05, 0.14)
  assert (multicrop.global_size, multicrop.local_size, multicrop.num_local) == (224, 96, 8)


def test_rn50_recipe_config_builds_a_resnet50_dino():
  for optimizer in ("sgd", "lars"):
    cfg = dino_rn50_alive.get_config(optimizer)
    config_lib.validate_config(cfg, n_devices=8)
    model_config = state_lib.dino_model_config(cfg)
    assert model_config.backbone_type == "resnet" and model_config.backbone.depth == 50
    assert model_config.embed_dim == 2048 and model_config.head.out_dim == 65536
    assert cfg.dino.optimizer.name == optimizer and cfg.dino.optimizer.weight_decay == 1e-4
  with pytest.raises(ValueError, match="expected one of"):
    dino_rn50_alive.get_config("adamw")
