"""The released AgriCLIP bundle's zero-shot recipe, as a configuration of the one zero-shot path.

The reference (umair1221/AgriCLIP, `AgriCLIP_alignment/AgriClip_zeroshot.py` + `TextToConcept.py`,
checked Nov 2026) classifies an ImageFolder tree like this:
  1. images: PIL RGB -> Resize(224) (shorter side, bilinear) -> CenterCrop(224) -> ToTensor ->
     ImageNet normalisation;
  2. DINO ResNet-50 (`dino_pretrain.pth`, torchvision layout, fc removed) -> 2048-d pooled features;
  3. aligner (`Agri_Dino_aligner_*.pth`, {'W': [512, 2048], 'b': [512]}): x @ W.T + b, L2-normalised;
  4. classes: the ImageFolder's sorted sub-folder names, put as they are into the task's template;
     text embeddings: CLIP encode_text of every template, averaged *unnormalised*, then normalised;
  5. logits = aligned @ text.T; prediction = argmax; accuracy over all images.
Step 1 is the "agriclip-reference" view (`input_pipeline.transforms.preset`), what every DINO
backbone gets by default (a model directory that records another view gets that one); steps 2-3
are `api.load` + the "agriclip" method; step 4 is the "reference" recipe of `zeroshot.RECIPES`;
everything runs through `zeroshot.score_task`, as `agriclip zeroshot --clip ...` does. Two
deliberate differences: the ImageFolder is read by the project's one rule
(`input_pipeline.sources.list_image_folder`: the direct entries of each class folder, where
torchvision also walks sub-folders), and an image that cannot be read is an error naming the file
(or, with `on_bad_image="skip"`, is listed in the result) where the reference silently skipped
whole batches on IndexError.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np


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


def resolve_templates(task_or_template: str | Sequence[str]) -> list[str]:
  """A template with one '{}' (or a list of them), or a task name of `agriclip_jax.tasks`."""
  from agriclip_jax.zeroshot import validate_template
  if not isinstance(task_or_template, str):
    return [validate_template(t) for t in task_or_template]
  if "{" in task_or_template:
    return [validate_template(task_or_template)]
  from agriclip_jax.tasks import get_task
  return list(get_task(task_or_template).templates)


def run_reference_zeroshot(dino: str | os.PathLike, aligner: str | os.PathLike, clip: str | os.PathLike,
                           data_dir: str | os.PathLike, task_or_template: str | Sequence[str], *,
                           batch_size: int = 32, on_bad_image: str = "error",
                           **clip_options: Any) -> ZeroShotResult:
  """The reference zero-shot classification of an ImageFolder (see the module docstring).

  `dino`: a DINO / torchvision .pth, a DINO training checkpoint or a model directory; `aligner`:
  the reference .pth (or .safetensors / .npz / model directory); `clip`: any CLIP `api.load`
  reads, with `clip_options` (clip_format, tokenizer, model_name, allow_torchscript)."""
  from agriclip_jax import api, zeroshot
  from input_pipeline.sources import ImageFolderSource
  if on_bad_image not in ("error", "skip"):
    raise ValueError(f"on_bad_image={on_bad_image!r}; expected 'error' or 'skip'")
  templates = resolve_templates(task_or_template)
  source = ImageFolderSource(data_dir, captions_for_class=lambda name: [])
  model = api.load(clip=clip, dino=dino, aligner=aligner, batch_size=batch_size, **clip_options)
  scored = zeroshot.score_task(Path(data_dir).name, source, np.arange(len(source)),
                               source.class_names, templates, model, ("agriclip",),
                               recipe="reference", batch_size=batch_size)
  path_of = lambda index: Path(source.entry(index)["path"])  # noqa: E731
  skipped = [(path_of(index), reason) for index, reason in scored.encoded.skipped_records]
  if skipped and on_bad_image == "error":
    path, reason = skipped[0]
    raise ValueError(f"{path}: cannot be read as an image ({reason}); pass on_bad_image='skip' to "
                     f"leave it out (it is then listed in the result)")
  logits = scored.scores["agriclip"] / scored.logit_scale
  predictions = logits.argmax(axis=1)
  return ZeroShotResult(predictions, scored.labels, logits,
                        float(np.mean(predictions == scored.labels)), scored.class_names,
                        templates, [path_of(i) for i in scored.encoded.indices], skipped)
