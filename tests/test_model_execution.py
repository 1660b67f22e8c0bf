"""How a tower runs, from the training config to the model directory: FLIP patch dropout (against a
numpy draw of the same scores), scan over layers (same outputs as the unrolled stack; weights on
disk per layer, so converters read them), remat policies (same gradients)."""

from __future__ import annotations

import json
import re
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


def test_a_scanned_bf16_stack_with_stochastic_depth_keeps_its_dtype():
  # A scanned stack gets each layer's drop-path rate as an fp32 array; the branch must stay in
  # the compute dtype, or nn.scan refuses a bf16 carry that comes back fp32 (DINO ViT, bf16).
  from agriclip_jax.models.transformer import Transformer
  stack = Transformer(width=32, layers=2, heads=2, mlp_dim=64, act="gelu", ln_eps=1e-6,
                      drop_path_rate=0.1, deterministic=False, dtype=jnp.bfloat16,
                      scan_layers=True)
  x = jnp.ones((4, 5, 32), jnp.bfloat16)
  variables = stack.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}, x)
  out = stack.apply(variables, x, rngs={"dropout": jax.random.PRNGKey(2)})
  assert out.dtype == jnp.bfloat16 and out.shape == x.shape


def _all_gather_shapes(hlo_text: str) -> list[tuple[int, ...]]:
  shapes = []
  for match in re.finditer(r"= [a-z0-9]+\[([\d,]*)\]\S* all-gather\(", hlo_text):
    shapes.append(tuple(int(d) for d in match.group(1).split(",") if d))
  return shapes


@pytest.mark.parametrize("scan_layers", [False, True])
def test_fsdp_gathers_weights_not_the_batchs_activations(scan_layers):
  # Batch and weights both split over the 8-device fsdp axis: each block's matmuls must gather the
  # weight shards. Without transformer.keep_batch_split, XLA resolved the scanned blocks' matmuls
  # by gathering [global batch, tokens, width] activations instead (and all-reducing them back).
  from agriclip_jax.train import steps as steps_lib
  from agriclip_jax.train.checkpoint import abstract_with_shardings
  from agriclip_jax.train.sharding import batch_sharding, make_mesh
  cfg = tiny.get_config("contrastive")
  cfg.scan_layers = scan_layers
  cfg.sharding.min_size = 256  # the tiny weights are split too
  cfg.mesh.data, cfg.mesh.fsdp = 1, 8
  mesh = make_mesh(1, 8, jax.devices()[:8])
  task = state_lib.build_task(cfg, steps_per_epoch=10)
  shardings = state_lib.state_shardings_for(task, mesh, cfg)
  state = abstract_with_shardings(state_lib.abstract_state(task, cfg.seed), shardings)
  batch_size, size = 64, cfg.data.image_size
  sharding = batch_sharding(mesh)
  batch = {"images": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32, sharding=sharding),
           "tokens": jax.ShapeDtypeStruct((batch_size, cfg.data.context_length), jnp.int32,
                                          sharding=sharding)}
  step = steps_lib.jit_train_step(task, mesh, shardings, fast_compile=True)
  gathered = _all_gather_shapes(step.lower(state, batch).compile().as_text())
  weights = [s for s in gathered if len(s) == 2]
  activations = [s for s in gathered if len(s) == 3 and s[0] == batch_size]
  assert weights, gathered  # the split weights are gathered for their matmuls
  assert not activations, activations
