"""`agriclip demo`: the quick demo end to end, its files, the PyTorch exports, and accuracy above
chance on every downstream task; plus the pieces of the own-data path that need no training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agriclip_jax import demo

METHODS = ("clip", "agriclip", "ensemble")
# Thresholds measured with configs/demo.py:quick over seeds 0, 1, 2 (each seed also changes the
# generated data). Worst seed in brackets.
# - Every task rendered in the pretraining style (held-out images, held-out subject x condition
#   pairs): the best method at least 2 points above chance [+4 points: bean leaf disease, seed 1;
#   the other five tasks +12 points or more].
PER_TASK_MARGIN = 0.02
# - Mean CLIP top-1 over the tasks of one kind, as a multiple of their mean chance:
#   held-out images [1.95x], held-out combinations [2.45x].
CLIP_OVER_CHANCE = {"heldout_images": 1.6, "heldout_combinations": 2.0}
# - AgriCLIP (aligned DINO, `last2` features) on the held-out images, mean over the tasks
#   [1.24x chance; 1.66x for seed 0].
AGRICLIP_OVER_CHANCE = 1.1
# The style-shift tasks (other backgrounds and lighting) stay near chance at this size (13-24 %
# for a 20 % chance): they are reported, not asserted; BENCHMARKS.md has the default-size numbers.
IN_STYLE_KINDS = ("heldout_images", "heldout_combinations")


WITHOUT_TORCH = Path(__file__).resolve().parent / "without_torch"
REPO_ROOT = Path(__file__).resolve().parents[1]


def _env_without_torch() -> dict[str, str]:
  """An environment where torch, torchvision, timm and open_clip cannot be imported: what a
  machine with requirements.txt alone gives `./run.sh`."""
  path = os.pathsep.join(p for p in (str(WITHOUT_TORCH), str(REPO_ROOT),
                                     os.environ.get("PYTHONPATH", "")) if p)
  return dict(os.environ, PYTHONPATH=path)


def agriclip_without_torch(*args: str) -> subprocess.CompletedProcess:
  """`python -m agriclip_jax ARGS` without torch (`_env_without_torch`)."""
  return subprocess.run([sys.executable, "-m", "agriclip_jax", *args], capture_output=True,
                        text=True, timeout=1200, env=_env_without_torch())


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  """The quick demo through its command, without PyTorch (the main job must not need it)."""
  workdir = tmp_path_factory.mktemp("demo") / "run"
  process = agriclip_without_torch("demo", "--quick", "--workdir", str(workdir))
  assert process.returncode == 0, process.stderr[-4000:]
  return workdir, json.loads((workdir / "results.json").read_text()), process


def test_the_torch_blocker_really_hides_torch():
  process = subprocess.run(
      [sys.executable, "-c", "import importlib.util, sys; "
       "sys.exit(importlib.util.find_spec('torch') is not None)"],
      env=dict(os.environ, PYTHONPATH=str(WITHOUT_TORCH)), capture_output=True, text=True)
  assert process.returncode == 0, process.stderr
  process = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=str(WITHOUT_TORCH)))
  assert process.returncode != 0 and "ModuleNotFoundError" in process.stderr


def _is_png(path: Path) -> bool:
  return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_demo_writes_report_plots_and_timings(quick_run):
  workdir, document, _ = quick_run
  report = (workdir / "report.md").read_text()
  for task in document["tasks"]:
    assert f"| {task} |" in report
  assert "AgriCLIP" in report and "chance" in report
  for png in ("accuracy.png", "training.png"):
    assert _is_png(workdir / png), png
    assert f"]({png})" in report
  confusions = sorted((workdir / "confusion").glob("*.png"))
  assert len(confusions) == len(document["tasks"]) * len(METHODS)
  assert all(_is_png(p) for p in confusions)
  timings = json.loads((workdir / "timings.json").read_text())
  assert {"data", "tokenizer", "train", "align", "zeroshot", "export", "report"} <= set(timings)
  assert timings["total"] >= sum(v for k, v in timings.items() if k != "total") - 1e-6


def test_results_json_has_exactly_the_promised_shape(quick_run):
  workdir, document, _ = quick_run
  on_disk = json.loads((workdir / "results.json").read_text())
  assert on_disk == json.loads(json.dumps(document))
  assert set(on_disk) == {"tasks", "mean", "ensemble"}
  # The ensemble's choice comes from the held-out align rows (the demo's training captions).
  assert set(on_disk["ensemble"]) == {"weight", "clip_temperature", "agriclip_temperature",
                                      "source", "validation"}
  assert 0.0 <= on_disk["ensemble"]["weight"] <= 1.0
  assert "calibration" in on_disk["ensemble"]["source"]
  assert set(on_disk["mean"]) == {"clip", "agriclip", "ensemble", "chance"}
  specs = json.loads((workdir / "data" / "tasks" / "tasks.json").read_text())["tasks"]
  assert list(on_disk["tasks"]) == [t["name"] for t in specs]
  for spec in specs:
    entry = on_disk["tasks"][spec["name"]]
    assert entry["num_classes"] == spec["num_classes"]
    assert entry["chance"] == pytest.approx(1.0 / spec["num_classes"])
    assert set(entry["accuracy"]) == set(METHODS)
    assert all(0.0 <= a <= 1.0 for a in entry["accuracy"].values())
  for method in METHODS:
    expected = np.mean([t["accuracy"][method] for t in on_disk["tasks"].values()])
    assert on_disk["mean"][method] == pytest.approx(expected)
  assert on_disk["mean"]["chance"] == pytest.approx(
      np.mean([1.0 / t["num_classes"] for t in specs]))


def test_accuracy_comes_from_the_saved_predictions(quick_run):
  # Each accuracy is the trace of the task's confusion matrix over its images (rows.json), so the
  # summary cannot drift from what was actually predicted.
  workdir, document, _ = quick_run
  rows = json.loads((workdir / "rows.json").read_text())["results"]
  for row in rows:
    confusion = np.asarray(row["confusion"])
    assert confusion.sum() == row["num_images"]
    assert document["tasks"][row["task"]]["accuracy"][row["method"]] == pytest.approx(
        np.trace(confusion) / confusion.sum())


def _mean_over_kind(tasks: dict, kind: str, key: str) -> float:
  chosen = [t for t in tasks.values() if t["kind"] == kind]
  assert chosen, kind
  return float(np.mean([t["chance"] if key == "chance" else t["accuracy"][key] for t in chosen]))


def test_zero_shot_beats_chance_on_the_in_style_tasks(quick_run):
  _, document, _ = quick_run
  tasks = document["tasks"]
  assert {t["kind"] for t in tasks.values()} == {*IN_STYLE_KINDS, "style_shift"}
  for name, task in tasks.items():
    if task["kind"] in IN_STYLE_KINDS:
      assert max(task["accuracy"].values()) >= task["chance"] + PER_TASK_MARGIN, (name, task)
  for kind, factor in CLIP_OVER_CHANCE.items():
    clip, chance = _mean_over_kind(tasks, kind, "clip"), _mean_over_kind(tasks, kind, "chance")
    assert clip >= factor * chance, (kind, clip, chance)
  agriclip = _mean_over_kind(tasks, "heldout_images", "agriclip")
  chance = _mean_over_kind(tasks, "heldout_images", "chance")
  assert agriclip >= AGRICLIP_OVER_CHANCE * chance, (agriclip, chance)


def test_exports_written_without_torch_load_in_pytorch_and_match_the_flax_models(quick_run):
  # The demo ran without torch; torch "installed afterwards" (this process) reads every export.
  import torch
  import transformers
  from safetensors.torch import load_file

  from agriclip_jax import align, features
  workdir, _, process = quick_run
  export = workdir / "export"
  assert "torch is not installed: skipped the reference torch.save layouts" in process.stdout
  assert not (export / "dino_vit.pth").exists() and not (export / "aligner.pth").exists()
  report = (workdir / "report.md").read_text()
  assert "export/dino_vit.safetensors" in report and "export/aligner.safetensors" in report

  hf = transformers.CLIPModel.from_pretrained(export / "clip_hf").eval()
  mesh = features.data_mesh(__import__("jax").devices()[:1])
  encoders = features.clip_model_encoders(workdir / "models" / "clip", batch_size=8, mesh=mesh)
  size = hf.config.vision_config.image_size
  images = np.random.default_rng(0).normal(size=(3, size, size, 3)).astype(np.float32)
  ours = features.apply_in_batches(encoders.image.apply, images, 8, mesh,
                                   params=encoders.image.params)
  with torch.no_grad():
    theirs = hf.get_image_features(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2))
  theirs = getattr(theirs, "pooler_output", theirs)  # newer transformers return an output object
  np.testing.assert_allclose(np.asarray(theirs), ours, rtol=1e-3, atol=1e-4)

  state = load_file(str(export / "dino_vit.safetensors"))
  assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight"} <= set(state)
  assert any(k.startswith("blocks.0.attn.qkv") for k in state)
  saved = load_file(str(export / "aligner.safetensors"))
  assert set(saved) == {"W", "b"}
  width = state["norm.weight"].shape[0]
  pooling = json.loads((export / "dino_features.json").read_text())
  blocks = max(int(k.split(".")[1]) for k in state if k.startswith("blocks.")) + 1
  assert 1 <= pooling["n_last_blocks"] <= blocks
  assert tuple(saved["W"].shape) == (hf.config.projection_dim,
                                     width * (pooling["n_last_blocks"] + pooling["avgpool"]))
  fitted = align.load_aligner(workdir / "models" / "aligner.safetensors")
  np.testing.assert_array_equal(saved["W"].numpy(), fitted.weight)
  np.testing.assert_array_equal(saved["b"].numpy(), fitted.bias)


def test_the_reference_pth_layouts_come_from_the_command_the_demo_names(quick_run, tmp_path):
  # With torch present, the commands the demo printed give the reference .pth files, holding the
  # very tensors of the safetensors exports.
  import torch
  from safetensors.torch import load_file

  from agriclip_jax import cli
  workdir, _, process = quick_run
  commands = process.stdout.split("After `pip install torch`: ", 1)[1].splitlines()[0].split("; ")
  assert len(commands) == 2
  for command in commands:
    words = command.split()
    assert words[:2] == ["agriclip", "convert"]
    assert cli.main(words[1:]) == 0
  export = workdir / "export"
  for name in ("dino_vit", "aligner"):
    pth = torch.load(export / f"{name}.pth", map_location="cpu", weights_only=True)
    tensors = load_file(str(export / f"{name}.safetensors"))
    assert set(pth) == set(tensors)
    for key, value in tensors.items():
      assert torch.equal(pth[key], value), (name, key)


def _losses(workdir: Path) -> dict[int, dict[str, float]]:
  """metrics.jsonl's losses by step (the timings differ from run to run; the losses may not)."""
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: {k: v for k, v in r.items() if k.endswith("loss")} for r in records}


def _start_demo(workdir: Path) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "agriclip_jax", "demo", "--quick", "--workdir",
                           str(workdir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=_env_without_torch())


def _wait_for_checkpoint(process: subprocess.Popen, workdir: Path, above: int = 0) -> int:
  """The first committed checkpoint step above `above` (Orbax renames a finished save)."""
  import time
  deadline = time.time() + 600
  while time.time() < deadline:
    steps = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()] if (
        workdir / "checkpoints").is_dir() else []
    if any(s > above for s in steps):
      return max(steps)
    assert process.poll() is None, process.communicate()[1][-3000:]
    time.sleep(0.1)
  process.kill()
  raise AssertionError(f"no checkpoint above step {above} in {workdir} within 600 s")


def test_demo_killed_mid_training_resumes_and_ends_as_an_uninterrupted_run(quick_run, tmp_path):
  """kill -9 after the first checkpoint, then the same command again: the losses of every logged
  step and results.json equal the uninterrupted quick demo's (the `quick_run` fixture)."""
  reference, reference_document, _ = quick_run
  workdir = tmp_path / "run"
  total = json.loads((reference / "config.json").read_text())["total_steps"]
  process = _start_demo(workdir)
  killed_after = _wait_for_checkpoint(process, workdir)
  process.kill()
  process.communicate(timeout=60)
  assert killed_after < total and not (workdir / "results.json").exists()

  resumed = agriclip_without_torch("demo", "--quick", "--workdir", str(workdir))
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  assert f"resumed from {workdir / 'checkpoints'} at step " in resumed.stdout
  assert "the one the checkpoints" in resumed.stdout  # the tokenizer they were trained with
  assert _losses(workdir) == _losses(reference)
  assert json.loads((workdir / "results.json").read_text()) == reference_document


def test_a_signal_during_training_stops_the_demo_with_the_shells_status():
  # What the loop reports (train/loop.py's `stopped_by`; KeyboardInterrupt for a second Ctrl-C)
  # becomes the demo's exit status and one line saying how to resume. The loop's own signal
  # handling runs for real in tests/test_train_faults.py.
  workdir = Path("/runs/demo")
  cases = {"SIGINT": (130, "stopped by SIGINT during training, after saving a checkpoint in "
                           "/runs/demo/checkpoints; run the same command again to resume"),
           "SIGTERM": (143, "stopped by SIGTERM during training, after saving a checkpoint in "
                            "/runs/demo/checkpoints; run the same command again to resume"),
           None: (130, "interrupted: stopped at once by a second Ctrl-C during training; the same "
                       "command resumes from the newest complete checkpoint in "
                       "/runs/demo/checkpoints")}
  for name, (code, message) in cases.items():
    stopped = demo.TrainingStopped(name, workdir)
    assert (stopped.exit_code, str(stopped)) == (code, message)


# ------------------------------------------------------------------------------------------------
# Pieces without training
# ------------------------------------------------------------------------------------------------

def test_results_document_averages_tasks_and_keeps_chance():
  rows = []
  for task, k, accs in (("a", 4, (0.5, 0.75, 0.25)), ("b", 2, (1.0, 0.5, 0.5))):
    for method, acc in zip(METHODS, accs):
      interval = {"accuracy": acc, "low": acc - 0.1, "high": acc + 0.1}
      rows.append({"task": task, "method": method, "kind": "x", "num_classes": k,
                   "chance": 1.0 / k, "top1": acc, "balanced_accuracy": acc, "num_images": 8,
                   "top1_interval": interval})
  document = demo.results_document(rows)
  assert document["tasks"]["b"]["interval"]["clip"] == [pytest.approx(0.9), pytest.approx(1.1)]
  assert document["mean"] == pytest.approx({"clip": 0.75, "agriclip": 0.625, "ensemble": 0.375,
                                            "chance": 0.375})
  assert document["tasks"]["a"]["accuracy"] == {"clip": 0.5, "agriclip": 0.75, "ensemble": 0.25}


def _tiny_folder(root: Path, classes: dict[str, int]) -> Path:
  from PIL import Image
  rng = np.random.default_rng(0)
  for name, count in classes.items():
    (root / name).mkdir(parents=True)
    for i in range(count):
      Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
  return root


def test_own_data_holdout_split_is_disjoint_and_captions_follow_metadata(tmp_path):
  config = demo.load_config(demo.DEFAULT_CONFIG, "real_quick")
  data = _tiny_folder(tmp_path / "lab", {"Blight": 12, "Healthy": 12})
  evals = _tiny_folder(tmp_path / "field", {"Blight": 3})
  metadata = tmp_path / "meta.json"
  metadata.write_text(json.dumps({"name": "corn", "domain": "crop", "task": "disease",
                                  "subject": "corn leaf", "classes": {
                                      "Blight": {"readable": "northern leaf blight"},
                                      "Healthy": {"readable": "healthy", "healthy": True}}}))
  own = demo.own_data(tmp_path / "w", config, str(data), str(metadata), [str(evals)], 0.5)
  held, field = own.tasks
  assert field.prompt_names == ("a photo of a corn leaf with northern leaf blight",)
  assert held.prompt_names == ("a photo of a corn leaf with northern leaf blight",
                               "a photo of a healthy corn leaf")
  train_paths = {Path(own.train_source.entry(i)["path"]).resolve()
                 for i in range(len(own.train_source))}
  held_paths = {Path(held.source.entry(int(i))["path"]).resolve() for i in held.indices}
  assert not train_paths & held_paths
  assert len(train_paths) + len(held_paths) == 24
  assert 0 < len(held_paths) < 24
  for i in range(len(own.train_source)):
    entry = own.train_source.entry(i)
    name = "northern leaf blight" if "Blight" in entry["path"] else "healthy"
    assert all(name in caption for caption in entry["captions"])


def test_own_data_without_metadata_uses_folder_names(tmp_path):
  config = demo.load_config(demo.DEFAULT_CONFIG, "real_quick")
  data = _tiny_folder(tmp_path / "lab", {"Gray_Leaf_Spot": 2, "Healthy": 2})
  own = demo.own_data(tmp_path / "w", config, str(data), None, [str(data)], 0.0)
  (task,) = own.tasks
  assert task.class_names == ("gray leaf spot", "healthy")
  assert task.templates == (config.captions.template,)
  assert any("gray leaf spot" in c for c in own.captions)


def test_bad_inputs_are_named(tmp_path):
  config = demo.load_config(demo.DEFAULT_CONFIG, "real_quick")
  data = _tiny_folder(tmp_path / "lab", {"Rust": 2})
  metadata = tmp_path / "meta.json"
  metadata.write_text(json.dumps({"name": "corn", "domain": "crop", "task": "disease",
                                  "classes": {"Blight": {}}}))
  with pytest.raises(ValueError, match="Rust"):
    demo.own_data(tmp_path / "w", config, str(data), str(metadata), [], 0.0)
  with pytest.raises(ValueError, match="no zero-shot task"):
    demo.own_data(tmp_path / "w2", config, str(data), None, [], 0.0)
  from agriclip_jax.commands.train import apply_override  # the one override syntax
  with pytest.raises(KeyError, match="train.nope"):
    apply_override(config, "train.nope", "3")
  apply_override(config, "train.total_steps", "7")
  apply_override(config, "train.data.jitter", "[0.1, 0.1, 0.1, 0.0]")
  assert config.train.total_steps == 7 and config.train.data.jitter == (0.1, 0.1, 0.1, 0.0)
  with pytest.raises(ValueError, match="configs/demo.py:nope"):
    demo.load_config(demo.DEFAULT_CONFIG, "nope")


def test_command_rejects_bad_flags_with_exit_code_2(tmp_path, capsys):
  from agriclip_jax import cli

  def demo(*flags: str) -> tuple[int, str]:
    code = cli.main(["demo", "--workdir", str(tmp_path), *flags])
    return code, capsys.readouterr().err.strip()

  code, err = demo("--holdout", "1.5")
  assert code == 2 and err == "agriclip demo: error: --holdout must be in [0, 1), got 1.5"
  # --eval belongs to your own --data; on the generated data it is refused before any work.
  code, err = demo("--eval", str(tmp_path))
  assert code == 2 and err.startswith("agriclip demo: error: ") and "--data" in err
  code, err = demo("--config.train.bogus=1")
  assert code == 2 and err.startswith("agriclip demo: error: ") and "--config.train.bogus" in err
