"""Gradient accumulation keeps the whole batch's contrastive negatives (GradCache): the same global
batch with accumulate_steps = 1, 2, 4, 8 gives the same losses, gradients and parameters, for
InfoNCE (dense and sharded on 8 simulated devices), the sigmoid loss and the joint CLIP + DINO step;
and the two passes draw the same drop-path masks (checked against the dense gradient of the
micro-batches' towers)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agriclip_jax import losses, param_rules
from agriclip_jax.models.clip import CLIP
from agriclip_jax.train import state as state_lib
from agriclip_jax.train import steps as steps_lib
from agriclip_jax.train.sharding import make_mesh
from agriclip_jax.testing.toy_data import make_toy_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configs import tiny  # noqa: E402

STEPS = 3


def _config(kind: str, batch_size: int, accumulate_steps: int, mesh=(1, 1), loss="infonce"):
  cfg = tiny.get_config(kind)
  cfg.batch_size = batch_size
  cfg.accumulate_steps = accumulate_steps
  cfg.data.toy_records = 4 * batch_size
  cfg.mesh.data, cfg.mesh.fsdp = mesh
  cfg.clip.layers = cfg.dino.layers = 1  # compile time is what these tests spend
  cfg.clip.loss = loss
  cfg.dino.freeze_last_layer_epochs = 0
  # Plain SGD: a step moves the parameters by -lr * gradient, so equal parameters after three
  # steps mean equal gradients at every step (Adam would magnify rounding in zero-gradient entries).
  for optimizer in (cfg.clip.optimizer, cfg.dino.optimizer):
    optimizer.name, optimizer.momentum, optimizer.warmup_steps = "sgd", 0.0, 0
    optimizer.weight_decay, optimizer.weight_decay_end = 0.0, 0.0
    optimizer.lr = 0.5
  return cfg


def _batches(cfg) -> list[dict]:
  it = iter(make_toy_dataset(cfg.kind, global_batch_size=cfg.batch_size, seed=cfg.seed,
                             n_records=cfg.data.toy_records, image_size=cfg.data.image_size,
                             global_crop_size=cfg.data.global_crop_size,
                             local_crop_size=cfg.data.local_crop_size,
                             n_local_crops=cfg.data.n_local_crops))
  return [next(it) for _ in range(STEPS)]


def _train(cfg, devices, batches):
  mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, devices)
  task = state_lib.build_task(cfg, steps_per_epoch=4)
  state, shardings = state_lib.create_sharded_state(task, mesh, cfg)
  step = steps_lib.jit_train_step(task, mesh, shardings, cfg.fast_compile)
  logged = []
  for batch in batches:
    state, metrics = step(state, batch)
    logged.append({k: float(v) for k, v in jax.device_get(metrics).items()
                   if k in ("loss", "contrastive_loss", "dino_loss", "grad_norm_clip",
                            "grad_norm_dino")})
  params = param_rules.flatten_names({"params": state["params"], "teacher": state["teacher"],
                                      "centre": state["centre"]})
  return logged, jax.device_get(params)


CASES = {
    # name: (kind, loss, global batch, mesh, accumulate_steps to compare with 1)
    "infonce": ("contrastive", "infonce", 16, (1, 1), (2, 4, 8)),
    "infonce_sharded": ("contrastive", "infonce", 64, (4, 2), (8,)),
    "sigmoid": ("contrastive", "sigmoid", 16, (1, 1), (4,)),
    "joint": ("joint", "infonce", 16, (1, 1), (4,)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_accumulated_steps_equal_the_whole_batch_step(case):
  kind, loss, batch_size, mesh, accumulations = CASES[case]
  devices = jax.devices()[:mesh[0] * mesh[1]]
  batches = _batches(_config(kind, batch_size, 1, mesh, loss))
  reference_log, reference = _train(_config(kind, batch_size, 1, mesh, loss), devices, batches)
  start = _train(_config(kind, batch_size, 1, mesh, loss), devices, [])[1]
  moved = [name for name in reference if not np.allclose(start[name], reference[name])]
  assert len(moved) > len(reference) // 2  # the steps trained: this is no comparison of no-ops
  for k in accumulations:
    log, params = _train(_config(kind, batch_size, k, mesh, loss), devices, batches)
    for got, want in zip(log, reference_log):
      assert got.keys() == want.keys()
      for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6,
                                   err_msg=f"{case} k={k} {key}")
    for name, value in reference.items():
      np.testing.assert_allclose(params[name], value, rtol=1e-5, atol=1e-5,
                                 err_msg=f"{case} k={k} {name}")


def test_micro_batch_negatives_would_differ():
  # The control: InfoNCE over two halves is not InfoNCE over the whole batch, so the equalities
  # above are a property of the exact accumulation, not of the data.
  rng = np.random.default_rng(0)
  images, texts = (rng.normal(size=(16, 8)).astype(np.float32) for _ in range(2))
  images /= np.linalg.norm(images, axis=1, keepdims=True)
  texts /= np.linalg.norm(texts, axis=1, keepdims=True)
  whole = float(losses.infonce_loss(images, texts, 10.0))
  halves = np.mean([float(losses.infonce_loss(images[i::2], texts[i::2], 10.0)) for i in (0, 1)])
  assert abs(whole - halves) > 0.05


def test_both_passes_draw_the_same_drop_path_masks():
  # With drop-path on in the image tower (the text tower has none), the accumulated gradient must equal the gradient of the dense
  # computation in which micro-batch i's towers run with micro-batch i's key: a second pass that drew
  # other masks would back-propagate through other networks than the first pass embedded with.
  cfg = _config("contrastive", 16, 4)
  cfg.clip.layers = 2  # drop-path rates rise from 0 at the first block: one block would draw none
  task = state_lib.build_task(cfg, steps_per_epoch=4)
  clip_config = task.clip_model.config
  clip_config = clip_config.replace(
      vision=dataclasses.replace(clip_config.vision, drop_path_rate=0.5))
  task = dataclasses.replace(task, clip_model=CLIP(clip_config))
  mesh = make_mesh(1, 1, jax.devices()[:1])
  state, _ = state_lib.create_sharded_state(task, mesh, cfg)
  batch = _batches(cfg)[0]
  rng = jax.random.PRNGKey(7)
  _, _, _, grads, _ = jax.jit(lambda s, b: steps_lib._grads_and_metrics(task, mesh, s, b, rng))(
      state, batch)

  def dense_loss(params):
    micro = steps_lib._micro_batches(batch, 4, None)
    pairs = [steps_lib._clip_embeddings(task, params, jax.tree.map(lambda x: x[i], micro),
                                        steps_lib._micro_rngs(rng, i)[0]) for i in range(4)]
    images = steps_lib._whole_batch(jnp.stack([p[0] for p in pairs]), None)
    texts = steps_lib._whole_batch(jnp.stack([p[1] for p in pairs]), None)
    scale, _ = steps_lib._logit_parameters(task, params)
    return losses.infonce_loss(images, texts, scale)

  expected = param_rules.flatten_names(jax.jit(jax.grad(dense_loss))(state["params"]["clip"]))
  got = param_rules.flatten_names(grads["clip"])
  for name, value in expected.items():
    np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
  # And the masks matter: without drop-path the gradient is another one.
  plain = param_rules.flatten_names(jax.jit(lambda s, b: steps_lib._grads_and_metrics(
      dataclasses.replace(task, clip_model=CLIP(clip_config.replace(
          vision=dataclasses.replace(clip_config.vision, drop_path_rate=0.0)))),
      mesh, s, b, rng))(state, batch)[3]["clip"])
  assert max(float(np.max(np.abs(plain[n] - expected[n]))) for n in expected) > 1e-4


def test_agriclip_train_logs_the_same_losses_with_accumulate_steps_4(tmp_path):
  # Through the command a user types: the tiny contrastive run with accumulate_steps=4 logs the
  # losses of accumulate_steps=1 (plain SGD, so that equal gradients give equal parameters).
  import json
  import os
  import subprocess
  repo = Path(__file__).resolve().parents[1]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(repo))
  logged = {}
  for k in (1, 4):
    workdir = tmp_path / f"k{k}"
    process = subprocess.run(
        [sys.executable, "-m", "agriclip_jax", "train", "--config", f"{repo}/configs/tiny.py:contrastive",
         "--workdir", str(workdir), "--config.total_steps=4", "--config.log_every_steps=1",
         "--config.checkpoint_every_steps=4", "--config.clip.layers=1", "--config.batch_size=16",
         "--config.tensorboard=False", f"--config.accumulate_steps={k}",
         "--config.clip.optimizer.name=sgd", "--config.clip.optimizer.momentum=0.0"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    logged[k] = [line["loss"] for line in lines if "loss" in line]
  assert len(logged[1]) == 4
  np.testing.assert_allclose(logged[4], logged[1], rtol=1e-5, atol=1e-6)
  assert len(set(np.round(logged[1], 6))) > 1  # the loss moved: these are not four copies
