"""kNN, linear probe, centroids, few-shot and bootstrap intervals against independent references:
DINO's eval_knn formula written densely in numpy, scikit-learn's LogisticRegression and
NearestCentroid, and numpy's percentile bootstrap / the normal approximation."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from agriclip_jax import evaluation


def dense_dino_knn(train, train_labels, test, num_classes, k, temperature=0.07):
  """DINO's eval_knn for one k, all at once: [M, C] classes ranked by their weighted votes
  (np.argsort with kind="stable": lower index first on ties, for neighbours and classes)."""
  train = np.asarray(train, np.float32)
  test = np.asarray(test, np.float32)
  train = train / np.maximum(np.linalg.norm(train, axis=1, keepdims=True), 1e-12)
  test = test / np.maximum(np.linalg.norm(test, axis=1, keepdims=True), 1e-12)
  similarity = test @ train.T
  neighbours = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
  distances = np.take_along_axis(similarity, neighbours, axis=1)
  one_hot = np.eye(num_classes, dtype=np.float32)[train_labels[neighbours]]  # [M, k, C]
  votes = (one_hot * np.exp(distances / temperature)[:, :, None]).sum(axis=1)
  return np.argsort(-votes, axis=1, kind="stable")


def _clusters(rows, classes, width, seed, spread=1.2):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(classes, width))
  labels = rng.integers(0, classes, rows)
  return (centres[labels] + spread * rng.normal(size=(rows, width))).astype(np.float32), labels


def _assert_same_accuracy(ranked, reference, labels):
  for rank in (1, min(5, reference.shape[1])):
    np.testing.assert_array_equal(evaluation.topk_correct(ranked, labels, rank),
                                  evaluation.topk_correct(reference, labels, rank))


@pytest.mark.parametrize("train_chunk,test_chunk", [(16, 8), (37, 24), (500, 256)])
def test_chunked_sharded_knn_equals_the_dense_dino_formula(train_chunk, test_chunk):
  assert len(jax.devices()) == 8  # conftest: the test rows are split over 8 simulated devices
  train, train_labels = _clusters(203, 7, 12, seed=0)  # 203 is no multiple of any chunk
  test, test_labels = _clusters(61, 7, 12, seed=1)
  ks = (1, 10, 20, 100, 200)
  ranked = evaluation.knn_predict(train, train_labels, test, 7, ks, train_chunk=train_chunk,
                                  test_chunk=test_chunk)
  for k in ks:
    reference = dense_dino_knn(train, train_labels, test, 7, k)
    np.testing.assert_array_equal(ranked[k], reference[:, :5], err_msg=f"k={k}")
    _assert_same_accuracy(ranked[k], reference, test_labels)


def test_knn_breaks_ties_towards_the_lower_index_like_one_dense_sort():
  # Entries +-1/4 in 16 dimensions: unit norm and every similarity a multiple of 1/16, exactly, so
  # most neighbours tie; duplicated training rows with other labels make the tie decide the vote.
  rng = np.random.default_rng(3)
  base = rng.choice([-0.25, 0.25], size=(40, 16)).astype(np.float32)
  train = np.concatenate([base, base[:20], base[:10]])
  train_labels = np.concatenate([rng.integers(0, 6, 40), rng.integers(0, 6, 20), rng.integers(0, 6, 10)])
  test = rng.choice([-0.25, 0.25], size=(33, 16)).astype(np.float32)
  test_labels = rng.integers(0, 6, 33)
  for train_chunk in (7, 32, 70):
    ranked = evaluation.knn_predict(train, train_labels, test, 6, (1, 3, 10, 50),
                                    train_chunk=train_chunk, test_chunk=8)
    for k, got in ranked.items():
      reference = dense_dino_knn(train, train_labels, test, 6, k)
      np.testing.assert_array_equal(got, reference[:, :5], err_msg=f"k={k}, chunk={train_chunk}")
      _assert_same_accuracy(got, reference, test_labels)


def test_knn_names_bad_arguments():
  train, labels = _clusters(10, 3, 4, seed=0)
  with pytest.raises(ValueError, match=r"k \[20\] must lie in \[1, 10\]"):
    evaluation.knn_predict(train, labels, train, 3, (5, 20))
  with pytest.raises(ValueError, match="width 5 but training features 4"):
    evaluation.knn_predict(train, labels, np.ones((2, 5)), 3, (5,))
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
    evaluation.knn_predict(train, labels, train, 2, (5,))


def _sklearn_probe(features, labels, C):
  from sklearn.linear_model import LogisticRegression
  # float64: scikit-learn keeps float32 input in float32 and then stops ~1e-3 short of the optimum
  return LogisticRegression(C=C, tol=1e-12, max_iter=100_000).fit(features.astype(np.float64), labels)


@pytest.mark.parametrize("C", [0.05, 1.0, 30.0])
def test_probe_equals_sklearn_multinomial_logistic_regression(C):
  features, labels = _clusters(240, 4, 16, seed=2, spread=1.5)
  features = evaluation.l2_normalise(features)
  probe = evaluation.fit_logistic_probe(features, labels, C, tol=1e-7)
  reference = _sklearn_probe(features, labels, C)
  scale = np.abs(reference.coef_).max()
  # same objective, both converged: the coefficients agree to 1e-5 of their size
  np.testing.assert_allclose(probe.weights, reference.coef_, atol=1e-5 * scale)
  np.testing.assert_allclose(probe.bias, reference.intercept_ - reference.intercept_.mean(),
                             atol=1e-5 * scale)
  np.testing.assert_array_equal(probe.ranked(features)[:, 0], reference.predict(features))


def test_probe_with_two_classes_means_sklearns_binary_C():
  features, labels = _clusters(150, 2, 8, seed=4, spread=1.5)
  features = evaluation.l2_normalise(features)
  for C in (0.1, 10.0):
    probe = evaluation.fit_logistic_probe(features, labels, C, tol=1e-7)
    reference = _sklearn_probe(features, labels, C)
    scale = np.abs(reference.coef_).max()
    np.testing.assert_allclose(probe.weights[1] - probe.weights[0], reference.coef_[0],
                               atol=1e-5 * scale)
    np.testing.assert_allclose(probe.bias[1] - probe.bias[0], reference.intercept_[0],
                               atol=1e-5 * scale)


def test_sweep_picks_the_best_validation_C_and_refits_on_everything():
  # the shapes of the test above (4 classes, 16 wide, <= 256 rows): one compiled solver for both
  features, labels = _clusters(200, 4, 16, seed=5, spread=3.0)
  grid = (1e-3, 1e-1, 1.0, 10.0)
  probe, sweep = evaluation.sweep_probe(features, labels, 4, grid, seed=1, tol=1e-7)
  fit_rows, val_rows = evaluation.validation_split(labels, seed=1)
  assert not set(fit_rows) & set(val_rows) and len(fit_rows) + len(val_rows) == 200
  assert sweep["validation_images"] == len(val_rows) == 40  # a fifth of each class
  normalised = evaluation.l2_normalise(features)
  reference_scores = [np.mean(_sklearn_probe(normalised[fit_rows], labels[fit_rows], C)
                              .predict(normalised[val_rows]) == labels[val_rows]) for C in grid]
  np.testing.assert_allclose(sweep["validation_top1"], reference_scores)
  assert sweep["best_C"] == grid[int(np.argmax(reference_scores))] == probe.C
  refit = _sklearn_probe(normalised, labels, probe.C)
  np.testing.assert_allclose(probe.weights, refit.coef_, atol=1e-5 * np.abs(refit.coef_).max())


def test_centroid_classifier_equals_sklearn_nearest_centroid_on_cl2n_features():
  from sklearn.neighbors import NearestCentroid
  support, support_labels = _clusters(60, 4, 10, seed=6)
  query, _ = _clusters(50, 4, 10, seed=7)
  predicted = evaluation.centroid_predict(support, support_labels, query, 4)
  centre = support.astype(np.float64).mean(axis=0)

  def cl2n(x):
    x = x - centre
    return x / np.linalg.norm(x, axis=1, keepdims=True)

  reference = NearestCentroid().fit(cl2n(support), support_labels).predict(cl2n(query))
  np.testing.assert_array_equal(predicted, reference)
  with pytest.raises(ValueError, match=r"classes \[4\] have no support images"):
    evaluation.centroid_predict(support, support_labels, query, 5)


def test_fewshot_draws_n_per_class_per_seed_and_reports_mean_and_std():
  train, train_labels = _clusters(120, 3, 8, seed=8, spread=2.0)
  test, test_labels = _clusters(40, 3, 8, seed=9, spread=2.0)
  draws = [evaluation.draw_shots(train_labels, 4, seed, 3) for seed in range(3)]
  for drawn in draws:
    assert np.bincount(train_labels[drawn], minlength=3).tolist() == [4, 4, 4]
  assert not np.array_equal(draws[0], draws[1])
  result = evaluation.fewshot(train, train_labels, test, test_labels, 3, shots=(4,), seeds=3,
                              Cs=(2.0,))["4"]
  normalised_test = evaluation.l2_normalise(test)
  probe_runs, centroid_runs = [], []
  for drawn in draws:
    shots = evaluation.l2_normalise(train[drawn])
    reference = _sklearn_probe(shots, train_labels[drawn], 2.0)
    probe_runs.append(np.mean(reference.predict(normalised_test) == test_labels))
    centroid_runs.append(np.mean(evaluation.centroid_predict(train[drawn], train_labels[drawn],
                                                             test, 3) == test_labels))
  np.testing.assert_allclose(result["probe"]["runs"], probe_runs)
  assert result["probe"]["mean"] == pytest.approx(np.mean(probe_runs))
  assert result["centroid"]["std"] == pytest.approx(np.std(centroid_runs, ddof=1))
  assert result["seeds"] == 3 and result["test_images"] == 40
  with pytest.raises(ValueError, match="50-shot needs 50 training images of class 0"):
    evaluation.draw_shots(train_labels, 50, 0, 3)


def test_bootstrap_interval_is_numpys_percentile_bootstrap_with_the_same_seed():
  rng = np.random.default_rng(10)
  correct = rng.random(5001) < 0.63  # odd n, and two blocks of resamples inside
  interval = evaluation.bootstrap_interval(correct, resamples=1000, seed=7)
  index = np.random.default_rng(7).integers(0, 5001, size=(1000, 5001))
  means = correct[index].mean(axis=1)
  low, high = np.percentile(means, [2.5, 97.5])
  assert interval["low"] == pytest.approx(low, abs=1e-12)
  assert interval["high"] == pytest.approx(high, abs=1e-12)
  assert interval == {**interval, "accuracy": correct.mean(), "images": 5001, "resamples": 1000,
                      "seed": 7, "level": 0.95}


def test_bootstrap_interval_width_follows_the_normal_approximation():
  correct = np.random.default_rng(11).random(20_000) < 0.7
  interval = evaluation.bootstrap_interval(correct)
  p = correct.mean()
  assert interval["low"] < p < interval["high"]
  expected = 2 * 1.96 * np.sqrt(p * (1 - p) / correct.size)
  assert interval["high"] - interval["low"] == pytest.approx(expected, rel=0.1)


def test_paired_bootstrap_uses_the_same_images_for_both_methods():
  rng = np.random.default_rng(12)
  a = rng.random(3001) < 0.6
  b = np.where(rng.random(3001) < 0.9, a, ~a)  # mostly right and wrong on the same images
  paired = evaluation.paired_bootstrap_difference(a, b, resamples=500, seed=3)
  index = np.random.default_rng(3).integers(0, 3001, size=(500, 3001))
  differences = a[index].mean(axis=1) - b[index].mean(axis=1)
  low, high = np.percentile(differences, [2.5, 97.5])
  assert (paired["low"], paired["high"]) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))
  assert paired["difference"] == pytest.approx(a.mean() - b.mean())
  # The normal approximation of a paired difference: only the images the methods disagree on
  # vary it, so the interval is far narrower than for two independent samples.
  disagree, difference = np.mean(a != b), a.mean() - b.mean()
  paired_width = 2 * 1.96 * np.sqrt((disagree - difference ** 2) / a.size)
  assert high - low == pytest.approx(paired_width, rel=0.15)
  single = [evaluation.bootstrap_interval(x, resamples=500, seed=3) for x in (a, b)]
  assert high - low < 0.6 * np.hypot(*[s["high"] - s["low"] for s in single])
  with pytest.raises(ValueError, match="same images: 3001 and 3000"):
    evaluation.paired_bootstrap_difference(a, b[:3000])
  with pytest.raises(ValueError, match="booleans"):
    evaluation.bootstrap_interval(np.array([0.5, 1.0]))


def test_sharded_knn_needs_no_collectives():
  """Each device ranks its own test rows against the replicated training set: the compiled program
  holds no all-gather / all-reduce (sharding propagation alone used to gather rows)."""
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec

  from agriclip_jax.features import data_mesh
  mesh = data_mesh()
  run = evaluation._compiled_knn(100, 32, 10, (1, 10), 5, 0.07, mesh)
  split, replicated = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
  text = run.lower(jax.ShapeDtypeStruct((64, 16), jnp.float32, sharding=split),
                   jax.ShapeDtypeStruct((4, 32, 16), jnp.float32, sharding=replicated),
                   jax.ShapeDtypeStruct((128,), jnp.int32, sharding=replicated)).compile().as_text()
  for collective in ("all-gather", "all-reduce", "all-to-all", "collective-permute"):
    assert collective not in text
