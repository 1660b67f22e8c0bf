"""Model directories: round trip, clear errors on mismatched or damaged weights, atomic writes."""

import json

import jax
import numpy as np
import pytest

from agriclip_jax import model_io
from agriclip_jax.models.configs import clip_config


@pytest.fixture(scope="module")
def tiny_clip():
  cfg = clip_config("tiny")
  variables = model_io.init_variables("clip", cfg.to_dict(), seed=0)
  return cfg, variables


def test_round_trip_is_exact(tmp_path, tiny_clip):
  cfg, variables = tiny_clip
  model_io.save_model_dir(tmp_path / "m", "clip", cfg.to_dict(), variables)
  model_type, config, loaded = model_io.load_model_dir(tmp_path / "m")
  assert model_type == "clip" and config == json.loads(json.dumps(cfg.to_dict()))
  want = model_io.flatten(variables)
  got = model_io.flatten(loaded)
  assert set(want) == set(got)
  for key in want:
    np.testing.assert_array_equal(np.asarray(want[key]), np.asarray(got[key]), err_msg=key)


def test_config_that_does_not_match_weights_names_the_key(tmp_path, tiny_clip):
  cfg, variables = tiny_clip
  path = model_io.save_model_dir(tmp_path / "m", "clip", cfg.to_dict(), variables)
  meta = json.loads((path / "config.json").read_text())
  meta["config"]["vision"]["width"] = 128
  meta["config"]["vision"]["mlp_dim"] = 512
  (path / "config.json").write_text(json.dumps(meta))
  with pytest.raises(ValueError, match=r"shape mismatches.*params/visual/class_embedding: expected \(128,\), got \(64,\)"):
    model_io.load_model_dir(path)


def test_missing_and_extra_keys_are_named():
  expected = {"a": {"w": np.zeros((2, 3))}, "b": np.zeros(4)}
  actual = {"a/w": np.zeros((2, 3)), "c": np.zeros(1)}
  with pytest.raises(ValueError, match=r"missing keys \(1\): b; unexpected keys \(1\): c"):
    model_io.check_tree_matches(expected, actual, "src.bin")


def test_truncated_weights_file_is_a_clear_error(tmp_path, tiny_clip):
  cfg, variables = tiny_clip
  path = model_io.save_model_dir(tmp_path / "m", "clip", cfg.to_dict(), variables)
  weights = path / model_io.WEIGHTS_FILE
  weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
  with pytest.raises(ValueError, match="model.safetensors: cannot read safetensors file"):
    model_io.load_model_dir(path)


def test_unknown_model_type_is_refused_before_writing(tmp_path, tiny_clip):
  cfg, variables = tiny_clip
  with pytest.raises(ValueError, match="unknown model_type 'clipp'"):
    model_io.save_model_dir(tmp_path / "m", "clipp", cfg.to_dict(), variables)
  assert not (tmp_path / "m").exists()


def test_failed_write_leaves_previous_version_intact(tmp_path, tiny_clip):
  cfg, variables = tiny_clip
  path = model_io.save_model_dir(tmp_path / "m", "clip", cfg.to_dict(), variables)
  before = (path / model_io.WEIGHTS_FILE).read_bytes()
  with pytest.raises(FileNotFoundError, match="no tokenizer files"):
    model_io.save_model_dir(path, "clip", cfg.to_dict(), variables, tokenizer_dir=tmp_path / "nowhere")
  assert (path / model_io.WEIGHTS_FILE).read_bytes() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary left behind


def test_unknown_variant_lists_known_ones():
  with pytest.raises(ValueError, match=r"unknown model variant 'ViT-B/17' \(did you mean ViT-B/16"):
    clip_config("ViT-B/17")


def test_image_size_not_divisible_by_patch_names_fields():
  with pytest.raises(ValueError, match="image_size=100 is not divisible by patch_size=16"):
    clip_config("ViT-B/16", image_size=100)
