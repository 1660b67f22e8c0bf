"""Parity with the real PyTorch libraries, through the commands a user types.

Each model is built by its own library (torchvision, timm, open_clip, transformers) with random
weights from a fixed seed, saved the way that library saves it, ported with `agriclip convert` and
embedded with `agriclip embed` on the vendored corn photos at their own sizes (tests/data/corn).
The reference is the PyTorch model fed by that model's own standard preprocessing: torchvision
transforms for DINO backbones (the AgriCLIP reference's view, or DINO's eval view when converted
with --preprocess dino-eval), open_clip's `preprocess`, HF's CLIPImageProcessor. Features must
agree within 1e-4 of the reference features' scale (their root mean square).

Nothing here may be skipped quietly: under CI=true a skip of a `parity` test fails the run
(tests/conftest.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agriclip_jax import cli

pytestmark = pytest.mark.parity

PHOTOS = Path(__file__).resolve().parent / "data" / "corn"
TOLERANCE = 1e-4
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)



@pytest.fixture(scope="module")
def photos() -> list[Path]:
  """The photos, once torch and torchvision import (inside a test, so a missing library is a
  skip that tests/conftest.py turns into a failure under CI=true, not a silent collection skip)."""
  pytest.importorskip("torch")
  pytest.importorskip("torchvision")
  paths = sorted(PHOTOS.rglob("*.jpg"))
  assert len(paths) == 12, f"expected the 12 vendored photos under {PHOTOS}, found {len(paths)}"
  return paths


def pil_loader(path: Path):
  """torchvision's ImageFolder loader (no EXIF rotation)."""
  from PIL import Image
  with open(path, "rb") as handle:
    return Image.open(handle).convert("RGB")


def torch_features(forward, preprocess, paths: list[Path]) -> np.ndarray:
  import torch
  batch = torch.stack([preprocess(pil_loader(p)) for p in paths])
  with torch.no_grad():
    return forward(batch).float().numpy()


def embed_features(model_dir: Path, tmp_path: Path, paths: list[Path]) -> np.ndarray:
  out = tmp_path / f"{model_dir.name}.npz"
  assert cli.main(["embed", "--model", str(model_dir), "--images", str(PHOTOS), "--out", str(out),
                   "--batch-size", str(len(paths))]) == 0
  result = np.load(out)
  assert [Path(p) for p in result["image_paths"]] == paths
  return result["image_features"]


def relative_difference(ours: np.ndarray, reference: np.ndarray, what: str = "") -> float:
  """max |ours - reference| over the reference's RMS: the error in units of the feature scale."""
  assert ours.shape == reference.shape, (ours.shape, reference.shape)
  value = float(np.abs(ours - reference).max() / np.sqrt(np.mean(reference.astype(np.float64) ** 2)))
  if what:
    print(f"[parity] {what}: max |JAX - PyTorch| / RMS = {value:.2e}")
  return value


def convert(src: Path, src_format: str, dst: Path, *extra: str) -> Path:
  assert cli.main(["convert", "--src", str(src), "--src-format", src_format, "--dst", str(dst),
                   "--dst-format", "flax", *extra]) == 0
  return dst


def recorded_view(model_dir: Path) -> dict:
  return json.loads((model_dir / "config.json").read_text())["preprocess"]


def perturb_(module, seed: int, scale: float = 0.05) -> None:
  """Random offsets on every parameter and BatchNorm statistic: library inits leave LayerNorm /
  BatchNorm at ones and zeros, which would hide a mis-ported scale or bias."""
  import torch
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, tensor in module.state_dict().items():
      if not tensor.is_floating_point():
        continue
      noise = torch.randn(tensor.shape, generator=generator) * scale
      if name.endswith("running_var"):
        tensor.mul_(torch.exp(noise))  # stays positive
      else:
        tensor.add_(noise)


def reference_dino_view(size: int = 224):
  """The AgriCLIP reference's DINO view (what a DINO backbone records by default)."""
  from torchvision import transforms as T
  return T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(),
                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def dino_eval_view():
  """DINO's eval_linear / eval_knn view."""
  from torchvision import transforms as T
  return T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                    T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


# ------------------------------------------------------------------------------------------------
# DINO backbones: torchvision ResNet-50, timm ViT-S/16
# ------------------------------------------------------------------------------------------------

def test_torchvision_resnet50_embeds_as_in_pytorch(photos, tmp_path):
  import torch
  import torchvision
  torch.manual_seed(0)
  model = torchvision.models.resnet50(weights=None)
  perturb_(model, seed=1)
  model.fc = torch.nn.Identity()
  model.eval()
  weights = tmp_path / "rn50.pth"
  torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}, weights)
  model_dir = convert(weights, "dino-rn50", tmp_path / "rn50")
  assert recorded_view(model_dir)["name"] == "agriclip-reference"
  want = torch_features(model, reference_dino_view(), photos)
  got = embed_features(model_dir, tmp_path, photos)
  assert got.shape == (12, 2048)
  assert relative_difference(got, want, "torchvision resnet50") < TOLERANCE


@pytest.fixture(scope="module")
def timm_vit(photos, tmp_path_factory):
  import torch
  timm = pytest.importorskip("timm")
  torch.manual_seed(0)
  model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
  perturb_(model, seed=2)
  model.eval()
  weights = tmp_path_factory.mktemp("timm") / "vit_small.pth"
  torch.save(model.state_dict(), weights)
  return model, weights


def test_timm_vit_small_embeds_as_in_pytorch_in_both_dino_views(timm_vit, photos, tmp_path):
  model, weights = timm_vit
  default_dir = convert(weights, "timm-dino-vit", tmp_path / "vit_reference")
  dino_dir = convert(weights, "timm-dino-vit", tmp_path / "vit_dino_eval", "--preprocess", "dino-eval")
  assert recorded_view(default_dir)["name"] == "agriclip-reference"
  assert recorded_view(dino_dir)["name"] == "dino-eval"
  want_reference = torch_features(model, reference_dino_view(), photos)
  want_dino_eval = torch_features(model, dino_eval_view(), photos)
  # The two views give clearly different features, so each comparison below can tell them apart.
  assert relative_difference(want_dino_eval, want_reference) > 100 * TOLERANCE
  assert relative_difference(embed_features(default_dir, tmp_path, photos), want_reference,
                             "timm vit_small_patch16_224, agriclip-reference view") < TOLERANCE
  assert relative_difference(embed_features(dino_dir, tmp_path, photos), want_dino_eval,
                             "timm vit_small_patch16_224, dino-eval view") < TOLERANCE

  # An aligner records its DINO model by content: the .pth and its port are the same model, the
  # port with another view is not.
  from agriclip_jax import features
  ids = [features.dino_model_encoder(path).model_id for path in (weights, default_dir, dino_dir)]
  assert ids[0] == ids[1] != ids[2]


# ------------------------------------------------------------------------------------------------
# CLIP: open_clip ViT-B-16 (exact GELU) and ViT-B-16-quickgelu (OpenAI's), HF CLIPModel
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ViT-B-16", "ViT-B-16-quickgelu"])
def test_open_clip_vit_b16_embeds_as_in_pytorch(name, photos, tmp_path):
  import torch
  open_clip = pytest.importorskip("open_clip")
  torch.manual_seed(0)
  model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
  model.eval()
  weights = tmp_path / f"{name}.pt"
  torch.save(model.state_dict(), weights)
  model_dir = convert(weights, "openclip", tmp_path / name, "--model-name", name)
  assert recorded_view(model_dir)["name"] == "openclip"
  want = torch_features(model.encode_image, preprocess, photos)
  del model
  got = embed_features(model_dir, tmp_path, photos)
  assert got.shape == (12, 512)
  assert relative_difference(got, want, f"open_clip {name}") < TOLERANCE


def test_hf_clip_embeds_as_its_image_processor_prepares(photos, tmp_path):
  import torch
  transformers = pytest.importorskip("transformers")
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  torch.manual_seed(0)
  common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
  config = transformers.CLIPConfig(
      text_config=dict(common, vocab_size=49408, max_position_embeddings=77),
      vision_config=dict(common, image_size=224, patch_size=32), projection_dim=32)
  model = transformers.CLIPModel(config)
  perturb_(model, seed=3)
  model.eval()
  hf_dir = tmp_path / "hf"
  model.save_pretrained(hf_dir)
  # A non-default processor: its preprocessor_config.json must be what the port records.
  processor = CLIPImageProcessorPil(size={"shortest_edge": 240}, crop_size={"height": 224, "width": 224})
  processor.save_pretrained(hf_dir)
  model_dir = convert(hf_dir, "hf", tmp_path / "hf_flax")
  view = recorded_view(model_dir)
  assert (view["resize_size"], view["image_size"], view["crop_offset"]) == (240, 224, "floor")

  def prepare(image):
    return processor(images=image, return_tensors="pt")["pixel_values"][0]

  def forward(pixels):
    output = model.get_image_features(pixel_values=pixels)
    return getattr(output, "pooler_output", output)

  want = torch_features(forward, prepare, photos)
  got = embed_features(model_dir, tmp_path, photos)
  assert relative_difference(got, want, "HF CLIPModel + CLIPImageProcessor (PIL backend)") < TOLERANCE
