"""The released AgriCLIP bundle's zero-shot recipe, end to end in JAX.

The reference (umair1221/AgriCLIP, `AgriCLIP_alignment/AgriClip_zeroshot.py` + `TextToConcept.py`,
checked Nov 2026) classifies an ImageFolder tree like this:
  1. images: PIL RGB -> Resize(224) (shorter side, bilinear) -> CenterCrop(224) -> ToTensor ->
     ImageNet normalisation;
  2. DINO ResNet-50 (`dino_pretrain.pth`, torchvision layout, fc removed) -> 2048-d pooled features;
  3. aligner (`Agri_Dino_aligner_*.pth`, {'W': [512, 2048], 'b': [512]}): x @ W.T + b, L2-normalised;
  4. classes: the ImageFolder's sorted sub-folder names, put as they are into the task's template;
     text embeddings: CLIP encode_text of every template, averaged *unnormalised*, then normalised;
  5. logits = aligned @ text.T; prediction = argmax; accuracy over all images.
Step 1 is the "agriclip-reference" view of `input_pipeline.transforms`, what every DINO backbone
gets by default; a model directory that records another view gets that one. Everything here
follows those steps, with two deliberate differences: an image that cannot be read
is an error naming the file (or, with `on_bad_image="skip"`, is listed in the result) where the
reference silently skipped whole batches on IndexError; and the DINO backbone may also be a ViT or a
model directory, since every DINO backbone of this project yields features the same way.

`run_reference_zeroshot(dino, aligner, clip, data_dir, task_or_template)` returns predictions and
accuracy. `dino` is a .pth (torchvision ResNet / DINO ViT state dict, or a DINO training checkpoint:
its teacher) or a model directory; `aligner` the reference .pth (or .safetensors / .npz / model
directory); `clip` an HF CLIPModel directory, an open_clip / OpenAI file, or a Flax model directory.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from input_pipeline.transforms import PreprocessSpec, load_eval_image

# torchvision.datasets.folder.IMG_EXTENSIONS: what ImageFolder counts as an image.
IMAGEFOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclasses.dataclass
class ZeroShotResult:
  predictions: np.ndarray  # int [N], indices into class_names
  labels: np.ndarray  # int [N]
  logits: np.ndarray  # float32 [N, C], cosine similarities
  accuracy: float
  class_names: list[str]
  templates: list[str]
  files: list[Path]  # the N images, in ImageFolder order
  skipped: list[tuple[Path, str]]  # (file, reason) of images that could not be read

  def summary(self) -> dict[str, Any]:
    return {"accuracy": self.accuracy, "images": int(len(self.labels)),
            "classes": self.class_names, "templates": self.templates,
            "skipped": [(str(path), reason) for path, reason in self.skipped]}


# ---------------------------------------------------------------------------------------------
# Data: the ImageFolder listing
# ---------------------------------------------------------------------------------------------

def imagefolder_samples(root: str | os.PathLike) -> tuple[list[str], list[tuple[Path, int]]]:
  """(class names, [(file, label)]) in torchvision ImageFolder's order (sorted classes, sorted walk)."""
  root = Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f"data folder not found: {root}")
  classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
  if not classes:
    raise ValueError(f"{root}: no class sub-folders (an ImageFolder holds ROOT/CLASS/IMAGE files)")
  samples = []
  for label, name in enumerate(classes):
    count = 0
    for folder, _, files in sorted(os.walk(root / name, followlinks=True)):
      for file_name in sorted(files):
        if file_name.lower().endswith(IMAGEFOLDER_EXTENSIONS):
          samples.append((Path(folder) / file_name, label))
          count += 1
    if count == 0:
      raise ValueError(f"class folder {root / name} holds no images ({', '.join(IMAGEFOLDER_EXTENSIONS)})")
  return classes, samples


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

def resolve_templates(task_or_template: str | Sequence[str]) -> list[str]:
  """A template with one '{}' (or a list of them), or a task name of `agriclip_jax.tasks`."""
  from agriclip_jax.zeroshot import validate_template
  if not isinstance(task_or_template, str):
    return [validate_template(t) for t in task_or_template]
  if "{" in task_or_template:
    return [validate_template(task_or_template)]
  from agriclip_jax.tasks import get_task
  return list(get_task(task_or_template).templates)


DinoApply = Callable[[Any, jax.Array], jax.Array]


def load_dino(dino: str | os.PathLike) -> tuple[DinoApply, Any, PreprocessSpec]:
  """(apply(variables, images) -> features, variables, the backbone's view) of a DINO backbone
  file or directory."""
  from agriclip_jax.features import image_features_fn, load_dino_backbone
  backbone = load_dino_backbone(dino)
  apply = image_features_fn(backbone.model_type, backbone.config, backbone.preprocess.pooling,
                            str(dino))
  return apply, backbone.variables, backbone.preprocess


def load_clip(clip: str | os.PathLike, clip_format: str | None = None,
              tokenizer: str | os.PathLike | None = None):
  """(CLIP module, variables, ClipTokenizer, context length) through `features.load_clip_model`."""
  from agriclip_jax.features import load_clip_model
  from agriclip_jax.models.clip import CLIP
  from agriclip_jax.models.configs import CLIPConfig
  loaded = load_clip_model(clip, clip_format, tokenizer)
  config = CLIPConfig.from_dict(loaded.config)
  return CLIP(config), loaded.variables, loaded.tokenizer, config.text.context_length


def text_embeddings(module, variables, tokenizer, context_length: int, class_names: Sequence[str],
                    templates: Sequence[str]) -> np.ndarray:
  """[C, E] unit rows: per class, the mean of the unnormalised template embeddings, normalised
  (TextToConcept.get_zeroshot_weights)."""
  prompts = [template.format(name) for name in class_names for template in templates]
  tokens = tokenizer.encode(prompts, context_length=context_length)
  encode = jax.jit(lambda v, t: module.apply(v, t, method=type(module).encode_text))
  embeddings = np.asarray(encode(variables, tokens), np.float32)
  per_class = embeddings.reshape(len(class_names), len(templates), -1).mean(axis=1)
  return per_class / np.linalg.norm(per_class, axis=-1, keepdims=True)


def make_classifier(dino_apply: DinoApply) -> Callable[..., jax.Array]:
  """Jitted (dino variables, W, b, class embeddings, images) -> cosine logits [B, C]."""

  @jax.jit
  def classify(dino_variables, weight, bias, class_embeddings, images):
    features = dino_apply(dino_variables, images).astype(jnp.float32)
    aligned = features @ weight.T + bias
    aligned = aligned / jnp.linalg.norm(aligned, axis=-1, keepdims=True)
    return aligned @ class_embeddings.T

  return classify


# ---------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------

def run_reference_zeroshot(dino: str | os.PathLike, aligner: str | os.PathLike, clip: str | os.PathLike,
                           data_dir: str | os.PathLike, task_or_template: str | Sequence[str], *,
                           clip_format: str | None = None, tokenizer: str | os.PathLike | None = None,
                           batch_size: int = 32, on_bad_image: str = "error",
                           progress: Callable[[int, int], None] | None = None) -> ZeroShotResult:
  """The reference zero-shot classification of an ImageFolder; see the module docstring."""
  from agriclip_jax.features import load_aligner_any
  if on_bad_image not in ("error", "skip"):
    raise ValueError(f"on_bad_image={on_bad_image!r}; expected 'error' or 'skip'")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be positive")
  templates = resolve_templates(task_or_template)
  class_names, samples = imagefolder_samples(data_dir)

  linear = load_aligner_any(aligner)
  dino_apply, dino_variables, view = load_dino(dino)
  clip_module, clip_variables, clip_tokenizer, context_length = load_clip(clip, clip_format,
                                                                         tokenizer)
  class_embeddings = text_embeddings(clip_module, clip_variables, clip_tokenizer, context_length,
                                     class_names, templates)
  if class_embeddings.shape[1] != linear.out_dim:
    raise ValueError(f"aligner {aligner} maps to {linear.out_dim}-d but CLIP {clip} embeds texts in "
                     f"{class_embeddings.shape[1]}-d")

  probe = jax.ShapeDtypeStruct((1, view.image_size, view.image_size, 3), jnp.float32)
  feature_width = jax.eval_shape(dino_apply, dino_variables, probe).shape[-1]
  if feature_width != linear.in_dim:
    raise ValueError(f"aligner {aligner} expects {linear.in_dim}-d DINO features but {dino} gives "
                     f"{feature_width}-d")

  classify = make_classifier(dino_apply)
  weight, bias = jnp.asarray(linear.weight), jnp.asarray(linear.bias)
  class_embeddings = jnp.asarray(class_embeddings)
  logits, labels, files, skipped = [], [], [], []
  batch: list[np.ndarray] = []

  def flush() -> None:
    count = len(batch)
    images = np.stack(batch + [np.zeros_like(batch[0])] * (batch_size - count))  # one compile
    logits.append(np.asarray(classify(dino_variables, weight, bias, class_embeddings, images))[:count])
    batch.clear()

  for index, (path, label) in enumerate(samples):
    try:
      pixels = load_eval_image(path.read_bytes(), view, str(path))
    except (OSError, ValueError) as e:
      if on_bad_image == "error":
        raise ValueError(f"{path}: cannot be read as an image ({e}); pass on_bad_image='skip' to "
                         f"leave it out (it is then listed in the result)") from e
      skipped.append((path, str(e)))
      continue
    batch.append(pixels)
    labels.append(label)
    files.append(path)
    if len(batch) == batch_size:
      flush()
    if progress is not None:
      progress(index + 1, len(samples))
  if batch:
    flush()
  if not labels:
    raise ValueError(f"{data_dir}: no readable images ({len(skipped)} skipped)")
  all_logits = np.concatenate(logits)
  predictions = all_logits.argmax(axis=1)
  labels_array = np.asarray(labels)
  return ZeroShotResult(predictions, labels_array, all_logits,
                        float(np.mean(predictions == labels_array)), class_names, templates, files,
                        skipped)

