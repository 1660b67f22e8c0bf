"""Training losses: contrastive (InfoNCE, sigmoid) dense and sharded, and DINO self-distillation.

All functions are pure. The dense versions are the definitions; the sharded versions compute the
same value with less memory by letting each device score only its local rows against the gathered
global batch (InfoNCE) or against text blocks passed around a ring (sigmoid). Both are written with
`jax.shard_map`, so gradients flow through the collectives (`all_gather` transposes to a
reduce-scatter, `ppermute` to the reverse permutation).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

# CLIP clamps the learned temperature so that exp(logit_scale) <= 100.
MAX_LOG_LOGIT_SCALE = math.log(100.0)

# Mesh axes the batch dimension is split over (FSDP also splits the batch).
BATCH_AXES: tuple[str, ...] = ("data", "fsdp")


# ----------------------------------------------------------------------------------------------
# InfoNCE (CLIP)
# ----------------------------------------------------------------------------------------------

def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean over rows of -log softmax(logits)[label]."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))


def infonce_loss(image_embeddings: jax.Array, text_embeddings: jax.Array,
                 logit_scale: jax.Array) -> jax.Array:
  """Symmetric InfoNCE over the whole batch; embeddings are L2-normalised, `logit_scale` = exp(log)."""
  logits = logit_scale * image_embeddings @ text_embeddings.T
  labels = jnp.arange(logits.shape[0])
  return 0.5 * (_cross_entropy(logits, labels) + _cross_entropy(logits.T, labels))


def _batch_axes(mesh: Mesh, axes: Sequence[str]) -> tuple[str, ...]:
  missing = [a for a in axes if a not in mesh.axis_names]
  if missing:
    raise ValueError(f"mesh axes {mesh.axis_names} lack the batch axes {missing}")
  return tuple(axes)


def infonce_loss_sharded(image_embeddings: jax.Array, text_embeddings: jax.Array,
                         logit_scale: jax.Array, mesh: Mesh,
                         axes: Sequence[str] = BATCH_AXES) -> jax.Array:
  """InfoNCE equal to `infonce_loss` with logits O(B_local x B_global) per device.

  open_clip's `local_loss` + `gather_with_grad`: device r scores its local images against all
  texts and its local texts against all images; its positives sit at columns r * B_local + i.
  Summing the local row losses over devices covers every row and every column of the dense logits.
  """
  axes = _batch_axes(mesh, axes)

  def local_loss(images: jax.Array, texts: jax.Array, scale: jax.Array) -> jax.Array:
    all_images = jax.lax.all_gather(images, axes, axis=0, tiled=True)
    all_texts = jax.lax.all_gather(texts, axes, axis=0, tiled=True)
    n_local = images.shape[0]
    labels = jnp.arange(n_local) + n_local * jax.lax.axis_index(axes)
    image_loss = _cross_entropy(scale * images @ all_texts.T, labels)
    text_loss = _cross_entropy(scale * texts @ all_images.T, labels)
    return jax.lax.pmean(0.5 * (image_loss + text_loss), axes)

  batch_spec = P(axes)
  return jax.shard_map(local_loss, mesh=mesh, in_specs=(batch_spec, batch_spec, P()),
                       out_specs=P())(image_embeddings, text_embeddings, logit_scale)


# ----------------------------------------------------------------------------------------------
# Sigmoid (SigLIP)
# ----------------------------------------------------------------------------------------------

def _sigmoid_pair_sum(images: jax.Array, texts: jax.Array, scale: jax.Array, bias: jax.Array,
                      positives_on_diagonal: bool) -> jax.Array:
  logits = (scale * images @ texts.T + bias).astype(jnp.float32)
  if positives_on_diagonal:
    labels = 2.0 * jnp.eye(logits.shape[0], logits.shape[1]) - 1.0
  else:
    labels = -jnp.ones_like(logits)
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits))


def sigmoid_loss(image_embeddings: jax.Array, text_embeddings: jax.Array, logit_scale: jax.Array,
                 logit_bias: jax.Array) -> jax.Array:
  """SigLIP: -sum over all pairs of log sigmoid(label * (s * <i, t> + b)) / batch size."""
  total = _sigmoid_pair_sum(image_embeddings, text_embeddings, logit_scale, logit_bias, True)
  return total / image_embeddings.shape[0]


def sigmoid_loss_chunked(image_embeddings: jax.Array, text_embeddings: jax.Array,
                         logit_scale: jax.Array, logit_bias: jax.Array, mesh: Mesh,
                         axes: Sequence[str] = BATCH_AXES) -> jax.Array:
  """`sigmoid_loss` with text blocks passed around a ring of devices: O(B_local^2) logits each.

  At ring step k device r holds the texts of device r - k; only step 0 holds its own positives.
  """
  axes = _batch_axes(mesh, axes)
  n_devices = int(np.prod([mesh.shape[a] for a in axes]))
  # Each device hands its current text block to the next one around the ring.
  ring = [(i, (i + 1) % n_devices) for i in range(n_devices)]

  def local_loss(images: jax.Array, texts: jax.Array, scale: jax.Array,
                 bias: jax.Array) -> jax.Array:
    total = _sigmoid_pair_sum(images, texts, scale, bias, True)
    for _ in range(n_devices - 1):
      texts = jax.lax.ppermute(texts, axes, ring)
      total = total + _sigmoid_pair_sum(images, texts, scale, bias, False)
    return jax.lax.psum(total, axes) / (images.shape[0] * n_devices)

  batch_spec = P(axes)
  return jax.shard_map(local_loss, mesh=mesh, in_specs=(batch_spec, batch_spec, P(), P()),
                       out_specs=P())(image_embeddings, text_embeddings, logit_scale, logit_bias)


# ----------------------------------------------------------------------------------------------
# DINO
# ----------------------------------------------------------------------------------------------

def dino_loss(student_outputs: jax.Array, teacher_outputs: jax.Array, centre: jax.Array,
              teacher_temp: jax.Array | float, student_temp: float = 0.1) -> jax.Array:
  """DINO cross-entropy between sharpened teacher and student over crops of different views.

  Args:
    student_outputs: [B, V, K] head outputs of the student for all crops, the global crops first.
    teacher_outputs: [B, G, K] head outputs of the teacher for the G global crops.
    centre: [K] running centre of the teacher outputs.
  Returns:
    mean over (teacher crop i, student crop v != i) pairs of mean over batch of -sum P_t log P_s.
  """
  n_global = teacher_outputs.shape[1]
  n_views = student_outputs.shape[1]
  if n_views < 2 or n_global > n_views:
    raise ValueError(f"dino_loss: student has {n_views} crops, teacher {n_global}; the student "
                     "must see every teacher crop and at least one other")
  teacher_probs = jax.nn.softmax(
      (teacher_outputs.astype(jnp.float32) - centre) / teacher_temp, axis=-1)
  teacher_probs = jax.lax.stop_gradient(teacher_probs)
  student_log_probs = jax.nn.log_softmax(student_outputs.astype(jnp.float32) / student_temp, axis=-1)
  # cross[b, i, v] = -sum_k P_t[b, i, k] log P_s[b, v, k]
  cross = -jnp.einsum("bik,bvk->biv", teacher_probs, student_log_probs)
  same_view = jnp.eye(n_global, n_views, dtype=bool)
  n_pairs = n_global * n_views - n_global
  per_pair = jnp.mean(cross, axis=0)
  return jnp.sum(jnp.where(same_view, 0.0, per_pair)) / n_pairs


def update_centre(centre: jax.Array, teacher_outputs: jax.Array,
                  momentum: float = 0.9) -> jax.Array:
  """C <- m C + (1 - m) mean of raw teacher outputs over the global batch and its global crops.

  Under jit the mean of a batch-sharded array is over the global batch, i.e. over all devices.
  """
  batch_mean = jnp.mean(teacher_outputs.astype(jnp.float32).reshape(-1, centre.shape[-1]), axis=0)
  return momentum * centre + (1.0 - momentum) * batch_mean


def teacher_temperature(step: jax.Array | int, steps_per_epoch: int, warmup_temp: float,
                        final_temp: float, warmup_epochs: int) -> jax.Array:
  """DINO's per-epoch schedule: linspace(warmup, final, warmup_epochs) then constant final."""
  epoch = jnp.asarray(step) // max(steps_per_epoch, 1)
  if warmup_epochs <= 0:
    return jnp.asarray(final_temp, jnp.float32) + 0.0 * epoch
  if warmup_epochs == 1:
    ramp = jnp.asarray(warmup_temp, jnp.float32)
  else:
    ramp = warmup_temp + (final_temp - warmup_temp) * epoch / (warmup_epochs - 1)
  return jnp.where(epoch < warmup_epochs, ramp, final_temp).astype(jnp.float32)


def entropy(probabilities: jax.Array) -> jax.Array:
  """Mean over rows of -sum p log p (nats); collapse shows as 0 or as log(K)."""
  p = probabilities.astype(jnp.float32)
  return -jnp.mean(jnp.sum(p * jnp.log(jnp.clip(p, 1e-12)), axis=-1))
