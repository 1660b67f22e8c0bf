"""How a tower runs, from the training config to the model directory: FLIP patch dropout (against a
numpy draw of the same scores), scan over layers (same outputs as the unrolled stack; weights on
disk per layer, so converters read them), remat policies (same gradients)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agriclip_jax import model_io
from agriclip_jax.convert import registry
from agriclip_jax.models.clip import CLIP
from agriclip_jax.models.configs import clip_config, vision_config
from agriclip_jax.models.vit import VisionTransformer, drop_patches
from agriclip_jax.train import state as state_lib

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configs import tiny  # noqa: E402


def test_drop_patches_keeps_the_class_token_and_the_highest_scored_patches_in_order():
  tokens = jnp.asarray(np.random.default_rng(0).normal(size=(3, 1 + 16, 4)), jnp.float32)
  key = jax.random.PRNGKey(5)
  kept = np.asarray(drop_patches(tokens, 0.5, key))
  scores = np.asarray(jax.random.uniform(key, (3, 16)))  # the same draw, ranked by numpy
  for b in range(3):
    chosen = np.sort(np.argsort(-scores[b], kind="stable")[:8])
    np.testing.assert_array_equal(kept[b, 0], np.asarray(tokens[b, 0]))
    np.testing.assert_array_equal(kept[b, 1:], np.asarray(tokens[b, 1 + chosen]))
  assert drop_patches(tokens, 0.99, key).shape == (3, 2, 4)  # at least one patch stays


def test_patch_dropout_is_training_only_and_changes_the_training_forward():
  images = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)
  plain = VisionTransformer(vision_config("tiny"))
  dropped = VisionTransformer(vision_config("tiny", patch_dropout=0.5))
  params = plain.init(jax.random.PRNGKey(0), images)
  rngs = {"dropout": jax.random.PRNGKey(3)}
  np.testing.assert_array_equal(dropped.apply(params, images), plain.apply(params, images))
  np.testing.assert_array_equal(dropped.apply(params, images, train=True, rngs=rngs),
                                dropped.apply(params, images, train=True, rngs=rngs))
  assert not np.allclose(dropped.apply(params, images, train=True, rngs=rngs),
                         plain.apply(params, images, train=True, rngs=rngs), atol=1e-4)
  with pytest.raises(ValueError, match="patch_dropout=1.0 must be in"):
    vision_config("tiny", patch_dropout=1.0)


@pytest.fixture(scope="module")
def unrolled_and_scanned():
  cfg = clip_config("tiny")
  scanned_cfg = cfg.replace(vision=cfg.vision.__class__(**{**cfg.vision.to_dict(), "scan_layers": True}),
                            text=cfg.text.__class__(**{**cfg.text.to_dict(), "scan_layers": True}))
  variables = model_io.init_variables("clip", cfg.to_dict(), seed=0)
  return cfg, scanned_cfg, variables


def test_scanned_towers_equal_the_unrolled_ones_on_the_same_weights(unrolled_and_scanned):
  cfg, scanned_cfg, variables = unrolled_and_scanned
  stacked = model_io.match_layer_layout(
      variables, model_io.abstract_variables("clip", scanned_cfg.to_dict()))
  assert "resblocks" in stacked["params"]["visual"]["transformer"]
  images = jnp.asarray(np.random.default_rng(2).normal(size=(2, 32, 32, 3)), jnp.float32)
  tokens = jnp.asarray(np.random.default_rng(3).integers(1, 50, size=(2, cfg.text.context_length)))
  want = CLIP(cfg).apply(variables, images, tokens)
  got = CLIP(scanned_cfg).apply(stacked, images, tokens)
  for key in ("image_embeddings", "text_embeddings"):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6)


def test_a_scanned_model_directory_stores_per_layer_weights_and_converts(
    unrolled_and_scanned, tmp_path):
  cfg, scanned_cfg, variables = unrolled_and_scanned
  stacked = model_io.match_layer_layout(
      variables, model_io.abstract_variables("clip", scanned_cfg.to_dict()))
  tokenizer = tmp_path / "tok"
  tokenizer.mkdir()
  (tokenizer / "vocab.json").write_text(json.dumps({f"t{i}": i for i in range(50)}))
  (tokenizer / "merges.txt").write_text("#version: 0.2\n")
  scanned_dir = model_io.save_model_dir(tmp_path / "scanned", "clip", scanned_cfg.to_dict(), stacked)
  plain_dir = model_io.save_model_dir(tmp_path / "plain", "clip", cfg.to_dict(), variables)
  from safetensors.numpy import load_file
  on_disk = load_file(str(scanned_dir / "model.safetensors"))
  assert on_disk.keys() == load_file(str(plain_dir / "model.safetensors")).keys()
  saved = json.loads((scanned_dir / "config.json").read_text())["config"]
  assert saved["vision"]["scan_layers"] is True and saved["text"]["scan_layers"] is True
  _, _, loaded = model_io.load_model_dir(scanned_dir)  # in the layout its config builds
  assert "resblocks" in loaded["params"]["text"]["transformer"]
  converted = registry.read_flax(scanned_dir, {})
  assert "resblocks_0" in converted.variables["params"]["visual"]["transformer"]


def test_training_config_reaches_the_towers():
  cfg = tiny.get_config("joint")
  cfg.scan_layers, cfg.remat, cfg.remat_policy = True, True, "dots_saveable"
  cfg.clip.patch_dropout = 0.25
  task = state_lib.build_task(cfg, steps_per_epoch=4)
  vision, text = task.clip_model.config.vision, task.clip_model.config.text
  backbone = task.dino_model.config.backbone
  for tower in (vision, text, backbone):
    assert (tower.scan_layers, tower.remat, tower.remat_policy) == (True, True, "dots_saveable")
  assert vision.patch_dropout == 0.25
  cfg.remat_policy = "everything"
  with pytest.raises(ValueError, match="remat_policy='everything'"):
    state_lib.build_task(cfg, steps_per_epoch=4)


def test_remat_policies_give_the_same_gradients():
  images = jnp.asarray(np.random.default_rng(4).normal(size=(2, 32, 32, 3)), jnp.float32)
  plain = VisionTransformer(vision_config("tiny"))
  params = plain.init(jax.random.PRNGKey(0), images)
  grad = lambda model: jax.grad(lambda p: jnp.sum(model.apply(p, images) ** 2))(params)  # noqa: E731
  want = jax.tree.leaves(grad(plain))
  for policy in ("nothing_saveable", "dots_with_no_batch_dims_saveable"):
    got = jax.tree.leaves(grad(VisionTransformer(vision_config("tiny", remat=True,
                                                               remat_policy=policy))))
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
