"""Feature extraction: sharded batches equal the dense computation; decode-once, skip+count, cache."""

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agriclip_jax import features


def test_sharded_apply_equals_dense_with_padding():
  rng = np.random.default_rng(0)
  weight = rng.normal(size=(6, 4)).astype(np.float32)
  inputs = rng.normal(size=(21, 6)).astype(np.float32)  # not a multiple of the 8 devices
  mesh = features.data_mesh(jax.devices())
  out = features.apply_in_batches(lambda w, x: jnp.tanh(x @ w), inputs, batch_size=5, mesh=mesh,
                                  params=weight)
  assert features.round_batch_size(5, mesh) == len(jax.devices())
  np.testing.assert_allclose(out, np.tanh(inputs @ weight), rtol=1e-5, atol=1e-6)


def test_fingerprint_path_changes_with_content(tmp_path):
  (tmp_path / "a.txt").write_text("one")
  before = features.fingerprint_path(tmp_path)
  assert features.fingerprint_path(tmp_path) == before
  (tmp_path / "a.txt").write_text("three")
  assert features.fingerprint_path(tmp_path) != before


def test_content_fingerprint_follows_weights_config_and_view_not_names():
  from agriclip_jax import model_io
  from input_pipeline import transforms
  spec = transforms.preset("agriclip-reference", 32, pooling="cls")
  base = model_io.content_fingerprint("vit", {"width": 4}, spec, {"params": {"w": np.ones(3)}})
  same = model_io.content_fingerprint("vit", {"width": 4}, dataclasses.replace(
      spec, name="renamed", pooling="last4"), {"params": {"w": np.ones(3)}})
  assert same == base  # the view's name and the pooling (checked on its own) are not identity
  for other in (model_io.content_fingerprint("vit", {"width": 4}, spec, {"params": {"w": np.zeros(3)}}),
                model_io.content_fingerprint("vit", {"width": 5}, spec, {"params": {"w": np.ones(3)}}),
                model_io.content_fingerprint("vit", {"width": 4}, transforms.preset("dino-eval", 32),
                                             {"params": {"w": np.ones(3)}})):
    assert other != base


def _small_folder(corn_dir, tmp_path, per_class=3):
  root = tmp_path / "folder"
  for class_dir in sorted((corn_dir / "field").iterdir())[:2]:
    (root / class_dir.name).mkdir(parents=True)
    for image in sorted(class_dir.glob("*.jpg"))[:per_class]:
      shutil.copy(image, root / class_dir.name / image.name)
  return root


def _mean_colour_encoder(name, scale, calls):
  def view(image):
    return (image[:32, :32].astype(np.float32) / 255.0) * scale

  def apply(images):
    calls.append(images.shape)
    return jnp.mean(images, axis=(1, 2))

  return features.ImageEncoder(name, f"fp-{name}", view, f"crop32x{scale}", apply)


def test_encode_source_decodes_once_skips_bad_records_and_caches(corn_dir, tmp_path):
  from input_pipeline import sources, transforms
  root = _small_folder(corn_dir, tmp_path)
  bad = sorted((root).iterdir())[0] / "zz_broken.jpg"
  bad.write_bytes(b"this is not a jpeg")
  source = sources.open_source(root)
  indices = np.arange(len(source))
  calls = []
  encoders = [_mean_colour_encoder("a", 1.0, calls), _mean_colour_encoder("b", 2.0, calls)]
  cache = features.FeatureCache(tmp_path / "cache")
  data_print = features.fingerprint_path(root)
  result = features.encode_source(source, indices, encoders, batch_size=4, cache=cache,
                                  data_fingerprint=data_print, workers=2)
  assert sum(result.skipped.values()) == 1
  broken_index = [i for i in indices if source[i]["path"].endswith("zz_broken.jpg")][0]
  assert broken_index not in result.indices and len(result.indices) == len(source) - 1
  np.testing.assert_array_equal(result.labels, [source[int(i)]["label"] for i in result.indices])
  # Independent computation, one image at a time, straight from the file bytes.
  for row, index in enumerate(result.indices):
    image = transforms.decode_image(source[int(index)]["image_bytes"])
    want = (image[:32, :32].astype(np.float32) / 255.0).mean(axis=(0, 1))
    np.testing.assert_allclose(result.features["a"][row], want, rtol=1e-5)
    np.testing.assert_allclose(result.features["b"][row], 2 * want, rtol=1e-5)
  assert calls  # it did run the encoders

  def must_not_run(images):
    raise AssertionError("the cache should have answered")

  cached_encoders = [features.ImageEncoder(e.name, e.fingerprint, e.view, e.view_name, must_not_run)
                     for e in encoders]
  again = features.encode_source(source, indices, cached_encoders, batch_size=4, cache=cache,
                                 data_fingerprint=data_print)
  np.testing.assert_array_equal(again.indices, result.indices)
  np.testing.assert_array_equal(again.labels, result.labels)
  np.testing.assert_array_equal(again.features["b"], result.features["b"])
  assert again.skipped == result.skipped and again.skipped_records == result.skipped_records == [
      (int(broken_index), "not_an_image")]  # a cached run still names the unreadable record
  # Other data -> other key -> recomputed.
  fresh = features.encode_source(source, indices[:2], encoders, batch_size=4, cache=cache,
                                 data_fingerprint=data_print)
  assert len(fresh.indices) == 2


def test_cache_requires_a_data_fingerprint(tmp_path):
  with pytest.raises(ValueError, match="data fingerprint"):
    features.encode_source([], [], [], cache=features.FeatureCache(tmp_path))
