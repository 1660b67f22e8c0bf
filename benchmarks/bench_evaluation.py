"""kNN and linear probe (agriclip_jax.evaluation) against their peers, on the same features.

- kNN: `evaluation.knn_predict` (chunked over the training set, split over the test rows on the
  devices) vs the same formula densely in numpy (one similarity matrix, argpartition + sort of the
  k nearest) and vs DINO's own loop in PyTorch (mm + topk per chunk of 100 test images), in images/s
  of test images, and whether their top-1 predictions agree.
- probe: `evaluation.fit_logistic_probe` (L-BFGS in JAX, fp32) vs scikit-learn's
  LogisticRegression (lbfgs, float64) at the same C: fit seconds and the largest coefficient
  difference relative to the largest coefficient.

Features are class clusters on the unit sphere, sized like DINO ViT-S features of a small
agricultural data set; quick is smaller.

  python -m benchmarks.bench_evaluation [--quick]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def clusters(rows: int, classes: int, width: int, seed: int, spread: float = 2.0):
  rng = np.random.default_rng(seed)
  centres = np.random.default_rng(1234).normal(size=(classes, width))  # shared by both splits
  labels = rng.integers(0, classes, rows)
  features = centres[labels] + spread * rng.normal(size=(rows, width))
  return features.astype(np.float32), labels


def _best(fn, repeats: int):
  """(result, best wall seconds): a shared machine's load only ever adds time."""
  best = None
  for _ in range(repeats):
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    if best is None or seconds < best[1]:
      best = (result, seconds)
  return best


def dense_numpy_knn(train, train_labels, test, num_classes, ks, temperature=0.07):
  """{k: [M] top-1 classes} of DINO's weighted kNN, all test rows and every k in one pass: one
  similarity matrix, argpartition to the largest k, those sorted, a prefix per k."""
  train = train / np.linalg.norm(train, axis=1, keepdims=True)
  test = test / np.linalg.norm(test, axis=1, keepdims=True)
  similarity = test @ train.T
  k_max = max(ks)
  nearest = np.argpartition(-similarity, k_max - 1, axis=1)[:, :k_max]
  order = np.argsort(-np.take_along_axis(similarity, nearest, axis=1), axis=1, kind="stable")
  nearest = np.take_along_axis(nearest, order, axis=1)
  weights = np.exp(np.take_along_axis(similarity, nearest, axis=1) / temperature)
  rows = np.arange(len(test))[:, None]
  out = {}
  for k in ks:
    votes = np.zeros((len(test), num_classes), np.float32)
    np.add.at(votes, (rows, train_labels[nearest[:, :k]]), weights[:, :k])
    out[k] = np.argmax(votes, axis=1)
  return out


def torch_dino_knn(train, train_labels, test, num_classes, k, temperature=0.07, chunk=100):
  """[M] top-1 classes, DINO's eval_knn loop (torch.mm + topk per chunk of test images)."""
  import torch
  train = torch.nn.functional.normalize(torch.from_numpy(train), dim=1).T.contiguous()
  test = torch.nn.functional.normalize(torch.from_numpy(test), dim=1)
  labels = torch.from_numpy(train_labels)
  out = []
  for start in range(0, test.shape[0], chunk):
    similarity = test[start:start + chunk] @ train
    distances, indices = similarity.topk(k, largest=True, sorted=True)
    one_hot = torch.nn.functional.one_hot(labels[indices], num_classes).float()
    votes = (one_hot * (distances / temperature).exp()[:, :, None]).sum(1)
    out.append(votes.argmax(1))
  return torch.cat(out).numpy()


def bench_knn(quick: bool) -> None:
  import jax

  from agriclip_jax import evaluation
  train_rows, test_rows, width, classes = (4000, 512, 128, 20) if quick else (20000, 2000, 384, 50)
  train, train_labels = clusters(train_rows, classes, width, seed=0)
  test, _ = clusters(test_rows, classes, width, seed=1)
  ks = (10, 20, 100, 200)
  devices = f"{jax.devices()[0].platform} x{len(jax.devices())}"
  details = f"{train_rows} train x {test_rows} test, {width}-d, {classes} classes, k {ks}, {devices}"

  def ours():
    return evaluation.knn_predict(train, train_labels, test, classes, ks, train_chunk=4096,
                                  test_chunk=256)

  ours()  # compile once: a one-off cost, not the steady rate
  ranked, ours_s = _best(ours, 3)
  dense, dense_s = _best(lambda: dense_numpy_knn(train, train_labels, test, classes, ks), 2)
  agree = np.mean([np.mean(ranked[k][:, 0] == dense[k]) for k in ks])
  print(f"knn_chunked_images_per_second: {test_rows / ours_s:.0f} img/s ({details}; all 4 k in one "
        "pass)")
  print(f"knn_dense_numpy_images_per_second: {test_rows / dense_s:.0f} img/s (one similarity "
        "matrix, argpartition, every k in one pass)")
  print(f"knn_chunked_speedup_vs_dense_numpy: {dense_s / ours_s:.2f} x (top-1 agreement "
        f"{100 * agree:.2f} %)")
  try:
    import torch
  except ImportError:
    print("knn_torch_dino: skipped (torch is not installed)")
    return
  runs = {}
  for threads in (1, 2):  # the peer's best thread count on the shared cores
    torch.set_num_threads(threads)
    runs[threads] = _best(lambda: {k: torch_dino_knn(train, train_labels, test, classes, k)
                                   for k in ks}, 2)
  threads = min(runs, key=lambda t: runs[t][1])
  peer, torch_s = runs[threads]
  agree = np.mean([np.mean(ranked[k][:, 0] == peer[k]) for k in ks])
  print(f"knn_torch_dino_images_per_second: {test_rows / torch_s:.0f} img/s (DINO's eval_knn loop: "
        f"a pass per k, torch {torch.__version__}, best of 1 and 2 threads: {threads})")
  print(f"knn_chunked_speedup_vs_torch_dino: {torch_s / ours_s:.2f} x (top-1 agreement "
        f"{100 * agree:.2f} %)")


def bench_probe(quick: bool) -> None:
  from sklearn.linear_model import LogisticRegression

  from agriclip_jax import evaluation
  rows, width, classes = (1000, 128, 10) if quick else (5000, 384, 20)
  features, labels = clusters(rows, classes, width, seed=2, spread=3.0)
  features = evaluation.l2_normalise(features)
  C = 10.0
  start = time.perf_counter()
  evaluation.fit_logistic_probe(features, labels, C, tol=1e-6)
  first_s = time.perf_counter() - start
  probe, ours_s = _best(lambda: evaluation.fit_logistic_probe(features, labels, C, tol=1e-6), 3)
  from threadpoolctl import threadpool_limits
  # One OpenMP/BLAS thread: on the shared 2 cores two threads spin on each other and made
  # scikit-learn ~30x slower (measured); the peer gets its best setting.
  with threadpool_limits(1):
    reference, sklearn_s = _best(lambda: LogisticRegression(C=C, tol=1e-8, max_iter=10_000).fit(
        features.astype(np.float64), labels), 2)
  difference = np.abs(probe.weights - reference.coef_).max() / np.abs(reference.coef_).max()
  details = f"{rows} x {width}, {classes} classes, C {C:g}"
  print(f"probe_fit_seconds: {ours_s:.3f} s ({details}; {probe.iterations} L-BFGS iterations; first "
        f"call incl. compilation {first_s:.1f} s)")
  print(f"probe_sklearn_fit_seconds: {sklearn_s:.3f} s (lbfgs, float64, tol 1e-8, "
        f"{int(reference.n_iter_[0])} iterations, 1 thread)")
  print(f"probe_speedup_vs_sklearn: {sklearn_s / ours_s:.2f} x (coefficients agree to "
        f"{difference:.1e} of the largest; predictions agree "
        f"{100 * np.mean(probe.ranked(features)[:, 0] == reference.predict(features)):.2f} %)")


def main(quick: bool) -> None:
  bench_knn(quick)
  bench_probe(quick)


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--quick", action="store_true")
  main(parser.parse_args().quick)
