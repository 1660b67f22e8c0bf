"""The train step: one pure function `step(state, batch) -> (state, metrics)` per task kind.

contrastive: CLIP towers, InfoNCE (dense or sharded local loss) or sigmoid (dense or ring-chunked).
dino:        student on all crops, EMA teacher on the global crops, centring and sharpening.
joint:       both models from the same batch, in the same step (one pass over the data).

The step is jitted once with explicit shardings and the state donated (`jit_train_step`).

Gradient accumulation splits the global batch into `accumulate_steps` micro-batches (strided, so
every device keeps its own rows). The contrastive loss stays that of the whole global batch, with
all its negatives (GradCache; open_clip's --accum-freq): a first pass embeds every micro-batch
without keeping activations, the loss and its gradient with respect to the embeddings are taken
on the whole batch, and a second pass recomputes each micro-batch's towers (same dropout and
drop-path draws) and back-propagates its slice of that gradient. Peak activation memory is then
one micro-batch's, for one more forward pass of the towers. DINO's loss is a mean over images
with the step's centre and teacher, so averaging it over micro-batches is already exact; only
BatchNorm (ResNet students and teachers) sees micro-batch statistics, its running statistics
updated once per micro-batch.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from agriclip_jax import losses
from agriclip_jax.models.clip import CLIP
from agriclip_jax.models.dino import DINO
from agriclip_jax.train.sharding import ACTIVATION_RULES, BATCH_AXES, batch_sharding, replicated
from agriclip_jax.train.state import TrainTask

State = dict[str, Any]
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

REQUIRED_KEYS = {"contrastive": ("images", "tokens"), "dino": ("global_crops", "local_crops"),
                 "joint": ("images", "tokens", "global_crops", "local_crops")}


# ----------------------------------------------------------------------------------------------
# Losses of each part
# ----------------------------------------------------------------------------------------------

def _contrastive_loss(task: TrainTask, mesh: Mesh | None, images: jax.Array, texts: jax.Array,
                      scale: jax.Array, bias: jax.Array | None) -> jax.Array:
  """The contrastive loss of L2-normalised embeddings [B, D] (dense, or sharded on the mesh)."""
  use_sharded = task.sharded_loss and mesh is not None and mesh.size > 1
  if task.contrastive_loss == "sigmoid":
    if bias is None:
      raise ValueError("clip.loss='sigmoid' needs a model with a logit bias (clip.init_logit_bias)")
    return (losses.sigmoid_loss_chunked(images, texts, scale, bias, mesh) if use_sharded
            else losses.sigmoid_loss(images, texts, scale, bias))
  return (losses.infonce_loss_sharded(images, texts, scale, mesh) if use_sharded
          else losses.infonce_loss(images, texts, scale))


def _clip_embeddings(task: TrainTask, params: Any, batch: Batch, rng: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
  """L2-normalised (image, text) embeddings of a batch in training mode."""
  out = task.clip_model.apply({"params": params}, batch["images"], batch["tokens"], train=True,
                              rngs={"dropout": rng})
  return out["image_embeddings"], out["text_embeddings"]


def _logit_parameters(task: TrainTask, params: Any) -> tuple[jax.Array, jax.Array | None]:
  return task.clip_model.apply({"params": params}, method=CLIP.logit_parameters)


def _contrastive(task: TrainTask, mesh: Mesh | None, params: Any, batch: Batch,
                 rng: jax.Array) -> tuple[jax.Array, Metrics]:
  images, texts = _clip_embeddings(task, params, batch, rng)
  scale, bias = _logit_parameters(task, params)
  loss = _contrastive_loss(task, mesh, images, texts, scale, bias)
  return loss, {"contrastive_loss": loss, "logit_scale": scale}


def _apply_multi_crop(model: DINO, params: Any, batch_stats: Any, global_crops: jax.Array,
                      local_crops: jax.Array | None, train: bool, rng: jax.Array | None
                      ) -> tuple[jax.Array, Any]:
  """(head outputs [B, V, K], updated batch_stats) -- batch_stats pass through without BatchNorm."""
  rngs = {"dropout": rng} if rng is not None else None
  if not model.config.has_batch_norm:
    out = model.apply({"params": params}, global_crops, local_crops, train=train, rngs=rngs,
                      method=DINO.multi_crop)
    return out, batch_stats
  # BatchNorm in train mode: statistics of the (global) batch, running statistics updated.
  out, updated = model.apply({"params": params, "batch_stats": batch_stats}, global_crops,
                             local_crops, train=True, rngs=rngs, mutable=["batch_stats"],
                             method=DINO.multi_crop)
  return out, updated["batch_stats"]


def _dino(task: TrainTask, params: Any, teacher: Any, centre: jax.Array, batch: Batch,
          rng: jax.Array, step: jax.Array, batch_stats: Any = None, teacher_batch_stats: Any = None
          ) -> tuple[jax.Array, Metrics, jax.Array, tuple[Any, Any]]:
  """Loss, metrics, batch mean of the teacher outputs, (student, teacher) updated batch_stats.

  A ResNet teacher runs in train mode, as DINO's does (see train/state.py): batch statistics and
  its own running statistics. A ViT teacher runs without drop-path (DINO builds it without).
  """
  settings = task.dino
  model = task.dino_model
  teacher_out, teacher_batch_stats = _apply_multi_crop(
      model, teacher, teacher_batch_stats, batch["global_crops"], None, train=False, rng=None)
  teacher_out = jax.lax.stop_gradient(teacher_out)
  teacher_batch_stats = jax.lax.stop_gradient(teacher_batch_stats)
  student_out, batch_stats = _apply_multi_crop(
      model, params, batch_stats, batch["global_crops"], batch["local_crops"], train=True, rng=rng)
  batch_stats = jax.lax.stop_gradient(batch_stats)
  temp = losses.teacher_temperature(step, settings.steps_per_epoch, settings.warmup_teacher_temp,
                                    settings.teacher_temp, settings.warmup_teacher_temp_epochs)
  loss = losses.dino_loss(student_out, teacher_out, centre, temp, settings.student_temp)
  teacher_probs = jax.nn.softmax((teacher_out.astype(jnp.float32) - centre) / temp, axis=-1)
  metrics = {"dino_loss": loss, "teacher_temp": temp,
             # Collapse shows as per-sample entropy -> log(K) (uniform) or marginal -> 0 (one-hot).
             "teacher_entropy": losses.entropy(teacher_probs.reshape(-1, teacher_probs.shape[-1])),
             "teacher_marginal_entropy": losses.entropy(
                 jnp.mean(teacher_probs.reshape(-1, teacher_probs.shape[-1]), axis=0)[None])}
  teacher_mean = jnp.mean(teacher_out.astype(jnp.float32).reshape(-1, centre.shape[-1]), axis=0)
  return loss, metrics, teacher_mean, (batch_stats, teacher_batch_stats)


def _stats(state: State) -> dict[str, Any]:
  """The BatchNorm running statistics of a state ({} each for models without BatchNorm)."""
  return {"batch_stats": state.get("batch_stats", {}),
          "teacher_batch_stats": state.get("teacher_batch_stats", {})}


def _dino_part(task: TrainTask, params: Any, state: State, stats: dict[str, Any], batch: Batch,
               rng: jax.Array) -> tuple[jax.Array, Metrics, jax.Array, dict[str, Any]]:
  """DINO's loss, metrics and teacher mean on `batch`, and the BatchNorm statistics after it."""
  has_bn = task.dino_model.config.has_batch_norm
  loss, parts, teacher_mean, (student_bs, teacher_bs) = _dino(
      task, params, state["teacher"]["dino"], state["centre"], batch, rng, state["step"],
      stats["batch_stats"].get("dino") if has_bn else None,
      stats["teacher_batch_stats"].get("dino") if has_bn else None)
  if has_bn:
    stats = {"batch_stats": {**stats["batch_stats"], "dino": student_bs},
             "teacher_batch_stats": {**stats["teacher_batch_stats"], "dino": teacher_bs}}
  return loss, parts, teacher_mean, stats


def _loss_fn(task: TrainTask, mesh: Mesh | None):
  """loss_fn(params, state, batch, rng) -> (loss, (metrics, teacher_mean, updated statistics))."""
  def loss_fn(params, state: State, batch: Batch, rng: jax.Array):
    total = jnp.zeros([], jnp.float32)
    metrics: Metrics = {}
    teacher_mean = jnp.zeros_like(state["centre"])
    stats = _stats(state)
    clip_rng, dino_rng = jax.random.split(rng)
    if task.clip_model is not None:
      loss, parts = _contrastive(task, mesh, params["clip"], batch, clip_rng)
      total, metrics = total + loss, {**metrics, **parts}
    if task.dino_model is not None:
      loss, parts, teacher_mean, stats = _dino_part(task, params["dino"], state, stats, batch,
                                                    dino_rng)
      total, metrics = total + loss, {**metrics, **parts}
    return total, (metrics, teacher_mean, stats)
  return loss_fn


def _micro_batches(batch: Batch, k: int, mesh: Mesh | None) -> Batch:
  """[B, ...] -> [k, B/k, ...] taking every k-th row, so each device's rows stay on it."""
  def split(x):
    y = jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
    if mesh is not None:
      y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, P(None, BATCH_AXES)))
    return y
  return jax.tree.map(split, batch)


def _whole_batch(micro: jax.Array, mesh: Mesh | None) -> jax.Array:
  """[k, B/k, ...] -> [B, ...], the inverse of `_micro_batches`: rows back in batch order."""
  x = jnp.swapaxes(micro, 0, 1).reshape((-1,) + micro.shape[2:])
  if mesh is not None:
    x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(BATCH_AXES)))
  return x


def _micro_rngs(rng: jax.Array, index: jax.Array) -> jax.Array:
  """(clip, dino) keys of micro-batch `index`: both passes of the exact accumulation draw these."""
  return jax.random.split(jax.random.fold_in(rng, index))


def _mean_over_micro_batches(task: TrainTask, mesh: Mesh | None, state: State, batch: Batch,
                             rng: jax.Array):
  """Accumulation for DINO alone: means of losses and gradients over the micro-batches.

  BatchNorm running statistics are not averaged: each micro-batch updates them in turn, as
  consecutive forward passes would.
  """
  grad_fn = jax.value_and_grad(_loss_fn(task, mesh), has_aux=True)
  k = task.accumulate_steps

  def body(carry, micro):
    summed, stats = carry
    index, micro_batch = micro
    (loss, (metrics, teacher_mean, stats)), grads = grad_fn(
        state["params"], dict(state, **stats), micro_batch, jax.random.fold_in(rng, index))
    summed = jax.tree.map(jnp.add, summed, (loss, metrics, teacher_mean, grads))
    return (summed, stats), None

  zeros = jax.eval_shape(lambda: grad_fn(state["params"], state,
                                         jax.tree.map(lambda x: x[0], _micro_batches(batch, k, None)),
                                         rng))
  (_, (m0, t0, _)), g0 = zeros
  init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                      (jax.ShapeDtypeStruct((), jnp.float32), m0, t0, g0))
  (total, stats), _ = jax.lax.scan(body, (init, _stats(state)),
                                   (jnp.arange(k), _micro_batches(batch, k, mesh)))
  loss, metrics, teacher_mean, grads = jax.tree.map(lambda x: x / k, total)
  return loss, metrics, teacher_mean, grads, stats


def _exact_contrastive_accumulation(task: TrainTask, mesh: Mesh | None, state: State,
                                    batch: Batch, rng: jax.Array):
  """Accumulation with the whole batch's contrastive loss (GradCache); DINO, when the task has
  it, as `_mean_over_micro_batches` does. Same returns as `_grads_and_metrics`."""
  k = task.accumulate_steps
  params = state["params"]
  micro = _micro_batches(batch, k, mesh)
  indices = jnp.arange(k)

  # Pass 1: every micro-batch's embeddings. Nothing is differentiated, so no activations are kept.
  def embed(carry, xs):
    index, micro_batch = xs
    return carry, _clip_embeddings(task, params["clip"], micro_batch, _micro_rngs(rng, index)[0])

  _, (images, texts) = jax.lax.scan(embed, None, (indices, micro))
  images, texts = _whole_batch(images, mesh), _whole_batch(texts, mesh)

  # The whole batch's loss; its gradient w.r.t. the embeddings, and w.r.t. the logit parameters
  # (which enter the loss directly and not through the towers).
  def whole_batch_loss(images, texts, clip_params):
    scale, bias = _logit_parameters(task, clip_params)
    return _contrastive_loss(task, mesh, images, texts, scale, bias), scale

  (contrastive_loss, scale), (d_images, d_texts, logit_grads) = jax.value_and_grad(
      whole_batch_loss, argnums=(0, 1, 2), has_aux=True)(images, texts, params["clip"])
  d_images = _micro_batches({"x": d_images}, k, mesh)["x"]
  d_texts = _micro_batches({"x": d_texts}, k, mesh)["x"]

  # Pass 2: each micro-batch again, back-propagating its slice of the embedding gradient: the
  # gradient of <d_images, images(p)> + <d_texts, texts(p)> is exactly that vector-Jacobian
  # product. DINO's part adds the gradient of its micro-batch mean loss / k.
  def surrogate(p, stats, micro_batch, index, d_image, d_text):
    clip_rng, dino_rng = _micro_rngs(rng, index)
    image, text = _clip_embeddings(task, p["clip"], micro_batch, clip_rng)
    total = jnp.sum(image * d_image) + jnp.sum(text * d_text)
    if task.dino_model is None:
      return total, ({}, jnp.zeros_like(state["centre"]), stats, jnp.zeros([], jnp.float32))
    loss, parts, teacher_mean, stats = _dino_part(task, p["dino"], state, stats, micro_batch,
                                                  dino_rng)
    return total + loss / k, (parts, teacher_mean, stats, loss)

  grad_fn = jax.grad(surrogate, has_aux=True)

  def body(carry, xs):
    summed, stats = carry
    grads, (parts, teacher_mean, stats, dino_loss) = grad_fn(params, stats, *xs)
    summed = jax.tree.map(jnp.add, summed, (grads, parts, teacher_mean, dino_loss))
    return (summed, stats), None

  shapes = jax.eval_shape(grad_fn, params, _stats(state),
                          *jax.tree.map(lambda x: x[0], (micro, indices, d_images, d_texts)))
  grads0, (parts0, mean0, _, loss0) = shapes
  init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grads0, parts0, mean0, loss0))
  (summed, stats), _ = jax.lax.scan(body, (init, _stats(state)),
                                    (micro, indices, d_images, d_texts))
  grads, dino_parts, teacher_mean, dino_loss = summed
  grads = dict(grads, clip=jax.tree.map(jnp.add, grads["clip"], logit_grads))
  metrics = {"contrastive_loss": contrastive_loss, "logit_scale": scale,
             **jax.tree.map(lambda x: x / k, dino_parts)}
  return contrastive_loss + dino_loss / k, metrics, teacher_mean / k, grads, stats


def _grads_and_metrics(task: TrainTask, mesh: Mesh | None, state: State, batch: Batch,
                       rng: jax.Array):
  """(loss, metrics, teacher_mean, grads, updated BatchNorm statistics) of the global batch."""
  if task.accumulate_steps <= 1:
    grad_fn = jax.value_and_grad(_loss_fn(task, mesh), has_aux=True)
    (loss, (metrics, teacher_mean, stats)), grads = grad_fn(state["params"], state, batch, rng)
    return loss, metrics, teacher_mean, grads, stats
  if task.clip_model is not None:
    return _exact_contrastive_accumulation(task, mesh, state, batch, rng)
  return _mean_over_micro_batches(task, mesh, state, batch, rng)


# ----------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------

def _all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def make_train_step(task: TrainTask, mesh: Mesh | None = None
                    ) -> Callable[[State, Batch], tuple[State, Metrics]]:
  """The pure step function, to be jitted. `mesh` is needed for the sharded contrastive losses
  and binds the models' activation constraints (keep rows split; none without a mesh)."""

  def step_fn(state: State, batch: Batch) -> tuple[State, Metrics]:
    if mesh is None:
      return traced_step(state, batch)
    # The models' activation constraints (transformer.keep_batch_split) bind to this mesh.
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(ACTIVATION_RULES):
      return traced_step(state, batch)

  def traced_step(state: State, batch: Batch) -> tuple[State, Metrics]:
    missing = [k for k in REQUIRED_KEYS[task.kind] if k not in batch]
    if missing:
      raise ValueError(f"a {task.kind} batch needs keys {missing}; got {sorted(batch)}")
    step = state["step"]
    rng = jax.random.fold_in(state["rng"], step)
    loss, metrics, teacher_mean, grads, stats = _grads_and_metrics(task, mesh, state, batch, rng)

    params, opt_state = {}, {}
    for part in task.parts:
      updates, opt_state[part] = task.optimizers[part].update(
          grads[part], state["opt_state"][part], state["params"][part])
      params[part] = optax.apply_updates(state["params"][part], updates)
      metrics[f"lr_{part}"] = task.schedules[part]["lr"](step)
      metrics[f"grad_norm_{part}"] = optax.tree.norm(grads[part])
    if "clip" in params:
      # CLIP: exp(logit_scale) never exceeds 100.
      clip_params = dict(params["clip"])
      clip_params["logit_scale"] = jnp.minimum(clip_params["logit_scale"],
                                               losses.MAX_LOG_LOGIT_SCALE)
      params["clip"] = clip_params
    teacher, centre = state["teacher"], state["centre"]
    if task.dino_model is not None:
      momentum = task.dino.teacher_momentum(step)
      teacher = {"dino": jax.tree.map(lambda t, s: momentum * t + (1.0 - momentum) * s,
                                      teacher["dino"], params["dino"])}
      centre = (task.dino.centre_momentum * centre +
                (1.0 - task.dino.centre_momentum) * teacher_mean)
      metrics["teacher_momentum"] = momentum
      metrics["weight_decay_dino"] = task.schedules["dino"]["weight_decay"](step)

    # A non-finite loss or gradient leaves the state as it was (the loop skips or stops).
    finite = jnp.isfinite(loss) & _all_finite(grads)
    updated = dict(params=params, opt_state=opt_state, teacher=teacher, centre=centre,
                   **{k: v for k, v in stats.items() if k in state})
    kept = {k: state[k] for k in updated}
    chosen = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, kept)
    new_state = dict(state, **chosen, step=step + 1,
                     skipped=state["skipped"] + (~finite).astype(jnp.int32))
    metrics.update(loss=loss, nonfinite=(~finite).astype(jnp.int32), skipped=new_state["skipped"])
    return new_state, metrics

  return step_fn


# XLA options that cut CPU compile time about in half at some cost in run time (tiny test runs).
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def compiler_options(fast_compile: bool) -> dict[str, Any] | None:
  return dict(FAST_COMPILE_OPTIONS) if fast_compile else None


def jit_train_step(task: TrainTask, mesh: Mesh, state_shardings: Any, fast_compile: bool = False):
  """One jit for the whole run: state in/out on its shardings (donated), batch on the batch axes."""
  return jax.jit(make_train_step(task, mesh),
                 in_shardings=(state_shardings, batch_sharding(mesh)),
                 out_shardings=(state_shardings, replicated(mesh)),
                 donate_argnums=(0,), compiler_options=compiler_options(fast_compile))
