"""DINO backbones, heads and the reference aligner: PyTorch files <-> Flax variables.

Formats (keys of `READERS` / `WRITERS`):
- `dino-vit`: a DINO ViT backbone state dict (.pth), DINO's names: cls_token [1,1,D], pos_embed
  [1,N,D], patch_embed.proj, blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm.
- `dino-rn50`: a torchvision ResNet backbone state dict (.pth) without `fc` (DINO's ResNet-50 and
  the released AgriCLIP `dino_pretrain.pth`), BatchNorm running statistics included. Any torchvision
  depth (18/34/50/101/152) is read; option `depth` insists on one.
- `dino-checkpoint`: a DINO training checkpoint (.pth) {"student": {"module.backbone.*",
  "module.head.*"}, "teacher": {"backbone.*", "head.*"}, ...}. Option `which` = "teacher" (default,
  as DINO evaluates) or "student"; option `part` = "full" (default: backbone + head, model type
  "dino" with a ViT or ResNet backbone) or "backbone".
- `timm-dino-vit`: timm's DINO ViT (`vit_small_patch16_224.dino`, ...): a timm hub directory
  (model.safetensors + config.json) or a single .safetensors / .pth / .bin file. timm's DINO v1
  names are DINO's names; a classifier `head.*` is refused unless option `drop_classifier` is set.
- `agriclip-aligner`: the reference aligner .pth {'W': [out, in], 'b': [out]}.

Contract shared with `agriclip_jax/convert/registry.py`: `reader(src, options) -> ConvertedModel`
and `writer(model, dst, options) -> None`. Files load with torch.load(weights_only=True), so a file
that needs pickled code is refused; every write goes to a temporary name and is renamed into place.

Flax layouts: ViT as `agriclip_jax.models.vit` (DINO flavour, model type "vit"), ResNet as
`agriclip_jax.models.resnet` (model type "resnet", variables "params" + "batch_stats"), the DINO head
as `agriclip_jax.models.dino` (model type "dino", params "backbone" + "head", and with a ResNet
backbone "batch_stats" under "backbone"), the aligner as a Dense layer (model type
"linear_aligner", kernel = W.T). Backbone formats (`dino-rn50`) also accept a "dino" model -- what
`agriclip train` writes -- and write its backbone.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from agriclip_jax import fileio, model_io
from agriclip_jax.convert.registry import ConvertedModel
from agriclip_jax.models.resnet import RESNET_STAGES, ResNetConfig

DINO_HEAD_DIM = 64  # DINO ViT-S/16 (384 / 6) and ViT-B/16 (768 / 12); heads are not stored.


# ---------------------------------------------------------------------------------------------
# Loading torch / safetensors files safely
# ---------------------------------------------------------------------------------------------

def looks_like_torch_file(path: Path) -> bool:
  """torch.save writes a zip archive (or, before PyTorch 1.6, a pickle: protocol byte 0x80)."""
  import zipfile
  with open(path, "rb") as handle:
    first = handle.read(1)
  return first == b"\x80" or zipfile.is_zipfile(path)


def load_torch_file(path: Path) -> Any:
  """torch.load(weights_only=True) with errors that name the file and what is wrong."""
  import pickle

  import torch
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"weights file not found: {path}")
  if not looks_like_torch_file(path):
    raise ValueError(f"{path}: not a PyTorch file (neither torch.save's zip archive nor a "
                     f"pickle); it may be damaged or of another format")
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise ValueError(f"{path}: refused: the file holds pickled Python objects beyond tensors and "
                     f"containers, and is loaded only with torch.load(weights_only=True) ({e}). "
                     f"Re-save its state_dict() with torch.save.") from e
  except (RuntimeError, EOFError, OSError, KeyError, ValueError) as e:
    raise ValueError(f"{path}: not a readable PyTorch file ({e}); it may be truncated") from e


def load_state_file(path: Path) -> dict[str, np.ndarray]:
  """A flat {name: float32/int array} from a .safetensors file or a torch state dict file."""
  path = Path(path)
  if path.suffix == ".safetensors":
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
      tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
      raise ValueError(f"{path}: cannot read safetensors file ({e})") from e
    return tensors_to_numpy(tensors, str(path))
  data = load_torch_file(path)
  return tensors_to_numpy(unwrap_state_dict(data, str(path)), str(path))


def unwrap_state_dict(data: Any, source: str) -> Mapping[str, Any]:
  """A state dict, possibly wrapped as {"state_dict": ...} or {"model": ...}."""
  if not isinstance(data, Mapping):
    raise ValueError(f"{source}: expected a state dict (a mapping of names to tensors), got "
                     f"{type(data).__name__}")
  if "student" in data or "teacher" in data:
    raise ValueError(f"{source}: this is a DINO training checkpoint (entries "
                     f"{sorted(map(str, data))}); read it with the format 'dino-checkpoint'")
  for wrapper in ("state_dict", "model"):
    if wrapper in data and isinstance(data[wrapper], Mapping):
      return data[wrapper]
  return data


def tensors_to_numpy(state: Mapping[str, Any], source: str) -> dict[str, np.ndarray]:
  import torch
  out = {}
  for name, value in state.items():
    if not isinstance(value, torch.Tensor):
      raise ValueError(f"{source}: entry {name!r} is a {type(value).__name__}, not a tensor")
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    out[str(name)] = value.numpy().copy()  # never alias torch's memory (BN updates it in place)
  return out


def strip_prefixes(state: Mapping[str, np.ndarray], prefixes: tuple[str, ...] = ("module.", "backbone.")
                   ) -> dict[str, np.ndarray]:
  """Removes DDP's `module.` and DINO's `backbone.` when every key carries them (as DINO's loader)."""
  state = dict(state)
  for prefix in prefixes:
    if state and all(k.startswith(prefix) for k in state):
      state = {k[len(prefix):]: v for k, v in state.items()}
  return state


def guess_architecture(keys: set[str] | list[str]) -> str:
  """'vit' | 'resnet' | 'clip' | 'dino-head' | 'unknown', from characteristic names."""
  keys = set(keys)
  if {"cls_token", "pos_embed"} <= keys or any(k.startswith("blocks.") for k in keys):
    return "vit"
  if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
    return "resnet"
  if any(k.startswith(("visual.", "vision_model.", "text_model.")) for k in keys) or \
      "token_embedding.weight" in keys:
    return "clip"
  if any(k.startswith(("mlp.", "last_layer.")) for k in keys):
    return "dino-head"
  return "unknown"


_FORMAT_OF = {"vit": "dino-vit or timm-dino-vit", "resnet": "dino-rn50",
              "clip": "a CLIP format (hf / openclip)", "dino-head": "dino-checkpoint"}


def _require_architecture(state: Mapping[str, np.ndarray], wanted: str, source: str) -> None:
  found = guess_architecture(list(state))
  if found != wanted:
    shown = ", ".join(sorted(state)[:6])
    hint = f"; it looks like {found} -- use {_FORMAT_OF[found]}" if found in _FORMAT_OF else ""
    raise ValueError(f"{source}: not a {wanted} state dict (keys start: {shown}){hint}")


# ---------------------------------------------------------------------------------------------
# Name tables: torch name -> (flax path, layout). One table per model serves both directions.
# ---------------------------------------------------------------------------------------------

# layout -> (torch -> flax, flax -> torch)
_LAYOUTS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    "same": (lambda a: a, lambda a: a),
    "linear": (lambda a: a.T, lambda a: a.T),  # torch [out, in] <-> flax [in, out]
    "conv": (lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1)),  # OIHW <-> HWIO
    "token": (lambda a: a.reshape(a.shape[-1]), lambda a: a.reshape(1, 1, -1)),  # [1,1,D] <-> [D]
    "positions": (lambda a: a.reshape(a.shape[-2:]), lambda a: a[None]),  # [1,N,D] <-> [N,D]
    "column": (lambda a: a.reshape(-1), lambda a: a.reshape(-1, 1)),  # weight_g [out,1] <-> [out]
}
Table = dict[str, tuple[tuple[str, ...], str]]


def _linear(table: Table, torch_name: str, flax_path: tuple[str, ...], bias: bool = True) -> None:
  table[f"{torch_name}.weight"] = (flax_path + ("kernel",), "linear")
  if bias:
    table[f"{torch_name}.bias"] = (flax_path + ("bias",), "same")


def _layer_norm(table: Table, torch_name: str, flax_path: tuple[str, ...]) -> None:
  table[f"{torch_name}.weight"] = (flax_path + ("scale",), "same")
  table[f"{torch_name}.bias"] = (flax_path + ("bias",), "same")


def vit_table(layers: int) -> Table:
  """DINO ViT names -> VisionTransformer (DINO flavour) params."""
  p = ("params",)
  table: Table = {
      "cls_token": (p + ("class_embedding",), "token"),
      "pos_embed": (p + ("positional_embedding",), "positions"),
      "patch_embed.proj.weight": (p + ("conv1", "kernel"), "conv"),
      "patch_embed.proj.bias": (p + ("conv1", "bias"), "same"),
  }
  for i in range(layers):
    block = p + ("transformer", f"resblocks_{i}")
    _layer_norm(table, f"blocks.{i}.norm1", block + ("ln_1",))
    _linear(table, f"blocks.{i}.attn.qkv", block + ("attn", "qkv"))
    _linear(table, f"blocks.{i}.attn.proj", block + ("attn", "out"))
    _layer_norm(table, f"blocks.{i}.norm2", block + ("ln_2",))
    _linear(table, f"blocks.{i}.mlp.fc1", block + ("mlp", "c_fc"))
    _linear(table, f"blocks.{i}.mlp.fc2", block + ("mlp", "c_proj"))
  _layer_norm(table, "norm", p + ("ln_post",))
  return table


def resnet_table(config: ResNetConfig) -> Table:
  """torchvision ResNet names (no fc) -> ResNet params and batch_stats. num_batches_tracked aside."""
  table: Table = {}

  def conv(torch_name: str, flax_path: tuple[str, ...]) -> None:
    table[f"{torch_name}.weight"] = (("params",) + flax_path + ("kernel",), "conv")

  def batch_norm(torch_name: str, flax_path: tuple[str, ...]) -> None:
    table[f"{torch_name}.weight"] = (("params",) + flax_path + ("scale",), "same")
    table[f"{torch_name}.bias"] = (("params",) + flax_path + ("bias",), "same")
    table[f"{torch_name}.running_mean"] = (("batch_stats",) + flax_path + ("mean",), "same")
    table[f"{torch_name}.running_var"] = (("batch_stats",) + flax_path + ("var",), "same")

  conv("conv1", ("conv1",))
  batch_norm("bn1", ("bn1",))
  convs = 3 if config.block_kind == "bottleneck" else 2
  for stage, blocks in enumerate(config.stage_blocks, start=1):
    for index in range(blocks):
      torch_block, flax_block = f"layer{stage}.{index}", (f"layer{stage}_{index}",)
      for k in range(1, convs + 1):
        conv(f"{torch_block}.conv{k}", flax_block + (f"conv{k}",))
        batch_norm(f"{torch_block}.bn{k}", flax_block + (f"bn{k}",))
      # torchvision gives the first block of every stage a projection shortcut at these depths.
      if index == 0 and (stage > 1 or config.block_kind == "bottleneck"):
        conv(f"{torch_block}.downsample.0", flax_block + ("downsample_conv",))
        batch_norm(f"{torch_block}.downsample.1", flax_block + ("downsample_bn",))
  return table


def head_table(n_layers: int, norm_last_layer: bool) -> Table:
  """DINOHead names (`mlp.{0,2,4}`, `last_layer.weight_{g,v}`) -> DINOHead params."""
  p = ("params",)
  table: Table = {}
  for i in range(n_layers):
    _linear(table, f"mlp.{2 * i}" if n_layers > 1 else "mlp", p + (f"mlp_{i}",))
  table["last_layer.weight_v"] = (p + ("last_layer", "kernel_v"), "linear")
  if not norm_last_layer:
    table["last_layer.weight_g"] = (p + ("last_layer", "kernel_g"), "column")
  return table


def _check_keys(table: Table, state: Mapping[str, Any], source: str, ignored: set[str]) -> None:
  missing = sorted(set(table) - set(state))
  extra = sorted(set(state) - set(table) - ignored)
  problems = model_io.describe_mismatch(missing, extra)
  if problems:
    raise ValueError(f"{source}: {problems}")


def torch_to_flax(table: Table, state: Mapping[str, np.ndarray], source: str,
                  ignored: set[str] = frozenset()) -> dict:
  """Nested Flax variables from a torch state dict; every key must be used (except `ignored`)."""
  _check_keys(table, state, source, set(ignored))
  flat = {}
  for torch_name, (flax_path, layout) in table.items():
    flat["/".join(flax_path)] = np.ascontiguousarray(_LAYOUTS[layout][0](np.asarray(state[torch_name])))
  return model_io.unflatten(flat)


def flax_to_torch(table: Table, variables: Mapping[str, Any], source: str) -> dict[str, np.ndarray]:
  """A torch-named state dict (numpy) from Flax variables; every Flax variable must be used."""
  flat = model_io.flatten(variables)
  wanted = {"/".join(path) for path, _ in table.values()}
  missing = sorted(wanted - set(flat))
  extra = sorted(set(flat) - wanted)
  if missing or extra:
    raise ValueError(f"{source}: the Flax variables do not match the expected layout: missing "
                     f"{model_io._short(missing) or 'none'}; unexpected {model_io._short(extra) or 'none'}")
  return {torch_name: np.ascontiguousarray(_LAYOUTS[layout][1](np.asarray(flat["/".join(path)],
                                                                          np.float32)))
          for torch_name, (path, layout) in table.items()}


# ---------------------------------------------------------------------------------------------
# ViT
# ---------------------------------------------------------------------------------------------

def _block_count(state: Mapping[str, Any], pattern: str) -> int:
  indices = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
  return max(indices) + 1 if indices else 0


def vit_config_from_state(state: Mapping[str, np.ndarray], source: str,
                          heads: int | None = None) -> dict:
  """VisionConfig (DINO flavour) as a dict, inferred from shapes; heads = width / 64 by default."""
  for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"):
    if key not in state:
      raise ValueError(f"{source}: missing key {key!r} of a DINO ViT")
  width = int(state["cls_token"].shape[-1])
  patch = int(state["patch_embed.proj.weight"].shape[-1])
  tokens = int(state["pos_embed"].shape[1])
  grid = math.isqrt(tokens - 1)
  if grid * grid != tokens - 1:
    raise ValueError(f"{source}: pos_embed has {tokens} tokens, not 1 + a square grid")
  heads = int(heads) if heads else max(width // DINO_HEAD_DIM, 1)
  from agriclip_jax.models.configs import VisionConfig
  config = VisionConfig(image_size=grid * patch, patch_size=patch, width=width,
                        layers=_block_count(state, r"blocks\.(\d+)\."), heads=heads,
                        mlp_dim=int(state["blocks.0.mlp.fc1.weight"].shape[0]), output_dim=None,
                        act="gelu", ln_eps=1e-6, patch_bias=True, ln_pre=False, flavour="dino")
  return config.to_dict()


def _check_dino_vit_config(config: Mapping[str, Any], source: str) -> None:
  wanted = dict(flavour="dino", output_dim=None, patch_bias=True, ln_pre=False)
  wrong = {k: config.get(k) for k, v in wanted.items() if config.get(k) != v}
  if wrong:
    raise ValueError(f"{source}: not a DINO-flavour ViT config ({wrong}); DINO layouts need "
                     f"{wanted}")


def vit_from_dino_state(state: Mapping[str, np.ndarray], source: str,
                        heads: int | None = None) -> ConvertedModel:
  state = strip_prefixes(state)
  _require_architecture(state, "vit", source)
  config = vit_config_from_state(state, source, heads)
  variables = torch_to_flax(vit_table(config["layers"]), state, source)
  model_io.check_tree_matches(model_io.abstract_variables("vit", config), variables, source)
  return ConvertedModel("vit", config, variables)


def vit_to_dino_state(model: ConvertedModel, source: str) -> dict[str, np.ndarray]:
  _check_dino_vit_config(model.config, source)
  return flax_to_torch(vit_table(model.config["layers"]), model.variables, source)


# ---------------------------------------------------------------------------------------------
# ResNet
# ---------------------------------------------------------------------------------------------

def resnet_depth_from_state(state: Mapping[str, Any], source: str) -> int:
  blocks = tuple(_block_count(state, rf"layer{s}\.(\d+)\.") for s in range(1, 5))
  kind = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
  for depth, (known_kind, known_blocks) in RESNET_STAGES.items():
    if (known_kind, known_blocks) == (kind, blocks):
      return depth
  raise ValueError(f"{source}: a ResNet with {kind} blocks {blocks} per stage is not a torchvision "
                   f"depth ({', '.join(f'{d}: {b}' for d, (_, b) in RESNET_STAGES.items())})")


def resnet_from_torch_state(state: Mapping[str, np.ndarray], source: str,
                            depth: int | None = None, drop_fc: bool = False) -> ConvertedModel:
  state = strip_prefixes(state)
  _require_architecture(state, "resnet", source)
  found = resnet_depth_from_state(state, source)
  if depth is not None and int(depth) != found:
    raise ValueError(f"{source}: the checkpoint is a ResNet-{found}, but ResNet-{depth} was asked for")
  fc_keys = {k for k in state if k.startswith("fc.")}
  if fc_keys and not drop_fc:
    raise ValueError(f"{source}: holds a classifier ({sorted(fc_keys)}); DINO backbones have none. "
                     f"Pass the option drop_fc=true to convert the backbone without it")
  config = ResNetConfig(depth=found)
  # num_batches_tracked only matters to torch BatchNorm with momentum=None (not torchvision's).
  ignored = fc_keys | {k for k in state if k.endswith(".num_batches_tracked")}
  variables = torch_to_flax(resnet_table(config), state, source, ignored)
  model_io.check_tree_matches(model_io.abstract_variables("resnet", config.to_dict()), variables,
                              source)
  return ConvertedModel("resnet", config.to_dict(), variables)


def resnet_to_torch_state(model: ConvertedModel, source: str,
                          num_batches_tracked: int = 0) -> dict[str, np.ndarray]:
  config = ResNetConfig.from_dict(model.config)
  state = flax_to_torch(resnet_table(config), model.variables, source)
  # torch's BatchNorm2d state dict has the counter; strict loading needs it.
  for name in [k[:-len(".running_mean")] for k in state if k.endswith(".running_mean")]:
    state[f"{name}.num_batches_tracked"] = np.asarray(num_batches_tracked, np.int64)
  return state


# ---------------------------------------------------------------------------------------------
# DINO head and training checkpoints
# ---------------------------------------------------------------------------------------------

def head_config_from_state(state: Mapping[str, np.ndarray], source: str,
                           norm_last_layer: bool | None = None) -> dict:
  from agriclip_jax.models.dino import DINOHeadConfig
  state = _weight_norm_aliases(state)
  if "last_layer.weight_v" not in state:
    raise ValueError(f"{source}: the DINO head has no last_layer.weight_v (keys: "
                     f"{model_io._short(sorted(state))})")
  linear_indices = sorted(int(m.group(1)) for k in state if (m := re.fullmatch(r"mlp\.(\d+)\.weight", k)))
  if any(state[f"mlp.{i}.weight"].ndim != 2 for i in linear_indices) or \
      linear_indices != list(range(0, 2 * len(linear_indices), 2)):
    raise ValueError(f"{source}: DINO head layers at mlp.{linear_indices} are not Linear-GELU "
                     f"alternations (a head with BatchNorm, use_bn_in_head, is not supported)")
  n_layers = len(linear_indices) if linear_indices else 1
  if "mlp.weight" in state:
    first, last = state["mlp.weight"], state["mlp.weight"]
  elif linear_indices:
    first, last = state["mlp.0.weight"], state[f"mlp.{linear_indices[-1]}.weight"]
  else:
    raise ValueError(f"{source}: the DINO head has no mlp layers")
  gain = state.get("last_layer.weight_g")
  if norm_last_layer is None:
    # DINO fixes g to 1 when norm_last_layer; a trained g means the norm was free.
    norm_last_layer = gain is None or bool(np.all(gain == 1.0))
  config = DINOHeadConfig(out_dim=int(state["last_layer.weight_v"].shape[0]),
                          hidden_dim=int(first.shape[0]) if n_layers > 1 else 2048,
                          bottleneck_dim=int(last.shape[0]), n_layers=n_layers,
                          norm_last_layer=bool(norm_last_layer))
  return config.to_dict()


def _weight_norm_aliases(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """torch.nn.utils.parametrizations.weight_norm names -> the old weight_g / weight_v names."""
  aliases = {"last_layer.parametrizations.weight.original0": "last_layer.weight_g",
             "last_layer.parametrizations.weight.original1": "last_layer.weight_v"}
  return {aliases.get(k, k): v for k, v in state.items()}


def head_from_state(state: Mapping[str, np.ndarray], source: str,
                    norm_last_layer: bool | None = None) -> tuple[dict, dict]:
  """(DINOHeadConfig dict, head params) from `mlp.*` / `last_layer.*` names."""
  state = _weight_norm_aliases(state)
  config = head_config_from_state(state, source, norm_last_layer)
  ignored = {"last_layer.weight_g"} if config["norm_last_layer"] else set()
  if config["norm_last_layer"] and "last_layer.weight_g" in state and \
      not np.all(state["last_layer.weight_g"] == 1.0):
    raise ValueError(f"{source}: norm_last_layer was asked for but last_layer.weight_g is not all "
                     f"ones; converting would change the head")
  variables = torch_to_flax(head_table(config["n_layers"], config["norm_last_layer"]), state,
                            source, ignored)
  return config, variables["params"]


def head_to_state(config: Mapping[str, Any], params: Mapping[str, Any], source: str
                  ) -> dict[str, np.ndarray]:
  state = flax_to_torch(head_table(config["n_layers"], config["norm_last_layer"]),
                        {"params": params}, source)
  if config["norm_last_layer"]:
    state["last_layer.weight_g"] = np.ones((config["out_dim"], 1), np.float32)
  return state


def _split_prefix(state: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def read_dino_checkpoint_data(data: Any, source: str, which: str = "teacher", part: str = "full",
                              heads: int | None = None, depth: int | None = None) -> ConvertedModel:
  if which not in ("teacher", "student"):
    raise ValueError(f"option which={which!r}; expected 'teacher' or 'student'")
  if part not in ("full", "backbone"):
    raise ValueError(f"option part={part!r}; expected 'full' or 'backbone'")
  if not isinstance(data, Mapping):
    raise ValueError(f"{source}: expected a DINO training checkpoint (a dict with 'student' and "
                     f"'teacher'), got {type(data).__name__}")
  if which not in data:
    raise KeyError(f"{source}: no {which!r} entry in this DINO checkpoint (entries: "
                   f"{sorted(map(str, data))}); is it a backbone-only state dict (formats dino-vit, "
                   f"dino-rn50), or pass which=student")
  state = strip_prefixes(tensors_to_numpy(data[which], f"{source}[{which!r}]"), ("module.",))
  entry = f"{source}[{which!r}]"
  backbone = _split_prefix(state, "backbone.")
  head = _split_prefix(state, "head.")
  other = sorted(k for k in state if not k.startswith(("backbone.", "head.")))
  if other:
    raise ValueError(f"{entry}: keys outside backbone. / head.: {model_io._short(other)}")
  if not backbone:
    raise ValueError(f"{entry}: no backbone.* keys")
  architecture = guess_architecture(list(backbone))
  if architecture == "vit":
    converted = vit_from_dino_state(backbone, entry, heads)
  elif architecture == "resnet":
    converted = resnet_from_torch_state(backbone, entry, depth)
  else:
    raise ValueError(f"{entry}: the backbone is neither a DINO ViT nor a torchvision ResNet "
                     f"(keys start: {', '.join(sorted(backbone)[:6])})")
  if part == "backbone":
    return converted
  if not head:
    raise ValueError(f"{entry}: no head.* keys; pass part=backbone to convert the backbone alone")
  head_config, head_params = head_from_state(head, f"{entry} head")
  config = {"backbone_type": architecture, "backbone": converted.config, "head": head_config}
  variables = {"params": {"backbone": converted.variables["params"], "head": head_params}}
  if "batch_stats" in converted.variables:
    variables["batch_stats"] = {"backbone": converted.variables["batch_stats"]}
  model_io.check_tree_matches(model_io.abstract_variables("dino", config), variables, entry)
  return ConvertedModel("dino", config, variables)


def dino_checkpoint_state(model: ConvertedModel, which: str, source: str) -> dict[str, Any]:
  """{which: state} with DINO's prefixes: the student under module., the teacher without."""
  if model.model_type == "dino":
    backbone = dino_backbone(model)
    state = {f"backbone.{k}": v for k, v in _backbone_state(backbone, source).items()}
    head = head_to_state(model.config["head"], model.variables["params"]["head"], source)
    state.update({f"head.{k}": v for k, v in head.items()})
  else:
    state = {f"backbone.{k}": v for k, v in _backbone_state(model, source).items()}
  prefix = "module." if which == "student" else ""
  return {which: {prefix + k: v for k, v in state.items()}}


def dino_backbone(model: ConvertedModel) -> ConvertedModel:
  """The backbone of a "dino" model (backbone + head) as a model of its own ("vit" | "resnet")."""
  if model.model_type != "dino":
    return model
  backbone_type = model.config.get("backbone_type", "vit")
  variables = {"params": model.variables["params"]["backbone"]}
  if "batch_stats" in model.variables:
    variables["batch_stats"] = model.variables["batch_stats"]["backbone"]
  return ConvertedModel(backbone_type, dict(model.config["backbone"]), variables)


def _backbone_state(model: ConvertedModel, source: str) -> dict[str, np.ndarray]:
  if model.model_type == "vit":
    return vit_to_dino_state(model, source)
  if model.model_type == "resnet":
    return resnet_to_torch_state(model, source)
  raise ValueError(f"{source}: cannot write a {model.model_type!r} model as a DINO backbone "
                   f"(expected 'vit' (DINO flavour), 'resnet' or 'dino')")


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def _to_torch(value: Any):
  import torch
  if isinstance(value, Mapping):
    return {k: _to_torch(v) for k, v in value.items()}
  return torch.from_numpy(np.array(value, copy=True))


def save_torch_file(data: Mapping[str, Any], dst: Path) -> None:
  """A state dict as `.safetensors` (needs no PyTorch; `safetensors.torch.load_file` reads it
  back as the same state dict) or as a torch.save file (`.pth`, `.pt`, ...), written atomically."""
  dst = Path(dst)
  if dst.suffix == ".safetensors":
    from safetensors.numpy import save_file
    nested = sorted(k for k, v in data.items() if isinstance(v, Mapping))
    if nested:
      raise ValueError(f"{dst}: safetensors holds flat state dicts; entries {nested} are nested "
                       f"(write a .pth)")
    arrays = {k: np.ascontiguousarray(v) for k, v in data.items()}
    model_io.atomic_file(dst, lambda tmp: save_file(arrays, str(tmp), metadata={"format": "pt"}))
    return
  try:
    import torch  # noqa: F401  (checked here for the message; _to_torch uses it)
  except ImportError as e:
    raise ImportError(f"{dst}: writing a torch.save file needs PyTorch (pip install torch); a "
                      f".safetensors destination needs only the safetensors package") from e
  fileio.atomic_torch_save(dst, _to_torch(data))


def _require_type(model: ConvertedModel, allowed: tuple[str, ...], fmt: str) -> None:
  if model.model_type not in allowed:
    raise ValueError(f"format {fmt!r} writes {' or '.join(allowed)} models, not "
                     f"{model.model_type!r}")


# ---------------------------------------------------------------------------------------------
# Readers and writers (the converter contract)
# ---------------------------------------------------------------------------------------------

def _option_int(options: Mapping[str, Any], key: str) -> int | None:
  value = options.get(key)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"option {key}={value!r} is not an integer") from None


def _option_bool(options: Mapping[str, Any], key: str, default: bool = False) -> bool:
  value = options.get(key, default)
  if isinstance(value, bool):
    return value
  if str(value).lower() in ("1", "true", "yes"):
    return True
  if str(value).lower() in ("0", "false", "no"):
    return False
  raise ValueError(f"option {key}={value!r} is not a boolean (true / false)")


def read_dino_vit(src: Path, options: Mapping[str, Any]) -> ConvertedModel:
  src = Path(src)
  return vit_from_dino_state(load_state_file(src), str(src), _option_int(options, "heads"))


def write_dino_vit(model: ConvertedModel, dst: Path, options: Mapping[str, Any]) -> None:
  """DINO's ViT state dict; from a "vit" model or the backbone of a "dino" one (what `agriclip
  train` exports as W/models/dino)."""
  if model.model_type == "dino":
    model = dino_backbone(model)
    if model.model_type != "vit":
      raise ValueError(f"format 'dino-vit' writes ViT backbones; this DINO model has a "
                       f"{model.model_type!r} backbone (use dino-rn50)")
  _require_type(model, ("vit",), "dino-vit")
  save_torch_file(vit_to_dino_state(model, str(dst)), dst)


def read_dino_rn50(src: Path, options: Mapping[str, Any]) -> ConvertedModel:
  src = Path(src)
  return resnet_from_torch_state(load_state_file(src), str(src), _option_int(options, "depth"),
                                 _option_bool(options, "drop_fc"))


def write_dino_rn50(model: ConvertedModel, dst: Path, options: Mapping[str, Any]) -> None:
  """A torchvision ResNet state dict; from a "resnet" model or the backbone of a "dino" one."""
  if model.model_type == "dino":
    model = dino_backbone(model)
    if model.model_type != "resnet":
      raise ValueError(f"format 'dino-rn50' writes ResNet backbones; this DINO model has a "
                       f"{model.model_type!r} backbone (use dino-vit)")
  _require_type(model, ("resnet",), "dino-rn50")
  depth = _option_int(options, "depth")
  if depth is not None and depth != model.config.get("depth"):
    raise ValueError(f"{dst}: the model is a ResNet-{model.config.get('depth')}, not ResNet-{depth}")
  save_torch_file(resnet_to_torch_state(model, str(dst)), dst)


def read_dino_checkpoint(src: Path, options: Mapping[str, Any]) -> ConvertedModel:
  src = Path(src)
  return read_dino_checkpoint_data(load_torch_file(src), str(src), options.get("which", "teacher"),
                                   options.get("part", "full"), _option_int(options, "heads"),
                                   _option_int(options, "depth"))


def write_dino_checkpoint(model: ConvertedModel, dst: Path, options: Mapping[str, Any]) -> None:
  """Writes {which: state} -- what DINO's eval scripts (checkpoint_key) and loaders read."""
  which = options.get("which", "teacher")
  if which not in ("teacher", "student"):
    raise ValueError(f"option which={which!r}; expected 'teacher' or 'student'")
  save_torch_file(dino_checkpoint_state(model, which, str(dst)), dst)


TIMM_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def read_timm_dino_vit(src: Path, options: Mapping[str, Any]) -> ConvertedModel:
  src = Path(src)
  path = src
  if src.is_dir():
    found = [src / name for name in TIMM_WEIGHTS if (src / name).is_file()]
    if not found:
      raise FileNotFoundError(f"{src}: no timm weights ({' or '.join(TIMM_WEIGHTS)})")
    path = found[0]
  state = load_state_file(path)
  heads = _option_int(options, "heads")
  config_path = src / "config.json" if src.is_dir() else None
  if heads is None and config_path is not None and config_path.is_file():
    heads = json.loads(config_path.read_text()).get("model_args", {}).get("num_heads")
  classifier = sorted(k for k in state if k.startswith("head."))
  if classifier:
    if not _option_bool(options, "drop_classifier"):
      raise ValueError(f"{path}: holds a classifier ({classifier}); pass drop_classifier=true to "
                       f"convert the backbone without it")
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
  return vit_from_dino_state(state, str(path), heads)


def write_timm_dino_vit(model: ConvertedModel, dst: Path, options: Mapping[str, Any]) -> None:
  """A timm hub directory: model.safetensors (timm names) + config.json (architecture, args)."""
  from safetensors.numpy import save_file
  _require_type(model, ("vit",), "timm-dino-vit")
  cfg = model.config
  state = vit_to_dino_state(model, str(dst))
  size_name = {384: "small", 768: "base"}.get(cfg["width"], "base")
  timm_config = {
      "architecture": f"vit_{size_name}_patch{cfg['patch_size']}_{cfg['image_size']}",
      "num_classes": 0,
      "num_features": cfg["width"],
      "global_pool": "token",
      "model_args": {"img_size": cfg["image_size"], "patch_size": cfg["patch_size"],
                     "embed_dim": cfg["width"], "depth": cfg["layers"], "num_heads": cfg["heads"],
                     "mlp_ratio": cfg["mlp_dim"] / cfg["width"], "num_classes": 0},
      "pretrained_cfg": {"tag": "dino", "input_size": [3, cfg["image_size"], cfg["image_size"]],
                         "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406],
                         "std": [0.229, 0.224, 0.225], "num_classes": 0},
  }

  def write(tmp: Path) -> None:
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(timm_config, indent=2) + "\n")

  model_io.atomic_directory(Path(dst), write, keep_others=bool(options.get("overwrite")))


def read_agriclip_aligner(src: Path, options: Mapping[str, Any]) -> ConvertedModel:
  from agriclip_jax.align import load_aligner
  aligner = load_aligner(src)
  config = {"in_dim": aligner.in_dim, "out_dim": aligner.out_dim}
  variables = {"params": {"kernel": np.ascontiguousarray(aligner.weight.T), "bias": aligner.bias}}
  return ConvertedModel("linear_aligner", config, variables)


def write_agriclip_aligner(model: ConvertedModel, dst: Path, options: Mapping[str, Any]) -> None:
  from agriclip_jax.align import LinearAligner, save_aligner
  _require_type(model, ("linear_aligner",), "agriclip-aligner")
  if Path(dst).suffix.lower() not in (".pth", ".pt"):
    raise ValueError(f"{dst}: the reference aligner format is a .pth file")
  params = model.variables["params"]
  save_aligner(LinearAligner(np.asarray(params["kernel"], np.float32).T.copy(),
                             np.asarray(params["bias"], np.float32)), dst)


Reader = Callable[[Path, Mapping[str, Any]], ConvertedModel]
Writer = Callable[[ConvertedModel, Path, Mapping[str, Any]], None]

READERS: dict[str, Reader] = {
    "dino-vit": read_dino_vit,
    "dino-rn50": read_dino_rn50,
    "dino-checkpoint": read_dino_checkpoint,
    "timm-dino-vit": read_timm_dino_vit,
    "agriclip-aligner": read_agriclip_aligner,
}
WRITERS: dict[str, Writer] = {
    "dino-vit": write_dino_vit,
    "dino-rn50": write_dino_rn50,
    "dino-checkpoint": write_dino_checkpoint,
    "timm-dino-vit": write_timm_dino_vit,
    "agriclip-aligner": write_agriclip_aligner,
}
