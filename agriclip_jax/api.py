"""The Python API: load a model, embed photos and texts, classify photos zero-shot.

    import agriclip_jax as ac
    model = ac.load("runs/demo/models/clip")            # a CLIP in any format `convert` reads
    model = ac.load(clip="runs/demo/models/clip", dino="runs/demo/models/dino",
                    aligner="runs/demo/models/aligner.safetensors")      # AgriCLIP
    model.embed_images(["leaf.jpg", pixels_uint8_hxwx3])   # [N, D], unit rows
    model.embed_texts(["a photo of a corn leaf with rust"])  # [N, D], unit rows
    model.classify(["leaf.jpg"], ["rust", "blight", "healthy"], method="agriclip")

Every model is used exactly as the commands use it: the model's own eval view
(`model_io.read_preprocess`), the feature function of its type (`features.image_features_fn`),
prompts and scores through `zeroshot.class_embeddings` / `zeroshot.method_scores`. `agriclip
predict` and `agriclip embed` are thin layers over this module.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

Image = Union[str, os.PathLike, np.ndarray]
DEFAULT_TEMPLATE = "a photo of {}."


@dataclasses.dataclass
class Prediction:
  """One image's labels, most probable first."""
  image: str
  labels: list[str]
  probabilities: list[float]

  @property
  def label(self) -> str:
    return self.labels[0]

  def top(self, k: int) -> list[dict[str, Any]]:
    return [{"label": label, "probability": p}
            for label, p in zip(self.labels[:k], self.probabilities[:k])]


@dataclasses.dataclass
class Model:
  """A CLIP, a DINO backbone, or AgriCLIP (CLIP + DINO + aligner), loaded and ready.

  clip: features.ClipEncoders (image and text towers); dino: features.ImageEncoder (backbone
  features with the pooling the aligner was fitted on); aligner: align.LinearAligner.
  """
  clip: Any = None
  dino: Any = None
  aligner: Any = None
  batch_size: int = 32
  ensemble: dict | None = None  # the aligner's recorded calibration (`zeroshot.ensemble_choice`)
  _runners: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def methods(self) -> tuple[str, ...]:
    """The zero-shot methods this model can run (zeroshot.METHODS order)."""
    have_agriclip = self.clip is not None and self.dino is not None and self.aligner is not None
    return tuple(m for m, ok in (("clip", self.clip is not None), ("agriclip", have_agriclip),
                                 ("ensemble", have_agriclip)) if ok)

  def default_method(self) -> str:
    return "agriclip" if "agriclip" in self.methods else "clip"

  # -- images -------------------------------------------------------------------------------

  def _features(self, encoder, images: Sequence[Image]) -> np.ndarray:
    """[N, D] features of `encoder` (unnormalised), batched and padded through one compiled
    function per encoder."""
    from agriclip_jax import features
    images = list(images)
    if not images:
      raise ValueError("no images given")
    runner = self._runners.get(encoder.name)
    if runner is None:
      runner = self._runners[encoder.name] = features.ShardedApply(
          encoder.apply, self.batch_size, features.data_mesh(), encoder.params)
    outputs = []
    # Threads: PIL decodes and resizes outside the GIL; map keeps the order.
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
      for start in range(0, len(images), runner.batch_size):
        chunk = images[start:start + runner.batch_size]
        outputs.append(runner(np.stack(list(pool.map(lambda im: _view(encoder, im), chunk)))))
    return np.concatenate(outputs)

  def image_features(self, images: Sequence[Image], space: str | None = None) -> np.ndarray:
    """Unnormalised features: "clip" (the CLIP image embedding), "dino" (backbone features),
    "agriclip" (DINO -> aligner, in CLIP's space). Default: agriclip when the model has an
    aligner, else the one tower it has."""
    space = space or self._default_space()
    if space == "clip":
      self._need(self.clip, "a CLIP model (clip=...)")
      return self._features(self.clip.image, images)
    if space in ("dino", "agriclip"):
      self._need(self.dino, "a DINO model (dino=...)")
      dino = self._features(self.dino, images)
      if space == "dino":
        return dino
      self._need(self.aligner, "an aligner (aligner=...)")
      return self.aligner.apply(dino)
    raise ValueError(f"unknown embedding space {space!r}; expected 'clip', 'dino' or 'agriclip'")

  def embed_images(self, images: Sequence[Image], space: str | None = None) -> np.ndarray:
    """[N, D] L2-normalised image embeddings (see `image_features` for `space`)."""
    from agriclip_jax.zeroshot import l2_normalize
    return l2_normalize(self.image_features(images, space))

  # -- texts --------------------------------------------------------------------------------

  def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
    """[N, D] L2-normalised CLIP text embeddings."""
    from agriclip_jax.zeroshot import l2_normalize
    self._need(self.clip, "a CLIP model (clip=...): its text tower embeds texts")
    texts = list(texts)
    if not texts:
      raise ValueError("no texts given")
    return l2_normalize(self.clip.encode_text(texts))

  # -- zero-shot ----------------------------------------------------------------------------

  def class_embeddings(self, labels: Sequence[str], templates: Sequence[str] | None = None
                       ) -> np.ndarray:
    from agriclip_jax import zeroshot
    self._need(self.clip, "a CLIP model (clip=...): its text tower embeds the labels")
    return zeroshot.class_embeddings(list(labels), list(templates or [DEFAULT_TEMPLATE]),
                                     self.clip.encode_text)

  def scores(self, images: Sequence[Image], labels: Sequence[str],
             templates: Sequence[str] | None = None, method: str | None = None,
             ensemble_weight: float | None = None) -> np.ndarray:
    """[N, C] scores of `method` (logits for clip / agriclip, probabilities for the ensemble),
    exactly as `agriclip zeroshot` scores a task (`zeroshot.method_scores`)."""
    from agriclip_jax import zeroshot
    method = method or self.default_method()
    if method not in self.methods:
      raise ValueError(f"method {method!r} needs " + ("a CLIP model, a DINO model and an aligner"
                       if method != "clip" else "a CLIP model") + f"; this model runs {self.methods}")
    images = list(images)
    class_emb = self.class_embeddings(labels, templates)
    clip = self.image_features(images, "clip") if method in ("clip", "ensemble") else None
    dino = self.image_features(images, "dino") if method in ("agriclip", "ensemble") else None
    choice = zeroshot.ensemble_choice(self, ensemble_weight)
    return zeroshot.method_scores(class_emb, clip, dino, self.aligner, [method], choice["weight"],
                                  self.clip.logit_scale, zeroshot.ensemble_temperatures(choice))[method]

  def classify(self, images: Sequence[Image], labels: Sequence[str],
               templates: Sequence[str] | None = None, method: str | None = None,
               ensemble_weight: float | None = None) -> list[Prediction]:
    """Per image: every label with its probability, most probable first."""
    from agriclip_jax import zeroshot
    images = list(images)
    labels = list(labels)
    method = method or self.default_method()
    scores = self.scores(images, labels, templates, method, ensemble_weight)
    probabilities = scores if method == "ensemble" else zeroshot.softmax(scores)
    predictions = []
    for image, row in zip(images, probabilities):
      order = np.argsort(-row, kind="stable")  # ties as zeroshot ranks them
      predictions.append(Prediction(_name(image), [labels[i] for i in order],
                                    [float(row[i]) for i in order]))
    return predictions

  # -- helpers ------------------------------------------------------------------------------

  def _default_space(self) -> str:
    if self.dino is not None and self.aligner is not None:
      return "agriclip"
    return "clip" if self.clip is not None else "dino"

  @staticmethod
  def _need(part: Any, what: str) -> None:
    if part is None:
      raise ValueError(f"this needs {what}; load it with agriclip_jax.load(...)")


def _name(image: Image) -> str:
  return str(image) if not isinstance(image, np.ndarray) else f"array{tuple(image.shape)}"


def _view(encoder, image: Image) -> np.ndarray:
  """The encoder's eval view of a path (decoded as the commands decode it) or of uint8 pixels."""
  from input_pipeline import transforms
  if isinstance(image, np.ndarray):
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      raise ValueError(f"an image array must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    return encoder.view(image)
  path = Path(image)
  if not path.is_file():
    raise FileNotFoundError(f"image not found: {path}")
  try:
    pixels = transforms.decode_image(path.read_bytes(), exif_transpose=encoder.exif_transpose)
  except transforms.BadRecord as bad:
    raise ValueError(f"{path}: cannot use this image ({bad.reason})") from None
  return encoder.view(pixels)


def load(path: str | os.PathLike | None = None, *, clip: str | os.PathLike | None = None,
         dino: str | os.PathLike | None = None, aligner: str | os.PathLike | None = None,
         dino_pooling: str | None = None, batch_size: int = 32, **clip_options) -> Model:
  """A model from `path` (a CLIP in any format we read, or a DINO backbone), or AgriCLIP from
  `clip`, `dino` and `aligner`. The aligner's recorded DINO pooling and model fingerprints are
  checked as `agriclip zeroshot` checks them. `clip_options`: clip_format, tokenizer,
  model_name, allow_torchscript (`features.load_clip_model`)."""
  from agriclip_jax import align, features
  if path is not None:
    if clip is not None or dino is not None:
      raise ValueError("give either a path, or clip= / dino= / aligner=, not both")
    if _is_dino(Path(path)):
      dino = path
    else:
      clip = path
  if clip is None and dino is None:
    raise ValueError("nothing to load: give a path, or clip= (and dino= with aligner=)")
  if aligner is not None and dino is None:
    raise ValueError("an aligner maps DINO features: give dino= too")
  model = Model(batch_size=batch_size)
  if clip is not None:
    model.clip = features.clip_model_encoders(clip, batch_size, **clip_options)
  recorded: dict[str, Any] = {}
  if aligner is not None:
    model.aligner = features.load_aligner_any(aligner)
    recorded = align.read_aligner_metadata(aligner) if Path(aligner).is_file() else {}
    dino_pooling = align.resolve_pooling(recorded, dino_pooling, aligner)
    model.ensemble = recorded.get("ensemble")
  if dino is not None:
    model.dino = features.dino_model_encoder(dino, pooling=dino_pooling)
  if aligner is not None:
    checked = {"dino": (str(dino), model.dino.model_id)}
    if model.clip is not None:
      checked["clip"] = (str(clip), model.clip.image.model_id)
    align.check_provenance(recorded, aligner, checked)
    check_widths(model, dino, aligner, clip)
  return model


def check_widths(model: Model, dino, aligner, clip) -> None:
  """An aligner must take the DINO's feature width and give the CLIP's embedding width: checked
  from shapes before any image is read, naming the files."""
  from agriclip_jax import features
  width = features.output_width(model.dino)
  if width != model.aligner.in_dim:
    raise ValueError(f"aligner {aligner} expects {model.aligner.in_dim}-d DINO features but {dino} "
                     f"gives {width}-d with DINO pooling {model.dino.pooling!r} (an aligner fitted "
                     f"on another pooling of a ViT needs that one: --dino-pooling)")
  if model.clip is not None:
    width = features.output_width(model.clip.image)
    if width != model.aligner.out_dim:
      raise ValueError(f"aligner {aligner} maps to {model.aligner.out_dim}-d but CLIP {clip} embeds "
                       f"in {width}-d")


def _is_dino(path: Path) -> bool:
  """Whether `path` holds a DINO backbone (a model directory of type vit / resnet / dino, or a
  DINO / torchvision state dict) rather than a CLIP."""
  from agriclip_jax import fileio
  if path.is_dir():
    meta = fileio.read_json(path / "config.json", "model config")
    return meta.get("model_type") in ("vit", "resnet", "dino")
  if not path.is_file():
    raise FileNotFoundError(f"model not found: {path}")
  from agriclip_jax.convert import dino as dino_convert
  try:
    data = dino_convert.load_torch_file(path) if path.suffix != ".safetensors" else None
  except ValueError:
    return False  # e.g. a TorchScript CLIP archive: the CLIP loader reports what it is
  if isinstance(data, dict) and ("teacher" in data or "student" in data):
    return True
  state = dino_convert.load_state_file(path)
  return dino_convert.guess_architecture(dino_convert.strip_prefixes(state).keys()) in ("vit", "resnet")
