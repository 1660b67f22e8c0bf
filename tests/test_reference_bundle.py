"""The released bundle's zero-shot path on stand-ins, against a PyTorch implementation of the reference.

Stand-ins in the reference formats: a random torchvision-layout ResNet-50 state dict
(`dino_pretrain.pth`), a random aligner {'W', 'b'} (`Agri_Dino_aligner_DPT_CPT.pth`) and a tiny
random HF CLIPModel directory with the OpenAI BPE tokenizer files. The PyTorch side below re-does
the reference's computation (AgriClip_zeroshot.py + TextToConcept.py) with torch, PIL and
transformers: torchvision-style Resize(224) + CenterCrop(224) + ToTensor + Normalize, the torch
ResNet, x @ W.T + b, normalise, cosine with the mean of the CLIP text features per class.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from agriclip_jax import reference_bundle
from agriclip_jax.tokenizer import ClipTokenizer, installed_openai_bpe
from test_resnet import TorchResNet, randomise_batch_norms

CLASS_SOURCES = {  # class -> (split, count): field photos are not square, lab ones are 256 x 256
    "Blight": ("field", 2), "Common_Rust": ("field", 2), "Gray_Leaf_Spot": ("field", 1),
    "Healthy": ("lab", 2),
}
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def image_folder(corn_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("corn_subset")
  for name, (split, count) in CLASS_SOURCES.items():
    (root / name).mkdir()
    for path in sorted((corn_dir / split / name).glob("*.jpg"))[:count]:
      shutil.copyfile(path, root / name / path.name)
  return root


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
  from transformers import CLIPConfig, CLIPModel
  bpe = installed_openai_bpe()
  if bpe is None:
    pytest.skip("the OpenAI BPE file of open_clip_torch is not installed")
  root = tmp_path_factory.mktemp("bundle")
  torch.manual_seed(0)
  dino = TorchResNet(50)
  randomise_batch_norms(dino)
  dino.eval()
  torch.save(dino.state_dict(), root / "dino_pretrain.pth")

  common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
  clip = CLIPModel(CLIPConfig(text_config=common, vision_config=dict(common, image_size=32, patch_size=8),
                              projection_dim=32)).eval()
  with torch.no_grad():  # HF's init leaves text features nearly equal across prompts
    for param in clip.text_model.parameters():
      param.normal_(0, 0.1) if param.ndim > 1 else param.add_(0.1 * torch.randn_like(param))
  clip.save_pretrained(root / "clip")
  ClipTokenizer.from_openai_bpe(bpe).save(root / "clip")

  generator = torch.Generator().manual_seed(1)
  aligner = {"W": 0.02 * torch.randn(32, 2048, generator=generator),
             "b": 0.1 * torch.randn(32, generator=generator)}
  torch.save(aligner, root / "Agri_Dino_aligner_DPT_CPT.pth")
  return root, dino, clip, aligner


# ---------------------------------------------------------------------------------------------
# The PyTorch implementation of the reference computation
# ---------------------------------------------------------------------------------------------

def torch_reference_image(path, size: int = 224) -> torch.Tensor:
  from PIL import Image
  image = Image.open(path).convert("RGB")
  width, height = image.size
  short, long = min(width, height), max(width, height)
  long_out = int(size * long / short)  # torchvision's _compute_resized_output_size
  image = image.resize((size, long_out) if width <= height else (long_out, size), Image.BILINEAR)
  tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0  # ToTensor
  _, height, width = tensor.shape
  top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))  # center_crop
  tensor = tensor[:, top:top + size, left:left + size]
  return (tensor - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]


def torch_zeroshot_weights(clip, tokenizer_dir, class_names, templates) -> torch.Tensor:
  from transformers import CLIPTokenizer
  tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
  weights = []
  for name in class_names:
    tokens = tokenizer([t.format(name) for t in templates], padding=True, return_tensors="pt")
    with torch.no_grad():
      out = clip.get_text_features(input_ids=tokens["input_ids"])
    vecs = out if isinstance(out, torch.Tensor) else out.pooler_output
    vec = vecs.mean(0)
    weights.append(vec / vec.norm(dim=-1, keepdim=True))
  return torch.stack(weights)


def torch_reference_logits(bundle, image_folder, templates):
  root, dino, clip, aligner = bundle
  class_names = sorted(p.name for p in image_folder.iterdir() if p.is_dir())
  files, labels = [], []
  for label, name in enumerate(class_names):
    for path in sorted((image_folder / name).iterdir()):
      files.append(path)
      labels.append(label)
  images = torch.stack([torch_reference_image(p) for p in files])
  weights = torch_zeroshot_weights(clip, root / "clip", class_names, templates)
  with torch.no_grad():
    reps = dino(images).flatten(1)
    aligned = reps @ aligner["W"].T + aligner["b"]
    aligned = aligned / aligned.norm(dim=-1, keepdim=True)
    logits = aligned @ weights.T
  return logits.numpy(), np.asarray(labels), files, class_names


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

def test_reference_zeroshot_in_jax_equals_pytorch(bundle, image_folder):
  root = bundle[0]
  result = reference_bundle.run_reference_zeroshot(
      root / "dino_pretrain.pth", root / "Agri_Dino_aligner_DPT_CPT.pth", root / "clip",
      image_folder, "Banana Deficiency", batch_size=3)  # 7 images: the last batch is padded
  assert result.templates == ["a photo contain {} deficiency"]
  want_logits, want_labels, want_files, class_names = torch_reference_logits(
      bundle, image_folder, result.templates)
  assert result.class_names == class_names == ["Blight", "Common_Rust", "Gray_Leaf_Spot", "Healthy"]
  assert result.files == want_files and result.skipped == []
  np.testing.assert_array_equal(result.labels, want_labels)
  np.testing.assert_allclose(result.logits, want_logits, atol=1e-4, rtol=0)
  assert np.ptp(want_logits, axis=1).min() > 1e-3  # classes are distinguishable, argmax is stable
  np.testing.assert_array_equal(result.predictions, want_logits.argmax(axis=1))
  assert result.accuracy == pytest.approx(np.mean(want_logits.argmax(axis=1) == want_labels))


def test_reference_view_matches_the_torch_transform(image_folder):
  from input_pipeline import transforms
  spec = transforms.preset("agriclip-reference")  # what a DINO .pth gets (model_io's default)
  for path in sorted(image_folder.glob("*/*.jpg"))[:3]:
    got = transforms.load_eval_image(path.read_bytes(), spec, str(path))
    want = torch_reference_image(path).permute(1, 2, 0).numpy()
    assert got.shape == (224, 224, 3)
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.fixture(scope="module")
def small_bundle(bundle, tmp_path_factory):
  """A ResNet-18 (512-d) and its aligner: cheap runs for the error paths."""
  root = tmp_path_factory.mktemp("small")
  torch.save(TorchResNet(18).state_dict(), root / "rn18.pth")
  torch.save({"W": torch.randn(32, 512), "b": torch.zeros(32)}, root / "aligner.pth")
  return root, bundle[0] / "clip"


def test_unreadable_image_is_named_or_listed(small_bundle, image_folder, tmp_path):
  root, clip = small_bundle
  data = tmp_path / "data"
  shutil.copytree(image_folder, data)
  (data / "Blight" / "a_broken.jpg").write_bytes(b"not a jpeg")  # first file: fails before DINO runs
  args = (root / "rn18.pth", root / "aligner.pth", clip, data, "a photo of {}")
  with pytest.raises(ValueError, match=r"a_broken.jpg: cannot be read as an image"):
    reference_bundle.run_reference_zeroshot(*args, batch_size=8)
  result = reference_bundle.run_reference_zeroshot(*args, batch_size=8, on_bad_image="skip")
  assert [p.name for p, _ in result.skipped] == ["a_broken.jpg"]
  assert len(result.predictions) == sum(count for _, count in CLASS_SOURCES.values())


def test_mismatched_parts_and_bad_templates_are_clear_errors(small_bundle, bundle, image_folder):
  root, clip = small_bundle
  with pytest.raises(ValueError, match=r"expects 2048-d DINO features but .*rn18.pth gives 512-d"):
    reference_bundle.run_reference_zeroshot(root / "rn18.pth", bundle[0] / "Agri_Dino_aligner_DPT_CPT.pth",
                                            clip, image_folder, "a photo of {}")
  with pytest.raises(ValueError, match=r"exactly one '\{\}'"):
    reference_bundle.run_reference_zeroshot(root / "rn18.pth", root / "aligner.pth", clip,
                                            image_folder, "a photo of {} and {}")
  with pytest.raises(KeyError, match=r"unknown task 'Banana Deficiencies'"):
    reference_bundle.run_reference_zeroshot(root / "rn18.pth", root / "aligner.pth", clip,
                                            image_folder, "Banana Deficiencies")


def test_zeroshot_command_runs_the_released_bundle(bundle, image_folder, tmp_path):
  """`agriclip zeroshot --dino --aligner --clip --data --task` is the same computation, written in
  the one result schema."""
  import json

  from agriclip_jax import cli
  root = bundle[0]
  out = tmp_path / "released.json"
  code = cli.main(["zeroshot", "--dino", str(root / "dino_pretrain.pth"),
                   "--aligner", str(root / "Agri_Dino_aligner_DPT_CPT.pth"), "--clip", str(root / "clip"),
                   "--data", str(image_folder), "--task", "Banana Deficiency", "--out", str(out)])
  assert code == 0
  document = json.loads(out.read_text())
  want_logits, want_labels, want_files, class_names = torch_reference_logits(
      bundle, image_folder, ["a photo contain {} deficiency"])
  assert [row["image"] for row in document["predictions"]] == [str(p) for p in want_files]
  assert [row["prediction"] for row in document["predictions"]] == \
      [class_names[i] for i in want_logits.argmax(axis=1)]
  [row] = document["results"]
  assert (row["method"], row["recipe"], row["num_images"]) == ("agriclip", "reference", 7)
  assert row["prompt_names"] == class_names  # folder names as they are, as the reference does
  assert row["top1"] == pytest.approx(np.mean(want_logits.argmax(axis=1) == want_labels))
  assert row["top1_interval"]["low"] <= row["top1"] <= row["top1_interval"]["high"]
  assert document["config"]["recipe"] == "reference"


def test_released_bundle_honours_method_limit_and_cache(bundle, image_folder, tmp_path):
  """--clip is one configuration of the zero-shot path: --method, --limit and --cache work on it
  as on every run (the cached second run gives the same document)."""
  import json

  from agriclip_jax import cli
  root = bundle[0]
  outs = [tmp_path / "first.json", tmp_path / "second.json"]
  for out in outs:
    assert cli.main(["zeroshot", "--dino", str(root / "dino_pretrain.pth"),
                     "--aligner", str(root / "Agri_Dino_aligner_DPT_CPT.pth"),
                     "--clip", str(root / "clip"), "--data", str(image_folder),
                     "--template", "a photo of {}", "--method", "all", "--limit", "5",
                     "--cache", str(tmp_path / "cache"), "--out", str(out)]) == 0
  first, second = (json.loads(out.read_text()) for out in outs)
  assert [r["method"] for r in first["results"]] == ["clip", "agriclip", "ensemble"]
  assert {r["num_images"] for r in first["results"]} == {5}
  assert len(list((tmp_path / "cache").glob("*.npz"))) == 2  # the CLIP and the DINO features
  drop = lambda d: {k: v for k, v in d.items() if k != "config"}  # noqa: E731
  assert drop(first) == drop(second)
  agriclip = [p for p in first["predictions"] if p["method"] == "agriclip"]
  want_logits, _, want_files, class_names = torch_reference_logits(bundle, image_folder,
                                                                   ["a photo of {}"])
  want = {str(f): class_names[i] for f, i in zip(want_files, want_logits.argmax(axis=1))}
  assert [p["prediction"] for p in agriclip] == [want[p["image"]] for p in agriclip]


# ---------------------------------------------------------------------------------------------
# The released bundle in its own formats against the reference script on the corn field photos
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def openai_bundle(tmp_path_factory):
  """dino_pretrain.pth (torchvision ResNet-50, fc removed), an aligner .pth, and a small CLIP as
  an OpenAI-layout state dict `.pt` and as a TorchScript archive of the same (fp16-exact)
  weights: the files of the released bundle, with random weights."""
  import open_clip
  import torchvision

  from test_convert_clip import _torchscript_archive
  root = tmp_path_factory.mktemp("openai_bundle")
  torch.manual_seed(0)
  resnet = torchvision.models.resnet50()
  resnet.fc = torch.nn.Identity()
  randomise_batch_norms(resnet)
  torch.save(resnet.state_dict(), root / "dino_pretrain.pth")
  clip = open_clip.model.CLIP(
      embed_dim=32, quick_gelu=True,
      vision_cfg={"image_size": 32, "layers": 2, "width": 64, "patch_size": 16, "head_width": 64},
      text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2})
  state = {name: value.half().float() for name, value in clip.state_dict().items()}
  torch.save(state, root / "ViT-tiny.pt")
  _torchscript_archive({k: v.numpy() for k, v in state.items()}, root / "ViT-tiny-jit.pt")
  generator = torch.Generator().manual_seed(1)
  torch.save({"W": 0.02 * torch.randn(32, 2048, generator=generator),
              "b": 0.1 * torch.randn(32, generator=generator)}, root / "aligner.pth")
  return root


def test_released_bundle_files_agree_with_the_reference_script_on_field_photos(
    openai_bundle, corn_dir, tmp_path, capsys):
  """`agriclip zeroshot --clip ViT.pt --dino dino_pretrain.pth --aligner A.pth` (no --model-name)
  against the reference script in PyTorch on every corn field photo at its own size; then the
  TorchScript archive behind --allow-torchscript (DINO features from the cache)."""
  import json

  import torch_reference_script
  from agriclip_jax import cli
  root, field = openai_bundle, corn_dir / "field"
  template = "a photo of a corn leaf with {}"
  want = torch_reference_script.run(root / "dino_pretrain.pth", root / "aligner.pth",
                                    root / "ViT-tiny.pt", field, [template])
  assert len(want["files"]) == len(list(field.glob("*/*.jpg")))  # every photo, at its own size
  assert np.ptp(want["logits"], axis=1).min() > 0
  common = ["zeroshot", "--dino", str(root / "dino_pretrain.pth"), "--aligner",
            str(root / "aligner.pth"), "--data", str(field), "--template", template,
            "--cache", str(tmp_path / "cache")]
  for clip_file, flags in (("ViT-tiny.pt", []), ("ViT-tiny-jit.pt", ["--allow-torchscript"])):
    out = tmp_path / f"{clip_file}.json"
    assert cli.main(common + ["--clip", str(root / clip_file), "--out", str(out)] + flags) == 0
    document = json.loads(out.read_text())
    got = {p["image"]: p["prediction"] for p in document["predictions"]}
    assert sorted(got) == sorted(want["files"])  # every photo, none skipped
    agree = np.mean([got[f] == want["class_names"][p] for f, p in zip(want["files"],
                                                                     want["predictions"])])
    assert agree >= 0.99, (clip_file, agree)
    [row] = document["results"]
    assert abs(row["top1"] - want["accuracy"]) <= 1.0 - agree + 1e-9, (clip_file, row["top1"])
  assert cli.main(common + ["--clip", str(root / "ViT-tiny-jit.pt"), "--out",
                            str(tmp_path / "refused.json")]) == 2
  assert "allow-torchscript" in capsys.readouterr().err


def test_predict_reads_the_released_bundle_files_like_zeroshot(openai_bundle, corn_dir, capsys):
  """`agriclip predict` on the same files (TorchScript CLIP behind its flag) gives zeroshot's
  top-1 (one template: the two recipes' class embeddings coincide)."""
  import json

  import torch_reference_script
  from agriclip_jax import cli
  root = openai_bundle
  photos = sorted((corn_dir / "field" / "Common_Rust").glob("*.jpg"))[:3]
  labels = ["Blight", "Common_Rust", "Gray_Leaf_Spot"]
  template = "a photo of a corn leaf with {}"
  assert cli.main(["predict", "--model", str(root / "ViT-tiny-jit.pt"), "--allow-torchscript",
                   "--dino", str(root / "dino_pretrain.pth"), "--aligner", str(root / "aligner.pth"),
                   "--labels", ",".join(labels), "--template", template, "--json",
                   *map(str, photos)]) == 0
  got = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
  clip = torch_reference_script.load_openai_clip(root / "ViT-tiny.pt")
  dino = torch_reference_script.load_resnet50(root / "dino_pretrain.pth")
  aligner = torch.load(root / "aligner.pth", weights_only=True)
  text = torch_reference_script.zeroshot_weights(clip, labels, [template])
  from torchvision import transforms
  from PIL import Image
  view = transforms.Compose([transforms.Resize(224), transforms.CenterCrop(224), transforms.ToTensor(),
                             transforms.Normalize(torch_reference_script.IMAGENET_MEAN,
                                                  torch_reference_script.IMAGENET_STD)])
  with torch.no_grad():
    images = torch.stack([view(Image.open(p).convert("RGB")) for p in photos])
    aligned = dino(images) @ aligner["W"].T + aligner["b"]
    want = (aligned / aligned.norm(dim=-1, keepdim=True) @ text.T).argmax(dim=1).tolist()
  assert [g["image"] for g in got] == [str(p) for p in photos]
  assert [g["top"][0]["label"] for g in got] == [labels[i] for i in want]
