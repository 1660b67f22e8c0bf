"""`agriclip knn` and `agriclip probe` end to end on real corn photos with tiny random-weights
models: the JSON they write equals evaluation.py's functions on features computed independently
(each image preprocessed on its own by the written-out eval view, encoded by the Flax module)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from agriclip_jax import align, cli, evaluation, model_io
from agriclip_jax.models.clip import CLIP
from agriclip_jax.models.configs import CLIPConfig, clip_config, vision_config
from agriclip_jax.models.vit import VisionTransformer
from agriclip_jax.tokenizer import installed_openai_bpe, load_tokenizer
from test_convert_clip import random_variables
from test_embed import reference_view

VENDORED_CORN = Path(__file__).resolve().parent / "data" / "corn"
CLASSES = ["Blight", "Common_Rust", "Gray_Leaf_Spot", "Healthy"]


@pytest.fixture(scope="module")
def corn_split(request, tmp_path_factory):
  """train: up to 3 lab photos per class (4 classes); test: up to 2 field photos per class (the field
  photos have no Healthy class: test classes are matched to the training classes by name)."""
  root = VENDORED_CORN if VENDORED_CORN.is_dir() else request.getfixturevalue("corn_dir")
  out = tmp_path_factory.mktemp("corn_split")
  for split, per_class, target in (("lab", 3, "train"), ("field", 2, "test")):
    for folder in sorted((root / split).iterdir()):
      for photo in sorted(folder.glob("*.jpg"))[:per_class]:
        (out / target / folder.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(photo, out / target / folder.name / photo.name)
  return out / "train", out / "test"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  bpe = installed_openai_bpe()
  if bpe is None:
    pytest.skip("open_clip_torch (the OpenAI BPE file) is not installed")
  root = tmp_path_factory.mktemp("eval_models")
  clip = clip_config("tiny")
  model_io.save_model_dir(root / "clip", "clip", clip.to_dict(),
                          random_variables("clip", clip.to_dict(), seed=1),
                          load_tokenizer(bpe).save(tmp_path_factory.mktemp("tok")))
  dino = vision_config("tiny", flavour="dino")
  model_io.save_model_dir(root / "dino", "vit", dino.to_dict(),
                          random_variables("vit", dino.to_dict(), seed=2))
  rng = np.random.default_rng(3)
  aligner = align.LinearAligner(rng.normal(0, 0.2, (clip.embed_dim, dino.width)).astype(np.float32),
                                rng.normal(0, 0.1, clip.embed_dim).astype(np.float32))
  align.save_aligner(aligner, root / "aligner.npz")
  return root


def _images(folder: Path) -> tuple[list[Path], np.ndarray]:
  paths = sorted(folder.rglob("*.jpg"))
  return paths, np.array([CLASSES.index(p.parent.name) for p in paths])


@pytest.fixture(scope="module")
def reference_features(models, corn_split):
  """{split: {kind: [N, D]}, split + "_labels": [N]} computed one image at a time."""
  _, clip_config_dict, clip_variables = model_io.load_model_dir(models / "clip")
  clip = CLIP(CLIPConfig.from_dict(clip_config_dict))
  _, dino_config_dict, dino_variables = model_io.load_model_dir(models / "dino")
  dino = VisionTransformer(vision_config("tiny", flavour="dino"))
  assert dino_config_dict == dino.config.to_dict()
  aligner = align.load_aligner(models / "aligner.npz")
  encode_clip = jax.jit(lambda x: clip.apply(clip_variables, x, method=CLIP.encode_image))
  encode_dino = jax.jit(lambda x: dino.apply(dino_variables, x))
  out = {}
  for split, folder in zip(("train", "test"), corn_split):
    paths, labels = _images(folder)
    clip_features = np.concatenate([encode_clip(reference_view(p, 32)[None]) for p in paths])
    dino_features = np.concatenate([encode_dino(reference_view(p, 32, dino=True)[None]) for p in paths])
    aligned = dino_features @ aligner.weight.T + aligner.bias
    out[split] = {"clip": clip_features, "dino": dino_features, "agriclip": aligned,
                  "concat": np.concatenate([evaluation.l2_normalise(clip_features),
                                            evaluation.l2_normalise(aligned)], axis=1)}
    out[f"{split}_labels"] = labels
  return out


def _common_flags(models, corn_split):
  return ["--model", str(models / "clip"), "--dino", str(models / "dino"),
          "--aligner", str(models / "aligner.npz"), "--train", str(corn_split[0]),
          "--test", str(corn_split[1]), "--batch-size", "4"]


def test_knn_command_equals_evaluation_on_independent_features(models, corn_split,
                                                               reference_features, tmp_path, capsys):
  out = tmp_path / "knn.json"
  capsys.readouterr()
  assert cli.main(["knn", *_common_flags(models, corn_split), "--features", "agriclip", "clip",
                   "--k", "1", "3", "5", "--out", str(out)]) == 0
  console = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[knn] ")]
  document = json.loads(out.read_text())
  ref = reference_features
  train_n, test_n = len(ref["train_labels"]), len(ref["test_labels"])
  assert document["features"] == "agriclip" and document["class_names"] == CLASSES
  assert document["train"] == {**document["train"], "images": train_n, "classes": 4, "skipped": {}}
  assert document["test"] == {**document["test"], "images": test_n,
                              "classes": len(set(ref["test_labels"]))}
  correct = {}
  for kind in ("agriclip", "clip"):
    ranked = evaluation.knn_predict(ref["train"][kind], ref["train_labels"], ref["test"][kind], 4,
                                    (1, 3, 5))
    section = document["knn"] if kind == "agriclip" else document["compared"]["clip"]["knn"]
    assert sorted(section) == ["1", "3", "5"]
    for k, ranking in ranked.items():
      correct[kind, k] = evaluation.topk_correct(ranking, ref["test_labels"], 1)
      row = section[str(k)]
      assert row["top1"] == pytest.approx(correct[kind, k].mean())
      assert row["top5"] == pytest.approx(evaluation.topk_correct(ranking, ref["test_labels"], 5).mean())
      assert row["top1_interval"] == pytest.approx(evaluation.bootstrap_interval(correct[kind, k]))
      assert row["top1_interval"]["images"] == test_n
  difference = document["compared"]["clip"]["difference"]["3"]["top1"]
  assert difference == pytest.approx(
      evaluation.paired_bootstrap_difference(correct["agriclip", 3], correct["clip", 3]))
  # The console shows every feature kind, the compared one with its paired difference.
  assert [line.split(":")[0] for line in console[:-1]] == [
      f"[knn] {kind} k={k}" for kind in ("agriclip", "clip") for k in (1, 3, 5)]
  clip_k3 = console[4]
  assert f"{100 * document['compared']['clip']['knn']['3']['top1']:.2f}%" in clip_k3
  assert (f"agriclip - clip {100 * difference['difference']:+.2f} [{100 * difference['low']:+.2f}, "
          f"{100 * difference['high']:+.2f}]") in clip_k3


def test_probe_command_equals_evaluation_on_independent_features(models, corn_split,
                                                                 reference_features, tmp_path):
  out = tmp_path / "probe.json"
  assert cli.main(["probe", *_common_flags(models, corn_split), "--features", "concat",
                   "--C", "0.1", "10", "--shots", "1", "--seeds", "2", "--resamples", "200",
                   "--out", str(out)]) == 0
  document = json.loads(out.read_text())
  ref = reference_features
  train, test = ref["train"]["concat"], ref["test"]["concat"]
  probe, sweep = evaluation.sweep_probe(train, ref["train_labels"], 4, (0.1, 10.0))
  correct = probe.ranked(evaluation.l2_normalise(test))[:, 0] == ref["test_labels"]
  row = document["probe"]
  assert row["C"] == probe.C and row["sweep"]["C"] == [0.1, 10.0]
  assert row["sweep"]["validation_top1"] == pytest.approx(sweep["validation_top1"])
  assert row["top1"] == pytest.approx(correct.mean())
  assert row["top1_interval"] == pytest.approx(evaluation.bootstrap_interval(correct, resamples=200))
  expected = evaluation.fewshot(train, ref["train_labels"], test, ref["test_labels"], 4, (1,), 2,
                                (0.1, 10.0))
  assert set(document["fewshot"]) == {"1"}
  for method in ("probe", "centroid"):
    assert document["fewshot"]["1"][method]["mean"] == pytest.approx(expected["1"][method]["mean"])
    assert document["fewshot"]["1"][method]["std"] == pytest.approx(expected["1"][method]["std"])


def test_eval_commands_name_what_is_missing(models, corn_split, tmp_path, capsys):
  out = tmp_path / "x.json"
  assert cli.main(["knn", "--model", str(models / "clip"), "--train", str(corn_split[0]),
                   "--test", str(corn_split[1]), "--features", "agriclip", "--out", str(out)]) == 2
  assert "features ['agriclip'] need --dino and --aligner" in capsys.readouterr().err
  # the training photos are lab photos: a test class they lack is named
  assert cli.main(["knn", "--model", str(models / "clip"), "--features", "clip", "--train",
                   str(corn_split[1]), "--test", str(corn_split[0]), "--k", "1", "--out", str(out)]) == 2
  assert "classes ['Healthy'] are not among the training classes" in capsys.readouterr().err
  assert cli.main(["probe", "--model", str(models / "clip"), "--features", "clip", "--train",
                   str(corn_split[0]), "--test", str(corn_split[1]), "--shots", "1", "9",
                   "--out", str(out)]) == 2
  assert re.search(r"--shots 9 needs as many training images of every class; .*train has fewer of "
                   r"\{'Blight': \d, ", capsys.readouterr().err)
  assert not out.exists()


def test_a_probe_that_stops_at_max_iter_says_so(models, corn_split, tmp_path, capsys):
  out = tmp_path / "probe.json"
  capsys.readouterr()
  assert cli.main(["probe", *_common_flags(models, corn_split), "--features", "clip", "--C", "10",
                   "--max-iter", "2", "--out", str(out)]) == 0
  assert json.loads(out.read_text())["probe"]["iterations"] == 2
  assert ("[probe] warning: the clip probe (C 10) stopped at the --max-iter limit of 2 L-BFGS "
          "iterations before converging") in capsys.readouterr().err
