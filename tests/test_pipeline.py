"""The Grain pipeline: determinism, exact resume, per-process sharding, caption choice per epoch,
bad-record accounting, eval batches, and batches on an 8-device mesh."""

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import grain
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from input_pipeline import pipeline, sources
from input_pipeline.transforms import MultiCropConfig

SMALL_CROPS = MultiCropConfig(global_size=32, local_size=16, num_local=2)


def word_tokenize(captions: list[str]) -> np.ndarray:
  """A deterministic stand-in tokenizer: one id per word (sum of code points), padded to 8."""
  out = np.zeros((len(captions), 8), np.int32)
  for row, caption in enumerate(captions):
    ids = [sum(map(ord, word)) % 997 + 1 for word in caption.split()][:8]
    out[row, :len(ids)] = ids
  return out


class TinySource:
  """In-memory records: image i is a solid colour encoding i; label i; optional bad records."""

  def __init__(self, count: int, bad: dict[int, str] | None = None, captions=None, size=24, label_offset=0):
    self.count, self.bad, self.size, self.label_offset = count, bad or {}, size, label_offset
    self.captions = captions or (lambda i: [f"a photo of item {i}"])

  def __len__(self):
    return self.count

  def __getitem__(self, index):
    buffer = io.BytesIO()
    Image.new("RGB", (self.size, self.size), (index % 256, index // 256, 7)).save(buffer, "PNG")
    return sources.make_record(image_bytes=buffer.getvalue(), path=f"mem/{index}", captions=self.captions(index),
                               label=index + self.label_offset, key=str(index), error=self.bad.get(index))


@pytest.fixture(scope="module")
def small_corn(corn_dir, tmp_path_factory):
  """40 real corn photos (10 per class), resized to 64 px so augmentation is cheap."""
  root = tmp_path_factory.mktemp("small_corn")
  for class_dir in sorted((corn_dir / "lab").iterdir()):
    (root / class_dir.name).mkdir()
    for path in sorted(class_dir.glob("*.jpg"))[:10]:
      with Image.open(path) as image:
        image.convert("RGB").resize((64, 64), Image.BICUBIC).save(root / class_dir.name / path.name, quality=90)
  return sources.open_source(root)


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _assert_same_batches(left, right):
  assert len(left) == len(right)
  for a, b in zip(left, right):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def _joint(source, **overrides):
  options = dict(kind="joint", global_batch_size=4, seed=7, tokenize=word_tokenize, image_size=32,
                 multicrop=SMALL_CROPS)
  return pipeline.make_train_dataset(source, **{**options, **overrides})


def test_joint_batch_schema(small_corn):
  batch = next(iter(_joint(small_corn)))
  assert batch["images"].shape == (4, 32, 32, 3) and batch["images"].dtype == np.float32
  assert batch["tokens"].shape == (4, 8) and batch["tokens"].dtype == np.int32
  assert batch["global_crops"].shape == (4, 2, 32, 32, 3) and batch["global_crops"].dtype == np.float32
  assert batch["local_crops"].shape == (4, 2, 16, 16, 3)
  assert batch["label"].shape == (4,) and set(batch["label"]) <= {0, 1, 2, 3}
  # Normalised: roughly zero-centred, not 0..255.
  assert -3 < batch["images"].mean() < 3 and batch["images"].min() < 0


def test_same_seed_same_batches_different_seed_different(small_corn):
  first = _take(iter(_joint(small_corn)), 6)
  again = _take(iter(_joint(small_corn)), 6)
  _assert_same_batches(first, again)
  other = _take(iter(_joint(small_corn, seed=8)), 6)
  assert not all(np.array_equal(a["images"], b["images"]) for a, b in zip(first, other))


def test_resume_mid_epoch_continues_exactly(small_corn):
  """Stop after 7 batches (an epoch of 40 records is 10), save the state as JSON like a checkpoint
  does, restore into a fresh iterator: batches 8..14 (crossing into epoch 2) are identical."""
  reference = _take(iter(_joint(small_corn)), 14)
  interrupted = iter(_joint(small_corn))
  _take(interrupted, 7)
  saved = json.loads(json.dumps(interrupted.get_state()))
  resumed = iter(_joint(small_corn))
  resumed.set_state(saved)
  _assert_same_batches(_take(resumed, 7), reference[7:])


def test_orbax_checkpoint_of_iterator_state(small_corn, tmp_path):
  import orbax.checkpoint as ocp
  reference = _take(iter(_joint(small_corn, kind="dino", tokenize=None)), 5)
  iterator = iter(_joint(small_corn, kind="dino", tokenize=None))
  _take(iterator, 3)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
  fresh = iter(_joint(small_corn, kind="dino", tokenize=None))
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  _assert_same_batches(_take(fresh, 2), reference[3:])


def test_worker_processes_give_the_same_batches(small_corn):
  """Randomness comes from (seed, index), never from which worker did the work."""
  in_process = _take(iter(_joint(small_corn, kind="dino", tokenize=None)), 4)
  iterator = iter(_joint(small_corn, kind="dino", tokenize=None, num_workers=2))
  with_workers = _take(iterator, 4)
  _assert_same_batches(in_process, with_workers)


def test_every_record_once_per_epoch_and_processes_disjoint():
  source = TinySource(24)
  seen = []
  for process_index in range(2):
    dataset = pipeline.make_train_dataset(source, kind="dino", global_batch_size=4, seed=0, multicrop=SMALL_CROPS,
                                          num_epochs=1, process_index=process_index, process_count=2)
    labels = [int(x) for batch in dataset for x in batch["label"]]
    assert len(labels) == 12
    seen.append(set(labels))
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(24))


def test_shuffle_differs_between_epochs():
  dataset = pipeline.make_train_dataset(TinySource(16), kind="dino", global_batch_size=16, seed=0,
                                        multicrop=SMALL_CROPS, num_epochs=2)
  epoch_1, epoch_2 = [list(batch["label"]) for batch in dataset]
  assert sorted(epoch_1) == sorted(epoch_2) == list(range(16)) and epoch_1 != epoch_2


def test_one_caption_variant_per_record_per_epoch():
  variants = lambda i: [f"variant {v} of item {i}" for v in range(4)]  # noqa: E731
  dataset = pipeline.make_train_dataset(TinySource(8, captions=variants), kind="contrastive", global_batch_size=8,
                                        seed=1, tokenize=word_tokenize, image_size=16, num_epochs=6, shuffle=False)
  chosen = {i: [] for i in range(8)}
  for batch in dataset:
    for label, tokens in zip(batch["label"], batch["tokens"]):
      matches = [v for v in range(4) if np.array_equal(tokens, word_tokenize(variants(int(label)))[v])]
      assert len(matches) == 1
      chosen[int(label)].append(matches[0])
  # Over 6 epochs each record saw several variants (a fixed choice would give one).
  assert all(len(v) == 6 for v in chosen.values())
  assert np.mean([len(set(v)) for v in chosen.values()]) > 2


def test_mixture_follows_weights():
  small, large = TinySource(10), TinySource(30, label_offset=100)
  dataset = pipeline.make_train_dataset([small, large], weights=[3, 1], kind="dino", global_batch_size=40, seed=0,
                                        multicrop=SMALL_CROPS)
  labels = np.concatenate([batch["label"] for batch in _take(iter(dataset), 3)])
  from_large = int((labels >= 100).sum())
  assert abs(from_large - 30) <= 3  # a quarter of 120, although the second source is 3x larger
  # The small source repeats (30 weighted draws of 10 records per batch) instead of running dry.
  assert set(labels[labels < 100]) == set(range(10))


def test_bad_records_are_counted_and_skipped():
  source = TinySource(20, bad={3: "truncated_image", 11: "missing_file"})
  dataset = pipeline.make_train_dataset(source, kind="dino", global_batch_size=6, seed=0, multicrop=SMALL_CROPS,
                                        num_epochs=1, max_bad_fraction=0.5)
  iterator = iter(dataset)
  labels = [int(x) for batch in iterator for x in batch["label"]]
  assert len(labels) == 18 and set(labels) == set(range(20)) - {3, 11}
  stats = iterator.bad_records
  assert dict(stats.counts) == {"truncated_image": 1, "missing_file": 1} and stats.seen == 20
  assert stats.examples == {"truncated_image": ["mem/3"], "missing_file": ["mem/11"]}
  assert stats.metrics()["data/skipped/missing_file"] == 1.0
  # The counts are part of the iterator state, so a resumed run keeps counting from there.
  assert iterator.get_state()["bad_records"]["counts"] == {"truncated_image": 1, "missing_file": 1}


def test_too_many_bad_records_stop_with_examples():
  source = TinySource(40, bad={i: "not_an_image" for i in range(0, 40, 4)})
  dataset = pipeline.make_train_dataset(source, kind="dino", global_batch_size=4, seed=0, multicrop=SMALL_CROPS,
                                        min_records_for_check=20)
  iterator = iter(dataset)
  with pytest.raises(pipeline.BadDataError, match=r"limit 1\.00%.*not_an_image: \d+ \(e\.g\. mem/"):
    for _ in range(20):
      next(iterator)


def test_argument_errors_name_the_value():
  with pytest.raises(ValueError, match="multiple of process_count 3"):
    pipeline.make_train_dataset(TinySource(4), kind="dino", global_batch_size=4, seed=0, process_count=3)
  with pytest.raises(ValueError, match="needs a tokenize"):
    pipeline.make_train_dataset(TinySource(4), kind="contrastive", global_batch_size=4, seed=0)
  with pytest.raises(ValueError, match="kind must be"):
    pipeline.make_train_dataset(TinySource(4), kind="mae", global_batch_size=4, seed=0)


def test_global_arrays_on_an_eight_device_mesh(small_corn):
  devices = np.array(jax.devices()[:8])
  assert devices.size == 8, "tests/conftest.py sets 8 simulated CPU devices"
  mesh = Mesh(devices, ("data",))
  batch = next(iter(_joint(small_corn, global_batch_size=8)))
  on_mesh = pipeline.to_global_array(batch, mesh)
  for key, value in batch.items():
    assert on_mesh[key].shape == value.shape
    assert on_mesh[key].sharding == NamedSharding(mesh, P("data"))
    np.testing.assert_array_equal(np.asarray(on_mesh[key]), value)
  assert len(on_mesh["images"].addressable_shards) == 8


def test_device_prefetch_state_matches_batches_handed_out(small_corn):
  mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
  make = lambda: iter(_joint(small_corn, kind="dino", tokenize=None))  # noqa: E731
  reference = _take(make(), 6)
  prefetched = pipeline.device_prefetch(make(), mesh, depth=2)
  for expected in reference[:3]:
    np.testing.assert_array_equal(np.asarray(next(prefetched)["global_crops"]), expected["global_crops"])
  state = prefetched.get_state()  # 3 handed out, 2 more already in flight
  resumed = make()
  resumed.set_state(state)
  _assert_same_batches(_take(resumed, 3), reference[3:])


_TWO_PROCESS_SCRIPT = r'''
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
import numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
process_id, port = int(sys.argv[1]), sys.argv[2]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                           initialization_timeout=60)
from jax.experimental import multihost_utils
from jax.sharding import Mesh
sys.path.insert(0, sys.argv[3])
from input_pipeline import pipeline
from input_pipeline.transforms import MultiCropConfig
from tests.test_pipeline import TinySource
dataset = pipeline.make_train_dataset(TinySource(32), kind="dino", global_batch_size=8, seed=3,
                                      multicrop=MultiCropConfig(global_size=16, local_size=8, num_local=1),
                                      process_index=jax.process_index(), process_count=jax.process_count())
local = next(iter(dataset))
mesh = Mesh(np.array(jax.devices()), ("data",))
on_mesh = pipeline.to_global_array(local, mesh)
label_sum = jax.jit(lambda x: x.sum())(on_mesh["label"])
gathered = multihost_utils.process_allgather(on_mesh["global_crops"], tiled=True)
print("RESULT " + json.dumps({"local_labels": local["label"].tolist(), "global_shape": list(on_mesh["global_crops"].shape),
                              "label_sum": int(label_sum), "local_crops_sum": float(local["global_crops"].sum()),
                              "gathered_sum": float(np.asarray(gathered).sum())}))
jax.distributed.shutdown()
'''


def test_two_processes_assemble_one_global_batch(tmp_path):
  """Two real JAX processes on 127.0.0.1 (gloo): each feeds its own slice; the global array holds both."""
  script = tmp_path / "two_process.py"
  script.write_text(_TWO_PROCESS_SCRIPT)
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
  repo = str(Path(__file__).resolve().parents[1])
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the script sets 2 devices per process
  workers = [subprocess.Popen([sys.executable, str(script), str(i), str(port), repo], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=repo) for i in range(2)]
  results = []
  for worker in workers:
    out, err = worker.communicate(timeout=180)
    assert worker.returncode == 0, err[-2000:]
    results.append(json.loads(out.split("RESULT ", 1)[1]))
  labels = [set(r["local_labels"]) for r in results]
  assert len(labels[0]) == len(labels[1]) == 4 and not labels[0] & labels[1]
  assert all(r["global_shape"] == [8, 2, 16, 16, 3] for r in results)
  assert results[0]["label_sum"] == results[1]["label_sum"] == sum(labels[0]) + sum(labels[1])
  total = results[0]["local_crops_sum"] + results[1]["local_crops_sum"]
  for r in results:
    assert abs(r["gathered_sum"] - total) < 1e-3 * abs(total) + 1e-3


def test_exported_models_record_the_normalisation_training_used():
  """`agriclip train` exports each model with its type's default eval view (model_io); that view's
  mean/std must be the ones the training pipeline normalises that model's images with."""
  import inspect

  from agriclip_jax import model_io
  from agriclip_jax.models.configs import clip_config, vision_config
  from input_pipeline.transforms import NORMALISATIONS
  defaults = inspect.signature(pipeline.make_train_dataset).parameters
  clip_view = model_io.default_preprocess("clip", clip_config("tiny").to_dict())
  dino_view = model_io.default_preprocess("vit", vision_config("tiny", flavour="dino").to_dict())
  for view, name in ((clip_view, defaults["clip_normalisation"].default),
                     (dino_view, defaults["dino_normalisation"].default)):
    assert (tuple(view.mean), tuple(view.std)) == NORMALISATIONS[name], (view.name, name)
