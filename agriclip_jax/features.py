"""Batched, device-sharded feature extraction with a progress bar and a disk cache.

The core works on plain callables so that it serves every model:
- an `ImageEncoder` is a name, a fingerprint (what the cache key is made of), a `view` (decoded
  uint8 image -> float32 [H, W, 3] model input) and an `apply` (a jittable [B, H, W, 3] -> [B, D]);
- `encode_source` reads each record of a data source through Grain, decodes it once, builds
  every encoder's view from it, and runs the encoders on fixed-size batches split over the
  devices along a "data" mesh axis (the last batch is padded, so each encoder compiles once);
  records that cannot be decoded are skipped, counted by reason and reported, never dropped
  silently; with several processes each encodes its own slice and the slices are gathered;
- `FeatureCache` stores [N, D] features with the indices they belong to, keyed by a hash of the model
  fingerprint, the data fingerprint and the view, so a rerun reads them back instead of recomputing.

`clip_model_encoders` / `dino_model_encoder` build encoders from model directories
(`agriclip_jax.model_io`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agriclip_jax.fileio import atomic_file, atomic_write_text

CACHE_FORMAT = 1


# ----------------------------------------------------------------------------------------------
# Fingerprints and the cache
# ----------------------------------------------------------------------------------------------

def fingerprint(*parts: Any) -> str:
  """A short stable hash of JSON-able parts (strings, numbers, lists, dicts)."""
  text = json.dumps(parts, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:20]


def fingerprint_path(path: str | os.PathLike) -> str:
  """A file or directory by the names, sizes and modification times of its files (no reading):
  cheap for big weight files and image folders, and it changes whenever one of them is rewritten."""
  root = Path(path).resolve()
  if root.is_file():
    stat = root.stat()
    return fingerprint(str(root), stat.st_size, stat.st_mtime_ns)
  if not root.is_dir():
    raise FileNotFoundError(f"cannot fingerprint {root}: not a file or directory")
  entries = []
  for directory, _, files in sorted(os.walk(root)):
    for name in sorted(files):
      stat = os.stat(os.path.join(directory, name))
      entries.append((os.path.relpath(os.path.join(directory, name), root), stat.st_size, stat.st_mtime_ns))
  return fingerprint(str(root), entries)


def data_fingerprint(spec: str | os.PathLike, source) -> str:
  """A data source by its files: a folder or shard files by their names, sizes and modification
  times; a manifest (CSV / JSONL) by its own bytes' stamp and that of every image it lists, so
  that rewriting an image invalidates cached features; tfds:NAME[:SPLIT] by its spec and size."""
  text = str(spec)
  if text.startswith("tfds:") or not Path(text).exists():
    return fingerprint(text, len(source))
  listed = []
  if Path(text).is_file() and callable(getattr(source, "entry", None)):
    for index in range(len(source)):
      path = source.entry(index)["path"]
      try:
        stat = os.stat(path)
        listed.append((str(path), stat.st_size, stat.st_mtime_ns))
      except OSError:
        listed.append((str(path), None, None))  # missing: counted as a bad record when read
  return fingerprint(fingerprint_path(text), listed)


def record_keys(source) -> list[str]:
  """Every record's key (the storage-independent identity the evaluation split hashes).

  Uses the source's `keys()` when it has one; otherwise reads the records (which reads the bytes).
  """
  if callable(getattr(source, "keys", None)):
    return list(source.keys())
  return [str(source[i]["key"]) for i in range(len(source))]


class FeatureCache:
  """`root/<key>.npz` with arrays "features" [N, D], "indices" [N] (source indices) and "labels"
  [N], plus `<key>.json` metadata."""

  def __init__(self, root: str | os.PathLike):
    self.root = Path(root)

  @staticmethod
  def key(model_fingerprint: str, data_fingerprint: str, view: str) -> str:
    return fingerprint(CACHE_FORMAT, model_fingerprint, data_fingerprint, view)

  def _path(self, key: str) -> Path:
    return self.root / f"{key}.npz"

  def get(self, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    path = self._path(key)
    if not path.is_file():
      return None
    try:
      with np.load(path, allow_pickle=False) as data:
        return data["features"], data["indices"], data["labels"]
    except (OSError, ValueError, KeyError) as e:
      raise ValueError(f"feature cache file {path} is unreadable ({e}); delete it to recompute") from e

  def skipped_records(self, key: str) -> list[tuple[int, str]]:
    """(index, reason) of the records that could not be decoded when the entry was written."""
    try:
      meta = json.loads(self._path(key).with_suffix(".json").read_text())
    except (OSError, ValueError):
      return []
    return [(int(index), str(reason)) for index, reason in meta.get("skipped_records", [])]

  def put(self, key: str, features: np.ndarray, indices: np.ndarray, labels: np.ndarray,
          metadata: dict[str, Any] | None = None) -> Path:
    path = self._path(key)

    def write(tmp: Path) -> None:
      with open(tmp, "wb") as f:  # np.savez appends .npz to bare names; a file object avoids that
        np.savez(f, features=features, indices=indices, labels=labels)

    atomic_file(path, write)
    meta = {"rows": int(features.shape[0]), "dim": int(features.shape[1]), **(metadata or {})}
    atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


# ----------------------------------------------------------------------------------------------
# Device-sharded batched application
# ----------------------------------------------------------------------------------------------

def data_mesh(devices: Sequence[Any] | None = None):
  """A 1-D "data" mesh over `devices`, by default this process's own devices (in a
  multi-process run each process encodes its own slice; `encode_source` gathers them)."""
  import jax
  from jax.sharding import Mesh
  devices = list(devices if devices is not None else jax.local_devices())
  return Mesh(np.array(devices), ("data",))


def round_batch_size(batch_size: int, mesh) -> int:
  """The batch is split over the mesh's devices, so it must be a multiple of their number."""
  count = mesh.devices.size
  return max(count, -(-batch_size // count) * count)


class ShardedApply:
  """Runs `apply` on fixed-size batches placed across the mesh; pads the last batch.

  With `params`, `apply(params, batch)` gets the params as an argument replicated on every device
  (closing over big weights would bake them into the compiled program as constants).
  """

  def __init__(self, apply: Callable[..., Any], batch_size: int, mesh=None, params: Any = None):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec
    self.mesh = mesh if mesh is not None else data_mesh()
    self.batch_size = round_batch_size(batch_size, self.mesh)
    self.sharding = NamedSharding(self.mesh, PartitionSpec("data"))
    if params is None:
      self.params = None
      self._apply = jax.jit(apply, in_shardings=self.sharding)
    else:
      replicated = NamedSharding(self.mesh, PartitionSpec())
      self.params = jax.device_put(params, replicated)
      self._apply = jax.jit(apply, in_shardings=(replicated, self.sharding))

  def __call__(self, batch: np.ndarray) -> np.ndarray:
    import jax
    rows = batch.shape[0]
    if rows > self.batch_size:
      raise ValueError(f"batch of {rows} rows exceeds the batch size {self.batch_size}")
    if rows < self.batch_size:  # pad with copies of row 0: same shapes -> no recompilation
      batch = np.concatenate([batch, np.repeat(batch[:1], self.batch_size - rows, axis=0)])
    placed = jax.device_put(batch, self.sharding)
    out = self._apply(placed) if self.params is None else self._apply(self.params, placed)
    return np.asarray(jax.device_get(out), np.float32)[:rows]


def apply_in_batches(apply: Callable[..., Any], inputs: np.ndarray, batch_size: int = 256,
                     mesh=None, desc: str | None = None, params: Any = None) -> np.ndarray:
  """[N, ...] -> [N, D] through `apply`, batched and sharded, with a progress bar."""
  from tqdm import tqdm
  runner = ShardedApply(apply, batch_size, mesh, params)
  outputs = []
  with tqdm(total=len(inputs), desc=desc, unit="item", disable=desc is None) as bar:
    for start in range(0, len(inputs), runner.batch_size):
      outputs.append(runner(np.asarray(inputs[start:start + runner.batch_size])))
      bar.update(len(outputs[-1]))
  return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)


def encode_texts(texts: Sequence[str], tokenize: Callable[[list[str]], np.ndarray],
                 apply: Callable[..., Any], batch_size: int = 256, mesh=None,
                 params: Any = None) -> np.ndarray:
  """Texts -> [N, D]: tokenised on the host, encoded in sharded batches."""
  tokens = np.asarray(tokenize(list(texts)), np.int32)
  return apply_in_batches(apply, tokens, batch_size, mesh, params=params)


# ----------------------------------------------------------------------------------------------
# Images of a data source through one or more encoders
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ImageEncoder:
  name: str          # e.g. "clip_image", "dino"
  fingerprint: str   # model identity for the cache
  view: Callable[[np.ndarray], np.ndarray]  # uint8 [H, W, 3] -> float32 [S, S, 3]
  view_name: str     # identity of the view for the cache (the model's preprocess spec)
  apply: Callable[..., Any]  # jittable [B, S, S, 3] -> [B, D], or (params, batch) -> [B, D]
  params: Any = None  # passed to apply as its first argument when given
  exif_transpose: bool = True  # decode photos upright by their EXIF tag before `view`
  pooling: str | None = None  # a DINO backbone's feature pooling (what an aligner must be fitted on)
  model_id: str | None = None  # model_io.content_fingerprint: what aligners record and check
  image_size: int | None = None  # side of the square `view` gives (for shape checks)


def output_width(encoder: ImageEncoder) -> int:
  """The width of the encoder's features, from shapes alone (nothing runs)."""
  import jax
  import jax.numpy as jnp
  if encoder.image_size is None:
    raise ValueError(f"encoder {encoder.name!r} does not record its image size")
  probe = jax.ShapeDtypeStruct((1, encoder.image_size, encoder.image_size, 3), jnp.float32)
  if encoder.params is None:
    return int(jax.eval_shape(encoder.apply, probe).shape[-1])
  return int(jax.eval_shape(encoder.apply, encoder.params, probe).shape[-1])


def record_names(source, indices: Sequence[int]) -> list[str]:
  """What to call records in results: the file path where the source lists files, else the key."""
  if callable(getattr(source, "entry", None)):
    return [str(source.entry(int(i))["path"]) for i in indices]
  keys = record_keys(source)
  return [keys[int(i)] for i in indices]


def spec_encoder(name: str, model_print: str, spec, apply: Callable[..., Any],
                 params: Any = None, pooling: str | None = None,
                 model_id: str | None = None) -> ImageEncoder:
  """An encoder whose view is the model's own preprocess spec (`model_io.read_preprocess`)."""
  from input_pipeline import transforms
  return ImageEncoder(name, model_print, lambda image: transforms.eval_view(image, spec),
                      json.dumps(spec.to_dict(), sort_keys=True), apply, params,
                      spec.exif_transpose, pooling, model_id, spec.image_size)


def _decode_record(record: dict[str, Any], exif_transposes: Sequence[bool]
                   ) -> tuple[dict[bool, np.ndarray] | str, int]:
  """({exif_transpose: uint8 image} for each setting asked for, or the reason the record cannot be
  used; label)."""
  from input_pipeline import transforms
  label = int(record.get("label", -1))
  if record.get("error"):
    return str(record["error"]), label
  try:
    return {turn: transforms.decode_image(record.get("image_bytes"), exif_transpose=turn)
            for turn in exif_transposes}, label
  except transforms.BadRecord as bad:
    return bad.reason, label


@dataclasses.dataclass
class EncodedImages:
  features: dict[str, np.ndarray]  # encoder name -> [K, D]
  indices: np.ndarray              # [K] source indices that were encoded (same for every encoder)
  labels: np.ndarray               # [K] their labels (-1 where the source has none)
  skipped: dict[str, int]          # reason -> count of records that could not be decoded
  skipped_records: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # (index, reason)


def _decoded_views(source, indices: Sequence[int], encoders: Sequence[ImageEncoder],
                   workers: int, prefetch: int) -> Iterator[tuple[int, Any, int]]:
  """(index, {encoder name: view} or the reason the record cannot be used, label) in order,
  through Grain: records are read, decoded (once per EXIF setting) and viewed in `workers`
  threads (PIL works outside the GIL), `prefetch` records ahead."""
  import grain
  exif_transposes = sorted({e.exif_transpose for e in encoders})

  def prepare(index):
    decoded, label = _decode_record(source[int(index)], exif_transposes)
    if isinstance(decoded, str):
      return int(index), decoded, label
    return int(index), {e.name: e.view(decoded[e.exif_transpose]) for e in encoders}, label

  dataset = grain.MapDataset.source(np.asarray(indices, np.int64)).map(prepare)
  yield from dataset.to_iter_dataset(grain.ReadOptions(num_threads=max(1, workers),
                                                       prefetch_buffer_size=max(1, prefetch)))


def _process_slice(indices: np.ndarray) -> np.ndarray:
  """This process's contiguous share of `indices` (all of them in a single-process run)."""
  import jax
  return np.array_split(indices, jax.process_count())[jax.process_index()]


def encode_source(source, indices: Sequence[int], encoders: Sequence[ImageEncoder],
                  batch_size: int = 128, mesh=None, cache: FeatureCache | None = None,
                  data_fingerprint: str | None = None, desc: str = "images",
                  workers: int | None = None) -> EncodedImages:
  """Features of `source[i]` for i in `indices` under every encoder (one decode per image).

  With several processes each encodes a contiguous slice of `indices` on its own devices and
  the slices are gathered, so every process returns what one process would; the cache is read
  only when every process finds it, and written by process 0."""
  import jax
  indices = np.asarray(indices, np.int64)
  if cache is not None and data_fingerprint is None:
    raise ValueError("a feature cache needs a data fingerprint")
  keys = {e.name: FeatureCache.key(e.fingerprint, fingerprint(data_fingerprint, indices.tolist()),
                                   e.view_name) for e in encoders} if cache is not None else {}
  hits = {e.name: cache.get(keys[e.name]) for e in encoders} if cache is not None else {}
  if hits and jax.process_count() > 1:  # all or none: a collective below must run everywhere
    from agriclip_jax.train import multihost
    everywhere = multihost.allgather_json({name: hit is not None for name, hit in hits.items()})
    hits = {name: hit if all(found[name] for found in everywhere) else None
            for name, hit in hits.items()}
  features = {name: hit[0] for name, hit in hits.items() if hit is not None}
  pending = [e for e in encoders if e.name not in features]
  if not pending:  # the unreadable records are told as the first run told them
    _, cached_indices, cached_labels = next(iter(hits.values()))
    records = cache.skipped_records(keys[encoders[0].name])
    return EncodedImages(features, cached_indices, cached_labels,
                         dict(Counter(reason for _, reason in records)), records)
  encoded = _encode_local(source, _process_slice(indices), pending, batch_size, mesh, desc,
                          workers or min(8, os.cpu_count() or 1))
  if jax.process_count() > 1:
    encoded = _gather_processes(encoded, [e.name for e in pending])
  cached = next((hit for hit in hits.values() if hit is not None), None)
  if cached is not None and not np.array_equal(cached[1], encoded.indices):
    raise ValueError("cached features cover other images than the ones decoded now; "
                     f"clear the cache at {cache.root}")
  if cache is not None and jax.process_index() == 0:
    for e in pending:
      cache.put(keys[e.name], encoded.features[e.name], encoded.indices, encoded.labels,
                {"encoder": e.name, "view": e.view_name, "skipped": encoded.skipped,
                 "skipped_records": encoded.skipped_records})
  if encoded.skipped:
    print(f"[features] {desc}: skipped {sum(encoded.skipped.values())} of {len(indices)} records "
          f"that could not be decoded: {encoded.skipped}")
  encoded.features.update(features)
  return encoded


def _encode_local(source, indices: np.ndarray, encoders: Sequence[ImageEncoder], batch_size: int,
                  mesh, desc: str, workers: int) -> EncodedImages:
  """`encode_source` on this process's devices: fixed-size batches (the last padded, so that
  each encoder compiles once) split over the mesh."""
  from tqdm import tqdm
  runners = {e.name: ShardedApply(e.apply, batch_size, mesh, e.params) for e in encoders}
  step = min(r.batch_size for r in runners.values())
  outputs: dict[str, list[np.ndarray]] = {e.name: [] for e in encoders}
  views: dict[str, list[np.ndarray]] = {e.name: [] for e in encoders}
  kept: list[int] = []
  labels: list[int] = []
  skipped: Counter = Counter()
  skipped_records: list[tuple[int, str]] = []

  def flush():
    for e in encoders:
      if views[e.name]:
        outputs[e.name].append(runners[e.name](np.stack(views[e.name])))
        views[e.name] = []

  with tqdm(total=len(indices), desc=desc, unit="img") as bar:
    for index, prepared, label in _decoded_views(source, indices, encoders, workers, 2 * step):
      bar.update(1)
      if isinstance(prepared, str):
        skipped[prepared] += 1
        skipped_records.append((index, prepared))
        continue
      kept.append(index)
      labels.append(label)
      for e in encoders:
        views[e.name].append(prepared[e.name])
      if len(kept) % step == 0:
        flush()
    flush()
  features = {e.name: np.concatenate(outputs[e.name]) if outputs[e.name]
              else np.zeros((0, 0), np.float32) for e in encoders}
  return EncodedImages(features, np.asarray(kept, np.int64), np.asarray(labels, np.int64),
                       dict(skipped), skipped_records)


def _gather_processes(local: EncodedImages, names: Sequence[str]) -> EncodedImages:
  """The slices of every process joined in process order: one process's result."""
  from jax.experimental import multihost_utils

  from agriclip_jax.train import multihost
  info = multihost.allgather_json({"kept": len(local.indices), "skipped": local.skipped_records,
                          "widths": {n: int(local.features[n].shape[1]) if len(local.indices) else 0
                                     for n in names}})
  rows = max(1, max(part["kept"] for part in info))
  counts = [part["kept"] for part in info]

  def gather(array: np.ndarray, width: int | None = None) -> np.ndarray:
    shape = (rows,) if width is None else (rows, width)
    padded = np.zeros(shape, array.dtype)
    padded[:len(array)] = array.reshape((len(array),) + shape[1:])
    stacked = np.asarray(multihost_utils.process_allgather(padded))
    return np.concatenate([part[:count] for part, count in zip(stacked, counts)])

  features = {}
  for name in names:
    width = max(part["widths"][name] for part in info)
    features[name] = gather(local.features[name].astype(np.float32), width)
  skipped_records = [(int(i), str(r)) for part in info for i, r in part["skipped"]]
  return EncodedImages(features, gather(local.indices), gather(local.labels),
                       dict(Counter(reason for _, reason in skipped_records)), skipped_records)


# ----------------------------------------------------------------------------------------------
# Encoders from model directories
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ClipEncoders:
  image: ImageEncoder
  encode_text: Callable[[list[str]], np.ndarray]  # texts -> unnormalised text embeddings [N, E]
  logit_scale: float


@dataclasses.dataclass(frozen=True)
class LoadedClip:
  """A CLIP model as loaded from any format we read, with its tokenizer and eval view."""
  config: dict
  variables: dict
  tokenizer: Any  # tokenizer.ClipTokenizer
  preprocess: Any  # input_pipeline.transforms.PreprocessSpec
  source: str


def detect_clip_format(path: Path) -> str:
  """'flax' (our model directory), 'hf' (a CLIPModel directory) or 'openclip' (a single file:
  an open_clip / OpenAI state dict, or a TorchScript archive behind allow_torchscript)."""
  from agriclip_jax import fileio
  if path.is_dir():
    meta = fileio.read_json(path / "config.json",
                            "config of an HF CLIPModel or agriclip-jax model directory")
    return "flax" if "format_version" in meta and "config" in meta else "hf"
  if path.is_file():
    return "openclip"
  raise FileNotFoundError(f"CLIP model not found: {path}")


def load_clip_model(path: str | os.PathLike, clip_format: str | None = None,
                    tokenizer: str | os.PathLike | None = None, model_name: str | None = None,
                    allow_torchscript: bool = False) -> LoadedClip:
  """The one CLIP loader: our model directory, an HF CLIPModel directory, or an open_clip / OpenAI
  file (the architecture read from its tensor shapes unless `model_name` says it)."""
  import tempfile

  from agriclip_jax import model_io
  from agriclip_jax.tokenizer import ClipTokenizer
  path = Path(path)
  clip_format = clip_format or detect_clip_format(path)
  if clip_format == "flax":
    model_type, config, variables = model_io.load_model_dir(path)
    tokenizer_dir, spec = path, model_io.read_preprocess(path)
    if not model_io.has_tokenizer(path):
      raise FileNotFoundError(f"{path}: no tokenizer files (vocab.json + merges.txt)")
    tok = ClipTokenizer.from_directory(tokenizer_dir)
  else:
    from agriclip_jax.convert import registry
    with tempfile.TemporaryDirectory(prefix="agriclip-load-") as scratch:
      options = {"scratch_dir": Path(scratch), "model_name": model_name,
                 "allow_torchscript": allow_torchscript,
                 "tokenizer": None if tokenizer is None else str(tokenizer)}
      model = registry.get_reader(clip_format)(path, options)
      if model.tokenizer_dir is None:
        raise FileNotFoundError(f"{path}: no tokenizer files; pass a tokenizer (OpenAI's "
                                f"bpe_simple_vocab_16e6.txt.gz or an HF tokenizer directory)")
      tok = ClipTokenizer.from_directory(model.tokenizer_dir)  # read now: the scratch folder goes
    model_type, config, variables = model.model_type, model.config, model.variables
    spec = model.preprocess or model_io.default_preprocess(model_type, config)
  if model_type != "clip":
    raise ValueError(f"{path}: expected a CLIP model, found model_type {model_type!r}")
  return LoadedClip(config, variables, tok, spec, str(path))


def clip_model_encoders(path: str | os.PathLike, batch_size: int = 256, mesh=None,
                        **load_options) -> ClipEncoders:
  """CLIP image + text encoders of any CLIP we read (`load_clip_model`); images get the view the
  model records."""
  from agriclip_jax import model_io
  clip = load_clip_model(path, **load_options)
  config, variables = clip.config, clip.variables
  module, _ = model_io.build_model("clip", config)
  context_length = int(config["text"]["context_length"])

  def apply_text(params, tokens):
    return module.apply(params, tokens, method=type(module).encode_text)

  def encode_text(texts: list[str]) -> np.ndarray:
    return encode_texts(texts, lambda t: clip.tokenizer.encode(t, context_length=context_length),
                        apply_text, batch_size, mesh, params=variables)

  spec = clip.preprocess
  image = spec_encoder("clip_image", fingerprint_path(path), spec,
                       image_features_fn("clip", config), variables,
                       model_id=model_io.content_fingerprint("clip", config, spec, variables))
  log_scale = variables["params"].get("logit_scale") if "params" in variables else None
  scale = float(np.exp(np.asarray(log_scale))) if log_scale is not None else 100.0
  return ClipEncoders(image, encode_text, min(scale, 100.0))


def image_features_fn(model_type: str, config: dict, pooling: str | None = None,
                      source: str = "model") -> Callable[[Any, Any], Any]:
  """The one feature function of every image model: (variables, images [B, S, S, 3]) -> [B, D].

  clip: the image embedding before L2 normalisation; vit (DINO flavour) and resnet: the
  backbone's features with `pooling` ("cls", "cls+avgpool", "lastN"; a ResNet has only its pooled
  features, "cls"); dino (backbone + head): its backbone's features, never the head's scores.
  A pooling the model cannot give fails here, naming `source`, not mid-batch.
  """
  from agriclip_jax import model_io
  module, _ = model_io.build_model(model_type, config)
  if model_type == "clip":
    if pooling is not None:
      raise ValueError(f"{source}: a CLIP image tower has no DINO pooling (got {pooling!r})")
    return lambda variables, images: module.apply(variables, images, method=type(module).encode_image)
  if model_type not in ("vit", "resnet", "dino"):
    raise ValueError(f"{source}: model_type {model_type!r} has no image features")
  from agriclip_jax.models.vit import dino_pooling
  pooling = pooling or model_io.DEFAULT_DINO_POOLING
  n_last_blocks, avgpool = dino_pooling(pooling)
  backbone_config = config.get("backbone", {}) if model_type == "dino" else config
  is_resnet = model_type == "resnet" or (model_type == "dino" and
                                         config.get("backbone_type") == "resnet")
  if is_resnet and pooling != "cls":
    raise ValueError(f"{source}: a ResNet backbone has only its pooled features; DINO pooling "
                     f"{pooling!r} applies to a ViT (use 'cls')")
  if not is_resnet:
    from agriclip_jax.models.configs import VisionConfig
    from agriclip_jax.models.vit import check_dino_pooling
    try:
      check_dino_pooling(VisionConfig.from_dict(backbone_config), n_last_blocks, avgpool)
    except ValueError as e:
      raise ValueError(f"{source}: DINO pooling {pooling!r}: {e}") from None
  vit_pooling = {} if is_resnet else {"n_last_blocks": n_last_blocks, "avgpool": avgpool}

  def apply(variables, images):
    if model_type == "dino":
      return module.apply(variables, images, method=type(module).features, **vit_pooling)
    return module.apply(variables, images, **vit_pooling)

  return apply


@dataclasses.dataclass(frozen=True)
class DinoBackbone:
  """A DINO backbone as loaded: its type, config, variables and the eval view it expects."""
  model_type: str
  config: dict
  variables: dict
  preprocess: Any  # input_pipeline.transforms.PreprocessSpec


def load_dino_backbone(path: str | os.PathLike) -> DinoBackbone:
  """A DINO backbone from a model directory (with its recorded view) or a PyTorch file: a DINO ViT
  or torchvision ResNet state dict, or a DINO training checkpoint (its teacher), which get the
  default DINO view (`model_io.default_preprocess`)."""
  from agriclip_jax import model_io
  path = Path(path)
  if path.is_dir():
    model_type, config, variables = model_io.load_model_dir(path)
    if model_type not in ("vit", "resnet", "dino"):
      raise ValueError(f"{path}: expected a DINO backbone (model_type 'vit', 'resnet' or 'dino'), "
                       f"found {model_type!r}")
    return DinoBackbone(model_type, config, variables, model_io.read_preprocess(path))
  if not path.is_file():
    raise FileNotFoundError(f"DINO model not found: {path} (give a model directory or a .pth file)")
  from agriclip_jax.convert import dino as dino_convert
  data = dino_convert.load_torch_file(path) if path.suffix != ".safetensors" else None
  if isinstance(data, dict) and ("teacher" in data or "student" in data):
    model = dino_convert.read_dino_checkpoint(path, {"part": "backbone"})
  else:
    state = dino_convert.load_state_file(path)
    kind = dino_convert.guess_architecture(dino_convert.strip_prefixes(state).keys())
    if kind == "vit":
      model = dino_convert.read_dino_vit(path, {})
    elif kind == "resnet":
      model = dino_convert.read_dino_rn50(path, {})
    else:
      raise ValueError(f"{path}: not a DINO backbone (looks like {kind!r}); expected a DINO ViT or "
                       "ResNet state dict or a DINO training checkpoint")
  return DinoBackbone(model.model_type, model.config, model.variables,
                      model_io.default_preprocess(model.model_type, model.config))


def dino_model_encoder(path: str | os.PathLike, pooling: str | None = None) -> ImageEncoder:
  """DINO backbone features in the backbone's own view (`load_dino_backbone`): model type "vit"
  (DINO flavour), "resnet" (globally pooled, 2048-d for ResNet-50) or "dino" (backbone + head: the
  backbone's features). `pooling` overrides the one the model records (`image_features_fn`)."""
  from agriclip_jax import model_io
  backbone = load_dino_backbone(path)
  pooling = pooling or backbone.preprocess.pooling or model_io.DEFAULT_DINO_POOLING
  apply = image_features_fn(backbone.model_type, backbone.config, pooling, str(path))
  identity = fingerprint_path(path)
  # "cls" keeps the identity (and cache keys) it always had
  model_id = model_io.content_fingerprint(backbone.model_type, backbone.config, backbone.preprocess,
                                          backbone.variables)
  return spec_encoder("dino", identity if pooling == "cls" else fingerprint(identity, pooling),
                      backbone.preprocess, apply, backbone.variables, pooling, model_id)


def load_aligner_any(path: str | os.PathLike):
  """The aligner from our files (.safetensors / .npz), the reference .pth, or a model directory of
  type "linear_aligner" (a Dense layer: kernel = W.T)."""
  from agriclip_jax import align, model_io
  path = Path(path)
  if path.is_dir():
    model_type, _, variables = model_io.load_model_dir(path)
    if model_type != "linear_aligner":
      raise ValueError(f"{path}: expected an aligner, found model_type {model_type!r}")
    params = variables["params"]
    return align.LinearAligner(np.asarray(params["kernel"], np.float32).T.copy(),
                               np.asarray(params["bias"], np.float32))
  return align.load_aligner(path)
