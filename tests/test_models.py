"""Model-level checks: the variants table, remat, bf16 compute, position-embedding interpolation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agriclip_jax.models.clip import CLIP
from agriclip_jax.models.configs import VARIANTS, CLIPConfig, clip_config, vision_config
from agriclip_jax.models.vit import VisionTransformer, interpolate_positions


def _inputs(config: CLIPConfig, batch: int = 2):
  rng = np.random.default_rng(0)
  size = config.vision.image_size
  images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  tokens = rng.integers(1, 1000, size=(batch, 12)).astype(np.int32)
  tokens[:, 7] = config.text.vocab_size - 1  # the end token pools the text
  tokens[:, 8:] = 0
  return images, tokens


@pytest.fixture(scope="module")
def tiny():
  """A one-block tiny CLIP with a small vocabulary: every check here compiles it, so keep it small."""
  config = clip_config("tiny")
  config = config.replace(vision=dataclasses.replace(config.vision, layers=1),
                          text=dataclasses.replace(config.text, layers=1, vocab_size=1000))
  images, tokens = _inputs(config)
  # Random values of the right shapes from numpy: compiling Flax's init would cost more than the checks.
  shapes = jax.eval_shape(CLIP(config).init, jax.random.PRNGKey(0), images, tokens)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda leaf: jnp.asarray(rng.normal(0.0, 0.2, leaf.shape), jnp.float32), shapes)
  return config, params, images, tokens


def test_unknown_variant_lists_known_ones():
  with pytest.raises(ValueError, match=r"unknown model variant 'ViT-B/61'.*did you mean.*ViT-B/16"):
    clip_config("ViT-B/61")
  with pytest.raises(ValueError) as error:
    vision_config("ViT-H/14")
  assert all(name in str(error.value) for name in VARIANTS)


def test_variant_sizes_match_the_published_architectures():
  b16 = clip_config("ViT-B/16")
  assert (b16.vision.width, b16.vision.layers, b16.vision.heads, b16.vision.patch_size) == (768, 12, 12, 16)
  assert (b16.text.width, b16.text.heads, b16.text.context_length, b16.embed_dim) == (512, 8, 77, 512)
  l14 = clip_config("ViT-L/14")
  assert (l14.vision.width, l14.vision.layers, l14.embed_dim) == (1024, 24, 768)


def test_remat_gives_the_same_output(tiny):
  config, params, images, tokens = tiny
  rematted = config.replace(vision=dataclasses.replace(config.vision, remat=True),
                            text=dataclasses.replace(config.text, remat=True))
  plain = jax.jit(CLIP(config).apply)(params, images, tokens)
  again = jax.jit(CLIP(rematted).apply)(params, images, tokens)
  for key in ("image_embeddings", "text_embeddings"):
    np.testing.assert_allclose(again[key], plain[key], atol=1e-6)

  # remat changes only what the backward pass recomputes: gradients must agree too. The image
  # tower alone keeps the compile short; both towers share the same Transformer code.
  def loss(p, model):
    return jnp.sum(model.apply({"params": p}, images) ** 2)

  vision_params = params["params"]["visual"]
  grads = jax.jit(jax.grad(loss), static_argnums=1)(vision_params, VisionTransformer(config.vision))
  grads_remat = jax.jit(jax.grad(loss), static_argnums=1)(vision_params, VisionTransformer(rematted.vision))
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_remat)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_bf16_compute_is_close_to_fp32(tiny):
  config, params, images, tokens = tiny
  bf16 = config.replace(vision=dataclasses.replace(config.vision, dtype="bfloat16"),
                        text=dataclasses.replace(config.text, dtype="bfloat16"))
  full = jax.jit(CLIP(config).apply)(params, images, tokens)
  half = jax.jit(CLIP(bf16).apply)(params, images, tokens)
  for key in ("image_embeddings", "text_embeddings"):
    assert half[key].dtype == jnp.float32  # normalised embeddings come back in fp32
    cosine = np.sum(np.asarray(half[key]) * np.asarray(full[key]), axis=-1)
    assert (cosine > 0.995).all(), f"{key}: cosine to fp32 {cosine}"
    assert not np.allclose(half[key], full[key], atol=1e-6)  # bf16 really was used
  # Params stay fp32 whatever the compute dtype.
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


def test_interpolation_keeps_positions_at_the_same_size():
  positions = jax.random.normal(jax.random.PRNGKey(1), (1 + 4 * 4, 8))
  np.testing.assert_array_equal(interpolate_positions(positions, 4), positions)


def test_interpolation_resizes_the_grid_and_keeps_the_class_slot():
  # A constant grid stays constant under bicubic resizing (the weights sum to one).
  grid = jnp.concatenate([jnp.full((1, 8), -3.0), jnp.full((16, 8), 2.5)])
  for size in (2, 6):
    resized = interpolate_positions(grid, size)
    assert resized.shape == (1 + size * size, 8)
    np.testing.assert_allclose(resized[0], -3.0)
    np.testing.assert_allclose(resized[1:], 2.5, atol=1e-5)


def test_vit_runs_at_another_image_size():
  config = vision_config("tiny", flavour="dino")
  model = VisionTransformer(config)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  out = jax.jit(model.apply)(params, jnp.ones((2, 48, 48, 3)))
  assert out.shape == (2, config.width) and np.isfinite(np.asarray(out)).all()
