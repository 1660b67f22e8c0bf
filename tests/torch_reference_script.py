"""The AgriCLIP reference zero-shot script, written with the real PyTorch libraries.

What `AgriCLIP_alignment/AgriClip_zeroshot.py` + `TextToConcept.py` do, with the libraries they
use: torchvision's ImageFolder and transforms (Resize(224) + CenterCrop(224) + ToTensor + ImageNet
Normalize), a torchvision ResNet-50 with fc = Identity loaded from `dino_pretrain.pth`, the aligner
{'W', 'b'} applied as x @ W.T + b and L2-normalised, and OpenAI-layout CLIP text features (open_clip
builds the model from the state dict as OpenAI's `clip.load` does) averaged per class unnormalised,
then normalised. Used by the agreement test and by benchmarks/bench_zeroshot.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_resnet50(path: Path) -> torch.nn.Module:
  import torchvision
  model = torchvision.models.resnet50()
  model.fc = torch.nn.Identity()
  model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=False)
  return model.eval()


def load_openai_clip(path: Path) -> torch.nn.Module:
  from open_clip.model import build_model_from_openai_state_dict
  state = torch.load(path, map_location="cpu", weights_only=True)
  return build_model_from_openai_state_dict(state).float().eval()


def zeroshot_weights(clip, class_names: list[str], templates: list[str]) -> torch.Tensor:
  """TextToConcept.get_zeroshot_weights: per class, the unnormalised mean, normalised."""
  from open_clip.tokenizer import tokenize
  weights = []
  with torch.no_grad():
    for name in class_names:
      features = clip.encode_text(tokenize([t.format(name) for t in templates]))
      mean = features.mean(dim=0)
      weights.append(mean / mean.norm())
  return torch.stack(weights)


def run(dino_pth: Path, aligner_pth: Path, clip_pt: Path, data_dir: Path, templates: list[str],
        batch_size: int = 32) -> dict:
  """{"files", "labels", "predictions", "logits", "accuracy", "class_names"} of the reference
  computation on an ImageFolder."""
  import torchvision
  from torchvision import transforms
  transform = transforms.Compose([transforms.Resize(224), transforms.CenterCrop(224),
                                  transforms.ToTensor(),
                                  transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
  dataset = torchvision.datasets.ImageFolder(str(data_dir), transform=transform)
  loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
  dino, clip = load_resnet50(dino_pth), load_openai_clip(clip_pt)
  aligner = torch.load(aligner_pth, map_location="cpu", weights_only=True)
  text = zeroshot_weights(clip, dataset.classes, templates)
  logits, labels = [], []
  with torch.no_grad():
    for images, targets in loader:
      aligned = dino(images) @ aligner["W"].T + aligner["b"]
      aligned = aligned / aligned.norm(dim=-1, keepdim=True)
      logits.append((aligned @ text.T).numpy())
      labels.append(targets.numpy())
  logits_array, labels_array = np.concatenate(logits), np.concatenate(labels)
  predictions = logits_array.argmax(axis=1)
  return {"files": [path for path, _ in dataset.samples], "labels": labels_array,
          "predictions": predictions, "logits": logits_array, "class_names": dataset.classes,
          "accuracy": float(np.mean(predictions == labels_array))}
