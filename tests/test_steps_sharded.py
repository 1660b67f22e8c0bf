"""The train step on 8 simulated devices equals the same step on 1 device; no recompilation."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from agriclip_jax import param_rules
from agriclip_jax.train import config as config_lib
from agriclip_jax.train import state as state_lib
from agriclip_jax.train import steps as steps_lib
from agriclip_jax.train.sharding import make_mesh
from agriclip_jax.testing.toy_data import make_toy_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configs import tiny  # noqa: E402


def _config(kind: str, **changes):
  cfg = tiny.get_config(kind)
  cfg.batch_size = 8
  cfg.total_steps = 10
  cfg.data.toy_records = 64
  cfg.dino.freeze_last_layer_epochs = 0  # let the prototypes move within 3 steps
  cfg.clip.optimizer.warmup_steps = 1
  cfg.dino.optimizer.warmup_steps = 1
  cfg.sharding.min_size = 256  # so that the tiny models have FSDP-split parameters
  cfg.clip.layers = cfg.dino.layers = 1  # compile time is what these tests spend
  for key, value in changes.items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


def _batches(cfg, n: int) -> list[dict]:
  it = iter(make_toy_dataset(cfg.kind, global_batch_size=cfg.batch_size, seed=cfg.seed,
                             n_records=cfg.data.toy_records, image_size=cfg.data.image_size,
                             global_crop_size=cfg.data.global_crop_size,
                             local_crop_size=cfg.data.local_crop_size,
                             n_local_crops=cfg.data.n_local_crops))
  return [next(it) for _ in range(n)]


def _setup(cfg, devices):
  mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, devices)
  task = state_lib.build_task(cfg, steps_per_epoch=4)
  state, shardings = state_lib.create_sharded_state(task, mesh, cfg)
  step = steps_lib.jit_train_step(task, mesh, shardings, cfg.fast_compile)
  return state, step, shardings


def _run(cfg, devices, batches):
  state, step, shardings = _setup(cfg, devices)
  start = jax.device_get(state["params"])
  losses = []
  for batch in batches:
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return jax.device_get(state), losses, step, shardings, start


def _without_key_bias(name: str, value: np.ndarray) -> np.ndarray:
  """Drops the key part of a fused qkv bias: softmax ignores it, so its exact gradient is 0 and
  Adam turns the rounding noise of the two reduction orders into full-size (random) steps."""
  if name.endswith("attn/qkv/bias"):
    width = value.shape[0] // 3
    return np.concatenate([value[:width], value[2 * width:]])
  return value


@pytest.mark.parametrize("kind", ["contrastive", "dino", "joint"])
def test_eight_devices_equal_one_device(kind):
  cfg8 = _config(kind, **{"mesh.data": 4, "mesh.fsdp": 2})
  cfg1 = _config(kind, **{"mesh.data": 1, "mesh.fsdp": 1})
  batches = _batches(cfg8, 3)
  state8, losses8, step8, shardings8, _ = _run(cfg8, jax.devices()[:8], batches)
  state1, losses1, _, _, start = _run(cfg1, jax.devices()[:1], batches)

  # Some parameters really are split over the fsdp axis.
  specs = [s.spec for s in jax.tree.leaves(shardings8["params"])]
  assert any("fsdp" in tuple(spec) for spec in specs)
  # One compilation for the whole run.
  assert step8._cache_size() == 1

  np.testing.assert_allclose(losses8, losses1, rtol=1e-5, atol=1e-6)
  flat8 = param_rules.flatten_names({"params": state8["params"], "teacher": state8["teacher"],
                                     "centre": state8["centre"]})
  flat1 = param_rules.flatten_names({"params": state1["params"], "teacher": state1["teacher"],
                                     "centre": state1["centre"]})
  start = param_rules.flatten_names({"params": start})
  moved = 0
  for name, value in flat1.items():
    np.testing.assert_allclose(_without_key_bias(name, flat8[name]), _without_key_bias(name, value),
                               rtol=1e-5, atol=1e-5, err_msg=name)
    if name in start and not np.allclose(start[name], value):
      moved += 1
  assert moved > len(start) // 2  # the steps did train (the comparison is not of two no-ops)
  assert int(state8["step"]) == 3


@pytest.fixture(scope="module")
def one_device_contrastive():
  cfg = _config("contrastive", **{"mesh.data": 1, "mesh.fsdp": 1})
  state, step, _ = _setup(cfg, jax.devices()[:1])
  return cfg, state, step


def test_nonfinite_batch_is_skipped_and_counted(one_device_contrastive):
  cfg, state, step = one_device_contrastive
  state = jax.tree.map(lambda x: x.copy(), state)  # the step donates its input
  before = jax.device_get(state["params"])
  batch = _batches(cfg, 1)[0]
  batch["images"] = np.full_like(batch["images"], np.nan)
  state, metrics = step(state, batch)
  assert int(metrics["nonfinite"]) == 1 and int(state["skipped"]) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["params"]), before)


def test_logit_scale_is_clamped_to_ln_100(one_device_contrastive):
  cfg, state, step = one_device_contrastive
  state = jax.tree.map(lambda x: x.copy(), state)
  state["params"]["clip"]["logit_scale"] = state["params"]["clip"]["logit_scale"] * 0 + 5.0
  state, _ = step(state, _batches(cfg, 1)[0])
  assert float(state["params"]["clip"]["logit_scale"]) == pytest.approx(np.log(100), abs=1e-6)
  assert step._cache_size() == 1


def test_config_errors_name_the_field():
  cfg = _config("joint")
  cfg.batch_size = 12
  with pytest.raises(ValueError, match="batch_size"):
    config_lib.validate_config(cfg, n_devices=8)
  cfg = _config("contrastive")
  cfg.data.image_size = 30
  with pytest.raises(ValueError, match="image_size"):
    config_lib.validate_config(cfg, n_devices=8)
  cfg = _config("contrastive")
  cfg.clip.optimizer.lr = -1e-3
  with pytest.raises(ValueError, match="optimizer.lr"):
    config_lib.validate_config(cfg, n_devices=8)
  cfg = _config("contrastive", **{"mesh.data": 4, "mesh.fsdp": 4})
  with pytest.raises(ValueError, match="mesh"):
    config_lib.validate_config(cfg, n_devices=8)


def test_init_from_reads_the_stored_model_config_and_names_a_wrong_model_type(tmp_path):
  import json
  from agriclip_jax.models.configs import clip_config, vision_config
  from agriclip_jax.models.dino import DINOConfig, DINOHeadConfig
  stored = DINOConfig(vision_config("tiny", flavour="dino", layers=3),
                      DINOHeadConfig(out_dim=40, hidden_dim=24, bottleneck_dim=8))
  for name, model_type, model_config in (("dino", "dino", stored.to_dict()),
                                         ("clip", "clip", clip_config("tiny").to_dict())):
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.json").write_text(json.dumps(
        {"format_version": 1, "model_type": model_type, "config": model_config}))
  cfg = _config("joint", **{"dino.init_from": str(tmp_path / "dino"),
                            "clip.init_from": str(tmp_path / "clip")})
  got = state_lib.dino_model_config(cfg)
  assert got.head == stored.head and got.backbone.layers == 3  # the file's, not the run config's
  assert state_lib.clip_model_config(cfg).vision.width == 64
  cfg = _config("joint", **{"dino.init_from": str(tmp_path / "clip"),
                            "clip.init_from": str(tmp_path / "dino")})
  with pytest.raises(ValueError, match=r"dino.init_from=.* holds a 'clip' model, not a dino model"):
    state_lib.dino_model_config(cfg)
  with pytest.raises(ValueError, match=r"clip.init_from=.* holds a 'dino' model, not a clip model"):
    state_lib.clip_model_config(cfg)
