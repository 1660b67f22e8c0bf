"""The linear aligner: exact least squares vs numpy, chunking, ridge, the SGD recipe, file formats."""

import re

import numpy as np
import pytest
import torch

from agriclip_jax import align


def _paired_features(rows=600, in_dim=24, out_dim=8, noise=0.3, seed=0, offset=5.0):
  rng = np.random.default_rng(seed)
  # Correlated, offset inputs (like post-ReLU features) make the problem less trivial than iid N(0,1).
  mixing = rng.normal(size=(in_dim, in_dim)) / np.sqrt(in_dim) + np.eye(in_dim)
  x = rng.normal(size=(rows, in_dim)) @ mixing + offset
  true_w = rng.normal(size=(out_dim, in_dim)) / np.sqrt(in_dim)
  true_b = rng.normal(size=out_dim)
  y = x @ true_w.T + true_b + noise * rng.normal(size=(rows, out_dim))
  return x.astype(np.float32), y.astype(np.float32)


def _numpy_lstsq(x, y):
  design = np.concatenate([x.astype(np.float64), np.ones((x.shape[0], 1))], axis=1)
  solution, *_ = np.linalg.lstsq(design, y.astype(np.float64), rcond=None)
  return solution[:-1].T, solution[-1]


def _relative_error(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def test_exact_matches_numpy_lstsq():
  x, y = _paired_features()
  result = align.fit_exact(align.iterate_chunks(x, y, chunk_rows=128), holdout=0.0)
  want_w, want_b = _numpy_lstsq(x, y)
  assert _relative_error(result.aligner.weight, want_w) < 1e-5
  assert _relative_error(result.aligner.bias, want_b) < 1e-5


def test_collinear_features_give_the_minimum_norm_solution_like_lstsq():
  x, y = _paired_features(rows=200, in_dim=10)
  x = np.concatenate([x, x[:, :2], np.full((200, 1), 3.0, np.float32)], axis=1)  # duplicates + constant
  result = align.fit_exact(align.iterate_chunks(x, y, chunk_rows=64), holdout=0.0)
  want_w, want_b = _numpy_lstsq(x, y)
  np.testing.assert_allclose(result.aligner.apply(x), x @ want_w.T + want_b, rtol=1e-4, atol=1e-4)
  # Duplicated columns share their weight equally (minimum norm), as in lstsq. A constant column
  # gets no weight: the (unpenalised) bias carries it, where lstsq splits it with the intercept.
  assert _relative_error(result.aligner.weight[:, :12], want_w[:, :12]) < 1e-4
  np.testing.assert_allclose(result.aligner.weight[:, :2], result.aligner.weight[:, 10:12], rtol=1e-4)
  np.testing.assert_array_equal(result.aligner.weight[:, 12], 0.0)


def test_device_accumulation_equals_host_float64():
  x, y = _paired_features(rows=300)
  host = align.fit_exact(align.iterate_chunks(x, y, chunk_rows=50), holdout=0.2, on_device=False)
  device = align.fit_exact(align.iterate_chunks(x, y, chunk_rows=50), holdout=0.2, on_device=True)
  np.testing.assert_allclose(device.aligner.weight, host.aligner.weight, rtol=1e-6, atol=1e-7)
  assert device.metrics["heldout"]["r2"] == pytest.approx(host.metrics["heldout"]["r2"], rel=1e-9)


@pytest.mark.parametrize("chunk_rows", [1, 7, 100, 10_000])
def test_exact_does_not_depend_on_chunk_size(chunk_rows):
  x, y = _paired_features(rows=300)
  reference = align.fit_exact(align.iterate_chunks(x, y, chunk_rows=300), holdout=0.2, seed=3)
  chunked = align.fit_exact(align.iterate_chunks(x, y, chunk_rows=chunk_rows), holdout=0.2, seed=3)
  np.testing.assert_allclose(chunked.aligner.weight, reference.aligner.weight, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(chunked.aligner.bias, reference.aligner.bias, rtol=1e-5, atol=1e-6)
  assert chunked.metrics["heldout"]["rows"] == reference.metrics["heldout"]["rows"]


def test_holdout_split_is_exactly_the_hashed_rows_and_metrics_match_direct_computation():
  x, y = _paired_features(rows=400)
  result = align.fit_exact(align.iterate_chunks(x, y, chunk_rows=64), holdout=0.25, seed=1)
  mask = align.holdout_mask(np.arange(len(x)), 0.25, seed=1)
  assert 0.15 < mask.mean() < 0.35
  want_w, want_b = _numpy_lstsq(x[~mask], y[~mask])
  assert _relative_error(result.aligner.weight, want_w) < 1e-5
  for split, rows in (("fit", ~mask), ("heldout", mask)):
    pred = x[rows].astype(np.float64) @ result.aligner.weight.T.astype(np.float64) + result.aligner.bias
    residual = y[rows] - pred
    centred = y[rows] - y[rows].mean(0)
    assert result.metrics[split]["rows"] == rows.sum()
    np.testing.assert_allclose(result.metrics[split]["mse"], np.mean(residual ** 2), rtol=1e-5)
    np.testing.assert_allclose(result.metrics[split]["r2"],
                               1 - np.sum(residual ** 2) / np.sum(centred ** 2), rtol=1e-6)


def test_ridge_matches_closed_form_and_auto_picks_the_best_heldout_value():
  x, y = _paired_features(rows=120, in_dim=40, noise=2.0)  # few rows per feature: ridge helps
  strength = 0.3
  result = align.fit_exact(align.iterate_chunks(x, y), ridge=strength, holdout=0.0)
  xc = x.astype(np.float64) - x.mean(0)
  yc = y.astype(np.float64) - y.mean(0)
  lam = strength * np.trace(xc.T @ xc) / x.shape[1]
  want_w = np.linalg.solve(xc.T @ xc + lam * np.eye(x.shape[1]), xc.T @ yc).T
  assert _relative_error(result.aligner.weight, want_w) < 1e-5

  auto = align.fit_exact(align.iterate_chunks(x, y), ridge="auto", holdout=0.3)
  assert auto.ridge_scores is not None
  assert auto.metrics["heldout"]["r2"] == pytest.approx(max(auto.ridge_scores.values()), abs=1e-9)
  assert auto.ridge > 0  # on this under-determined-ish problem some shrinkage beats plain OLS
  # The returned aligner is the refit on all rows with the chosen strength: numpy's on all rows.
  xc = x.astype(np.float64) - x.mean(0)
  yc = y.astype(np.float64) - y.mean(0)
  lam = auto.ridge * np.trace(xc.T @ xc) / x.shape[1]
  want_w = np.linalg.solve(xc.T @ xc + lam * np.eye(x.shape[1]), xc.T @ yc).T
  assert _relative_error(auto.aligner.weight, want_w) < 1e-5
  want_b = y.mean(0) - x.mean(0) @ want_w.T
  np.testing.assert_allclose(auto.aligner.bias, want_b, rtol=1e-4, atol=1e-5)
  assert auto.metrics["all"]["rows"] == len(x)


def test_pooled_moments_equal_the_moments_of_all_rows():
  x, y = _paired_features(rows=300, in_dim=6, out_dim=3)
  whole, _ = align.accumulate(align.iterate_chunks(x, y, chunk_rows=300), holdout=0.0)
  part_a, part_b = align.accumulate(align.iterate_chunks(x, y, chunk_rows=64), holdout=0.4, seed=3)
  pooled = align.pooled_moments(part_a, part_b)
  assert pooled.count == whole.count == 300
  for got, want in zip(pooled.centred(), whole.centred()):
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_pooling_and_models_the_aligner_records_are_checked():
  recorded = {"dino_pooling": "cls+avgpool", "dino_model": "dino_a", "dino_fingerprint": "aaa",
              "clip_model": "clip_a", "clip_fingerprint": "ccc"}
  assert align.resolve_pooling(recorded, None, "al.safetensors") == "cls+avgpool"
  assert align.resolve_pooling(recorded, "cls+avgpool", "al.safetensors") == "cls+avgpool"
  assert align.resolve_pooling({}, "last2", "al.pth") == "last2"  # no record: the flag decides
  assert align.resolve_pooling({}, None, "al.pth") is None
  # Same width as cls+avgpool on a 2-block ViT, different features: still an error.
  with pytest.raises(ValueError, match=r"al.safetensors was fitted on DINO pooling 'cls\+avgpool', "
                                       r"but --dino-pooling is 'last2'"):
    align.resolve_pooling(recorded, "last2", "al.safetensors")
  align.check_provenance(recorded, "al.safetensors", {"dino": ("d", "aaa"), "clip": ("c", "ccc")})
  align.check_provenance({}, "al.pth", {"dino": ("d", "zzz"), "clip": ("c", "yyy")})
  with pytest.raises(ValueError, match=r"fitted on the DINO model dino_a \(fingerprint aaa\), but "
                                       r"the DINO model given is dino_b \(fingerprint bbb\)"):
    align.check_provenance(recorded, "al.safetensors", {"dino": ("dino_b", "bbb"), "clip": ("c", "ccc")})
  with pytest.raises(ValueError, match=r"CLIP model clip_a \(fingerprint ccc\).*clip_b"):
    align.check_provenance(recorded, "al.safetensors", {"dino": ("d", "aaa"), "clip": ("clip_b", "ddd")})


def test_exact_heldout_r2_at_least_the_sgd_recipe():
  # No common offset: with one, the reference recipe diverges (tested below).
  x, y = _paired_features(rows=1500, in_dim=32, out_dim=8, noise=0.5, offset=0.0)
  exact = align.fit_exact(align.iterate_chunks(x, y, chunk_rows=500), holdout=0.2)
  sgd = align.fit_sgd(x, y, holdout=0.2, epochs=70)
  assert sgd.metrics["heldout"]["rows"] == exact.metrics["heldout"]["rows"]
  assert sgd.metrics["heldout"]["r2"] > 0.5  # the recipe does learn
  assert exact.metrics["heldout"]["r2"] >= sgd.metrics["heldout"]["r2"] - 1e-9
  assert exact.metrics["fit"]["mse"] <= sgd.metrics["fit"]["mse"]


def test_sgd_divergence_is_an_error():
  x, y = _paired_features(rows=300, in_dim=32, out_dim=8, offset=5.0)
  with pytest.raises(FloatingPointError, match="diverged"):
    align.fit_sgd(x, y, holdout=0.0, epochs=20)


def test_sgd_bias_unscaling_exact_vs_reference_defect():
  x, y = _paired_features(rows=400, in_dim=8, out_dim=4, noise=0.1, offset=1.0)
  y = y * 5.0 + 2.0  # different scales so that c1 != c2 and the defect shows
  exact = align.fit_sgd(x, y, holdout=0.0, epochs=15, seed=2)
  defect = align.fit_sgd(x, y, holdout=0.0, epochs=15, seed=2, reproduce_bias_defect=True)
  c1, c2 = exact.info["scale_dino"], exact.info["scale_clip"]
  np.testing.assert_allclose(exact.aligner.weight, defect.aligner.weight)
  np.testing.assert_allclose(defect.aligner.bias, exact.aligner.bias * c1, rtol=1e-5)
  assert exact.metrics["fit"]["r2"] > defect.metrics["fit"]["r2"]


def test_reference_schedule_is_torch_cosine_annealing():
  weight = torch.nn.Parameter(torch.zeros(1))
  optimizer = torch.optim.SGD([weight], lr=0.01, momentum=0.9, weight_decay=5e-4)
  scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=200)
  for epoch in range(70):
    assert align.reference_lr(epoch) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12)
    optimizer.step()
    scheduler.step()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".npz"])
def test_save_load_round_trip_and_torch_application(tmp_path, suffix):
  rng = np.random.default_rng(0)
  aligner = align.LinearAligner(rng.normal(size=(6, 10)).astype(np.float32),
                                rng.normal(size=6).astype(np.float32))
  path = align.save_aligner(aligner, tmp_path / f"aligner{suffix}")
  loaded = align.load_aligner(path)
  np.testing.assert_array_equal(loaded.weight, aligner.weight)
  np.testing.assert_array_equal(loaded.bias, aligner.bias)
  features = rng.normal(size=(5, 10)).astype(np.float32)
  if suffix == ".pth":  # the reference applies its file as ftrs @ W.T + b
    state = torch.load(path, weights_only=True)
    assert set(state) == {"W", "b"} and state["W"].shape == (6, 10) and state["b"].shape == (6,)
    want = (torch.from_numpy(features) @ state["W"].T + state["b"]).numpy()
  else:
    want = features @ aligner.weight.T + aligner.bias
  np.testing.assert_allclose(loaded.apply(features), want, rtol=1e-6, atol=1e-6)


def test_reference_pth_with_none_bias_and_bad_files(tmp_path):
  torch.save({"W": torch.ones(3, 4), "b": None}, tmp_path / "nobias.pth")
  loaded = align.load_aligner(tmp_path / "nobias.pth")
  np.testing.assert_array_equal(loaded.bias, np.zeros(3))
  torch.save({"W": torch.ones(3, 4), "b": torch.ones(5)}, tmp_path / "bad.pth")
  with pytest.raises(ValueError, match=r"bad\.pth.*'b'"):
    align.load_aligner(tmp_path / "bad.pth")
  torch.save({"weight": torch.ones(3, 4)}, tmp_path / "nokey.pth")
  with pytest.raises(KeyError, match=r"nokey\.pth.*'W'"):
    align.load_aligner(tmp_path / "nokey.pth")
  with pytest.raises(ValueError, match="unknown suffix"):
    align.save_aligner(loaded, tmp_path / "aligner.bin")


def test_errors_name_the_problem():
  x, y = _paired_features(rows=50)
  with pytest.raises(ValueError, match="row counts differ.*50.*49"):
    align.fit_exact(align.iterate_chunks(x, y[:49]))
  with pytest.raises(ValueError, match="row counts differ"):
    align.fit_sgd(x[:10], y, epochs=1)
  bad = x.copy()
  bad[17, 3] = np.nan
  with pytest.raises(ValueError, match="row 17"):
    align.fit_exact(align.iterate_chunks(bad, y, chunk_rows=8))
  with pytest.raises(ValueError, match="held-out"):
    align.fit_exact(align.iterate_chunks(x, y), ridge="auto", holdout=0.0)
  with pytest.raises(ValueError, match="aligner expects features of width 24"):
    align.fit_exact(align.iterate_chunks(x, y), holdout=0.0).aligner.apply(np.zeros((2, 5)))


def test_align_command_on_feature_files(tmp_path, capsys):
  from agriclip_jax import cli
  x, y = _paired_features(rows=400)
  np.save(tmp_path / "x.npy", x)
  np.save(tmp_path / "y.npy", y)
  np.save(tmp_path / "y_short.npy", y[:399])
  out = tmp_path / "aligner.safetensors"
  assert cli.main(["align", "--dino-features", str(tmp_path / "x.npy"), "--clip-features",
                   str(tmp_path / "y.npy"), "--out", str(out), "--chunk-rows", "64"]) == 0
  assert "heldout" in capsys.readouterr().out
  # The default: ridge chosen on the held-out split, then refitted on all rows.
  direct = align.fit_exact(align.iterate_chunks(x, y), ridge="auto", holdout=0.1)
  np.testing.assert_allclose(align.load_aligner(out).weight, direct.aligner.weight, rtol=1e-5, atol=1e-6)
  assert align.read_aligner_metadata(out)["ridge"] == direct.ridge
  assert cli.main(["align", "--dino-features", str(tmp_path / "x.npy"), "--clip-features",
                   str(tmp_path / "y_short.npy"), "--out", str(out)]) == 2
  assert re.search(r"agriclip align: error: row counts differ: --dino-features .*x\.npy has 400 rows",
                   capsys.readouterr().err)
  assert cli.main(["align", "--out", str(out)]) == 2
  assert capsys.readouterr().err.startswith("agriclip align: error: give either")


def test_reference_variance_is_over_all_entries():
  x = np.random.default_rng(0).random((70_000, 3)).astype(np.float32) * 3 + 1  # > one row block
  assert align.global_variance(x) == pytest.approx(np.var(x.astype(np.float64)), rel=1e-9)
