"""ALive-synth: determinism, localised subtle conditions, disjoint tasks, metadata schema."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agriclip_jax.testing import synthetic as syn

# Subtle conditions next to the condition that differs from them only by the subtle detail.
SUBTLE_PAIRS = [
    ("crop", "bean", "leaf_spot", "healthy"),
    ("crop", "maize", "rust", "healthy"),
    ("fish", "trout", "thin_bars", "plain"),
    ("fish", "tilapia", "small_spots", "plain"),
    ("fish", "carp", "red_fins", "plain"),
    ("livestock", "goat", "roan", "red"),
    ("livestock", "horse", "spotted", "white"),
]


def _spec(domain: str, subject: str, condition: str,
          style: syn.RenderStyle = syn.PRETRAIN_STYLE) -> syn.SampleSpec:
  return syn.SampleSpec(syn.subject(domain, subject), syn.condition(domain, condition), style)


def _file_digests(root: Path) -> dict[str, str]:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def _image_digests(root: Path) -> set[str]:
  return {hashlib.sha256(np.asarray(Image.open(p)).tobytes()).hexdigest()
          for p in root.rglob("*.png")}


@pytest.fixture(scope="module")
def pretraining_dir(tmp_path_factory) -> Path:
  num_classes = sum(len(d.classes) for d in syn.pretraining_datasets())
  return syn.write_pretraining_set(tmp_path_factory.mktemp("pretrain"), num_classes * 2, 32, 0)


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> tuple[Path, list[syn.TaskSpec]]:
  root = tmp_path_factory.mktemp("tasks")
  return root, syn.write_downstream_tasks(root, size=32, seed=0, images_per_class=2)


@pytest.mark.parametrize("domain", syn.DOMAINS)
def test_render_same_seed_same_bytes_and_other_seed_differs(domain):
  for s in syn.SUBJECTS[domain]:
    for c in syn.CONDITIONS[domain]:
      spec = syn.SampleSpec(s, c, syn.PRETRAIN_STYLE)
      first = syn.render(spec, 48, np.random.default_rng(7))
      assert first.dtype == np.uint8 and first.shape == (48, 48, 3)
      np.testing.assert_array_equal(first, syn.render(spec, 48, np.random.default_rng(7)))
      assert not np.array_equal(first, syn.render(spec, 48, np.random.default_rng(8)))


@pytest.mark.parametrize("domain", syn.DOMAINS)
def test_windowed_render_equals_full_frame_render(domain):
  """Subjects are computed only in a window around them; that must never clip or change them."""
  for i, (s, c) in enumerate((s, c) for s in syn.SUBJECTS[domain] for c in syn.CONDITIONS[domain]):
    style = (syn.PRETRAIN_STYLE, syn.SHIFTED_STYLE)[i % 2]
    size = (24, 40)[i % 2]
    spec = syn.SampleSpec(s, c, style)
    fast = syn.render_layers(spec, size, np.random.default_rng(i))
    full = syn.render_layers(spec, size, np.random.default_rng(i), full_frame=True)
    np.testing.assert_array_equal(fast.image, full.image)
    np.testing.assert_array_equal(fast.subject_alpha, full.subject_alpha)


@pytest.mark.parametrize("domain,subject,condition,baseline", SUBTLE_PAIRS)
def test_subtle_condition_changes_few_pixels_inside_the_subject(domain, subject, condition,
                                                                baseline):
  for seed in range(4):
    with_it = syn.render_layers(_spec(domain, subject, condition), 64, np.random.default_rng(seed))
    without = syn.render_layers(_spec(domain, subject, baseline), 64, np.random.default_rng(seed))
    # The same layout: only the condition's pattern may differ.
    np.testing.assert_array_equal(with_it.subject_alpha, without.subject_alpha)
    changed = np.abs(with_it.image.astype(int) - without.image.astype(int)).max(axis=-1) > 0
    subject_pixels = with_it.subject_alpha > 0
    assert changed.sum() >= 8, f"{condition} changed only {changed.sum()} pixels (seed {seed})"
    # Visible, not rounding noise: some changed pixels move by a large step.
    assert np.abs(with_it.image.astype(int) - without.image.astype(int)).max() > 60
    assert not (changed & ~subject_pixels).any(), f"{condition} changed background pixels"
    # Subtle: a minority of the subject's pixels carries the label.
    assert changed.sum() < 0.6 * subject_pixels.sum()


def test_leaf_curl_changes_only_the_margin_region():
  spec_curl, spec_ok = _spec("crop", "bean", "leaf_curl"), _spec("crop", "bean", "healthy")
  with_it = syn.render_layers(spec_curl, 64, np.random.default_rng(3))
  without = syn.render_layers(spec_ok, 64, np.random.default_rng(3))
  changed = np.abs(with_it.image.astype(int) - without.image.astype(int)).max(axis=-1) > 0
  healthy_leaf = without.subject_alpha > 0
  # The curl pulls the outline in: the curled leaf is smaller and every change touches the leaf
  # or its contact shadow, never the far background.
  assert with_it.subject_alpha.sum() < without.subject_alpha.sum()
  near_leaf = np.zeros_like(healthy_leaf)
  for dy in range(-1, 4):
    for dx in range(-1, 4):
      near_leaf |= np.roll(healthy_leaf, (dy, dx), axis=(0, 1))
  assert changed.any() and not (changed & ~near_leaf).any()


@pytest.mark.parametrize("domain", syn.DOMAINS)
def test_subject_is_framed(domain):
  """Subjects fill a sensible part of the frame and are rarely cut off by its border."""
  coverage, cut = [], 0
  for i in range(60):
    s = syn.SUBJECTS[domain][i % len(syn.SUBJECTS[domain])]
    c = syn.CONDITIONS[domain][i % len(syn.CONDITIONS[domain])]
    style = (syn.PRETRAIN_STYLE, syn.SHIFTED_STYLE)[i % 2]
    rendering = syn.render_layers(syn.SampleSpec(s, c, style), 48, np.random.default_rng(i))
    alpha = rendering.subject_alpha
    coverage.append(alpha.mean())
    border = np.concatenate([alpha[0], alpha[-1], alpha[:, 0], alpha[:, -1]])
    cut += int(border.max() > 0.5)
  assert 0.02 < min(coverage) and max(coverage) < 0.5
  assert cut <= 6


def test_held_out_pairs_are_absent_from_pretraining_but_their_parts_are_seen(pretraining_dir):
  rows = [json.loads(l) for l in (pretraining_dir / "manifest.jsonl").read_text().splitlines()]
  seen = {(r["subject"], r["condition"]) for r in rows}
  for domain in syn.DOMAINS:
    held = syn.held_out_pairs(domain)
    assert len(held) == 10
    for s, c in held:
      assert (s.name, c.name) not in seen
      assert any(ss == s.name for ss, _ in seen) and any(cc == c.name for _, cc in seen)
  # Statically too: no pretraining class can draw a held-out pair.
  for dataset in syn.pretraining_datasets():
    for cls in dataset.classes:
      for cond in cls.conditions:
        assert (cls.subject, cond) not in syn.held_out_pairs(dataset.domain)


def test_downstream_tasks_cover_every_class_and_kind(tasks_dir):
  root, specs = tasks_dir
  assert {t.kind for t in specs} == {"heldout_images", "heldout_combinations", "style_shift"}
  listed = json.loads((root / "tasks.json").read_text())["tasks"]
  assert [t["name"] for t in listed] == [t.name for t in specs]
  assert syn.load_tasks(root) == specs
  for spec, entry in zip(specs, listed):
    folders = sorted(p.name for p in spec.path.iterdir() if p.is_dir())
    assert folders == list(spec.class_folders) == entry["class_folders"]
    assert entry["num_classes"] == spec.num_classes == len(entry["classes"]) >= 5
    assert entry["template"].count("{}") == 1 and (root / entry["path"]) == spec.path
    assert len(set(spec.class_names)) == spec.num_classes
    for folder in folders:
      images = sorted((spec.path / folder).glob("*.png"))
      assert len(images) == 2
      assert Image.open(images[0]).size == (32, 32)


def test_downstream_images_are_disjoint_from_pretraining(pretraining_dir, tasks_dir):
  assert not _image_digests(pretraining_dir) & _image_digests(tasks_dir[0])
  for domain in syn.DOMAINS:
    assert not (set(syn.PRETRAIN_STYLE.backgrounds[domain])
                & set(syn.SHIFTED_STYLE.backgrounds[domain]))


def test_held_out_combination_tasks_name_unseen_pairs(tasks_dir, pretraining_dir):
  _, specs = tasks_dir
  pretraining_readables = {c["readable"] for d in json.loads(
      (pretraining_dir / "metadata.json").read_text())["datasets"] for c in d["classes"]}
  combos = [t for t in specs if t.kind == "heldout_combinations"]
  assert len(combos) == 3
  for task in combos:
    # Zero-shot names are made of words pretraining captions use, never a new breed name.
    assert not set(task.class_names) & pretraining_readables
    assert all(" with " in name for name in task.class_names)


def test_metadata_and_manifest_schema(pretraining_dir):
  meta = json.loads((pretraining_dir / "metadata.json").read_text())
  classes = {}
  for d in meta["datasets"]:
    assert set(d) >= {"name", "domain", "task", "classes"} and d["domain"] in syn.DOMAINS
    for c in d["classes"]:
      assert isinstance(c["readable"], str) and c["readable"]
      assert c["attributes"] and all(isinstance(a, str) and a for a in c["attributes"])
      classes[(d["name"], c["name"])] = c
  rows = [json.loads(l) for l in (pretraining_dir / "manifest.jsonl").read_text().splitlines()]
  assert len(rows) == 2 * len(classes)
  assert {(r["dataset"], r["class"]) for r in rows} == set(classes)
  for r in rows:
    assert (pretraining_dir / r["image"]).is_file()
    assert Path(r["image"]).parts[:2] == (r["dataset"], r["class"])
    assert len(set(r["captions"])) >= 4 and all(isinstance(t, str) for t in r["captions"])
    # The captions name what is in the picture: the condition's attributes appear in them.
    cond = syn.condition(r["domain"], r["condition"])
    assert any(cond.attributes[0] in t for t in r["captions"])


def test_writers_are_deterministic_by_seed(tmp_path):
  num = sum(len(d.classes) for d in syn.pretraining_datasets())
  a = _file_digests(syn.write_pretraining_set(tmp_path / "a", num, 24, 5))
  b = _file_digests(syn.write_pretraining_set(tmp_path / "b", num, 24, 5))
  c = _file_digests(syn.write_pretraining_set(tmp_path / "c", num, 24, 6))
  assert a == b
  images = [k for k in a if k.endswith(".png")]
  assert len(images) == num and all(a[k] != c[k] for k in images)
  syn.write_downstream_tasks(tmp_path / "t1", size=24, seed=1, images_per_class=1)
  syn.write_downstream_tasks(tmp_path / "t2", size=24, seed=1, images_per_class=1)
  assert _file_digests(tmp_path / "t1") == _file_digests(tmp_path / "t2")


def test_bad_input_is_named():
  with pytest.raises(ValueError, match="num_images=3"):
    syn.write_pretraining_set("/nonexistent-never-created", num_images=3, size=32, seed=0)
  with pytest.raises(ValueError, match="'blight'.*known"):
    syn.condition("crop", "blight")
  with pytest.raises(ValueError, match="unknown domain 'insects'"):
    syn.subject("insects", "bee")
  with pytest.raises(ValueError, match="'bean' is crop.*'plain' is fish"):
    syn.SampleSpec(syn.subject("crop", "bean"), syn.condition("fish", "plain"), syn.PRETRAIN_STYLE)
  with pytest.raises(ValueError, match="images_per_class"):
    syn.write_downstream_tasks("/nonexistent-never-created", images_per_class=0)


def test_writers_refuse_a_non_empty_directory_and_loader_names_missing_folders(tmp_path):
  (tmp_path / "old.png").write_bytes(b"")
  with pytest.raises(FileExistsError, match=str(tmp_path)):
    syn.write_downstream_tasks(tmp_path, size=24, images_per_class=1)
  root = tmp_path / "tasks"
  specs = syn.write_downstream_tasks(root, size=24, images_per_class=1)
  (specs[0].path / specs[0].class_folders[0] / "00000.png").unlink()
  (specs[0].path / specs[0].class_folders[0]).rmdir()
  with pytest.raises(ValueError, match=f"{specs[0].name}.*{specs[0].class_folders[0]}"):
    syn.load_tasks(root)


def test_synthetic_metadata_becomes_grammatical_alive_captions():
  from agriclip_jax import prompts
  entries = {d.name: d for d in syn.pretraining_datasets()}
  raw = {"name": "trout_variety", "domain": "fish", "task": "variety", "classes": [
      {"name": c.name, "readable": c.readable, "attributes": list(c.attributes),
       "subject": c.subject.name, "conditions": [x.name for x in c.conditions]}
      for c in entries["trout_variety"].classes]}
  meta = syn.caption_metadata(raw)
  for cls in meta.classes:
    assert cls.readable.startswith("trout with ")
    for caption in prompts.template_variants(meta, cls, 4, 0, "key"):
      assert cls.readable in caption
  leaf = entries["bean_leaf_disease"]
  raw = {"name": leaf.name, "domain": "crop", "task": "disease", "classes": [
      {"name": c.name, "readable": c.readable, "attributes": list(c.attributes),
       "subject": c.subject.name, "conditions": [x.name for x in c.conditions]}
      for c in leaf.classes]}
  meta = syn.caption_metadata(raw)
  assert meta.subject == "bean leaf"
  healthy = [c for c in meta.classes if c.healthy]
  assert len(healthy) == 1 and prompts.base_caption(meta, healthy[0]).startswith(
      "a photo of a healthy bean leaf")
