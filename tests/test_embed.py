"""`agriclip embed` on real photos: preprocessing, batching/padding, ordering and the npz contract."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from agriclip_jax import cli, model_io
from agriclip_jax.commands import embed
from agriclip_jax.models.clip import CLIP
from agriclip_jax.models.configs import CLIPConfig, clip_config, vision_config
from agriclip_jax.models.vit import VisionTransformer
from agriclip_jax.tokenizer import installed_openai_bpe, load_tokenizer
from test_convert_clip import random_variables  # one random-weights helper for both files

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
TEXTS = ["a photo of a corn leaf with common rust", "a healthy maize leaf", "gray leaf spot"]




def reference_view(path: Path, size: int, dino: bool = False) -> np.ndarray:
  """The eval transforms written out: shorter side -> size, centre crop, mean/std; CLIP's bicubic
  with CLIP mean/std, or the AgriCLIP reference's DINO view (bilinear, ImageNet mean/std)."""
  image = Image.open(path).convert("RGB")
  width, height = image.size
  scale = size / min(width, height)
  new_w, new_h = (size, int(height * scale)) if width <= height else (int(width * scale), size)
  image = image.resize((new_w, new_h), Image.BILINEAR if dino else Image.BICUBIC)
  left, top = round((new_w - size) / 2), round((new_h - size) / 2)
  pixels = np.asarray(image.crop((left, top, left + size, top + size)), np.float32) / 255.0
  return (pixels - IMAGENET_MEAN) / IMAGENET_STD if dino else (pixels - MEAN) / STD


@pytest.fixture(scope="module")
def photos(corn_dir, tmp_path_factory):
  """Five real photos in two nested folders (not in sorted order on disk)."""
  root = tmp_path_factory.mktemp("photos")
  sources = sorted((corn_dir / "field").rglob("*.jpg"))[:3] + sorted((corn_dir / "lab").rglob("*.jpg"))[:2]
  for i, source in enumerate(sources):
    target = root / ("b" if i % 2 else "a") / f"{4 - i}_{source.name}"
    target.parent.mkdir(exist_ok=True)
    shutil.copyfile(source, target)
  return root


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  bpe = installed_openai_bpe()
  if bpe is None:
    pytest.skip("open_clip_torch (the OpenAI BPE file) is not installed")
  config = clip_config("tiny")
  directory = tmp_path_factory.mktemp("models") / "clip"
  tokenizer_dir = load_tokenizer(bpe).save(tmp_path_factory.mktemp("tok"))
  model_io.save_model_dir(directory, "clip", config.to_dict(),
                          random_variables("clip", config.to_dict(), seed=1), tokenizer_dir)
  return directory


def test_embed_clip_matches_per_image_reference(clip_dir, photos, tmp_path):
  texts = tmp_path / "texts.txt"
  texts.write_text("\n".join(TEXTS) + "\n")
  out = tmp_path / "emb.npz"
  assert cli.main(["embed", "--model", str(clip_dir), "--images", str(photos), "--texts", str(texts),
                   "--out", str(out), "--batch-size", "2"]) == 0  # 5 images: the last batch is padded
  result = np.load(out)
  paths = [Path(p) for p in result["image_paths"]]
  assert paths == sorted(photos.rglob("*.jpg")) and len(paths) == 5

  _, config, variables = model_io.load_model_dir(clip_dir)
  model = CLIP(CLIPConfig.from_dict(config))
  size = model.config.vision.image_size
  encode_image = jax.jit(lambda v, x: model.apply(v, x, method=CLIP.encode_image))
  for row, path in enumerate(paths):  # one image at a time, preprocessed independently
    expected = encode_image(variables, reference_view(path, size)[None])[0]
    np.testing.assert_allclose(result["image_features"][row], expected, atol=2e-5)
  norms = np.linalg.norm(result["image_embeddings"], axis=-1)
  np.testing.assert_allclose(norms, 1.0, atol=1e-5)
  np.testing.assert_allclose(result["image_embeddings"] * np.linalg.norm(result["image_features"], axis=-1,
                                                                          keepdims=True),
                             result["image_features"], atol=1e-5)

  from transformers import CLIPTokenizer
  hf_tokens = CLIPTokenizer.from_pretrained(str(clip_dir))(TEXTS, max_length=77, truncation=True,
                                                           padding="max_length")
  tokens = np.where(np.array(hf_tokens["attention_mask"]) == 1, np.array(hf_tokens["input_ids"]), 0)
  direct = jax.jit(model.apply)(variables, images=np.zeros((len(TEXTS), size, size, 3), np.float32),
                       tokens=tokens.astype(np.int32))
  np.testing.assert_allclose(result["text_embeddings"], direct["text_embeddings"], atol=2e-5)
  np.testing.assert_allclose(result["logit_scale"], direct["logit_scale"], rtol=1e-6)
  assert list(result["texts"]) == TEXTS


def test_embed_vit_writes_only_image_arrays(photos, tmp_path):
  config = vision_config("tiny", flavour="dino")
  model_dir = tmp_path / "vit"
  variables = random_variables("vit", config.to_dict(), seed=2)
  model_io.save_model_dir(model_dir, "vit", config.to_dict(), variables)
  listing = tmp_path / "list.txt"
  originals = sorted(photos.rglob("*.jpg"))[:3]
  (tmp_path / "rel").mkdir()
  shutil.copyfile(originals[2], tmp_path / "rel" / "copy.jpg")
  chosen = sorted([originals[0], originals[1], tmp_path / "rel" / "copy.jpg"])
  # Relative entries are relative to the list file; blank lines are not entries.
  listing.write_text("\n".join(["rel/copy.jpg", "", str(originals[0]), str(originals[1])]) + "\n")
  out = tmp_path / "vit.npz"
  assert cli.main(["embed", "--model", str(model_dir), "--images", str(listing), "--out", str(out),
                   "--batch-size", "4"]) == 0
  result = np.load(out)
  assert sorted(result.files) == ["image_embeddings", "image_features", "image_paths"]
  assert [Path(p) for p in result["image_paths"]] == chosen
  # A DINO ViT gets the DINO view (ImageNet mean/std), not CLIP's.
  expected = jax.jit(VisionTransformer(config).apply)(variables,
                                                      reference_view(chosen[0], 32, dino=True)[None])[0]
  np.testing.assert_allclose(result["image_features"][0], expected, atol=2e-5)
  with pytest.raises(ValueError, match="no text tower"):
    embed.embed(model_dir, listing, listing)


def test_embed_bad_inputs_are_named(clip_dir, tmp_path, capsys):
  broken = tmp_path / "imgs" / "broken.jpg"
  broken.parent.mkdir()
  broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
  out = tmp_path / "o.npz"
  assert cli.main(["embed", "--model", str(clip_dir), "--images", str(broken.parent), "--out", str(out)]) == 2
  assert re.search(r"broken\.jpg: cannot use this image", capsys.readouterr().err)
  listing = tmp_path / "list.txt"
  listing.write_text("imgs/missing.png\n")
  with pytest.raises(FileNotFoundError, match=r"list\.txt:1: image .*missing\.png not found"):
    embed.embed(clip_dir, listing, None)
  texts = tmp_path / "texts.txt"
  texts.write_text("corn\n\nwheat\n")
  with pytest.raises(ValueError, match=r"texts\.txt: line 2 is empty"):
    embed.embed(clip_dir, broken.parent, texts)
  assert not out.exists()


def test_embed_dino_gives_backbone_features_with_the_recorded_pooling(photos, tmp_path):
  from agriclip_jax.models.dino import DINO, DINOConfig, DINOHeadConfig
  from input_pipeline import transforms
  backbone = vision_config("tiny", flavour="dino")
  config = DINOConfig(backbone=backbone, head=DINOHeadConfig(out_dim=64, hidden_dim=32,
                                                             bottleneck_dim=16))
  variables = random_variables("dino", config.to_dict(), seed=3)
  model_dir = tmp_path / "dino"
  spec = transforms.preset("dino-eval", backbone.image_size, pooling="cls+avgpool")
  model_io.save_model_dir(model_dir, "dino", config.to_dict(), variables, preprocess=spec)
  out = tmp_path / "dino.npz"
  assert cli.main(["embed", "--model", str(model_dir), "--images", str(photos), "--out", str(out)]) == 0
  result = np.load(out)
  path = Path(result["image_paths"][0])
  pixels = transforms.eval_view(Image.open(path).convert("RGB"), spec)[None]
  module = DINO(config)
  expected = jax.jit(lambda v, x: module.apply(v, x, method=DINO.features, n_last_blocks=1,
                                      avgpool=True))(variables, pixels)
  assert result["image_features"].shape == (5, 2 * backbone.width)  # class token + mean patch token
  np.testing.assert_allclose(result["image_features"][0], expected[0], atol=2e-5)


def test_a_directory_without_a_recorded_view_gets_its_type_default(photos, tmp_path, capsys):
  import json
  config = vision_config("tiny", flavour="dino")
  model_dir = tmp_path / "old_vit"
  variables = random_variables("vit", config.to_dict(), seed=2)
  model_io.save_model_dir(model_dir, "vit", config.to_dict(), variables)
  meta = json.loads((model_dir / "config.json").read_text())
  assert meta["preprocess"]["name"] == "agriclip-reference"
  del meta["preprocess"]  # as written before models recorded their view
  (model_dir / "config.json").write_text(json.dumps(meta))
  capsys.readouterr()
  result = embed.embed(model_dir, photos, None)
  notices = [line for line in capsys.readouterr().err.splitlines() if "records no 'preprocess'" in line]
  assert len(notices) == 1 and "agriclip-reference" in notices[0] and "ImageNet" in notices[0]
  path = Path(result["image_paths"][0])
  expected = jax.jit(VisionTransformer(config).apply)(variables, reference_view(path, 32, dino=True)[None])[0]
  np.testing.assert_allclose(result["image_features"][0], expected, atol=2e-5)
