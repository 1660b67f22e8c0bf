"""`agriclip train` with `config.evals`: zero-shot and kNN evaluations of the parameters being
trained, on real photos, every N steps; their numbers equal what the evaluation engine gives on the
exported model of that step; a failing evaluation is one line and the run goes on; a bad evals
section is refused before anything compiles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agriclip_jax import cli
from agriclip_jax.train.metrics_writer import read_metrics

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/tiny.py")
CORN = REPO / "tests/data/corn"
TEMPLATES = ("{} on a maize leaf.",)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
  from agriclip_jax.tokenizer import train_bpe_tokenizer
  out = tmp_path_factory.mktemp("tokenizer")
  train_bpe_tokenizer(["blight on a maize leaf", "common rust on a maize leaf",
                       "gray leaf spot on a maize leaf", "healthy maize leaf"] * 10,
                      vocab_size=600, out_dir=out)
  return out


def _args(workdir: Path, tokenizer_dir: Path, evals, *extra: str) -> list[str]:
  from agriclip_jax.tokenizer import load_tokenizer
  vocab = load_tokenizer(tokenizer_dir).vocab_size
  return ["train", "--config", f"{TINY}:contrastive", "--workdir", str(workdir),
          "--config.total_steps=4", "--config.log_every_steps=2",
          "--config.checkpoint_every_steps=4", "--config.batch_size=8", "--config.mesh.data=2",
          "--config.clip.layers=1", "--config.async_checkpoints=False",
          f"--config.data.tokenizer={tokenizer_dir}", f"--config.clip.vocab_size={vocab}",
          f"--config.evals={tuple(evals)!r}", *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer_dir):
  """One 4-step contrastive run with a zero-shot eval every 2 steps, a kNN eval at step 4 and
  an eval whose folder does not exist."""
  workdir = tmp_path_factory.mktemp("evals") / "run"
  evals = [dict(name="lab", kind="zeroshot", source=str(CORN / "lab"), templates=TEMPLATES,
                every=2),
           dict(name="field_knn", kind="knn", train=str(CORN / "lab"), test=str(CORN / "field"),
                k=3, every=4),
           dict(name="gone", kind="zeroshot", source=str(workdir.parent / "missing"), every=2)]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  result = subprocess.run([sys.executable, "-m", "agriclip_jax",
                           *_args(workdir, tokenizer_dir, evals)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
  return workdir, result


def test_evaluations_are_logged_at_their_steps_and_a_failing_one_does_not_stop_training(run):
  workdir, result = run
  assert result.returncode == 0, result.stderr[-3000:]
  records = {m["step"]: m for m in read_metrics(workdir)}
  assert sorted(records) == [2, 4]
  assert {k for k in records[2] if k.startswith("eval/")} == {
      "eval/lab/top1", "eval/lab/top5", "eval/lab/images"}
  assert {k for k in records[4] if k.startswith("eval/")} == {
      "eval/lab/top1", "eval/lab/top5", "eval/lab/images", "eval/field_knn/top1",
      "eval/field_knn/top5", "eval/field_knn/images"}
  assert records[4]["eval/lab/images"] == 7 and records[4]["eval/field_knn/images"] == 5
  assert "loss" in records[2] and "loss" in records[4]
  failures = [line for line in result.stderr.splitlines() if "evaluation 'gone'" in line]
  assert len(failures) == 2, result.stderr[-3000:]
  assert failures[0].startswith("warning: evaluation 'gone' (zeroshot) at step 2 failed and was "
                                "skipped; training goes on: ValueError: ")
  assert "missing" in failures[0]
  assert (workdir / "models/clip/model.safetensors").is_file()
  # The run's saved config records the evaluations.
  saved = json.loads((workdir / "config.json").read_text())
  assert [e["name"] for e in saved["evals"]] == ["lab", "field_knn", "gone"]
  # TensorBoard has them too.
  from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
  from tensorboard.util.tensor_util import make_ndarray
  [events] = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  top1 = {e.step: float(make_ndarray(v.tensor)) for e in EventFileLoader(str(events)).Load()
          for v in e.summary.value if v.tag == "eval/lab/top1"}
  assert top1 == pytest.approx({2: records[2]["eval/lab/top1"], 4: records[4]["eval/lab/top1"]})


def test_the_numbers_equal_the_engine_on_the_exported_model_of_that_step(run):
  """Step 4 is the last: models/clip holds its parameters. The model is read back from disk,
  with its recorded view and tokenizer, as `agriclip zeroshot` / `agriclip knn` read it."""
  from agriclip_jax import evaluation, features, zeroshot
  from input_pipeline.sources import open_source
  workdir, result = run
  assert result.returncode == 0, result.stderr[-3000:]
  logged = {m["step"]: m for m in read_metrics(workdir)}[4]
  clip = features.clip_model_encoders(workdir / "models/clip")

  def encode(folder):
    source = open_source(folder)
    encoded = features.encode_source(source, np.arange(len(source)), [clip.image])
    return encoded.features["clip_image"], encoded.labels, list(source.class_names)

  images, labels, names = encode(CORN / "lab")
  class_emb = zeroshot.class_embeddings([zeroshot.clean_class_name(n) for n in names],
                                        list(TEMPLATES), clip.encode_text)
  scores = zeroshot.method_scores(class_emb, clip_image_embeddings=images, methods=("clip",))
  expected = zeroshot.classification_metrics(scores["clip"], labels, names)
  assert logged["eval/lab/top1"] == pytest.approx(expected["top1"])
  assert logged["eval/lab/top5"] == pytest.approx(expected["top5"])

  test, test_labels, test_names = encode(CORN / "field")
  test_labels = np.array([names.index(test_names[i]) for i in test_labels])
  ranked = evaluation.knn_predict(images, labels, test, len(names), ks=(3,))[3]
  assert logged["eval/field_knn/top1"] == pytest.approx(
      evaluation.topk_correct(ranked, test_labels, 1).mean())
  assert logged["eval/field_knn/top5"] == pytest.approx(
      evaluation.topk_correct(ranked, test_labels, 5).mean())


@pytest.mark.parametrize("item, message", [
    (dict(name="x", kind="linear", source="d", every=2),
     "config.evals[0].kind='linear'; expected one of zeroshot, knn"),
    (dict(name="x", kind="zeroshot", every=2),
     "config.evals[0].source=None: a zeroshot evaluation needs a data source"),
    (dict(name="x", kind="knn", train="a", every=2),
     "config.evals[0].test=None: a knn evaluation needs a data source"),
    (dict(name="x", kind="zeroshot", source="d", templates=("a photo",), every=2),
     "config.evals[0].templates[0]='a photo': template 'a photo' must contain exactly one '{}'"),
    (dict(name="x", kind="knn", train="a", test="b", k=0, every=2),
     "config.evals[0].k=0 must be a positive integer"),
    (dict(name="x", kind="knn", train="a", test="b", every=2, kk=3),
     "config.evals[0]: unknown key(s) ['kk'] for a knn evaluation"),
])
def test_a_bad_evals_section_is_one_line_naming_the_key_before_anything_runs(
    item, message, tokenizer_dir, tmp_path, capsys):
  workdir = tmp_path / "run"
  capsys.readouterr()
  code = cli.main(_args(workdir, tokenizer_dir, [item]))
  err = capsys.readouterr().err
  assert code == 2
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith(f"agriclip train: error: {message}"), err
  assert not workdir.exists()


def test_knn_in_a_dino_run_uses_the_teacher_backbone_in_its_exported_view(tmp_path):
  """No step needed: a fresh DINO state whose teacher is moved away from the student, evaluated
  as `agriclip train` does, against the engine on the exported teacher (models/dino)."""
  import jax
  from agriclip_jax import evaluation, features
  from agriclip_jax.commands import train as train_command
  from agriclip_jax.train import evals, loop, sharding, state as state_lib
  from input_pipeline.sources import open_source
  cfg = train_command.build_config(f"{TINY}:dino", [("dino.layers", "1"), ("mesh.data", "2")])
  mesh = sharding.make_mesh(2, 1)
  task = state_lib.build_task(cfg, steps_per_epoch=10)
  state, _ = state_lib.create_sharded_state(task, mesh, cfg, state_lib.load_pretrained(task))
  state["teacher"] = jax.tree.map(lambda x: x * 1.5, state["teacher"])
  item = dict(name="k", kind="knn", train=str(CORN / "lab"), test=str(CORN / "field"), k=3,
              every=1)
  logged = evals.run_due([item], 1, state, evals.TrainedModels(task, cfg), mesh)

  loop.export_models(task, state, tmp_path, cfg)
  exported = features.dino_model_encoder(tmp_path / "models/dino")
  encoded = {}
  for folder in ("lab", "field"):
    source = open_source(CORN / folder)
    got = features.encode_source(source, np.arange(len(source)), [exported])
    encoded[folder] = (got.features["dino"], got.labels, list(source.class_names))
  (train, labels, names), (test, test_labels, test_names) = encoded["lab"], encoded["field"]
  test_labels = np.array([names.index(test_names[i]) for i in test_labels])
  ranked = evaluation.knn_predict(train, labels, test, len(names), ks=(3,))[3]
  assert logged == pytest.approx({
      "eval/k/top1": evaluation.topk_correct(ranked, test_labels, 1).mean(),
      "eval/k/top5": evaluation.topk_correct(ranked, test_labels, 5).mean(),
      "eval/k/images": 5})
  # The features themselves: the teacher's, not the student's.
  source = open_source(CORN / "lab")
  models = evals.TrainedModels(task, cfg)
  teacher = features.encode_source(source, np.arange(len(source)), [models.dino_teacher(
      state["teacher"]["dino"], None)]).features["dino"]
  student = features.encode_source(source, np.arange(len(source)), [models.dino_teacher(
      state["params"]["dino"], None)]).features["dino"]
  np.testing.assert_allclose(teacher, train, rtol=1e-5, atol=1e-5)
  assert not np.allclose(student, train, rtol=1e-3, atol=1e-3)
