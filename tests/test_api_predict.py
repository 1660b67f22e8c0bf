"""The Python API and `agriclip predict`, through the doors users use, on real corn photos at their
own sizes: the API's embeddings equal `agriclip embed`'s; predict's top label equals `agriclip
zeroshot`'s prediction for the same images, labels and templates (all three methods); the API
classifies arrays as it classifies the files they came from."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import agriclip_jax as ac
from agriclip_jax import cli
from agriclip_jax.models.configs import clip_config
from test_eval_commands import CLASSES, corn_split, models  # noqa: F401  (module fixtures)

TEMPLATE = "a photo of a corn leaf with {}."


@pytest.fixture(scope="module")
def agriclip(models):  # noqa: F811
  return ac.load(clip=models / "clip", dino=models / "dino", aligner=models / "aligner.npz",
                 batch_size=8)


def _photos(corn_split):  # noqa: F811
  return sorted(corn_split[1].rglob("*.jpg"))


def test_api_embeddings_equal_the_embed_command(models, corn_split, tmp_path):  # noqa: F811
  photos = _photos(corn_split)
  for name in ("clip", "dino"):
    out = tmp_path / f"{name}.npz"
    assert cli.main(["embed", "--model", str(models / name), "--images", str(corn_split[1]),
                     "--out", str(out), "--batch-size", "4"]) == 0
    with np.load(out) as saved:
      assert [str(p) for p in photos] == list(saved["image_paths"])
      got = ac.load(models / name).embed_images(photos)
      assert np.max(np.abs(got - saved["image_embeddings"])) <= 1e-6, name
  with np.load(tmp_path / "clip.npz") as saved:
    assert "text_embeddings" not in saved
  texts = ["a photo of a corn leaf with rust", "a healthy leaf"]
  (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
  assert cli.main(["embed", "--model", str(models / "clip"), "--images", str(corn_split[1]),
                   "--texts", str(tmp_path / "texts.txt"), "--out", str(tmp_path / "t.npz")]) == 0
  with np.load(tmp_path / "t.npz") as saved:
    got = ac.load(models / "clip").embed_texts(texts)
    assert np.max(np.abs(got - saved["text_embeddings"])) <= 1e-6


@pytest.mark.parametrize("method", ["clip", "agriclip", "ensemble"])
def test_predict_top_label_equals_zeroshot_prediction(models, corn_split, tmp_path, capsys,  # noqa: F811
                                                      method):
  folder = corn_split[1]
  classes = sorted(p.name for p in folder.iterdir())
  labels = [c.replace("_", " ").lower() for c in classes]  # zeroshot's clean_class_name
  out = tmp_path / "zs.json"
  assert cli.main(["zeroshot", "--model", str(models / "clip"), "--dino", str(models / "dino"),
                   "--aligner", str(models / "aligner.npz"), "--data", str(folder),
                   "--template", TEMPLATE, "--method", method, "--out", str(out)]) == 0
  row = json.loads(out.read_text())["results"][0]
  assert row["prompt_names"] == labels
  capsys.readouterr()
  assert cli.main(["predict", "--model", str(models / "clip"), "--dino", str(models / "dino"),
                   "--aligner", str(models / "aligner.npz"), "--labels", ",".join(labels),
                   "--template", TEMPLATE, "--method", method, "--top-k", "2", "--json",
                   str(folder)]) == 0
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  photos = _photos(corn_split)
  assert [line["image"] for line in lines] == [str(p) for p in photos]
  for line in lines:
    assert len(line["top"]) == 2 and line["top"][0]["probability"] >= line["top"][1]["probability"]
  # The confusion matrix of zeroshot (rows: true class, columns: prediction) from predict's labels.
  confusion = np.zeros((len(labels), len(labels)), int)
  for photo, line in zip(photos, lines):
    confusion[classes.index(photo.parent.name), labels.index(line["top"][0]["label"])] += 1
  np.testing.assert_array_equal(confusion, row["confusion"])


def test_classify_arrays_as_the_files_they_came_from(agriclip, corn_split):  # noqa: F811
  photos = _photos(corn_split)[:3]
  arrays = [np.asarray(Image.open(p).convert("RGB")) for p in photos]
  labels = ["blight", "common rust", "gray leaf spot"]
  from_files = agriclip.classify(photos, labels, [TEMPLATE])
  from_arrays = agriclip.classify(arrays, labels, [TEMPLATE])
  for a, b in zip(from_files, from_arrays):
    assert a.labels == b.labels
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-6)
    assert sum(a.probabilities) == pytest.approx(1.0, abs=1e-5)
  assert agriclip.methods == ("clip", "agriclip", "ensemble")
  # AgriCLIP embeds photos in CLIP's space: DINO -> aligner, unit rows
  embedded = agriclip.embed_images(photos)
  assert embedded.shape == (3, clip_config("tiny").embed_dim)
  np.testing.assert_allclose(np.linalg.norm(embedded, axis=1), 1.0, rtol=1e-5)


def test_predict_errors_name_the_problem(models, tmp_path, capsys):  # noqa: F811
  photo = tmp_path / "leaf.jpg"
  Image.new("RGB", (40, 30), (30, 120, 40)).save(photo)
  assert cli.main(["predict", "--model", str(models / "clip"), "--labels", "rust", str(photo)]) == 2
  assert "at least two labels" in capsys.readouterr().err
  assert cli.main(["predict", "--model", str(models / "clip"), "--labels", "a,b",
                   str(tmp_path / "missing.jpg")]) == 2
  assert "missing.jpg" in capsys.readouterr().err
  assert cli.main(["predict", "--model", str(models / "clip"), "--labels", "a,b",
                   "--method", "agriclip", str(photo)]) == 2
  assert "needs a CLIP model, a DINO model and an aligner" in capsys.readouterr().err
  with pytest.raises(ValueError, match="uint8 \\[H, W, 3\\]"):
    ac.load(models / "clip").embed_images([np.zeros((8, 8), np.float32)])
