"""Losses against direct numpy evaluations of their formulas, and sharded against dense."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from agriclip_jax import losses


def _normalised(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
  x = rng.normal(size=(n, d))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _mesh_8() -> Mesh:
  return Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))


def test_infonce_matches_numpy_formula():
  rng = np.random.default_rng(0)
  images, texts = _normalised(rng, 6, 5), _normalised(rng, 6, 5)
  scale = 7.5
  logits = scale * images.astype(np.float64) @ texts.T.astype(np.float64)
  expected = -0.5 * (np.mean(np.diag(_np_log_softmax(logits))) +
                     np.mean(np.diag(_np_log_softmax(logits.T))))
  got = losses.infonce_loss(jnp.asarray(images), jnp.asarray(texts), jnp.float32(scale))
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_infonce_sharded_equals_dense_loss_and_grads():
  rng = np.random.default_rng(1)
  images, texts = jnp.asarray(_normalised(rng, 16, 8)), jnp.asarray(_normalised(rng, 16, 8))
  scale = jnp.float32(12.0)
  mesh = _mesh_8()
  dense = jax.value_and_grad(losses.infonce_loss, argnums=(0, 1, 2))
  sharded = jax.jit(jax.value_and_grad(
      lambda i, t, s: losses.infonce_loss_sharded(i, t, s, mesh), argnums=(0, 1, 2)))
  loss_d, grads_d = dense(images, texts, scale)
  loss_s, grads_s = sharded(images, texts, scale)
  np.testing.assert_allclose(loss_s, loss_d, rtol=1e-5, atol=1e-6)
  for g_s, g_d in zip(grads_s, grads_d):
    np.testing.assert_allclose(g_s, g_d, rtol=1e-5, atol=1e-6)
  # A shuffled pairing must change the loss: the test sees the labels, not only the logits.
  shuffled = losses.infonce_loss_sharded(images, texts[::-1], scale, mesh)
  assert abs(float(shuffled) - float(loss_d)) > 1e-2


def test_sigmoid_matches_numpy_formula():
  rng = np.random.default_rng(2)
  images, texts = _normalised(rng, 5, 4), _normalised(rng, 5, 4)
  scale, bias = 10.0, -3.0
  logits = scale * images.astype(np.float64) @ texts.T + bias
  labels = 2 * np.eye(5) - 1
  expected = np.sum(np.log1p(np.exp(-labels * logits))) / 5
  got = losses.sigmoid_loss(jnp.asarray(images), jnp.asarray(texts), jnp.float32(scale),
                            jnp.float32(bias))
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_sigmoid_chunked_equals_dense_loss_and_grads():
  rng = np.random.default_rng(3)
  images, texts = jnp.asarray(_normalised(rng, 16, 8)), jnp.asarray(_normalised(rng, 16, 8))
  scale, bias = jnp.float32(10.0), jnp.float32(-5.0)
  mesh = _mesh_8()
  dense = jax.value_and_grad(losses.sigmoid_loss, argnums=(0, 1, 2, 3))
  chunked = jax.jit(jax.value_and_grad(
      lambda i, t, s, b: losses.sigmoid_loss_chunked(i, t, s, b, mesh), argnums=(0, 1, 2, 3)))
  loss_d, grads_d = dense(images, texts, scale, bias)
  loss_c, grads_c = chunked(images, texts, scale, bias)
  np.testing.assert_allclose(loss_c, loss_d, rtol=1e-5, atol=1e-6)
  for g_c, g_d in zip(grads_c, grads_d):
    np.testing.assert_allclose(g_c, g_d, rtol=1e-5, atol=1e-6)


def _np_dino_loss(student, teacher, centre, t_temp, s_temp):
  """The reference's double loop, written out."""
  total, n_terms = 0.0, 0
  for i in range(teacher.shape[1]):
    q = np.exp(_np_log_softmax((teacher[:, i] - centre) / t_temp))
    for v in range(student.shape[1]):
      if v == i:
        continue
      total += np.mean(np.sum(-q * _np_log_softmax(student[:, v] / s_temp), axis=-1))
      n_terms += 1
  return total / n_terms, n_terms


def test_dino_loss_and_centre_match_numpy():
  rng = np.random.default_rng(4)
  batch, n_crops, n_global, k = 4, 10, 2, 32
  student = rng.normal(size=(batch, n_crops, k)).astype(np.float32)
  teacher = rng.normal(size=(batch, n_global, k)).astype(np.float32)
  centre = rng.normal(scale=0.1, size=(k,)).astype(np.float32)
  expected, n_terms = _np_dino_loss(student.astype(np.float64), teacher.astype(np.float64),
                                    centre, 0.04, 0.1)
  assert n_terms == 18
  got = losses.dino_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(centre), 0.04, 0.1)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)

  new_centre = losses.update_centre(jnp.asarray(centre), jnp.asarray(teacher), 0.9)
  expected_centre = 0.9 * centre + 0.1 * teacher.reshape(-1, k).mean(axis=0)
  np.testing.assert_allclose(new_centre, expected_centre, rtol=1e-5, atol=1e-7)


def test_dino_loss_gradient_stops_at_teacher():
  rng = np.random.default_rng(5)
  student = jnp.asarray(rng.normal(size=(2, 4, 8)), jnp.float32)
  teacher = jnp.asarray(rng.normal(size=(2, 2, 8)), jnp.float32)
  grad_teacher = jax.grad(losses.dino_loss, argnums=1)(student, teacher, jnp.zeros(8), 0.04)
  assert float(jnp.abs(grad_teacher).max()) == 0.0


def test_dino_centre_uses_global_batch_when_sharded():
  rng = np.random.default_rng(6)
  teacher = rng.normal(size=(16, 2, 8)).astype(np.float32)
  mesh = _mesh_8()
  sharded = jax.device_put(teacher, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      ("data", "fsdp"))))
  got = jax.jit(losses.update_centre)(jnp.zeros(8), sharded)
  np.testing.assert_allclose(got, 0.1 * teacher.reshape(-1, 8).mean(0), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("warmup_epochs", [0, 1, 5])
def test_teacher_temperature_matches_reference_schedule(warmup_epochs):
  steps_per_epoch, epochs = 3, 8
  reference = np.concatenate([np.linspace(0.04, 0.07, warmup_epochs),
                              np.full(epochs - warmup_epochs, 0.07)])
  for step in range(epochs * steps_per_epoch):
    got = losses.teacher_temperature(step, steps_per_epoch, 0.04, 0.07, warmup_epochs)
    np.testing.assert_allclose(float(got), reference[step // steps_per_epoch], rtol=1e-6)
