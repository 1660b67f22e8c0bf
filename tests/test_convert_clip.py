"""Weight porting against PyTorch: transformers.CLIPModel and open_clip's own CLIP module.

open_clip cannot be imported here (its package imports torchvision), so `open_clip_reference` loads
its real model code (open_clip/model.py, transformer.py) under a private package name, with a
stand-in for the one torchvision symbol it imports at module level and without the HF text encoder.
The key set and the forward pass we compare against are therefore open_clip's, not a re-creation.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import json
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from agriclip_jax import cli, model_io
from agriclip_jax.convert import clip_formats, registry
from agriclip_jax.models.clip import CLIP
from agriclip_jax.models.configs import CLIPConfig, clip_config
from agriclip_jax.tokenizer import installed_openai_bpe, load_tokenizer

TOL = 1e-4
CAPTIONS = ["a photo of a maize leaf with northern blight", "healthy corn", "Image of cattle named Daisy!"]


def random_variables(model_type: str, config: dict, seed: int) -> dict:
  """Random variables of the model's shapes, drawn by numpy: compiling Flax's init costs seconds
  per test on a busy CPU, and porting and embedding need values, not a trained distribution."""
  rng = np.random.default_rng(seed)
  abstract = model_io.flatten(model_io.abstract_variables(model_type, config))
  flat = {name: (1.0 if name.endswith("scale") and "logit" not in name else 0.0)
          + rng.normal(0.0, 0.05, leaf.shape).astype(np.float32) for name, leaf in abstract.items()}
  return model_io.unflatten(flat)


@pytest.fixture(scope="module")
def open_clip_reference():
  spec = importlib.util.find_spec("open_clip")
  if spec is None or installed_openai_bpe() is None:
    pytest.skip("open_clip_torch is not installed")
  root = Path(spec.submodule_search_locations[0])
  stubs = {}
  for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc"):
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    stubs[name] = module
  stubs["torchvision.ops.misc"].FrozenBatchNorm2d = None  # only used for ResNet towers
  package = types.ModuleType("_open_clip_reference")
  package.__path__ = [str(root)]
  hf_model = types.ModuleType("_open_clip_reference.hf_model")
  hf_model.HFTextEncoder = None
  saved = {name: sys.modules.get(name) for name in stubs}
  sys.modules.update(stubs)
  sys.modules.update({"_open_clip_reference": package, "_open_clip_reference.hf_model": hf_model})
  try:
    model_module = importlib.import_module("_open_clip_reference.model")
  finally:
    for name, module in saved.items():
      if module is None:
        sys.modules.pop(name, None)
      else:
        sys.modules[name] = module

  def create(model_name: str, **overrides):
    """open_clip.create_model(model_name) without pretrained weights, from its own config json."""
    base = model_name.removesuffix("-quickgelu")
    cfg = json.loads((root / "model_configs" / f"{base}.json").read_text()) if base.startswith("ViT-") else {}
    cfg.update(overrides)
    return model_module.CLIP(**cfg, quick_gelu=model_name.endswith("-quickgelu")).eval()

  return create


def tiny_hf_config(act: str = "quick_gelu"):
  from transformers import CLIPConfig as HFConfig
  common = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                hidden_act=act)
  return HFConfig(text_config=dict(common), vision_config=dict(common, image_size=32, patch_size=8),
                  projection_dim=32)


def hf_model(config, seed: int = 0):
  from transformers import CLIPModel
  torch.manual_seed(seed)
  model = CLIPModel(config).eval()
  with torch.no_grad():  # random, not HF's near-zero init, so that every tensor matters
    model.logit_scale.fill_(3.1)
    for name, param in model.named_parameters():
      if "layer_norm" in name or "layernorm" in name:
        param.add_(0.1 * torch.randn_like(param))
  return model


def torch_outputs(model, images: np.ndarray, tokens: np.ndarray) -> dict[str, np.ndarray]:
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
  return dict(image=out.image_embeds.numpy(), text=out.text_embeds.numpy(),
              logits=out.logits_per_image.numpy())


def open_clip_outputs(model, images: np.ndarray, tokens: np.ndarray) -> dict[str, np.ndarray]:
  with torch.no_grad():
    image, text, scale = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
                               torch.from_numpy(tokens.astype(np.int64)))
  return dict(image=image.numpy(), text=text.numpy(), logits=(scale * image @ text.T).numpy())


def flax_outputs(model_dir: Path, images: np.ndarray, tokens: np.ndarray) -> dict[str, np.ndarray]:
  model_type, config, variables = model_io.load_model_dir(model_dir)
  assert model_type == "clip"
  out = jax.jit(CLIP(CLIPConfig.from_dict(config)).apply)(variables, images, tokens)
  image, text = np.asarray(out["image_embeddings"]), np.asarray(out["text_embeddings"])
  return dict(image=image, text=text, logits=float(out["logit_scale"]) * image @ text.T)


def assert_close(got: dict, want: dict, tol: float = TOL) -> None:
  for key in ("image", "text", "logits"):
    diff = np.abs(got[key] - want[key]).max()
    assert diff <= tol, f"{key}: max abs diff {diff:.3g} > {tol}"


def random_images(count: int, size: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(count, size, size, 3)).astype(np.float32)


def flat_params(model_dir: Path) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in model_io.flatten(model_io.load_model_dir(model_dir)[2]).items()}


def assert_same_params(a: Path, b: Path) -> None:
  left, right = flat_params(a), flat_params(b)
  assert left.keys() == right.keys()
  for key in left:
    np.testing.assert_array_equal(left[key], right[key], err_msg=key)


# ------------------------------------------------------------------------------------------------
# Parity with PyTorch
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("hf_tiny")
  model = hf_model(tiny_hf_config())
  model.save_pretrained(directory)
  return directory, model


@pytest.fixture(scope="module")
def tiny_flax_dir(tiny_hf_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("flax") / "tiny"
  registry.convert(tiny_hf_dir[0], "hf", out, "flax", {})
  return out


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_tiny_hf_parity(act, tmp_path):
  model = hf_model(tiny_hf_config(act), seed=1)
  model.save_pretrained(tmp_path / "hf")
  registry.convert(tmp_path / "hf", "hf", tmp_path / "flax", "flax", {})
  assert model_io.read_config(tmp_path / "flax")["config"]["vision"]["act"] == act
  tokens = load_tokenizer(tmp_path / "flax").encode(CAPTIONS)  # from the installed OpenAI BPE file
  images = random_images(2, 32)
  assert_close(flax_outputs(tmp_path / "flax", images, tokens), torch_outputs(model, images, tokens))


def test_tiny_openclip_layout_parity(tiny_hf_dir, tiny_flax_dir, open_clip_reference, tmp_path):
  hf_dir, model = tiny_hf_dir
  tokens = load_tokenizer(tiny_flax_dir).encode(CAPTIONS)
  images = random_images(2, 32, seed=2)
  expected = torch_outputs(model, images, tokens)
  for suffix in (".pt", ".safetensors"):
    state_path = tmp_path / f"tiny{suffix}"
    registry.convert(hf_dir, "hf", state_path, "openclip", {})
    # open_clip's own CLIP module accepts the file strictly and computes the same outputs.
    reference = open_clip_reference(
        "tiny-quickgelu", embed_dim=32,
        vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32, mlp_ratio=4),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2))
    state = clip_formats.read_safetensors(state_path) if suffix == ".safetensors" else \
        torch.load(state_path, weights_only=True)
    reference.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)
    assert_close(open_clip_outputs(reference, images, tokens), expected)
    # ...and reading it back gives our model with the same outputs.
    back = tmp_path / f"back{suffix}"
    registry.convert(state_path, "openclip", back, "flax", {"model_name": "tiny-quickgelu"})
    assert_close(flax_outputs(back, images, tokens), expected)
    assert_same_params(back, tiny_flax_dir)


@pytest.mark.slow
def test_vit_b16_parity_hf_and_openclip(open_clip_reference, tmp_path):
  from transformers import CLIPConfig as HFConfig
  model = hf_model(HFConfig(vision_config=dict(patch_size=16)), seed=3)  # HF defaults otherwise: B/16
  model.save_pretrained(tmp_path / "hf")
  registry.convert(tmp_path / "hf", "hf", tmp_path / "flax", "flax", {})
  tokens = load_tokenizer(tmp_path / "flax").encode(CAPTIONS[:2])
  images = random_images(1, 224, seed=4)
  expected = torch_outputs(model, images, tokens)
  del model
  assert_close(flax_outputs(tmp_path / "flax", images, tokens), expected)
  # open_clip layout: open_clip's ViT-B-16-quickgelu loads it strictly; read back, the params are
  # bit-identical to the HF-converted ones, hence the same outputs.
  registry.convert(tmp_path / "flax", "flax", tmp_path / "b16.safetensors", "openclip", {})
  reference = open_clip_reference("ViT-B-16-quickgelu")
  state = clip_formats.read_safetensors(tmp_path / "b16.safetensors")
  reference.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
  assert_close(open_clip_outputs(reference, images, tokens), expected)
  del reference, state
  registry.convert(tmp_path / "b16.safetensors", "openclip", tmp_path / "back", "flax",
                   {"model_name": "ViT-B-16-quickgelu"})
  assert_same_params(tmp_path / "back", tmp_path / "flax")


# ------------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------------

def test_round_trip_flax_hf_flax_is_exact(tiny_flax_dir, tmp_path):
  from transformers import CLIPModel, CLIPTokenizer
  registry.convert(tiny_flax_dir, "flax", tmp_path / "hf", "hf", {})
  CLIPModel.from_pretrained(tmp_path / "hf")  # loads without missing/unexpected-key complaints
  hf_tokens = CLIPTokenizer.from_pretrained(tmp_path / "hf")(["healthy corn"])["input_ids"][0]
  assert hf_tokens == list(load_tokenizer(tiny_flax_dir).encode(["healthy corn"])[0][:len(hf_tokens)])
  registry.convert(tmp_path / "hf", "hf", tmp_path / "back", "flax", {})
  assert_same_params(tmp_path / "back", tiny_flax_dir)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_round_trip_flax_openclip_flax_is_exact(suffix, tmp_path):
  # A sigmoid-loss model with exact GELU and a logit bias: the parts only open_clip can hold.
  config = clip_config("tiny", act="gelu", init_logit_bias=-10.0)
  variables = random_variables("clip", config.to_dict(), seed=5)
  tokenizer_dir = load_tokenizer(installed_openai_bpe()).save(tmp_path / "tok")
  model_io.save_model_dir(tmp_path / "flax", "clip", config.to_dict(), variables, tokenizer_dir)
  registry.convert(tmp_path / "flax", "flax", tmp_path / f"oc{suffix}", "openclip", {})
  registry.convert(tmp_path / f"oc{suffix}", "openclip", tmp_path / "back", "flax", {"model_name": "tiny"})
  assert_same_params(tmp_path / "back", tmp_path / "flax")
  assert model_io.read_config(tmp_path / "back")["config"] == model_io.read_config(tmp_path / "flax")["config"]
  with pytest.raises(ValueError, match="HF CLIPModel has no logit_bias"):
    registry.convert(tmp_path / "flax", "flax", tmp_path / "hf", "hf", {})
  assert not (tmp_path / "hf").exists()


def test_cli_convert(tiny_hf_dir, tmp_path, capsys):
  code = cli.main(["convert", "--src", str(tiny_hf_dir[0]), "--src-format", "hf", "--dst",
                   str(tmp_path / "oc.pt"), "--dst-format", "openclip"])
  assert code == 0 and (tmp_path / "oc.pt").is_file()
  code = cli.main(["convert", "--src", str(tmp_path / "oc.pt"), "--src-format", "openclip",
                   "--model-name", "tiny-quickgelu", "--tokenizer", str(installed_openai_bpe()),
                   "--dst", str(tmp_path / "flax"), "--dst-format", "flax"])
  assert code == 0 and model_io.has_tokenizer(tmp_path / "flax")
  assert "converted" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# open_clip / OpenAI file variants
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_openclip_state(tiny_flax_dir):
  model = registry.get_reader("flax")(tiny_flax_dir, {})
  config = CLIPConfig.from_dict(model.config)
  return clip_formats.flax_to_torch_layout(model.variables, clip_formats.clip_rules(config, "openclip"))


def _save_torch(state: dict, path: Path) -> Path:
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, path)
  return path


def test_nested_state_dict_and_module_prefix(tiny_openclip_state, tiny_flax_dir, tmp_path):
  wrapped = {"epoch": 3, "state_dict": {f"module.{k}": torch.from_numpy(v)
                                        for k, v in tiny_openclip_state.items()}}
  torch.save(wrapped, tmp_path / "checkpoint.pt")
  registry.convert(tmp_path / "checkpoint.pt", "openclip", tmp_path / "flax", "flax",
                   {"model_name": "tiny-quickgelu"})
  assert_same_params(tmp_path / "flax", tiny_flax_dir)


class _Holder(torch.nn.Module):
  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x


def _torchscript_archive(state: dict, path: Path) -> Path:
  """A TorchScript archive shaped like OpenAI's: fp16 weights plus integer bookkeeping entries."""
  root = _Holder()
  for name, value in state.items():
    *parents, leaf = name.split(".")
    module = root
    for part in parents:
      if not hasattr(module, part):
        module.add_module(part, _Holder())
      module = getattr(module, part)
    module.register_buffer(leaf, torch.from_numpy(np.asarray(value)).half())
  for name, value in (("input_resolution", 32), ("context_length", 77), ("vocab_size", 49408)):
    root.register_buffer(name, torch.tensor(value))
  torch.jit.save(torch.jit.script(root), str(path))
  return path


def test_torchscript_only_with_flag(tiny_openclip_state, tiny_flax_dir, tmp_path):
  archive = _torchscript_archive(tiny_openclip_state, tmp_path / "ViT-tiny.pt")
  with pytest.raises(ValueError, match="allow-torchscript"):
    registry.convert(archive, "openclip", tmp_path / "flax", "flax", {"model_name": "tiny-quickgelu"})
  registry.convert(archive, "openclip", tmp_path / "flax", "flax",
                   {"model_name": "tiny-quickgelu", "allow_torchscript": True})
  got, want = flat_params(tmp_path / "flax"), flat_params(tiny_flax_dir)
  for key in want:  # fp16 storage rounds the weights; the port itself adds nothing
    np.testing.assert_allclose(got[key], want[key].astype(np.float16).astype(np.float32), err_msg=key)
    assert got[key].dtype == np.float32


# ------------------------------------------------------------------------------------------------
# Clear errors
# ------------------------------------------------------------------------------------------------

def test_missing_and_extra_keys_are_named(tiny_openclip_state, tmp_path):
  state = dict(tiny_openclip_state)
  del state["visual.transformer.resblocks.1.mlp.c_fc.bias"]
  state["visual.head.weight"] = np.zeros((3, 3), np.float32)
  path = _save_torch(state, tmp_path / "bad.pt")
  with pytest.raises(ValueError) as error:
    registry.convert(path, "openclip", tmp_path / "out", "flax", {"model_name": "tiny-quickgelu"})
  message = str(error.value)
  assert "bad.pt" in message and "missing keys (1): visual.transformer.resblocks.1.mlp.c_fc.bias" in message
  assert "unexpected keys (1): visual.head.weight" in message
  assert not (tmp_path / "out").exists()


def test_shape_mismatch_is_named(tiny_hf_dir, tmp_path):
  from safetensors.numpy import save_file
  state = clip_formats.read_safetensors(tiny_hf_dir[0] / "model.safetensors")
  state["text_model.encoder.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 60), np.float32)
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text((tiny_hf_dir[0] / "config.json").read_text())
  save_file(state, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"text_model\.encoder\.layers\.0\.self_attn\.k_proj\.weight: "
                                       r"expected \(64, 64\), got \(64, 60\)"):
    registry.convert(tmp_path / "hf", "hf", tmp_path / "out", "flax", {})


def test_truncated_safetensors_is_named(tiny_hf_dir, tmp_path):
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text((tiny_hf_dir[0] / "config.json").read_text())
  data = (tiny_hf_dir[0] / "model.safetensors").read_bytes()
  (tmp_path / "hf" / "model.safetensors").write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=r"model\.safetensors: cannot read safetensors file .*truncated"):
    registry.convert(tmp_path / "hf", "hf", tmp_path / "out", "flax", {})


def test_unknown_formats_list_the_known_ones(tiny_flax_dir, tmp_path):
  with pytest.raises(ValueError, match=r"unknown source format 'onnx'; known source formats: .*flax.*hf.*openclip"):
    registry.convert(tiny_flax_dir, "onnx", tmp_path / "x", "flax")
  with pytest.raises(ValueError, match=r"unknown destination format 'tflite'.*openclip"):
    registry.convert(tiny_flax_dir, "flax", tmp_path / "x", "tflite")


def test_model_name_errors(tiny_openclip_state, tmp_path):
  path = _save_torch(tiny_openclip_state, tmp_path / "tiny.pt")
  with pytest.raises(ValueError, match=r"unknown model variant 'ViT-Q/99'.*known variants: .*ViT-B/16"):
    registry.convert(path, "openclip", tmp_path / "out", "flax", {"model_name": "ViT-Q-99"})
  with pytest.raises(ValueError, match=r"does not match --model-name 'ViT-B-16'.*vision.width: checkpoint 64, ViT-B/16 768"):
    registry.convert(path, "openclip", tmp_path / "out", "flax", {"model_name": "ViT-B-16"})


def test_without_a_model_name_the_architecture_follows_openai_build_model(tiny_openclip_state,
                                                                           tmp_path, capsys):
  # OpenAI's build_model: vision_heads = vision_width // 64, transformer_heads = width // 64,
  # QuickGELU; every size from the shapes.
  path = _save_torch(tiny_openclip_state, tmp_path / "tiny.pt")
  model = registry.convert(path, "openclip", tmp_path / "out", "flax", {})
  assert "no --model-name" in capsys.readouterr().err
  config = CLIPConfig.from_dict(model.config)
  named = CLIPConfig.from_dict(registry.convert(path, "openclip", tmp_path / "named", "flax",
                                                {"model_name": "tiny-quickgelu"}).config)
  width = tiny_openclip_state["visual.conv1.weight"].shape[0]
  text_width = tiny_openclip_state["token_embedding.weight"].shape[1]
  assert (config.vision.heads, config.text.heads) == (max(1, width // 64), max(1, text_width // 64))
  assert config.vision.act == config.text.act == "quick_gelu"
  for field in ("image_size", "patch_size", "width", "layers", "mlp_dim", "output_dim"):
    assert getattr(config.vision, field) == getattr(named.vision, field), field
  for field in ("vocab_size", "context_length", "width", "layers", "mlp_dim", "output_dim"):
    assert getattr(config.text, field) == getattr(named.text, field), field


def test_missing_tokenizer_says_how_to_supply_one(tiny_openclip_state, tmp_path, monkeypatch):
  path = _save_torch(tiny_openclip_state, tmp_path / "tiny.pt")
  monkeypatch.setattr(clip_formats, "installed_openai_bpe", lambda: None)
  with pytest.raises(FileNotFoundError, match=r"--tokenizer PATH .*bpe_simple_vocab_16e6.txt.gz"):
    registry.convert(path, "openclip", tmp_path / "out", "flax", {"model_name": "tiny-quickgelu"})


def test_unsafe_pickle_is_refused(tmp_path):
  import pickle
  (tmp_path / "evil.pt").write_bytes(pickle.dumps({"visual.proj": object()}))
  with pytest.raises(ValueError, match=r"evil\.pt: cannot load with torch\.load\(weights_only=True\)"):
    registry.convert(tmp_path / "evil.pt", "openclip", tmp_path / "out", "flax", {"model_name": "tiny"})


def test_hf_pytorch_model_bin(tiny_hf_dir, tiny_flax_dir, tmp_path):
  hf_dir, model = tiny_hf_dir
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text((hf_dir / "config.json").read_text())
  torch.save(model.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
  registry.convert(tmp_path / "hf", "hf", tmp_path / "flax", "flax", {})
  assert_same_params(tmp_path / "flax", tiny_flax_dir)


def test_half_precision_safetensors_are_cast_to_fp32(tiny_openclip_state, tiny_flax_dir, tmp_path):
  from safetensors.torch import save_file
  save_file({k: torch.from_numpy(v).bfloat16() for k, v in tiny_openclip_state.items()},
            str(tmp_path / "bf16.safetensors"))
  registry.convert(tmp_path / "bf16.safetensors", "openclip", tmp_path / "flax", "flax",
                   {"model_name": "tiny-quickgelu"})
  got, want = flat_params(tmp_path / "flax"), flat_params(tiny_flax_dir)
  for key in want:
    assert got[key].dtype == np.float32
    np.testing.assert_allclose(got[key], want[key], rtol=1e-2, atol=1e-2, err_msg=key)
