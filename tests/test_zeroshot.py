"""Zero-shot: toy case with known answers for all three methods, metrics vs brute force, splits."""

import numpy as np
import pytest

from agriclip_jax import align, evaluation, zeroshot

CLASSES = ["Common_Rust", "Gray_Leaf_Spot", "Blight", "Healthy"]
TEMPLATES = ["a photo of {}.", "a leaf with {}"]


def _toy_text_encoder(embed_dim=8, seed=0):
  """Each cleaned class name owns a basis direction; templates add a small shared offset."""
  rng = np.random.default_rng(seed)
  basis = np.linalg.qr(rng.normal(size=(embed_dim, embed_dim)))[0]
  class_vec = {zeroshot.clean_class_name(c): 3.0 * basis[i] for i, c in enumerate(CLASSES)}
  template_vec = {t: 0.2 * basis[len(CLASSES) + i] for i, t in enumerate(TEMPLATES)}
  seen = []

  def encode_text(prompts):
    seen.extend(prompts)
    rows = []
    for prompt in prompts:
      (name,) = [c for c in class_vec if c in prompt]
      (template,) = [t for t in TEMPLATES if prompt == t.format(name)]
      rows.append(class_vec[name] + template_vec[template])
    return np.stack(rows)

  return encode_text, class_vec, seen


def test_class_embeddings_average_normalised_templates():
  encode_text, _, seen = _toy_text_encoder()
  names = [zeroshot.clean_class_name(c) for c in CLASSES]
  got = zeroshot.class_embeddings(names, TEMPLATES, encode_text, batch_size=3)
  assert len(seen) == len(names) * len(TEMPLATES)
  for i, name in enumerate(names):
    per_template = [encode_text([t.format(name)])[0] for t in TEMPLATES]
    mean = np.mean([v / np.linalg.norm(v) for v in per_template], axis=0)
    np.testing.assert_allclose(got[i], mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)


def test_toy_zero_shot_scores_100_percent_for_all_three_methods():
  rng = np.random.default_rng(1)
  encode_text, class_vec, _ = _toy_text_encoder()
  names = [zeroshot.clean_class_name(c) for c in CLASSES]
  class_emb = zeroshot.class_embeddings(names, TEMPLATES, encode_text)
  labels = np.repeat(np.arange(len(CLASSES)), 5)
  targets = np.stack([class_vec[names[label]] for label in labels])
  clip_images = targets + 0.3 * rng.normal(size=targets.shape)
  # DINO features that the aligner maps onto the class directions (plus a null-space component).
  aligner = align.LinearAligner(rng.normal(size=(8, 12)).astype(np.float32),
                                rng.normal(size=8).astype(np.float32))
  pinv = np.linalg.pinv(aligner.weight.astype(np.float64))
  null = np.eye(12) - pinv @ aligner.weight
  dino = (targets + 0.3 * rng.normal(size=targets.shape) - aligner.bias) @ pinv.T
  dino = dino + rng.normal(size=dino.shape) @ null.T
  results, differences = zeroshot.evaluate(class_emb, labels, CLASSES, clip_images, dino,
                                           aligner, ensemble_weight=0.3)
  assert set(results) == {"clip", "agriclip", "ensemble"}
  for method, metrics in results.items():
    assert metrics["top1"] == 1.0, method
    assert metrics["top5"] == 1.0 and metrics["balanced_accuracy"] == 1.0
    np.testing.assert_array_equal(metrics["confusion"], np.diag([5] * len(CLASSES)))
  # The same data with shuffled class embeddings must fail: the test can tell right from wrong.
  assert [d["methods"] for d in differences] == [["agriclip", "clip"], ["ensemble", "clip"]]
  assert all(d["top1"]["difference"] == 0.0 for d in differences)
  wrong, _ = zeroshot.evaluate(class_emb[::-1], labels, CLASSES, clip_images, dino, aligner)
  assert all(m["top1"] == 0.0 for m in wrong.values())


def test_agriclip_path_is_aligner_then_normalise_then_cosine():
  rng = np.random.default_rng(2)
  aligner = align.LinearAligner(rng.normal(size=(4, 6)).astype(np.float32),
                                rng.normal(size=4).astype(np.float32))
  class_emb = zeroshot.l2_normalize(rng.normal(size=(3, 4)))
  dino = rng.normal(size=(5, 6)).astype(np.float32)
  scores = zeroshot.method_scores(class_emb, dino_features=dino, aligner=aligner,
                                  methods=["agriclip"], logit_scale=10.0)["agriclip"]
  aligned = dino @ aligner.weight.T + aligner.bias
  want = 10.0 * (aligned / np.linalg.norm(aligned, axis=1, keepdims=True)) @ class_emb.T
  np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-5)


def test_ensemble_is_weighted_probabilities():
  rng = np.random.default_rng(3)
  class_emb = zeroshot.l2_normalize(rng.normal(size=(3, 4)))
  clip_images = rng.normal(size=(6, 4))
  aligner = align.LinearAligner(np.eye(4, dtype=np.float32), np.zeros(4, np.float32))
  dino = rng.normal(size=(6, 4))
  scores = zeroshot.method_scores(class_emb, clip_images, dino, aligner, ensemble_weight=0.25,
                                  logit_scale=5.0)

  def probs(x):
    logits = 5.0 * zeroshot.l2_normalize(x) @ class_emb.T
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)

  np.testing.assert_allclose(scores["ensemble"], 0.25 * probs(clip_images) + 0.75 * probs(dino),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="row counts differ"):
    zeroshot.method_scores(class_emb, clip_images, dino[:5], aligner)
  with pytest.raises(ValueError, match="unknown methods"):
    zeroshot.method_scores(class_emb, clip_images, methods=["dino"])


def test_classification_metrics_against_brute_force():
  rng = np.random.default_rng(4)
  scores = rng.normal(size=(50, 7))
  labels = rng.integers(0, 6, size=50)  # class 6 never occurs: excluded from balanced accuracy
  got = zeroshot.classification_metrics(scores, labels)
  top1 = np.mean([np.argmax(s) == y for s, y in zip(scores, labels)])
  top5 = np.mean([y in np.argsort(-s)[:5] for s, y in zip(scores, labels)])
  confusion = np.zeros((7, 7), int)
  for s, y in zip(scores, labels):
    confusion[y, np.argmax(s)] += 1
  per_class = [confusion[c, c] / confusion[c].sum() for c in range(6)]
  assert got["top1"] == pytest.approx(top1)
  assert got["top5"] == pytest.approx(top5)
  assert got["balanced_accuracy"] == pytest.approx(np.mean(per_class))
  assert got["per_class"]["6"] is None
  np.testing.assert_array_equal(got["confusion"], confusion)
  # The intervals are evaluation.bootstrap_interval of the same per-image correctness.
  correct = np.array([np.argmax(s) == y for s, y in zip(scores, labels)])
  assert got["top1_interval"] == evaluation.bootstrap_interval(correct)
  assert got["top1_interval"]["low"] <= got["top1"] <= got["top1_interval"]["high"]
  assert got["top1_interval"]["images"] == 50


def test_differences_are_paired_bootstraps_of_the_same_images():
  rng = np.random.default_rng(5)
  labels = rng.integers(0, 3, size=40)
  clip = rng.normal(size=(40, 3))
  better = clip.copy()
  better[np.arange(40), labels] += 1.0  # right more often than clip, on the same images
  [difference] = zeroshot.method_differences({"clip": clip, "agriclip": better}, labels)
  correct_a = np.argmax(better, 1) == labels
  correct_b = np.argmax(clip, 1) == labels
  assert difference["methods"] == ["agriclip", "clip"]
  assert difference["top1"] == evaluation.paired_bootstrap_difference(correct_a, correct_b)
  assert difference["top1"]["difference"] == pytest.approx(correct_a.mean() - correct_b.mean())
  assert zeroshot.method_differences({"agriclip": better}, labels) == []


def test_retrieval_recall_against_brute_force():
  rng = np.random.default_rng(5)
  images = rng.normal(size=(12, 6))
  owner = np.concatenate([np.arange(12), rng.integers(0, 12, size=10)])  # some images have 2+ captions
  texts = images[owner] + 1.5 * rng.normal(size=(len(owner), 6))
  got = zeroshot.retrieval_recall(images, texts, owner, ks=(1, 5, 10))
  sim = zeroshot.l2_normalize(images) @ zeroshot.l2_normalize(texts).T
  for k in (1, 5, 10):
    i2t = np.mean([np.any(owner[np.argsort(-sim[i])[:k]] == i) for i in range(12)])
    t2i = np.mean([owner[j] in np.argsort(-sim[:, j])[:k] for j in range(len(owner))])
    assert got[f"image_to_text_R@{k}"] == pytest.approx(i2t)
    assert got[f"text_to_image_R@{k}"] == pytest.approx(t2i)
  assert 0 < got["image_to_text_R@1"] < 1  # the noise makes the case non-trivial


def test_templates_and_class_names():
  assert zeroshot.clean_class_name("Tomato___Early_blight") == "tomato early blight"
  assert zeroshot.clean_class_name("GrayLeafSpot") == "gray leaf spot"
  assert zeroshot.build_prompts(["rust"], ["a photo contain {} deficiency"]) == [
      "a photo contain rust deficiency"]
  for bad in ("a photo of a leaf", "a {} with {}", "a photo of {name}", "a photo of {"):
    with pytest.raises(ValueError, match="template"):
      zeroshot.validate_template(bad)


def test_eval_split_is_deterministic_and_order_free():
  paths = [f"Class{i % 3}/img_{i:04d}.jpg" for i in range(2000)]
  chosen = zeroshot.eval_indices(paths, 0.2)
  assert 0.17 < len(chosen) / len(paths) < 0.23
  reversed_choice = zeroshot.eval_indices(paths[::-1], 0.2)
  assert {paths[i] for i in chosen} == {paths[::-1][i] for i in reversed_choice}
  assert zeroshot.is_eval_item("./Class0/img_0001.jpg", 0.2) == zeroshot.is_eval_item(
      "Class0/img_0001.jpg", 0.2)
  assert set(zeroshot.eval_indices(paths, 0.2, salt="other")) != set(chosen)
  assert len(zeroshot.eval_indices(paths, 1.0)) == len(paths)


# ----------------------------------------------------------------------------------------------
# The commands end to end with tiny real models: align -> zeroshot -> report
# ----------------------------------------------------------------------------------------------

def _tiny_models(tmp_path):
  from agriclip_jax import model_io, tokenizer
  from agriclip_jax.models.configs import clip_config, vision_config
  captions = [f"a photo of a corn leaf with {c}" for c in ("blight", "common rust", "gray leaf spot")] * 20
  tok_dir = tmp_path / "tok"
  tokenizer.train_bpe_tokenizer(captions, vocab_size=600, out_dir=tok_dir)
  import jax

  def init(model_type, config, seed):
    """Random weights of the right shapes from numpy: compiling Flax's init costs more on 2 CPU
    cores than the rest of this test; these models only need to run, not to be good."""
    rng = np.random.default_rng(seed)
    shapes = model_io.abstract_variables(model_type, config)

    def fill(path, leaf):
      if "scale" in jax.tree_util.keystr(path):
        return np.ones(leaf.shape, leaf.dtype)
      return (0.05 * rng.normal(size=leaf.shape)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)

  clip_cfg = clip_config("tiny").to_dict()
  clip_dir = model_io.save_model_dir(tmp_path / "clip", "clip", clip_cfg, init("clip", clip_cfg, 0),
                                     tok_dir)
  dino_cfg = vision_config("tiny", flavour="dino").to_dict()
  dino_dir = model_io.save_model_dir(tmp_path / "dino", "vit", dino_cfg, init("vit", dino_cfg, 1))
  return clip_dir, dino_dir


def test_commands_align_zeroshot_report_on_real_photos(corn_dir, tmp_path, capsys):
  import json
  import shutil

  import jax

  from agriclip_jax import cli, model_io
  data = tmp_path / "field"
  for class_dir in sorted((corn_dir / "field").iterdir()):
    (data / class_dir.name).mkdir(parents=True)
    for image in sorted(class_dir.glob("*.jpg"))[:6]:
      shutil.copy(image, data / class_dir.name / image.name)
  total = len(list(data.glob("*/*.jpg")))  # 18 of the shared set, 5 of the vendored one
  clip_dir, dino_dir = _tiny_models(tmp_path)
  cache = tmp_path / "cache"
  aligner_path = tmp_path / "aligner.pth"
  assert cli.main(["align", "--dino", str(dino_dir), "--model", str(clip_dir), "--data", str(data),
                   "--reserve-eval", "0.5", "--holdout", "0.2", "--ridge", "auto",
                   "--cache", str(cache), "--batch-size", "8", "--out", str(aligner_path)]) == 0
  summary = json.loads((tmp_path / "aligner.pth.metrics.json").read_text())
  assert summary["method"] == "exact" and summary["in_dim"] == 64 and summary["out_dim"] == 32
  assert summary["rows"] < total  # the evaluation half was held back
  results = tmp_path / "results.json"
  assert cli.main(["zeroshot", "--model", str(clip_dir), "--dino", str(dino_dir),
                   "--aligner", str(aligner_path), "--data", str(data), "--template",
                   "a photo of a corn leaf with {}", "--eval-fraction", "0.5", "--cache", str(cache),
                   "--batch-size", "8", "--retrieval", "--out", str(results)]) == 0
  document = json.loads(results.read_text())
  assert [r["method"] for r in document["retrieval"]] == ["clip", "agriclip"]
  assert all(0 <= r["image_to_text_R@10"] <= 1 for r in document["retrieval"])
  assert [r["method"] for r in document["results"]] == ["clip", "agriclip", "ensemble"]
  evaluated = document["results"][0]["num_images"]
  assert evaluated + summary["rows"] == total  # evaluation and alignment images are disjoint
  assert document["results"][0]["class_names"] == ["Blight", "Common_Rust", "Gray_Leaf_Spot"]
  assert set(document["mean"]) == {"clip", "agriclip", "ensemble"}
  assert cli.main(["report", "--results", str(results), "--out", str(tmp_path / "report")]) == 0
  assert (tmp_path / "report" / "accuracy.png").stat().st_size > 1000
  assert "Image-text retrieval" in (tmp_path / "report" / "report.md").read_text()
  assert len(list((tmp_path / "report" / "confusion").glob("*.png"))) == 3

  # DINO's linear-evaluation pooling: the aligner reads [cls, mean patch] (2 x 64) and records it
  # with the models' fingerprints; zero-shot takes the pooling from the file, and other DINO
  # features (even of the same width: last2) or another DINO model are clear errors.
  pooled = tmp_path / "aligner_pooled.safetensors"
  assert cli.main(["align", "--dino", str(dino_dir), "--model", str(clip_dir), "--data", str(data),
                   "--dino-pooling", "cls+avgpool", "--batch-size", "8", "--out", str(pooled)]) == 0
  assert json.loads((tmp_path / "aligner_pooled.safetensors.metrics.json").read_text())["in_dim"] == 128
  from safetensors import safe_open
  with safe_open(str(pooled), "np") as handle:
    assert json.loads(handle.metadata()["dino_pooling"]) == "cls+avgpool"
    assert len(json.loads(handle.metadata()["dino_fingerprint"])) == 20
  zeroshot_args = ["zeroshot", "--model", str(clip_dir), "--dino", str(dino_dir), "--aligner",
                   str(pooled), "--data", str(data), "--template", "a photo of a corn leaf with {}",
                   "--method", "agriclip", "--batch-size", "8", "--out", str(results)]
  capsys.readouterr()
  for pooling in ("last2", "cls"):  # last2 has cls+avgpool's width (2 x 64) on this 2-block ViT
    assert cli.main(zeroshot_args + ["--dino-pooling", pooling]) == 2
    assert (f"{pooled} was fitted on DINO pooling 'cls+avgpool', but --dino-pooling is '{pooling}'"
            in capsys.readouterr().err)
  assert cli.main(zeroshot_args + ["--dino-pooling", "cls+avgpool"]) == 0
  assert cli.main(zeroshot_args) == 0  # the pooling comes from the aligner file
  assert json.loads(results.read_text())["results"][0]["num_images"] == total
  other_dino = tmp_path / "other_dino"
  shutil.copytree(dino_dir, other_dino)
  _, config, variables = model_io.load_model_dir(dino_dir)
  variables = jax.tree_util.tree_map(lambda a: np.asarray(a) * 1.01, variables)
  model_io.save_model_dir(other_dino, "vit", config, variables, keep_others=True)
  other_args = [str(other_dino) if a == str(dino_dir) else a for a in zeroshot_args]
  assert cli.main(other_args) == 2
  assert f"the DINO model given is {other_dino} (fingerprint" in capsys.readouterr().err
  # The reference .pth format records nothing: the flag decides, and widths are all that is checked.
  reference = tmp_path / "aligner_pooled.pth"
  align.save_aligner(align.load_aligner(pooled), reference)
  pth_args = [str(reference) if a == str(pooled) else a for a in zeroshot_args]
  assert cli.main(pth_args) == 2  # default pooling 'cls': 64-d, the aligner reads 128
  assert "--dino-pooling" in capsys.readouterr().err
  assert cli.main(pth_args + ["--dino-pooling", "cls+avgpool"]) == 0


def test_zeroshot_command_errors(tmp_path, capsys):
  from agriclip_jax import cli
  (tmp_path / "data" / "Rust").mkdir(parents=True)
  (tmp_path / "data" / "Rust" / "a.jpg").write_bytes(b"x")
  (tmp_path / "data" / "Empty").mkdir()
  out = str(tmp_path / "r.json")
  # The command turns bad input into exit code 2 and one line naming the problem.
  assert cli.main(["zeroshot", "--data", str(tmp_path / "data"), "--template", "a leaf", "--out", out]) == 2
  assert "agriclip zeroshot: error:" in (err := capsys.readouterr().err) and "must contain exactly one" in err
  assert cli.main(["zeroshot", "--data", str(tmp_path / "data"), "--template", "a {}", "--out", out]) == 2
  assert "Empty holds no images" in capsys.readouterr().err
  assert cli.main(["zeroshot", "--task", "banana", "--data", str(tmp_path / "data"), "--out", out]) == 2
  assert "unknown task 'banana'" in capsys.readouterr().err


def test_ensemble_scores_follow_their_formula_with_temperatures():
  rng = np.random.default_rng(0)
  class_emb = zeroshot.l2_normalize(rng.normal(size=(4, 8)))
  clip_image, dino = rng.normal(size=(5, 8)), rng.normal(size=(5, 6))
  from agriclip_jax.align import LinearAligner
  aligner = LinearAligner(rng.normal(size=(8, 6)).astype(np.float32), np.zeros(8, np.float32))
  scores = zeroshot.method_scores(class_emb, clip_image, dino, aligner, ("ensemble",), 0.3,
                                  temperatures=(0.02, 0.2))["ensemble"]
  cos_clip = zeroshot.l2_normalize(clip_image) @ class_emb.T
  cos_agri = zeroshot.l2_normalize(dino @ aligner.weight.T) @ class_emb.T
  soft = lambda z: np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)  # noqa: E731
  np.testing.assert_allclose(scores, 0.3 * soft(cos_clip / 0.02) + 0.7 * soft(cos_agri / 0.2),
                             rtol=1e-5, atol=1e-6)


def test_calibration_prefers_the_informative_member_and_the_lowest_nll_temperature():
  rng = np.random.default_rng(1)
  text = rng.normal(size=(60, 16))
  informative = text + 0.5 * rng.normal(size=text.shape)  # close to its own caption
  noise = rng.normal(size=text.shape)                     # unrelated to the captions
  owner = np.arange(60)
  chosen = zeroshot.calibrate_ensemble(informative, noise, text, owner)
  assert chosen["weight"] == 1.0 and chosen["validation"]["images"] == 60
  assert zeroshot.calibrate_ensemble(noise, informative, text, owner)["weight"] == 0.0
  # The CLIP temperature is the grid's minimiser of the caption NLL (checked by brute force).
  cosine = zeroshot.l2_normalize(informative) @ zeroshot.l2_normalize(text).T
  def nll(t):
    z = cosine / t
    log_p = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
    return -log_p[owner, owner].mean()
  losses = {t: nll(t) for t in zeroshot.DEFAULT_TEMPERATURE_GRID}
  assert chosen["clip_temperature"] == min(losses, key=losses.get)
  assert chosen["validation"]["clip"]["caption_top1"] > 0.9


def test_the_ensemble_is_calibrated_on_the_align_data_never_on_the_task(corn_dir, tmp_path,
                                                                        monkeypatch):
  """`agriclip align` records the ensemble's weight and temperatures chosen on its held-out rows;
  `agriclip zeroshot` uses them on any task without calibrating anything (calibration is made to
  fail during zeroshot), and records the choice beside the ensemble's accuracy."""
  import json
  import shutil

  from safetensors import safe_open

  from agriclip_jax import cli
  align_data, tasks = tmp_path / "align", {"field": tmp_path / "field", "lab": tmp_path / "lab"}
  for split, target, count in (("field", align_data, 4), ("field", tasks["field"], 2),
                               ("lab", tasks["lab"], 2)):
    for class_dir in sorted((corn_dir / split).iterdir()):
      (target / class_dir.name).mkdir(parents=True, exist_ok=True)
      for image in sorted(class_dir.glob("*.jpg"))[-count:]:
        shutil.copy(image, target / class_dir.name / image.name)
  clip_dir, dino_dir = _tiny_models(tmp_path)
  aligner = tmp_path / "aligner.safetensors"
  assert cli.main(["align", "--dino", str(dino_dir), "--model", str(clip_dir), "--data",
                   str(align_data), "--holdout", "0.5", "--batch-size", "8", "--out",
                   str(aligner)]) == 0
  with safe_open(str(aligner), "np") as handle:
    recorded = json.loads(handle.metadata()["ensemble"])
  assert 0.0 <= recorded["weight"] <= 1.0 and recorded["validation"]["images"] >= 2

  def no_calibration(*args, **kwargs):
    raise AssertionError("zero-shot must not calibrate on the task it scores")
  monkeypatch.setattr(zeroshot, "calibrate_ensemble", no_calibration)
  monkeypatch.setattr(zeroshot, "calibrate_on_source", no_calibration)
  for name, data in tasks.items():
    out = tmp_path / f"{name}.json"
    assert cli.main(["zeroshot", "--model", str(clip_dir), "--dino", str(dino_dir), "--aligner",
                     str(aligner), "--data", str(data), "--template", "a photo of a corn leaf with {}",
                     "--batch-size", "8", "--out", str(out)]) == 0
    [row] = [r for r in json.loads(out.read_text())["results"] if r["method"] == "ensemble"]
    for key in ("weight", "clip_temperature", "agriclip_temperature"):
      assert row["ensemble"][key] == recorded[key], (name, key)
    assert "calibration" in row["ensemble"]["source"]


def test_zeroshot_puts_the_metadatas_readable_class_names_into_the_templates(corn_dir, tmp_path,
                                                                             capsys):
  import json
  from pathlib import Path

  from agriclip_jax import api, cli
  metadata = Path(__file__).resolve().parents[1] / "configs" / "corn_metadata.json"
  readable = {name: c["readable"] for name, c in json.loads(metadata.read_text())["classes"].items()}
  clip_dir, _ = _tiny_models(tmp_path)
  data = corn_dir / "field"
  template = "a photo of a corn leaf with {}."
  out = tmp_path / "zeroshot.json"
  assert cli.main(["zeroshot", "--model", str(clip_dir), "--data", str(data), "--template",
                   template, "--method", "clip", "--metadata", str(metadata),
                   "--out", str(out)]) == 0
  row = json.loads(out.read_text())["results"][0]
  folders = sorted(p.name for p in data.iterdir() if p.is_dir())
  assert row["prompt_names"] == [readable[f] for f in folders]
  # The Python API, given the readable names as labels, predicts the same top-1.
  photos = sorted(p for f in folders for p in (data / f).iterdir())
  truth = [readable[p.parent.name] for p in photos]
  predictions = api.load(clip_dir).classify(photos, [readable[f] for f in folders], [template],
                                            "clip")
  assert row["top1"] == pytest.approx(np.mean([p.label == t for p, t in zip(predictions, truth)]))
  # A class folder the metadata does not know is named before any model loads.
  (tmp_path / "data" / "Mystery").mkdir(parents=True)
  (tmp_path / "data" / "Mystery" / "leaf.jpg").write_bytes(photos[0].read_bytes())
  capsys.readouterr()
  assert cli.main(["zeroshot", "--model", str(tmp_path / "nowhere"), "--data",
                   str(tmp_path / "data"), "--template", template, "--metadata", str(metadata),
                   "--out", str(tmp_path / "x.json")]) == 2
  assert f"--metadata {metadata}: class folder(s) ['Mystery'] of {tmp_path / 'data'} have no entry" \
      in capsys.readouterr().err
