"""The evaluations a DINO, CLIP or BioCLIP user expects, on plain feature arrays.

- weighted kNN exactly as DINO's eval_knn: cosine similarity of L2-normalised features, the k most
  similar training images, weights exp(similarity / T), one vote per neighbour for its class; chunked
  over the training set (memory O(test_chunk x train_chunk)) and split over the test rows on a mesh;
- a linear probe: multinomial logistic regression fitted by L-BFGS (optax), its strength given as
  scikit-learn's C (loss summed over images plus ||W||^2 / (2C), bias unpenalised), chosen from a
  log-spaced sweep on a validation split carved from the training set, then refitted on all of it
  (as DINOv2's log_regression does);
- a class-centroid classifier (SimpleShot's CL2N: centre, L2-normalise, nearest class mean) and a
  few-shot protocol (N images per class, several seeds) for both;
- percentile bootstrap intervals of an accuracy and of the difference between two methods scored
  on the same images (paired).

Ties are broken towards the lower index everywhere (training image among equally similar ones,
class among equal scores), so that a result never depends on chunk sizes or the device count.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

DINO_KS = (10, 20, 100, 200)
DINO_TEMPERATURE = 0.07
# DINOv2's log_regression searches C over 10**linspace(-6, 5, 45); half-decade steps over the
# same range cost half the fits and, warm-started, find the same plateau on normalised features.
DEFAULT_C_GRID = tuple(float(c) for c in np.logspace(-6, 5, 23))
TOP_RANKS = 5  # top-5 accuracy: the 5 best-scored classes (fewer when there are fewer classes)


def l2_normalise(features: np.ndarray, eps: float = 1e-12) -> np.ndarray:
  """[N, D] -> [N, D] float32 rows of unit norm (zero rows stay zero)."""
  features = np.asarray(features, np.float32)
  if features.ndim != 2:
    raise ValueError(f"features must be [N, D], got shape {features.shape}")
  return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), eps)


def _check_labels(labels: np.ndarray, rows: int, num_classes: int, what: str) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.shape != (rows,):
    raise ValueError(f"{what} labels must be [{rows}] (one per feature row), got shape {labels.shape}")
  if rows and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"{what} labels must lie in [0, {num_classes}), found "
                     f"{labels.min()}..{labels.max()}")
  return labels.astype(np.int32)


def topk_correct(ranked: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
  """ranked [N, R] classes best first, labels [N] -> [N] bool: the label is among the first k."""
  return np.any(np.asarray(ranked)[:, :k] == np.asarray(labels)[:, None], axis=1)


# ----------------------------------------------------------------------------------------------
# Weighted kNN (DINO's eval_knn)
# ----------------------------------------------------------------------------------------------

def _knn_chunk_function(train_rows: int, train_chunk: int, k_max: int, ks: Sequence[int],
                        num_classes: int, temperature: float):
  """(test [B, D], train [T, chunk, D], train labels [T * chunk]) -> ranked classes
  [len(ks), B, min(5, C)]. The k_max most similar training rows are merged chunk by chunk: the
  running best come first in each merge, so on equal similarity the earlier (lower) index wins,
  as in one top-k over the whole training set."""
  import jax
  import jax.numpy as jnp
  ranks = min(TOP_RANKS, num_classes)
  chunk_k = min(k_max, train_chunk)

  def run(test, train, train_labels):
    rows = test.shape[0]

    def merge(best, chunk_and_offset):
      best_similarity, best_index = best
      chunk, offset = chunk_and_offset
      # HIGHEST: neighbour ranks hinge on the last bits of a similarity; bf16 passes would reorder them
      similarity = jnp.matmul(test, chunk.T, precision=jax.lax.Precision.HIGHEST)
      index = offset + jnp.arange(train_chunk, dtype=jnp.int32)
      similarity = jnp.where(index[None, :] < train_rows, similarity, -jnp.inf)  # padding rows
      chunk_similarity, chunk_position = jax.lax.top_k(similarity, chunk_k)
      merged_similarity = jnp.concatenate([best_similarity, chunk_similarity], axis=1)
      merged_index = jnp.concatenate([best_index, index[chunk_position]], axis=1)
      best_similarity, position = jax.lax.top_k(merged_similarity, k_max)
      return (best_similarity, jnp.take_along_axis(merged_index, position, axis=1)), None

    start = (jnp.full((rows, k_max), -jnp.inf, test.dtype), jnp.zeros((rows, k_max), jnp.int32))
    offsets = jnp.arange(train.shape[0], dtype=jnp.int32) * train_chunk
    (similarity, index), _ = jax.lax.scan(merge, start, (train, offsets))
    neighbour_labels = train_labels[index]                       # [B, k_max]
    weights = jnp.exp(similarity / temperature)                  # [B, k_max]
    row = jnp.arange(rows)[:, None]
    ranked = []
    for k in ks:  # the first k of the k_max sorted neighbours are the k nearest
      votes = jnp.where(jnp.arange(k_max)[None, :] < k, weights, 0.0)
      scores = jnp.zeros((rows, num_classes), weights.dtype).at[row, neighbour_labels].add(votes)
      ranked.append(jax.lax.top_k(scores, ranks)[1])
    return jnp.stack(ranked)

  return run


@functools.lru_cache(maxsize=16)
def _compiled_knn(train_rows: int, train_chunk: int, k_max: int, ks: tuple[int, ...],
                  num_classes: int, temperature: float, mesh):
  """The jitted chunk function, kept: a second evaluation with the same sizes compiles nothing.

  shard_map: each device ranks its own test rows against the whole (replicated) training set, with
  no collective at all; left to sharding propagation, XLA gathered rows around the top-k merges."""
  import jax
  from jax.sharding import PartitionSpec
  local = jax.shard_map(
      _knn_chunk_function(train_rows, train_chunk, k_max, ks, num_classes, temperature), mesh=mesh,
      in_specs=(PartitionSpec("data"), PartitionSpec(), PartitionSpec()),
      out_specs=PartitionSpec(None, "data"), check_vma=False)  # purely local: nothing to check
  return jax.jit(local)


def knn_predict(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                num_classes: int, ks: Sequence[int] = DINO_KS,
                temperature: float = DINO_TEMPERATURE, train_chunk: int = 4096,
                test_chunk: int = 256, mesh=None) -> dict[int, np.ndarray]:
  """DINO's weighted kNN: {k: [N_test, min(5, C)] classes ranked by their votes}.

  train_features [N, D], train_labels [N] in [0, num_classes), test_features [M, D]. Features are
  L2-normalised here. Each test chunk is split over the mesh's "data" axis (all devices by default);
  the training set is replicated and scanned in chunks of `train_chunk` rows.
  """
  import jax
  from jax.sharding import NamedSharding, PartitionSpec

  from agriclip_jax.features import data_mesh, round_batch_size
  train = l2_normalise(train_features)
  test = l2_normalise(test_features)
  labels = _check_labels(train_labels, train.shape[0], num_classes, "training")
  if test.shape[1] != train.shape[1]:
    raise ValueError(f"test features have width {test.shape[1]} but training features "
                     f"{train.shape[1]}")
  ks = tuple(int(k) for k in ks)
  bad = [k for k in ks if not 1 <= k <= train.shape[0]]
  if bad:
    raise ValueError(f"k {bad} must lie in [1, {train.shape[0]}] (the number of training images)")
  if temperature <= 0:
    raise ValueError(f"temperature must be positive, got {temperature}")
  if train_chunk < 1 or test_chunk < 1:
    raise ValueError(f"chunk sizes must be positive, got train {train_chunk}, test {test_chunk}")
  mesh = mesh if mesh is not None else data_mesh()
  rows_per_chunk = round_batch_size(min(test_chunk, max(1, test.shape[0])), mesh)
  train_chunk = min(train_chunk, train.shape[0])
  chunks = -(-train.shape[0] // train_chunk)
  padded = np.zeros((chunks * train_chunk, train.shape[1]), np.float32)
  padded[:train.shape[0]] = train
  padded_labels = np.zeros(chunks * train_chunk, np.int32)
  padded_labels[:train.shape[0]] = labels

  replicated = NamedSharding(mesh, PartitionSpec())
  split = NamedSharding(mesh, PartitionSpec("data"))
  run = _compiled_knn(train.shape[0], train_chunk, max(ks), ks, num_classes, float(temperature),
                      mesh)
  train_on_devices = jax.device_put(padded.reshape(chunks, train_chunk, -1), replicated)
  labels_on_devices = jax.device_put(padded_labels, replicated)
  ranked = []
  for start in range(0, test.shape[0], rows_per_chunk):
    block = test[start:start + rows_per_chunk]
    rows = block.shape[0]
    if rows < rows_per_chunk:  # zero rows keep one compiled shape; their results are dropped
      block = np.concatenate([block, np.zeros((rows_per_chunk - rows, block.shape[1]), np.float32)])
    out = run(jax.device_put(block, split), train_on_devices, labels_on_devices)
    ranked.append(np.asarray(jax.device_get(out))[:, :rows])
  ranked = (np.concatenate(ranked, axis=1) if ranked
            else np.zeros((len(ks), 0, min(TOP_RANKS, num_classes)), np.int32))
  return {k: ranked[i] for i, k in enumerate(ks)}


# ----------------------------------------------------------------------------------------------
# Linear probe: multinomial logistic regression
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LogisticProbe:
  weights: np.ndarray  # [C, D]
  bias: np.ndarray     # [C], centred (a softmax does not change when every bias moves together)
  C: float             # scikit-learn's C: sum of losses + ||W||^2 / (2C)
  iterations: int
  gradient_norm: float  # of the per-image objective at the solution

  def scores(self, features: np.ndarray) -> np.ndarray:
    """[N, D] -> logits [N, C]."""
    return np.asarray(features, np.float32) @ self.weights.T + self.bias

  def ranked(self, features: np.ndarray) -> np.ndarray:
    """[N, D] -> [N, min(5, C)] classes best first (lower class on equal logits)."""
    return np.argsort(-self.scores(features), axis=1, kind="stable")[:, :TOP_RANKS]


@functools.cache
def _lbfgs_solver():
  """A jitted (features [N, D], labels [N], row weights [N], penalty, weights [C, D], bias [C], tol,
  max_iter) -> (weights, bias, iterations, gradient norm): one compilation per shape, whatever C is."""
  import jax
  import jax.numpy as jnp
  import optax

  def solve(features, labels, row_weights, penalty, weights, bias, tol, max_iter):
    def objective(params):
      # per image (row weights 1/N, 0 for padding): the same minimiser as scikit-learn's sum,
      # with gradients of order one in fp32
      logits = jnp.matmul(features, params["weights"].T, precision=jax.lax.Precision.HIGHEST)
      log_probs = jax.nn.log_softmax(logits + params["bias"], axis=1)
      loss = -jnp.sum(row_weights * jnp.take_along_axis(log_probs, labels[:, None], axis=1)[:, 0])
      return loss + penalty * jnp.sum(params["weights"] ** 2)

    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry):
      params, state = carry
      value, grad = value_and_grad(params, state=state)
      updates, state = solver.update(grad, state, params, value=value, grad=grad,
                                     value_fn=objective)
      return optax.apply_updates(params, updates), state

    def unfinished(carry):
      _, state = carry
      count = optax.tree_utils.tree_get(state, "count")
      grad_norm = optax.tree_utils.tree_norm(optax.tree_utils.tree_get(state, "grad"))
      return (count == 0) | ((count < max_iter) & (grad_norm >= tol))

    params = {"weights": weights, "bias": bias}
    params, state = jax.lax.while_loop(unfinished, step, (params, solver.init(params)))
    grad_norm = optax.tree_utils.tree_norm(jax.grad(objective)(params))
    return params["weights"], params["bias"], optax.tree_utils.tree_get(state, "count"), grad_norm

  return jax.jit(solve)


def fit_logistic_probe(features: np.ndarray, labels: np.ndarray, C: float,
                       num_classes: int | None = None, max_iter: int = 1000, tol: float = 1e-6,
                       init: LogisticProbe | None = None) -> LogisticProbe:
  """Multinomial logistic regression with a bias on `features` [N, D] as given (callers normalise):
  minimises sum_i -log softmax(W x_i + b)[y_i] + ||W||^2 / (2C), scikit-learn's objective.

  With two classes scikit-learn fits one logit w with penalty ||w||^2 / (2C); the two-row softmax
  here equals it (w = W[1] - W[0]) when its penalty is doubled, so C means the same for any number
  of classes. `init` warm-starts from another fit (a sweep over C)."""
  features = np.asarray(features, np.float32)
  if features.ndim != 2 or features.shape[0] == 0:
    raise ValueError(f"probe features must be a non-empty [N, D], got shape {features.shape}")
  num_classes = int(num_classes if num_classes is not None else np.max(labels) + 1)
  labels = _check_labels(labels, features.shape[0], num_classes, "probe")
  if num_classes < 2:
    raise ValueError(f"a probe needs at least 2 classes, got {num_classes}")
  if not C > 0:
    raise ValueError(f"C must be positive, got {C}")
  penalty = (2.0 if num_classes == 2 else 1.0) / (2.0 * C * features.shape[0])
  if init is not None:
    weights, bias = init.weights, init.bias
  else:
    weights = np.zeros((num_classes, features.shape[1]), np.float32)
    bias = np.zeros(num_classes, np.float32)
  # Rows padded to a power of two (weight 0): a sweep, its refit and every few-shot draw then
  # share one compiled solver instead of compiling one per row count.
  rows = features.shape[0]
  bucket = max(64, 1 << (rows - 1).bit_length())
  padded = np.zeros((bucket, features.shape[1]), np.float32)
  padded[:rows] = features
  padded_labels = np.zeros(bucket, np.int32)
  padded_labels[:rows] = labels
  row_weights = np.zeros(bucket, np.float32)
  row_weights[:rows] = 1.0 / rows
  weights, bias, count, grad_norm = _lbfgs_solver()(
      padded, padded_labels, row_weights, np.float32(penalty), np.asarray(weights, np.float32),
      np.asarray(bias, np.float32), np.float32(tol), np.int32(max_iter))
  bias = np.asarray(bias, np.float32)
  return LogisticProbe(np.asarray(weights, np.float32), bias - bias.mean(), float(C), int(count),
                       float(grad_norm))


def validation_split(labels: np.ndarray, fraction: float = 0.2, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
  """(fit indices, validation indices), stratified: each class gives round(fraction * n) of its n
  images (at least one, and never its last one) to validation. Seeded."""
  labels = np.asarray(labels)
  if not 0 < fraction < 1:
    raise ValueError(f"validation fraction must lie in (0, 1), got {fraction}")
  rng = np.random.default_rng(seed)
  fit, held = [], []
  for label in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == label))
    count = min(len(members) - 1, max(1, round(fraction * len(members))))
    held.append(members[:count])
    fit.append(members[count:])
  return np.sort(np.concatenate(fit)), np.sort(np.concatenate(held))


def sweep_probe(features: np.ndarray, labels: np.ndarray, num_classes: int,
                Cs: Sequence[float] = DEFAULT_C_GRID, val_features: np.ndarray | None = None,
                val_labels: np.ndarray | None = None, val_fraction: float = 0.2, seed: int = 0,
                max_iter: int = 1000, tol: float = 1e-6
                ) -> tuple[LogisticProbe, dict[str, Any]]:
  """The probe whose C scores best on validation images, refitted on all of `features` [N, D].

  Features are L2-normalised here. Validation images are `val_features` / `val_labels` when given,
  else a stratified split of `val_fraction` of the training set (`validation_split` by `seed`),
  which the sweep's fits then leave out. C values are fitted in
  increasing order, each warm-started from the last; on equal validation accuracy the smaller C
  (the stronger penalty) wins. Returns (probe, {"C": [...], "validation_top1": [...],
  "validation_images": n, "best_C": c})."""
  features = l2_normalise(features)
  labels = _check_labels(labels, features.shape[0], num_classes, "probe")
  Cs = sorted(float(c) for c in Cs)
  if not Cs:
    raise ValueError("the C sweep needs at least one value")
  if val_features is None:
    fit_rows, val_rows = validation_split(labels, val_fraction, seed)
    fit_features, fit_labels = features[fit_rows], labels[fit_rows]
    val_features, val_labels = features[val_rows], labels[val_rows]
  else:
    fit_features, fit_labels = features, labels
    val_features = l2_normalise(val_features)
    val_labels = _check_labels(val_labels, val_features.shape[0], num_classes, "validation")
  scores, probe = [], None
  if len(Cs) > 1 and len(val_labels):
    for C in Cs:
      probe = fit_logistic_probe(fit_features, fit_labels, C, num_classes, max_iter, tol, probe)
      scores.append(float(np.mean(probe.ranked(val_features)[:, 0] == val_labels)))
    best = Cs[int(np.argmax(scores))]  # argmax: the first, i.e. smallest, C of the best
  elif len(Cs) == 1:
    best = Cs[0]
  else:
    raise ValueError("the C sweep needs validation images; every class has a single training image")
  final = fit_logistic_probe(features, labels, best, num_classes, max_iter, tol)
  return final, {"C": Cs, "validation_top1": scores, "validation_images": int(len(val_labels)),
                 "best_C": best}


# ----------------------------------------------------------------------------------------------
# Class centroids (SimpleShot, CL2N) and few-shot
# ----------------------------------------------------------------------------------------------

def centroid_predict(support_features: np.ndarray, support_labels: np.ndarray,
                     query_features: np.ndarray, num_classes: int) -> np.ndarray:
  """SimpleShot's CL2N nearest mean: subtract the support mean, L2-normalise, assign each query
  [M, D] to the class whose mean normalised support feature is nearest (Euclidean). -> [M] int."""
  support = np.asarray(support_features, np.float32)
  labels = _check_labels(support_labels, support.shape[0], num_classes, "support")
  missing = sorted(set(range(num_classes)) - set(labels.tolist()))
  if missing:
    raise ValueError(f"classes {missing} have no support images")
  centre = support.mean(axis=0)
  support = l2_normalise(support - centre)
  query = l2_normalise(np.asarray(query_features, np.float32) - centre)
  centroids = np.stack([support[labels == c].mean(axis=0) for c in range(num_classes)])
  distances = ((query[:, None, :] - centroids[None, :, :]) ** 2).sum(axis=2)  # [M, C]
  return np.argmin(distances, axis=1)


def draw_shots(labels: np.ndarray, shots: int, seed: int, num_classes: int) -> np.ndarray:
  """Indices of `shots` images of every class, drawn without replacement by `seed`; sorted."""
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  chosen = []
  for label in range(num_classes):
    members = np.flatnonzero(labels == label)
    if len(members) < shots:
      raise ValueError(f"{shots}-shot needs {shots} training images of class {label}, it has "
                       f"{len(members)}")
    chosen.append(rng.choice(members, shots, replace=False))
  return np.sort(np.concatenate(chosen))


def _mean_std(values: Sequence[float]) -> dict[str, Any]:
  values = [float(v) for v in values]
  return {"mean": float(np.mean(values)),
          "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,  # sample std over seeds
          "runs": values}


def fewshot(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
            test_labels: np.ndarray, num_classes: int, shots: Sequence[int], seeds: int = 5,
            Cs: Sequence[float] = DEFAULT_C_GRID, max_iter: int = 1000) -> dict[str, Any]:
  """{N: {"probe": {"mean", "std", "runs", "C"}, "centroid": {"mean", "std", "runs"}, "seeds",
  "test_images"}} for every N in `shots`: seed s draws N training images per class
  (`draw_shots(labels, N, s)`), both classifiers fit on them and are scored on all test images.
  The probe's C is chosen on up to N other training images per class (never a shot, never a test
  image), so choosing it sees no more labelled images than the fit."""
  train_labels = _check_labels(train_labels, len(train_features), num_classes, "training")
  test_labels = _check_labels(test_labels, len(test_features), num_classes, "test")
  results: dict[str, Any] = {}
  for n in shots:
    probe_runs, centroid_runs, chosen_C = [], [], []
    for seed in range(seeds):
      support = draw_shots(train_labels, n, seed, num_classes)
      rest = np.setdiff1d(np.arange(len(train_labels)), support)
      rng = np.random.default_rng(seed + 1_000_003)  # apart from the shots' stream
      held = np.sort(np.concatenate([
          rng.permutation(rest[train_labels[rest] == c])[:n] for c in range(num_classes)]))
      if len(Cs) > 1 and len(held) == 0:
        raise ValueError(f"{n}-shot: no training images outside the shots to choose C on; "
                         "give a single C")
      probe, sweep = sweep_probe(train_features[support], train_labels[support], num_classes, Cs,
                                 val_features=train_features[held],
                                 val_labels=train_labels[held], max_iter=max_iter)
      probe_runs.append(np.mean(probe.ranked(l2_normalise(test_features))[:, 0] == test_labels))
      chosen_C.append(sweep["best_C"])
      predicted = centroid_predict(train_features[support], train_labels[support], test_features,
                                   num_classes)
      centroid_runs.append(np.mean(predicted == test_labels))
    results[str(n)] = {"probe": {**_mean_std(probe_runs), "C": chosen_C},
                       "centroid": _mean_std(centroid_runs), "seeds": int(seeds),
                       "test_images": int(len(test_labels))}
  return results


# ----------------------------------------------------------------------------------------------
# Bootstrap intervals
# ----------------------------------------------------------------------------------------------

def _resampled_means(columns: np.ndarray, resamples: int, seed: int) -> np.ndarray:
  """columns [n, m] -> [resamples, m] column means of `resamples` draws of n rows with replacement.
  Drawn in blocks of whole resamples (memory O(block x n)); numpy's Generator yields the same
  indices as one rng.integers(0, n, (resamples, n)) call."""
  rows = columns.shape[0]
  rng = np.random.default_rng(seed)
  block = max(1, 4_000_000 // rows)
  means = []
  for start in range(0, resamples, block):
    index = rng.integers(0, rows, size=(min(block, resamples - start), rows))
    means.append(columns[index].mean(axis=1))
  return np.concatenate(means)


def _check_correct(correct, name: str = "correct") -> np.ndarray:
  array = np.asarray(correct)
  if array.ndim != 1 or array.size == 0:
    raise ValueError(f"{name} must be a non-empty 1-D array of per-image results, got shape "
                     f"{array.shape}")
  if not np.isin(array, (0, 1)).all():
    raise ValueError(f"{name} must hold booleans (or 0/1) per image")
  return array.astype(np.float64)


def _check_bootstrap(resamples: int, level: float) -> None:
  if resamples < 1:
    raise ValueError(f"resamples must be at least 1, got {resamples}")
  if not 0 < level < 1:
    raise ValueError(f"confidence level must lie in (0, 1), got {level}")


def bootstrap_interval(correct, resamples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> dict[str, Any]:
  """Percentile bootstrap interval of an accuracy from per-image correctness [N] bool:
  {"accuracy", "low", "high", "images", "resamples", "seed", "level"}."""
  _check_bootstrap(resamples, level)
  values = _check_correct(correct)
  means = _resampled_means(values[:, None], resamples, seed)[:, 0]
  low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
  return {"accuracy": float(values.mean()), "low": float(low), "high": float(high),
          "images": int(values.size), "resamples": int(resamples), "seed": int(seed),
          "level": float(level)}


def paired_bootstrap_difference(correct_a, correct_b, resamples: int = 1000, seed: int = 0,
                                level: float = 0.95) -> dict[str, Any]:
  """Interval of accuracy(a) - accuracy(b) for two methods scored on the same N images: every
  resample draws the same images for both, so what the images share cancels.
  {"difference", "low", "high", "images", "resamples", "seed", "level"}."""
  _check_bootstrap(resamples, level)
  a = _check_correct(correct_a, "correct_a")
  b = _check_correct(correct_b, "correct_b")
  if a.shape != b.shape:
    raise ValueError(f"paired results must cover the same images: {a.size} and {b.size} given")
  means = _resampled_means(np.stack([a, b], axis=1), resamples, seed)
  low, high = np.quantile(means[:, 0] - means[:, 1], [(1 - level) / 2, (1 + level) / 2])
  return {"difference": float(a.mean() - b.mean()), "low": float(low), "high": float(high),
          "images": int(a.size), "resamples": int(resamples), "seed": int(seed),
          "level": float(level)}
