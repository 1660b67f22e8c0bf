"""Faults through the commands a user types, on the evaluation and conversion side: each gets a
one-line message naming the file or value and a non-zero exit, and nothing is lost."""

from __future__ import annotations

import json
import os

import numpy as np

from agriclip_jax import align, cli


def test_data_inspect_of_a_source_with_no_readable_record_fails(tmp_path, capsys):
  folder = tmp_path / "photos" / "rust"
  folder.mkdir(parents=True)
  for i in range(3):
    (folder / f"leaf_{i}.jpg").write_bytes(b"not a jpeg at all")
  code = cli.main(["data", "inspect", str(tmp_path / "photos"), "--no-captions"])
  out, err = capsys.readouterr()
  assert code == 2
  assert "skipped: 3 (100.00%)" in out
  assert err.strip() == (f"agriclip data: error: {tmp_path / 'photos'}: none of its 3 records "
                         f"could be read")


def test_converting_nan_weights_warns_naming_the_tensors(tmp_path, capsys):
  weight = np.ones((3, 4), np.float32)
  weight[1, 2] = np.nan
  src = align.save_aligner(align.LinearAligner(weight, np.zeros(3, np.float32)),
                           tmp_path / "a.safetensors")
  code = cli.main(["convert", "--src", str(src), "--src-format", "agriclip-aligner",
                   "--dst", str(tmp_path / "model"), "--dst-format", "flax"])
  err = capsys.readouterr().err
  assert code == 0  # converted as it is, for inspection, but not silently
  assert f"warning: {src}: 1 tensor(s) hold NaN or infinite values: params/kernel" in err
  assert sorted(os.listdir(tmp_path / "model")) == ["config.json", "model.safetensors"]
  assert json.loads((tmp_path / "model" / "config.json").read_text())["model_type"] == "linear_aligner"


def test_read_only_outputs_fail_before_any_compute(tmp_path, capsys, monkeypatch):
  # embed, align and zeroshot check --out before they load a model or encode an image: the error
  # comes at once, names the folder, and nothing is computed (the encoders are never reached).
  import subprocess

  import pytest
  from agriclip_jax import api, features
  if os.geteuid() != 0:
    pytest.skip("mounting a read-only tmpfs needs root (CI runs as root)")
  mount = tmp_path / "ro"
  mount.mkdir()
  subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mount)], check=True)
  try:
    def no_compute(*args, **kwargs):
      raise AssertionError("computed before checking the output")
    monkeypatch.setattr(api, "load", no_compute)
    monkeypatch.setattr(features, "encode_source", no_compute)
    photos = tmp_path / "photos" / "rust"
    photos.mkdir(parents=True)
    (photos / "a.jpg").write_bytes(b"x")
    commands = {
        "embed": ["--model", str(tmp_path), "--images", str(tmp_path / "photos"),
                  "--out", str(mount / "e.npz")],
        "align": ["--dino", str(tmp_path), "--model", str(tmp_path), "--data", str(tmp_path),
                  "--out", str(mount / "a.safetensors")],
        "zeroshot": ["--model", str(tmp_path), "--data", str(tmp_path / "photos"),
                     "--template", "a photo of {}.", "--out", str(mount / "r.json")],
    }
    for name, flags in commands.items():
      assert cli.main([name, *flags]) == 2, name
      err = capsys.readouterr().err.strip()
      assert err.startswith(f"agriclip {name}: error: {mount}: Read-only file system"), err
  finally:
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_the_feature_cache_key_follows_the_images_a_manifest_lists(tmp_path):
  # The manifest's bytes stay the same while an image it lists is rewritten: the key must change,
  # or --cache would hand back the features (and a bit-identical aligner) of the old image.
  from PIL import Image

  from agriclip_jax import features
  from input_pipeline.sources import open_source
  for i in range(2):
    Image.new("RGB", (32, 32), (40 * i, 90, 30)).save(tmp_path / f"leaf{i}.jpg")
  manifest = tmp_path / "data.jsonl"
  manifest.write_text("".join(json.dumps({"image": f"leaf{i}.jpg", "captions": ["a leaf"]}) + "\n"
                              for i in range(2)))
  before = features.data_fingerprint(manifest, open_source(manifest))
  assert features.data_fingerprint(manifest, open_source(manifest)) == before  # stable
  manifest_bytes = manifest.read_bytes()
  Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "leaf1.jpg")
  os.utime(tmp_path / "leaf1.jpg", ns=(1, 1))  # even with another mtime only the stamp differs
  assert manifest.read_bytes() == manifest_bytes
  assert features.data_fingerprint(manifest, open_source(manifest)) != before


def test_zeroshot_with_a_manifest_where_a_folder_goes_says_so(tmp_path, capsys):
  manifest = tmp_path / "field.jsonl"
  manifest.write_text(json.dumps({"image": "a.jpg", "captions": ["a leaf"]}) + "\n")
  code = cli.main(["zeroshot", "--model", str(tmp_path), "--data", str(manifest),
                   "--template", "a photo of {}.", "--out", str(tmp_path / "r.json")])
  err = capsys.readouterr().err.strip()
  assert code == 2 and err.startswith(f"agriclip zeroshot: error: {manifest} is a file, not an "
                                      f"ImageFolder")
  assert "not found" not in err and not (tmp_path / "r.json").exists()


def test_embed_reads_an_hf_clip_directory(tmp_path):
  # Used to stop with "missing key 'config'": the loader now tells an HF CLIPModel directory from
  # ours and converts it in memory.
  from agriclip_jax.convert import registry
  from agriclip_jax import model_io
  from agriclip_jax.models.configs import clip_config
  from agriclip_jax.tokenizer import installed_openai_bpe, load_tokenizer
  from PIL import Image
  import pytest
  bpe = installed_openai_bpe()
  if bpe is None:
    pytest.skip("open_clip_torch (the OpenAI BPE file) is not installed")
  config = clip_config("tiny")
  ours = model_io.save_model_dir(tmp_path / "ours", "clip", config.to_dict(),
                                 model_io.init_variables("clip", config.to_dict()),
                                 load_tokenizer(bpe).save(tmp_path / "tok"))
  registry.convert(ours, "flax", tmp_path / "hf", "hf")
  (tmp_path / "photos").mkdir()
  Image.new("RGB", (50, 40), (30, 120, 40)).save(tmp_path / "photos" / "leaf.jpg")
  for name in ("ours", "hf"):
    assert cli.main(["embed", "--model", str(tmp_path / name), "--images", str(tmp_path / "photos"),
                     "--out", str(tmp_path / f"{name}.npz")]) == 0
  with np.load(tmp_path / "ours.npz") as a, np.load(tmp_path / "hf.npz") as b:
    np.testing.assert_allclose(a["image_embeddings"], b["image_embeddings"], atol=1e-5)


def test_ctrl_c_in_any_command_is_the_shells_130_and_one_line(tmp_path, capsys, monkeypatch):
  # Ctrl-C while a command reads its data (here: data inspect's source listing) ends it with the
  # exit status shells give an interrupted command and one line, not a traceback.
  from input_pipeline import sources

  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(sources, "open_source", interrupted)
  code = cli.main(["data", "inspect", str(tmp_path), "--no-captions"])
  out, err = capsys.readouterr()
  assert code == 130
  assert err == "agriclip data: interrupted\n" and "Traceback" not in out
