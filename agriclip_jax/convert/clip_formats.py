"""CLIP weights between our Flax layout and PyTorch's: HF `CLIPModel` dirs and open_clip state dicts.

Porting is a table of rules, one per tensor: a Flax name, the PyTorch name(s) and how the array is
laid out on each side (Dense kernels are [in, out] in Flax, Linear weights [out, in] in PyTorch;
conv kernels HWIO vs OIHW; HF splits the fused qkv projection into q, k, v). The same table drives
both directions, so a round trip is exact by construction and every missing, extra or misshapen
tensor is reported under its PyTorch name.

Loading is safe: safetensors, or `torch.load(weights_only=True)`; OpenAI's TorchScript archives only
behind `allow_torchscript`. torch is imported only for .pt/.bin files.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from agriclip_jax import fileio, model_io
from agriclip_jax.convert.registry import ConvertedModel
from agriclip_jax.models.configs import CLIPConfig, TextConfig, VisionConfig, clip_config
from agriclip_jax.tokenizer import ClipTokenizer, installed_openai_bpe, load_tokenizer
from input_pipeline.transforms import PreprocessSpec, preset

# ------------------------------------------------------------------------------------------------
# Tensor rules
# ------------------------------------------------------------------------------------------------

# kind -> (flax array -> torch arrays, torch arrays -> flax array)
_LAYOUTS: dict[str, tuple[Callable[[np.ndarray], list[np.ndarray]],
                          Callable[[list[np.ndarray]], np.ndarray]]] = {
    "copy": (lambda f: [f], lambda t: t[0]),
    "linear": (lambda f: [f.T], lambda t: t[0].T),
    "conv": (lambda f: [f.transpose(3, 2, 0, 1)], lambda t: t[0].transpose(2, 3, 1, 0)),
    # HF keeps q, k, v as three Linear layers; our fused kernel is [D, 3D] with q; k; v along out.
    "qkv_kernel": (lambda f: [part.T for part in np.split(f, 3, axis=1)],
                   lambda t: np.concatenate([part.T for part in t], axis=1)),
    "qkv_bias": (lambda f: np.split(f, 3), lambda t: np.concatenate(t)),
}


@dataclasses.dataclass(frozen=True)
class Rule:
  flax: str  # flat variable name, e.g. "params/visual/conv1/kernel"
  torch: tuple[str, ...]
  kind: str


def _block_rules(flax_prefix: str, torch_prefix: str, layout: str) -> list[Rule]:
  if layout == "openclip":
    names = dict(ln_1="ln_1", ln_2="ln_2", out="attn.out_proj", c_fc="mlp.c_fc", c_proj="mlp.c_proj")
    qkv = [Rule(f"{flax_prefix}/attn/qkv/kernel", (f"{torch_prefix}attn.in_proj_weight",), "linear"),
           Rule(f"{flax_prefix}/attn/qkv/bias", (f"{torch_prefix}attn.in_proj_bias",), "copy")]
  else:
    names = dict(ln_1="layer_norm1", ln_2="layer_norm2", out="self_attn.out_proj", c_fc="mlp.fc1",
                 c_proj="mlp.fc2")
    qkv = [Rule(f"{flax_prefix}/attn/qkv/kernel",
                tuple(f"{torch_prefix}self_attn.{p}_proj.weight" for p in "qkv"), "qkv_kernel"),
           Rule(f"{flax_prefix}/attn/qkv/bias",
                tuple(f"{torch_prefix}self_attn.{p}_proj.bias" for p in "qkv"), "qkv_bias")]
  rules = list(qkv)
  for norm in ("ln_1", "ln_2"):
    rules += [Rule(f"{flax_prefix}/{norm}/scale", (f"{torch_prefix}{names[norm]}.weight",), "copy"),
              Rule(f"{flax_prefix}/{norm}/bias", (f"{torch_prefix}{names[norm]}.bias",), "copy")]
  for flax_name, module in (("attn/out", "out"), ("mlp/c_fc", "c_fc"), ("mlp/c_proj", "c_proj")):
    rules += [Rule(f"{flax_prefix}/{flax_name}/kernel", (f"{torch_prefix}{names[module]}.weight",), "linear"),
              Rule(f"{flax_prefix}/{flax_name}/bias", (f"{torch_prefix}{names[module]}.bias",), "copy")]
  return rules


def _norm_rules(flax_name: str, torch_name: str) -> list[Rule]:
  return [Rule(f"{flax_name}/scale", (f"{torch_name}.weight",), "copy"),
          Rule(f"{flax_name}/bias", (f"{torch_name}.bias",), "copy")]


def clip_rules(config: CLIPConfig, layout: str) -> list[Rule]:
  """Every tensor of a CLIP model in the "openclip" or "hf" PyTorch layout."""
  if layout not in ("openclip", "hf"):
    raise ValueError(f"unknown PyTorch layout {layout!r}")
  v, t = "params/visual", "params/text"
  oc = layout == "openclip"
  vis_torch = "visual." if oc else "vision_model."
  rules = [
      Rule(f"{v}/conv1/kernel", ("visual.conv1.weight" if oc else
                                 "vision_model.embeddings.patch_embedding.weight",), "conv"),
      Rule(f"{v}/class_embedding", ("visual.class_embedding" if oc else
                                    "vision_model.embeddings.class_embedding",), "copy"),
      Rule(f"{v}/positional_embedding", ("visual.positional_embedding" if oc else
                                         "vision_model.embeddings.position_embedding.weight",), "copy"),
      Rule(f"{v}/proj", ("visual.proj",), "copy") if oc else
      Rule(f"{v}/proj", ("visual_projection.weight",), "linear"),
      Rule(f"{t}/token_embedding/embedding", ("token_embedding.weight" if oc else
                                              "text_model.embeddings.token_embedding.weight",), "copy"),
      Rule(f"{t}/positional_embedding", ("positional_embedding" if oc else
                                         "text_model.embeddings.position_embedding.weight",), "copy"),
      Rule(f"{t}/text_projection", ("text_projection",), "copy") if oc else
      Rule(f"{t}/text_projection", ("text_projection.weight",), "linear"),
      Rule("params/logit_scale", ("logit_scale",), "copy"),
  ]
  if config.init_logit_bias is not None:
    if not oc:
      raise ValueError("an HF CLIPModel has no logit_bias; this model (trained with the sigmoid loss) "
                       "can be written as flax or openclip")
    rules.append(Rule("params/logit_bias", ("logit_bias",), "copy"))
  if config.vision.ln_pre:
    rules += _norm_rules(f"{v}/ln_pre", "visual.ln_pre" if oc else "vision_model.pre_layrnorm")
  rules += _norm_rules(f"{v}/ln_post", "visual.ln_post" if oc else "vision_model.post_layernorm")
  rules += _norm_rules(f"{t}/ln_final", "ln_final" if oc else "text_model.final_layer_norm")
  for i in range(config.vision.layers):
    prefix = f"visual.transformer.resblocks.{i}." if oc else f"{vis_torch}encoder.layers.{i}."
    rules += _block_rules(f"{v}/transformer/resblocks_{i}", prefix, layout)
  for i in range(config.text.layers):
    prefix = f"transformer.resblocks.{i}." if oc else f"text_model.encoder.layers.{i}."
    rules += _block_rules(f"{t}/transformer/resblocks_{i}", prefix, layout)
  return rules


def _names(items: list[str], limit: int = 8) -> str:
  shown = ", ".join(items[:limit]) or "none"
  return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def flax_to_torch_layout(variables: Mapping[str, Any], rules: list[Rule]) -> dict[str, np.ndarray]:
  """Flax variables -> a flat dict of C-contiguous float32 arrays under PyTorch names."""
  flat = {k: np.asarray(v, np.float32) for k, v in model_io.flatten(variables).items()}
  missing = sorted({r.flax for r in rules} - set(flat))
  unported = sorted(set(flat) - {r.flax for r in rules})  # would be lost: refuse rather than drop
  if missing or unported:
    raise ValueError(f"flax model: missing variables {_names(missing)}; variables this "
                     f"PyTorch layout cannot hold {_names(unported)}")
  out: dict[str, np.ndarray] = {}
  for rule in rules:
    for name, array in zip(rule.torch, _LAYOUTS[rule.kind][0](flat[rule.flax])):
      out[name] = np.array(array, np.float32, order="C")  # ascontiguousarray would make 0-d 1-d
  return out


def torch_layout_to_flax(state: Mapping[str, np.ndarray], rules: list[Rule], expected: Mapping[str, Any],
                         source: str) -> dict:
  """PyTorch-named arrays -> nested Flax variables, checked against `expected` (abstract) variables.

  Errors name the PyTorch keys: missing ones, unexpected ones, and shape mismatches with the shape
  the model needs.
  """
  want = model_io.flatten(expected)
  wanted_torch = {name for rule in rules for name in rule.torch}
  missing = sorted(wanted_torch - set(state))
  extra = sorted(set(state) - wanted_torch)
  mismatched = []
  for rule in rules:
    if rule.flax not in want:
      raise ValueError(f"internal: rule for {rule.flax} has no variable in the model")
    shape = want[rule.flax].shape
    expected_torch = _LAYOUTS[rule.kind][0](np.broadcast_to(np.zeros((), np.float32), shape))
    for name, needed in zip(rule.torch, expected_torch):
      if name in state and tuple(np.shape(state[name])) != needed.shape:
        mismatched.append(f"{name}: expected {needed.shape}, got {tuple(np.shape(state[name]))}")
  problems = model_io.describe_mismatch(missing, extra, mismatched)
  if problems:
    raise ValueError(f"{source}: weights do not match the model: {problems}")
  flat = {rule.flax: np.array(_LAYOUTS[rule.kind][1]([state[n] for n in rule.torch]), np.float32,
                              order="C") for rule in rules}
  model_io.check_tree_matches(want, flat, source)
  return model_io.unflatten(flat)


# ------------------------------------------------------------------------------------------------
# Reading state dicts
# ------------------------------------------------------------------------------------------------

def _to_float32(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Floating tensors (fp16/bf16 in OpenAI's and many released files) -> fp32 numpy."""
  out = {}
  for name, value in state.items():
    if hasattr(value, "detach"):  # a torch tensor; numpy has no bfloat16, so convert in torch
      value = value.detach().cpu()
      value = value.float().numpy() if value.is_floating_point() else value.numpy()
    array = np.asarray(value)
    # bfloat16 arrives as ml_dtypes' type, which numpy does not count as np.floating.
    is_float = np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"
    out[name] = array.astype(np.float32) if is_float else array
  return out


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError, safe_open
  try:
    with safe_open(str(path), framework="np") as handle:
      return _to_float32({name: handle.get_tensor(name) for name in handle.keys()})
  except (SafetensorError, OSError, ValueError, TypeError) as e:
    raise ValueError(f"{path}: cannot read safetensors file ({e}); it may be truncated or corrupted") from e


def _import_torch(path: Path):
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"{path}: reading this file needs PyTorch (pip install torch); safetensors "
                      f"files need only the safetensors package") from e
  return torch


def is_torchscript_archive(path: Path) -> bool:
  """TorchScript zips hold compiled code (`*/code/` entries) beside the pickled data."""
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as archive:
    return any("/code/" in name or name.endswith("constants.pkl") for name in archive.namelist())


def read_torch_file(path: Path, allow_torchscript: bool = False) -> dict[str, np.ndarray]:
  """A .pt/.bin state dict via torch.load(weights_only=True) (also nested under "state_dict"), or a
  TorchScript archive's state dict if allowed."""
  torch = _import_torch(path)
  if is_torchscript_archive(path):
    if not allow_torchscript:
      raise ValueError(f"{path} is a TorchScript archive (OpenAI's original release format); loading "
                       f"it runs torch.jit.load, so it needs --allow-torchscript")
    return _to_float32(torch.jit.load(str(path), map_location="cpu").state_dict())
  try:
    loaded = torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises a zoo of types for bad archives and unsafe pickles
    raise ValueError(f"{path}: cannot load with torch.load(weights_only=True) ({type(e).__name__}: "
                     f"{e}); the file is corrupted, truncated or holds more than tensors") from e
  # Training checkpoints nest the weights: {"epoch": ..., "state_dict": {...}, "optimizer": ...}.
  if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
    loaded = loaded["state_dict"]
  if not isinstance(loaded, Mapping):
    raise ValueError(f"{path}: expected a state dict (a mapping of names to tensors), got "
                     f"{type(loaded).__name__}")
  return _to_float32(loaded)


# ------------------------------------------------------------------------------------------------
# Tokenizer files for converted models
# ------------------------------------------------------------------------------------------------

def _scratch_dir(options: Mapping[str, Any]) -> Path:
  scratch = options.get("scratch_dir")
  return Path(scratch) if scratch else Path(tempfile.mkdtemp(prefix="agriclip-convert-"))


def resolve_tokenizer_dir(own_dir: Path | None, options: Mapping[str, Any], vocab_size: int,
                          source: str) -> Path:
  """A directory with vocab.json + merges.txt for a converted model.

  Order: `options["tokenizer"]` (a .txt.gz or HF dir), the source's own files, the OpenAI BPE file
  of an installed open_clip_torch package; otherwise a clear error.
  """
  explicit = options.get("tokenizer")
  if explicit:
    tokenizer = load_tokenizer(explicit)
  elif own_dir is not None and model_io.has_tokenizer(own_dir):
    tokenizer = ClipTokenizer.from_directory(own_dir)
  else:
    bpe = installed_openai_bpe()
    if bpe is None:
      raise FileNotFoundError(
          f"{source}: no tokenizer files found. Pass --tokenizer PATH (OpenAI's "
          f"bpe_simple_vocab_16e6.txt.gz or an HF tokenizer directory with vocab.json + merges.txt), "
          f"or install open_clip_torch (pip install --no-deps open_clip_torch), which ships the file")
    tokenizer = ClipTokenizer.from_openai_bpe(bpe)
    print(f"{source}: no tokenizer given; using OpenAI's CLIP BPE from {bpe}", file=sys.stderr)
  if tokenizer.vocab_size > vocab_size:
    raise ValueError(f"{source}: tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens but "
                     f"the text tower embeds only {vocab_size}")
  return tokenizer.save(_scratch_dir(options) / "tokenizer")


# ------------------------------------------------------------------------------------------------
# open_clip / OpenAI state dicts
# ------------------------------------------------------------------------------------------------

OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
SIGLIP_INIT_LOGIT_BIAS = -10.0
_QUICKGELU_SUFFIX = "-quickgelu"


def openclip_variant(model_name: str) -> tuple[str, str]:
  """open_clip model name -> (our variant name, activation).

  "ViT-B-16" -> ("ViT-B/16", "gelu"); "ViT-B-16-quickgelu" -> ("ViT-B/16", "quick_gelu"). Our own
  variant names ("tiny", "ViT-B/16") are accepted too.
  """
  act = "gelu"
  base = model_name
  if base.lower().endswith(_QUICKGELU_SUFFIX):
    act, base = "quick_gelu", base[:-len(_QUICKGELU_SUFFIX)]
  match = re.fullmatch(r"ViT-([A-Za-z]+)-(\d+)", base)
  variant = f"ViT-{match.group(1)}/{match.group(2)}" if match else base
  return variant, act


def _layer_count(state: Mapping[str, Any], pattern: str) -> int:
  indices = {int(m.group(1)) for name in state if (m := re.match(pattern, name))}
  return max(indices) + 1 if indices else 0


def _shape(state: Mapping[str, np.ndarray], name: str, source: str) -> tuple[int, ...]:
  if name not in state:
    raise ValueError(f"{source}: missing key {name!r}, needed to infer the model's sizes")
  return tuple(state[name].shape)


def _sizes_from_shapes(state: Mapping[str, np.ndarray], source: str
                       ) -> tuple[dict[str, int], dict[str, int]]:
  """(vision sizes, text sizes) that the tensor shapes tell: everything but heads and activation."""
  width, _, patch, _ = _shape(state, "visual.conv1.weight", source)
  positions = _shape(state, "visual.positional_embedding", source)[0]
  grid = int(round((positions - 1) ** 0.5))
  if grid * grid + 1 != positions:
    raise ValueError(f"{source}: visual.positional_embedding has {positions} rows, not 1 + a square grid")
  vocab, text_width = _shape(state, "token_embedding.weight", source)
  vision = dict(
      image_size=grid * patch, patch_size=patch, width=width,
      layers=_layer_count(state, r"visual\.transformer\.resblocks\.(\d+)\."),
      mlp_dim=_shape(state, "visual.transformer.resblocks.0.mlp.c_fc.weight", source)[0],
      output_dim=_shape(state, "visual.proj", source)[1])
  text = dict(
      vocab_size=vocab, context_length=_shape(state, "positional_embedding", source)[0],
      width=text_width, layers=_layer_count(state, r"transformer\.resblocks\.(\d+)\."),
      mlp_dim=_shape(state, "transformer.resblocks.0.mlp.c_fc.weight", source)[0],
      output_dim=_shape(state, "text_projection", source)[1])
  return vision, text


def infer_openclip_config(state: Mapping[str, np.ndarray], model_name: str | None,
                          source: str) -> CLIPConfig:
  """Sizes from tensor shapes; heads and activation from the named variant (shapes cannot tell).

  Without a name, OpenAI's own rule (its `build_model`): 64-wide heads in both towers and
  QuickGELU, which every OpenAI checkpoint uses; open_clip's exact-GELU models need their name.
  """
  vision_sizes, text_sizes = _sizes_from_shapes(state, source)
  # The trained scale and bias are in the params; the config keeps the usual initial values
  # (log(1/0.07); SigLIP's -10 for a bias, whose presence marks a sigmoid-loss model).
  bias = SIGLIP_INIT_LOGIT_BIAS if "logit_bias" in state else None
  if model_name is None:
    vision = VisionConfig(heads=max(1, vision_sizes["width"] // 64), act="quick_gelu", **vision_sizes)
    text = TextConfig(heads=max(1, text_sizes["width"] // 64), act="quick_gelu", **text_sizes)
    return CLIPConfig(vision=vision, text=text, init_logit_bias=bias)
  variant, act = openclip_variant(model_name)
  try:
    reference = clip_config(variant, act=act)
  except ValueError as e:
    raise ValueError(f"--model-name {model_name!r}: {e}") from e
  # Compared with the variant before any config is built, because the variant's head counts only
  # fit its own widths. Image size, vocabulary and context length may differ from the variant's.
  compared = {"vision": ("patch_size", "width", "layers", "mlp_dim", "output_dim"),
              "text": ("width", "layers", "mlp_dim", "output_dim")}
  differences = [
      f"{tower}.{field}: checkpoint {sizes[field]}, {variant} {getattr(want, field)}"
      for tower, sizes, want in (("vision", vision_sizes, reference.vision), ("text", text_sizes, reference.text))
      for field in compared[tower] if sizes[field] != getattr(want, field)]
  if differences:
    raise ValueError(f"{source}: the checkpoint does not match --model-name {model_name!r}: "
                     + "; ".join(differences))
  vision = VisionConfig(heads=reference.vision.heads, act=act, ln_eps=reference.vision.ln_eps,
                        **vision_sizes)
  text = TextConfig(heads=reference.text.heads, act=act, ln_eps=reference.text.ln_eps, **text_sizes)
  return CLIPConfig(vision=vision, text=text, init_logit_scale=reference.init_logit_scale,
                    init_logit_bias=bias)


def _unwrap_openclip_state(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Drops DataParallel's `module.` prefix and OpenAI's non-weight entries; scalars become 0-d."""
  if all(name.startswith("module.") for name in state):
    state = {name[len("module."):]: value for name, value in state.items()}
  for name in OPENAI_EXTRA_KEYS:
    state.pop(name, None)
  for name in ("logit_scale", "logit_bias"):
    if name in state and state[name].size == 1:
      state[name] = state[name].reshape(())
  return state


def _load_openclip_state(path: Path, allow_torchscript: bool) -> dict[str, np.ndarray]:
  if path.suffix == ".safetensors":
    return _unwrap_openclip_state(read_safetensors(path))
  return _unwrap_openclip_state(read_torch_file(path, allow_torchscript))


def read_openclip(src: Path, options: Mapping[str, Any]) -> ConvertedModel:
  """An open_clip / OpenAI-layout state dict (.pt, .bin, .safetensors) -> a CLIP model."""
  model_name = options.get("model_name") or None
  if model_name is None:
    print(f"notice: {src}: no --model-name, so the architecture is read from the tensor shapes as "
          f"OpenAI's build_model does (64-wide heads, QuickGELU); pass --model-name ViT-B-16 for "
          f"an open_clip model trained with exact GELU", file=sys.stderr)
  src = Path(src)
  if not src.is_file():
    raise FileNotFoundError(f"open_clip weights file {src} not found")
  state = _load_openclip_state(src, bool(options.get("allow_torchscript")))
  config = infer_openclip_config(state, model_name, str(src))
  variables = torch_layout_to_flax(state, clip_rules(config, "openclip"),
                                   model_io.abstract_variables("clip", config.to_dict()), str(src))
  tokenizer_dir = resolve_tokenizer_dir(None, options, config.text.vocab_size, str(src))
  return ConvertedModel("clip", config.to_dict(), variables, tokenizer_dir,
                        preset("openclip", config.vision.image_size))


def openclip_model_name(config: CLIPConfig) -> str | None:
  """The open_clip name that builds this architecture, or None when open_clip has no such config."""
  letters = {(384, 12): "S", (768, 12): "B", (1024, 24): "L"}
  letter = letters.get((config.vision.width, config.vision.layers))
  if letter is None:
    return None
  suffix = _QUICKGELU_SUFFIX if config.vision.act == "quick_gelu" else ""
  return f"ViT-{letter}-{config.vision.patch_size}{suffix}"


def write_openclip(model: ConvertedModel, dst: Path, options: Mapping[str, Any]) -> None:
  """A state dict with exactly open_clip's CLIP keys: .safetensors, or .pt/.bin via torch.save."""
  del options
  config = _clip_only(model, "openclip")
  state = flax_to_torch_layout(model.variables, clip_rules(config, "openclip"))
  dst = Path(dst)
  if dst.suffix == ".safetensors":
    from safetensors.numpy import save_file
    model_io.atomic_file(dst, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
  elif dst.suffix in (".pt", ".bin", ".pth"):
    torch = _import_torch(dst)
    tensors = {name: torch.from_numpy(array) for name, array in state.items()}
    model_io.atomic_file(dst, lambda tmp: torch.save(tensors, str(tmp)))
  else:
    raise ValueError(f"{dst}: open_clip weights are written as .safetensors, .pt, .pth or .bin; got "
                     f"suffix {dst.suffix!r}")


def _clip_only(model: ConvertedModel, format_name: str) -> CLIPConfig:
  if model.model_type != "clip":
    raise ValueError(f"format {format_name!r} holds CLIP models; this model is {model.model_type!r}")
  return CLIPConfig.from_dict(model.config)


# ------------------------------------------------------------------------------------------------
# HF CLIPModel directories
# ------------------------------------------------------------------------------------------------

_HF_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
            "gelu_new": "gelu_tanh"}
_OUR_ACTS_TO_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
# HF's CLIPTextConfig / CLIPVisionConfig defaults, for config.json files that omit a field.
_HF_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                         layer_norm_eps=1e-5)
_HF_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, image_size=224, patch_size=32,
                           hidden_act="quick_gelu", layer_norm_eps=1e-5)
# Non-persistent buffers that old HF versions saved; they carry no weights.
_HF_IGNORED_SUFFIXES = ("position_ids",)


def _hf_act(value: str, where: str) -> str:
  if value not in _HF_ACTS:
    raise ValueError(f"{where}: hidden_act {value!r} is not supported; known: {sorted(_HF_ACTS)}")
  return _HF_ACTS[value]


def _square(value: Any, where: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise ValueError(f"{where}: non-square size {value} is not supported")
    value = value[0]
  return int(value)


def hf_config_to_ours(hf: Mapping[str, Any], source: str) -> CLIPConfig:
  if hf.get("model_type", "clip") != "clip":
    raise ValueError(f"{source}: model_type {hf.get('model_type')!r} is not an HF CLIPModel ('clip')")
  text = {**_HF_TEXT_DEFAULTS, **(hf.get("text_config") or {})}
  vision = {**_HF_VISION_DEFAULTS, **(hf.get("vision_config") or {})}
  projection = int(hf.get("projection_dim", 512))
  return CLIPConfig(
      vision=VisionConfig(
          image_size=_square(vision["image_size"], f"{source} vision_config.image_size"),
          patch_size=_square(vision["patch_size"], f"{source} vision_config.patch_size"),
          width=vision["hidden_size"], layers=vision["num_hidden_layers"],
          heads=vision["num_attention_heads"], mlp_dim=vision["intermediate_size"],
          output_dim=projection, act=_hf_act(vision["hidden_act"], f"{source} vision_config"),
          ln_eps=float(vision["layer_norm_eps"])),
      text=TextConfig(
          vocab_size=text["vocab_size"], context_length=text["max_position_embeddings"],
          width=text["hidden_size"], layers=text["num_hidden_layers"], heads=text["num_attention_heads"],
          mlp_dim=text["intermediate_size"], output_dim=projection,
          act=_hf_act(text["hidden_act"], f"{source} text_config"), ln_eps=float(text["layer_norm_eps"])),
      init_logit_scale=float(hf.get("logit_scale_init_value", 2.6592)))


def _read_hf_weights(src: Path) -> tuple[dict[str, np.ndarray], Path]:
  index = src / "model.safetensors.index.json"
  single = src / "model.safetensors"
  if single.is_file():
    return read_safetensors(single), single
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise ValueError(f"{index}: not a safetensors index ({e})") from e
    state: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
      state.update(read_safetensors(src / shard))
    return state, index
  bin_path = src / "pytorch_model.bin"
  if bin_path.is_file():
    return read_torch_file(bin_path), bin_path
  raise FileNotFoundError(f"{src}: no model.safetensors, model.safetensors.index.json or "
                          f"pytorch_model.bin found")


def read_hf(src: Path, options: Mapping[str, Any]) -> ConvertedModel:
  """An HF CLIPModel directory (config.json + safetensors or pytorch_model.bin) -> a CLIP model."""
  src = Path(src)
  config_path = src / "config.json"
  hf = fileio.read_json(config_path, "HF CLIPModel config")
  config = hf_config_to_ours(hf, str(config_path))
  state, weights_path = _read_hf_weights(src)
  state = {k: v for k, v in state.items() if not k.endswith(_HF_IGNORED_SUFFIXES)}
  variables = torch_layout_to_flax(state, clip_rules(config, "hf"),
                                   model_io.abstract_variables("clip", config.to_dict()), str(weights_path))
  tokenizer_dir = resolve_tokenizer_dir(src, options, config.text.vocab_size, str(src))
  return ConvertedModel("clip", config.to_dict(), variables, tokenizer_dir,
                        hf_preprocess(src, config.vision.image_size))


# PIL resampling codes that HF image processors store.
_HF_RESAMPLE = {2: "bilinear", 3: "bicubic"}


def hf_preprocess(src: Path, image_size: int) -> PreprocessSpec:
  """The view of an HF model directory's preprocessor_config.json (CLIPImageProcessor's fields),
  or CLIPImageProcessor's defaults for this image size when the directory has none."""
  path = Path(src) / "preprocessor_config.json"
  if not path.is_file():
    return preset("hf-clip", image_size)
  hf = fileio.read_json(path, "HF image processor config")
  size = hf.get("size", {"shortest_edge": image_size})
  if isinstance(size, int):
    size = {"shortest_edge": size}
  if "shortest_edge" in size:
    resize, resize_size = "shorter-side", int(size["shortest_edge"])
  elif size.get("height") is not None and size.get("height") == size.get("width"):
    resize, resize_size = "square", int(size["height"])
  else:
    raise ValueError(f"{path}: size {size} is not supported (a shortest_edge or a square)")
  crop = hf.get("crop_size", resize_size) if hf.get("do_center_crop", True) else resize_size
  if isinstance(crop, Mapping):
    if crop.get("height") != crop.get("width"):
      raise ValueError(f"{path}: crop_size {crop} is not square")
    crop = crop["height"]
  resample = hf.get("resample", 3)
  if resample not in _HF_RESAMPLE:
    raise ValueError(f"{path}: resample {resample!r} is not supported; known: "
                     f"{', '.join(f'{k} ({v})' for k, v in _HF_RESAMPLE.items())}")
  for key in ("do_resize", "do_rescale", "do_normalize"):
    if hf.get(key, True) is not True:
      raise ValueError(f"{path}: {key}={hf[key]!r} is not supported (this project always resizes, "
                       f"rescales by 1/255 and normalises)")
  defaults = preset("hf-clip", image_size)
  try:
    return dataclasses.replace(
        defaults, name="hf", image_size=int(crop), resize_size=resize_size, resize=resize,
        interpolation=_HF_RESAMPLE[resample],
        mean=tuple(hf.get("image_mean", defaults.mean)), std=tuple(hf.get("image_std", defaults.std)))
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None


def hf_config_from_ours(config: CLIPConfig, tokenizer: ClipTokenizer | None) -> dict[str, Any]:
  if not config.vision.ln_pre or config.vision.flavour != "clip":
    raise ValueError("an HF CLIPModel needs a CLIP-flavour image tower with ln_pre")
  end_id = tokenizer.end_id if tokenizer else config.text.vocab_size - 1
  start_id = tokenizer.start_id if tokenizer else config.text.vocab_size - 2
  return {
      "architectures": ["CLIPModel"],
      "model_type": "clip",
      "dtype": "float32",
      "projection_dim": config.embed_dim,
      "logit_scale_init_value": config.init_logit_scale,
      "text_config": {
          "model_type": "clip_text_model", "vocab_size": config.text.vocab_size,
          "hidden_size": config.text.width, "intermediate_size": config.text.mlp_dim,
          "num_hidden_layers": config.text.layers, "num_attention_heads": config.text.heads,
          "max_position_embeddings": config.text.context_length,
          "hidden_act": _OUR_ACTS_TO_HF[config.text.act], "layer_norm_eps": config.text.ln_eps,
          "projection_dim": config.embed_dim, "bos_token_id": start_id, "eos_token_id": end_id,
          "pad_token_id": 1,
      },
      "vision_config": {
          "model_type": "clip_vision_model", "hidden_size": config.vision.width,
          "intermediate_size": config.vision.mlp_dim, "num_hidden_layers": config.vision.layers,
          "num_attention_heads": config.vision.heads, "image_size": config.vision.image_size,
          "patch_size": config.vision.patch_size, "num_channels": 3,
          "hidden_act": _OUR_ACTS_TO_HF[config.vision.act], "layer_norm_eps": config.vision.ln_eps,
          "projection_dim": config.embed_dim,
      },
  }


def _hf_tokenizer_files(tokenizer: ClipTokenizer, directory: Path, context_length: int) -> None:
  tokenizer.save(directory)
  specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
  (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
  tokenizer_config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": context_length,
                      "do_lower_case": True, **specials}
  (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def write_hf(model: ConvertedModel, dst: Path, options: Mapping[str, Any]) -> None:
  """A directory that `transformers.CLIPModel.from_pretrained` and `CLIPTokenizer` load."""
  from safetensors.numpy import save_file

  config = _clip_only(model, "hf")
  tokenizer = ClipTokenizer.from_directory(model.tokenizer_dir) if model.tokenizer_dir else None
  hf_config = hf_config_from_ours(config, tokenizer)
  state = flax_to_torch_layout(model.variables, clip_rules(config, "hf"))

  def write(tmp: Path) -> None:
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
      _hf_tokenizer_files(tokenizer, tmp, config.text.context_length)

  model_io.atomic_directory(Path(dst), write, keep_others=bool(options.get("overwrite")))


READERS = {"hf": read_hf, "openclip": read_openclip}
WRITERS = {"hf": write_hf, "openclip": write_openclip}
