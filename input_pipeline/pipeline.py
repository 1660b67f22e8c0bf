"""Grain pipelines: records -> checked, decoded, augmented examples -> batches -> global jax.Arrays.

Training (`make_train_dataset`):

    source(s) --shuffle (seeded, reshuffled each epoch)--> per-process slice
      --random_map: check, decode, CLIP view / DINO multi-crop, pick a caption, tokenize--> example
      --(worker processes: mp_prefetch)--> skip + count bad records --> batch --> normalise

Every random draw comes from the Generator Grain's `random_map` derives from (seed, element index,
epoch), so the same seed gives the same batches whatever the worker count, and the iterator's
`get_state()` / `set_state()` resumes mid-epoch exactly (the state is small JSON, saved with the
Orbax checkpoint through `grain.checkpoint.CheckpointSave`).

Bad records never raise inside the workers: they become a marker that the batching iterator, in
the main process, skips and counts (`BadRecordStats`: counts and a few example paths per reason).
Above `max_bad_fraction` of the records seen (default 1 %, checked from 200 records on, or
from the end of the first epoch when that comes sooner), the run stops with `BadDataError`
naming examples. Images cross the process boundary as uint8 and are normalised to float32 after
batching (4x less inter-process traffic).

Batches follow docs/architecture.md: contrastive `images` [B,H,W,3] + `tokens` [B,L]; dino
`global_crops` [B,2,G,G,3] + `local_crops` [B,N,S,S,3]; joint all four; plus `label` [B].
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, Callable, Literal, Mapping, Sequence

import grain
import numpy as np

from input_pipeline import transforms
from input_pipeline.transforms import BadRecord, ClipViewConfig, MultiCropConfig

log = logging.getLogger(__name__)

Kind = Literal["contrastive", "dino", "joint"]
Tokenize = Callable[[list[str]], np.ndarray]
_BAD = "_bad_reason"
_BAD_PATH = "_bad_path"
DEFAULT_MAX_CAPTION_CHARS = 1000
DEFAULT_EXAMPLES_PER_REASON = 5


class BadDataError(RuntimeError):
  """Too many bad records: the message names the reasons, counts and example paths."""


# ------------------------------------------------------------------------------------------------
# Record checks and bad-record accounting
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RecordChecks:
  """Limits that turn a record into a counted bad record."""
  max_pixels: int = transforms.DEFAULT_MAX_PIXELS
  min_side: int = transforms.DEFAULT_MIN_SIDE
  max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS
  need_captions: bool = True


def usable_captions(record: Mapping[str, Any], checks: RecordChecks) -> list[str]:
  """The record's non-blank captions; raises BadRecord for an unusable set."""
  captions = [c.strip() for c in record["captions"]]
  if any(any("\udc80" <= ch <= "\udcff" for ch in c) for c in captions):
    raise BadRecord("caption_not_utf8")  # surrogateescape left the undecodable bytes as surrogates
  if any(len(c) > checks.max_caption_chars for c in captions):
    raise BadRecord("caption_too_long", f"> {checks.max_caption_chars} characters")
  captions = [c for c in captions if c]
  if not captions and checks.need_captions:
    raise BadRecord("empty_caption")
  return captions


def check_and_decode(record: Mapping[str, Any], checks: RecordChecks, exif_transpose: bool = True):
  """-> (RGB PIL image, upright unless exif_transpose=False; usable captions); raises BadRecord
  with the first problem found."""
  if record.get("error"):
    raise BadRecord(record["error"])
  captions = usable_captions(record, checks)
  image = transforms.decode_pil(record["image_bytes"], checks.max_pixels, checks.min_side,
                               exif_transpose)
  return image, captions


@dataclasses.dataclass
class BadRecordStats:
  """Counts of skipped records by reason, with a few example paths each."""
  seen: int = 0
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  examples_per_reason: int = DEFAULT_EXAMPLES_PER_REASON

  def add_good(self) -> None:
    self.seen += 1

  def add_bad(self, reason: str, path: str) -> None:
    self.seen += 1
    self.counts[reason] += 1
    kept = self.examples.setdefault(reason, [])
    if len(kept) < self.examples_per_reason:
      kept.append(path)

  @property
  def skipped(self) -> int:
    return sum(self.counts.values())

  @property
  def fraction(self) -> float:
    return self.skipped / self.seen if self.seen else 0.0

  def metrics(self) -> dict[str, float]:
    """Flat numbers for the training metrics: data/skipped, data/skipped/<reason>."""
    out = {"data/seen": float(self.seen), "data/skipped": float(self.skipped)}
    out.update({f"data/skipped/{reason}": float(n) for reason, n in sorted(self.counts.items())})
    return out

  def describe(self) -> str:
    if not self.counts:
      return f"{self.seen} records seen, none skipped"
    parts = [f"{reason}: {count} (e.g. {', '.join(self.examples.get(reason, []))})"
             for reason, count in self.counts.most_common()]
    return (f"{self.skipped} of {self.seen} records skipped ({100 * self.fraction:.2f}%): "
            + "; ".join(parts))

  def check(self, max_fraction: float | None, min_records: int, final: bool = False) -> None:
    if max_fraction is None or not self.counts:
      return
    if (final or self.seen >= min_records) and self.fraction > max_fraction:
      raise BadDataError(f"too many bad records (limit {100 * max_fraction:.2f}%): {self.describe()}")

  def to_state(self) -> dict[str, Any]:
    return {"seen": self.seen, "counts": dict(self.counts), "examples": dict(self.examples)}

  @classmethod
  def from_state(cls, state: Mapping[str, Any], examples_per_reason: int) -> "BadRecordStats":
    return cls(int(state["seen"]), collections.Counter({k: int(v) for k, v in state["counts"].items()}),
               {k: list(v) for k, v in state["examples"].items()}, examples_per_reason)


def _bad_marker(reason: str, path: str) -> dict[str, Any]:
  return {_BAD: reason, _BAD_PATH: path}


# ------------------------------------------------------------------------------------------------
# Per-record transforms (run in Grain worker processes: plain picklable classes)
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TrainTransform(grain.transforms.RandomMap):
  """Record -> uint8 views (+ tokens of one caption chosen for this epoch), or a bad marker."""
  kind: Kind
  checks: RecordChecks
  clip_view: ClipViewConfig
  multicrop: MultiCropConfig
  tokenize: Tokenize | None

  def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    try:
      image, captions = check_and_decode(record, self.checks)
    except BadRecord as bad:
      return _bad_marker(bad.reason, record["path"])
    example: dict[str, Any] = {"label": np.int32(record["label"])}
    if self.kind in ("contrastive", "joint"):
      example["images"] = transforms.clip_train_view(image, rng, self.clip_view)
      caption = captions[int(rng.integers(len(captions)))]
      if self.tokenize is not None:
        example["tokens"] = np.asarray(self.tokenize([caption]), dtype=np.int32)[0]
    if self.kind in ("dino", "joint"):
      example["global_crops"], example["local_crops"] = transforms.dino_multicrop(image, rng, self.multicrop)
    return example


# ------------------------------------------------------------------------------------------------
# Skipping, batching and normalising in the main process
# ------------------------------------------------------------------------------------------------

_IMAGE_KEYS = ("images", "global_crops", "local_crops")


def _normalise_batch(batch: dict[str, np.ndarray], normalisation: Mapping[str, str]) -> dict[str, np.ndarray]:
  return {k: transforms.normalise(v, normalisation[k]) if k in _IMAGE_KEYS else v for k, v in batch.items()}


def _stack(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


class SkipBatchIterator(grain.DatasetIterator):
  """Pulls examples, counts and skips bad ones, returns full normalised batches.

  A batch is assembled entirely inside one `__next__`, so the parent's state between batches is
  exact and `get_state()` (parent state + counts) resumes without loss or repeats.
  """

  def __init__(self, parent: grain.DatasetIterator, batch_size: int, normalisation: Mapping[str, str],
               max_bad_fraction: float | None, min_records_for_check: int, examples_per_reason: int):
    super().__init__(parent)
    self._batch_size = batch_size
    self._normalisation = normalisation
    self._max_bad_fraction = max_bad_fraction
    self._min_records = min_records_for_check
    self._examples_per_reason = examples_per_reason
    self.bad_records = BadRecordStats(examples_per_reason=examples_per_reason)

  def __next__(self) -> dict[str, np.ndarray]:
    examples = []
    while len(examples) < self._batch_size:
      try:
        example = next(self._parent)
      except StopIteration:
        self.bad_records.check(self._max_bad_fraction, self._min_records, final=True)
        raise  # the incomplete last batch is dropped: every training step has the full global batch
      if _BAD in example:
        self.bad_records.add_bad(example[_BAD], example[_BAD_PATH])
        if self.bad_records.counts[example[_BAD]] == 1:
          log.warning("skipping bad record %s (%s); further ones are counted", example[_BAD_PATH], example[_BAD])
        self.bad_records.check(self._max_bad_fraction, self._min_records)
      else:
        self.bad_records.add_good()
        examples.append(example)
        if self.bad_records.seen == self._min_records:  # the check is due even after a good one
          self.bad_records.check(self._max_bad_fraction, self._min_records)
    return _normalise_batch(_stack(examples), self._normalisation)

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), "bad_records": self.bad_records.to_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self.bad_records = BadRecordStats.from_state(state["bad_records"], self._examples_per_reason)


class SkipBatchDataset(grain.IterDataset):
  def __init__(self, parent: grain.IterDataset, batch_size: int, normalisation: Mapping[str, str],
               max_bad_fraction: float | None, min_records_for_check: int,
               examples_per_reason: int = DEFAULT_EXAMPLES_PER_REASON):
    super().__init__(parent)
    self._args = (batch_size, dict(normalisation), max_bad_fraction, min_records_for_check, examples_per_reason)

  def __iter__(self) -> SkipBatchIterator:
    return SkipBatchIterator(self._parent.__iter__(), *self._args)


# ------------------------------------------------------------------------------------------------
# Builders
# ------------------------------------------------------------------------------------------------

def _worker_processes(dataset: grain.IterDataset, num_workers: int) -> grain.IterDataset:
  """mp_prefetch, after marking absl flags parsed: grain 0.2.18 reads one of its absl flags in
  the worker start-up and fails with UnparsedFlagAccessError outside an absl app."""
  if num_workers <= 0:
    return dataset
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # defaults for every flag, as absl.app would leave them
  return dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))


def _check_process_layout(global_batch_size: int, process_index: int, process_count: int) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} must be in [0, process_count={process_count})")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                     f"process_count {process_count}")
  return global_batch_size // process_count


def _shuffled_examples(sources: Sequence[Any], weights: Sequence[float] | None, seed: int,
                       num_epochs: int | None, shuffle: bool) -> grain.MapDataset:
  for index, source in enumerate(sources):
    if len(source) == 0:
      raise ValueError(f"data source #{index} ({type(source).__name__}) is empty")
  if len(sources) == 1:
    dataset = grain.MapDataset.source(sources[0]).seed(seed)
    return (dataset.shuffle() if shuffle else dataset).repeat(num_epochs)
  if weights is None or len(weights) != len(sources) or any(w <= 0 for w in weights):
    raise ValueError(f"mixing {len(sources)} sources needs as many positive weights, got {weights}")
  # Each source is shuffled and repeated on its own so the mixture keeps its proportions forever.
  parts = [grain.MapDataset.source(s).seed(seed + i) for i, s in enumerate(sources)]
  parts = [(p.shuffle() if shuffle else p).repeat(None) for p in parts]
  mixed = grain.MapDataset.mix(parts, weights)
  if num_epochs is not None:
    mixed = mixed[:num_epochs * sum(len(s) for s in sources)]
  return mixed.seed(seed)


def make_train_dataset(
    source: Any | Sequence[Any],
    *,
    kind: Kind,
    global_batch_size: int,
    seed: int,
    tokenize: Tokenize | None = None,
    image_size: int = 224,
    clip_scale: tuple[float, float] = (0.9, 1.0),
    multicrop: MultiCropConfig = MultiCropConfig(),
    weights: Sequence[float] | None = None,
    num_epochs: int | None = None,
    shuffle: bool = True,
    num_workers: int = 0,
    read_threads: int = 2,
    process_index: int = 0,
    process_count: int = 1,
    clip_normalisation: str = "clip",
    dino_normalisation: str = "imagenet",
    checks: RecordChecks = RecordChecks(),
    max_bad_fraction: float | None = 0.01,
    min_records_for_check: int = 200,
    augment_on: Literal["host", "device"] = "host",
) -> grain.IterDataset:
  """The training input: a Grain IterDataset of per-process batches (global_batch / process_count).

  `source` is one random-access source or a list mixed by `weights`. `num_epochs=None` repeats
  forever (the training loop counts steps); use that on several hosts: with a finite number of
  epochs, hosts that skip different numbers of bad records may end with different batch counts. `tokenize(list[str]) -> int32 [N, L]` is required for
  contrastive/joint. The iterator (`iter(ds)`) has `get_state()`, `set_state()` and
  `bad_records` (a BadRecordStats).
  """
  if kind not in ("contrastive", "dino", "joint"):
    raise ValueError(f"kind must be 'contrastive', 'dino' or 'joint', got {kind!r}")
  if kind != "dino" and tokenize is None:
    raise ValueError(f"kind={kind!r} needs a tokenize callable (captions -> int32 [N, L])")
  local_batch = _check_process_layout(global_batch_size, process_index, process_count)
  sources = list(source) if isinstance(source, (list, tuple)) else [source]
  examples = _shuffled_examples(sources, weights, seed, num_epochs, shuffle)
  # Each process takes every process_count-th element: disjoint, and balanced across processes.
  examples = examples[process_index::process_count]
  transform = TrainTransform(kind, checks, ClipViewConfig(image_size, tuple(clip_scale)), multicrop, tokenize)
  if augment_on == "device":  # uint8 canvas + plans drawn alike; input_pipeline/device_augment renders them
    from input_pipeline.host_decode import DeviceTrainTransform
    transform = DeviceTrainTransform(kind, checks, transform.clip_view, multicrop, tokenize)
  elif augment_on != "host":
    raise ValueError(f"augment_on must be 'host' or 'device', got {augment_on!r}")
  dataset = examples.random_map(transform).to_iter_dataset(
      grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(2 * local_batch, 8)))
  dataset = _worker_processes(dataset, num_workers)
  normalisation = {"images": clip_normalisation, "global_crops": dino_normalisation,
                   "local_crops": dino_normalisation}
  # The limit applies once `min_records_for_check` records are seen, or at the end of this
  # process's first epoch if that comes sooner: a short run on mostly bad data must not train.
  epoch_records = len(range(process_index, sum(len(s) for s in sources), process_count))
  min_records = max(min(min_records_for_check, epoch_records), 1)
  return SkipBatchDataset(dataset, local_batch, normalisation, max_bad_fraction, min_records)


# ------------------------------------------------------------------------------------------------
# Onto the mesh
# ------------------------------------------------------------------------------------------------

def to_global_array(batch: Mapping[str, np.ndarray], mesh, pspec=None) -> dict[str, Any]:
  """Per-process batch -> global jax.Arrays sharded along the batch axis (`P("data")` by default).

  Works for one and many processes: each process passes its own rows, JAX assembles the global
  array of process_count times the rows.
  """
  import jax
  from jax.sharding import NamedSharding, PartitionSpec
  sharding = NamedSharding(mesh, pspec if pspec is not None else PartitionSpec("data"))
  return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
          for key, value in batch.items()}


class DevicePrefetchIterator:
  """Keeps `depth` batches in flight to the devices while the step runs.

  `get_state()` is the state of the host iterator right after the last batch *handed out*, not
  after the ones still in flight, so a checkpoint taken between steps resumes exactly.
  """

  def __init__(self, iterator, mesh, pspec=None, depth: int = 2):
    if depth < 1:
      raise ValueError(f"prefetch depth must be >= 1, got {depth}")
    self._iterator, self._mesh, self._pspec, self._depth = iterator, mesh, pspec, depth
    self._queue: collections.deque = collections.deque()
    self._state = iterator.get_state() if hasattr(iterator, "get_state") else None
    self._exhausted = False

  def _fill(self) -> None:
    while not self._exhausted and len(self._queue) < self._depth:
      try:
        batch = next(self._iterator)
      except StopIteration:
        self._exhausted = True
        return
      state = self._iterator.get_state() if hasattr(self._iterator, "get_state") else None
      self._queue.append((to_global_array(batch, self._mesh, self._pspec), state))

  def __iter__(self):
    return self

  def __next__(self):
    self._fill()
    if not self._queue:
      raise StopIteration
    batch, self._state = self._queue.popleft()
    self._fill()  # start the next transfers before the caller's step runs
    return batch

  def get_state(self):
    return self._state

  def set_state(self, state) -> None:
    self._queue.clear()
    self._exhausted = False
    self._iterator.set_state(state)
    self._state = state

  @property
  def bad_records(self) -> BadRecordStats | None:
    return getattr(self._iterator, "bad_records", None)


def device_prefetch(iterator, mesh, pspec=None, depth: int = 2) -> DevicePrefetchIterator:
  return DevicePrefetchIterator(iterator, mesh, pspec, depth)
