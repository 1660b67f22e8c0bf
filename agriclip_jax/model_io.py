"""Model directories: config.json + model.safetensors (+ tokenizer files), written atomically.

Every subcommand accepts such a directory as `--model DIR`. Params are stored flattened with
'/'-joined names, exactly as Flax nests them, so a directory is readable without this package.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

# atomic_directory/atomic_file live in fileio; re-exported here, where callers first found them.
from agriclip_jax import fileio
from agriclip_jax.fileio import atomic_directory, atomic_file, read_json  # noqa: F401
from agriclip_jax.models.transformer import match_layer_layout, unstack_layer_params
from input_pipeline.transforms import PreprocessSpec, preset

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PREPROCESS_KEY = "preprocess"  # config.json key of the eval view (input_pipeline.transforms)
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Model types: how to rebuild the module and the shapes of its params from a config dict.
# ---------------------------------------------------------------------------------------------

def _clip_builder(config: Mapping[str, Any]):
  from agriclip_jax.models.clip import CLIP
  from agriclip_jax.models.configs import CLIPConfig
  cfg = CLIPConfig.from_dict(config)
  size = cfg.vision.image_size
  inputs = (jnp.zeros((1, size, size, 3), jnp.float32),
            jnp.zeros((1, cfg.text.context_length), jnp.int32))
  return CLIP(cfg), inputs


def _vit_builder(config: Mapping[str, Any]):
  from agriclip_jax.models.configs import VisionConfig
  from agriclip_jax.models.vit import VisionTransformer
  cfg = VisionConfig.from_dict(config)
  return VisionTransformer(cfg), (jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32),)


def _resnet_builder(config: Mapping[str, Any]):
  from agriclip_jax.models.resnet import ResNet, ResNetConfig, example_inputs
  cfg = ResNetConfig.from_dict(config)
  return ResNet(cfg), example_inputs(cfg)


def _dino_builder(config: Mapping[str, Any]):
  from agriclip_jax.models.dino import DINO, DINOConfig
  cfg = DINOConfig.from_dict(config)
  size = cfg.backbone.image_size
  return DINO(cfg), (jnp.zeros((1, size, size, 3), jnp.float32),)


def _linear_aligner_builder(config: Mapping[str, Any]):
  import flax.linen as nn
  unknown = set(config) - {"in_dim", "out_dim"}
  if unknown or not {"in_dim", "out_dim"} <= set(config):
    raise ValueError(f"linear_aligner config needs exactly in_dim and out_dim; got {sorted(config)}")
  # params: kernel [in, out] (the reference's W transposed) and bias [out].
  return nn.Dense(int(config["out_dim"])), (jnp.zeros((1, int(config["in_dim"])), jnp.float32),)


# model_type -> builder(config dict) -> (flax module, example inputs for `init`).
MODEL_BUILDERS: dict[str, Callable[[Mapping[str, Any]], tuple[Any, tuple]]] = {
    "clip": _clip_builder,
    "vit": _vit_builder,
    "resnet": _resnet_builder,
    "dino": _dino_builder,
    "linear_aligner": _linear_aligner_builder,
}


def build_model(model_type: str, config: Mapping[str, Any]):
  """Returns (module, example_inputs) for a model type and its config dict."""
  if model_type not in MODEL_BUILDERS:
    raise ValueError(f"unknown model_type {model_type!r}; known: {', '.join(sorted(MODEL_BUILDERS))}")
  return MODEL_BUILDERS[model_type](config)


def abstract_variables(model_type: str, config: Mapping[str, Any]) -> dict:
  """Shapes and dtypes of all variables (params and e.g. batch_stats), without allocating."""
  module, inputs = build_model(model_type, config)
  return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *inputs))


def init_variables(model_type: str, config: Mapping[str, Any], seed: int = 0) -> dict:
  module, inputs = build_model(model_type, config)
  # Jitted: running init op by op costs tens of seconds even for tiny models.
  return jax.jit(module.init)(jax.random.PRNGKey(seed), *inputs)


# ---------------------------------------------------------------------------------------------
# Flattening and checking
# ---------------------------------------------------------------------------------------------

def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def unflatten(flat: Mapping[str, Any]) -> dict:
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def check_tree_matches(expected: Mapping[str, Any], actual: Mapping[str, Any], source: str) -> None:
  """Raises ValueError naming every missing key, unexpected key and shape mismatch.

  `expected` and `actual` are nested or flat dicts of arrays / ShapeDtypeStructs.
  """
  want = flatten(expected) if _is_nested(expected) else dict(expected)
  got = flatten(actual) if _is_nested(actual) else dict(actual)
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  mismatched = [f"{k}: expected {tuple(want[k].shape)}, got {tuple(np.shape(got[k]))}"
                for k in sorted(set(want) & set(got)) if tuple(want[k].shape) != tuple(np.shape(got[k]))]
  problems = describe_mismatch(missing, extra, mismatched)
  if problems:
    raise ValueError(f"{source}: weights do not match the model: {problems}")


def describe_mismatch(missing: list[str], extra: list[str], mismatched: list[str] = ()) -> str:
  """One line naming missing keys, unexpected keys and shape mismatches ("" when there are none)."""
  problems = []
  if missing:
    problems.append(f"missing keys ({len(missing)}): {_short(missing)}")
  if extra:
    problems.append(f"unexpected keys ({len(extra)}): {_short(extra)}")
  if mismatched:
    problems.append(f"shape mismatches ({len(mismatched)}): {_short(list(mismatched))}")
  return "; ".join(problems)


def _is_nested(tree: Mapping[str, Any]) -> bool:
  return any(isinstance(v, Mapping) for v in tree.values())


def _short(items: list[str], limit: int = 8) -> str:
  shown = ", ".join(items[:limit])
  return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


# ---------------------------------------------------------------------------------------------
# Save and load
# ---------------------------------------------------------------------------------------------

def save_model_dir(path: str | Path, model_type: str, config: Mapping[str, Any],
                   variables: Mapping[str, Any], tokenizer_dir: str | Path | None = None,
                   extra: Mapping[str, Any] | None = None, keep_others: bool = False,
                   preprocess: PreprocessSpec | None = None) -> Path:
  """Saves a model directory. `variables` is {"params": ..., optionally "batch_stats": ...}.
  An existing directory is replaced only as fileio.atomic_directory allows (`keep_others`).
  `preprocess` is the eval view the model expects (default: `default_preprocess` of its type)."""
  from safetensors.numpy import save_file

  build_model(model_type, config)  # validates the type and the config before anything is written
  # On disk every transformer stack is per layer (`resblocks_N`), whatever layout it trained in
  # (scan_layers): converters and other readers see one layout.
  flat = {k: _host_array(v) for k, v in flatten(unstack_layer_params(variables)).items()}
  meta = {"format_version": FORMAT_VERSION, "model_type": model_type, "config": dict(config)}
  if model_type in IMAGE_MODEL_TYPES:
    spec = preprocess if preprocess is not None else default_preprocess(model_type, config)
    meta[PREPROCESS_KEY] = spec.to_dict()
  elif preprocess is not None:
    raise ValueError(f"a {model_type!r} model reads no images; it takes no preprocess spec")
  if extra:
    meta.update(extra)

  def write(tmp: Path) -> None:
    save_file(flat, str(tmp / WEIGHTS_FILE), metadata={"format": "agriclip-flax"})
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    if tokenizer_dir is not None:
      copied = 0
      for name in TOKENIZER_FILES:
        src = fileio.local_input(tokenizer_dir) / name
        if src.is_file():
          shutil.copyfile(src, tmp / name)
          copied += 1
      if not copied:
        raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {tokenizer_dir}")

  return atomic_directory(fileio.resolve_path(path), write, keep_others=keep_others)


def _host_array(value: Any) -> np.ndarray:
  """A C-contiguous host copy; floating params are stored as fp32 whatever the compute dtype."""
  array = np.asarray(jax.device_get(value))
  if np.issubdtype(array.dtype, np.floating):
    array = array.astype(np.float32)
  return np.array(array, order="C")  # np.ascontiguousarray would turn 0-d scalars into 1-d


def read_config(path: str | Path) -> dict:
  config_path = Path(path) / CONFIG_FILE
  meta = read_json(config_path, "model directory config")
  for key in ("model_type", "config"):
    if key not in meta:
      raise ValueError(f"{config_path}: missing key {key!r}")
  return meta


def load_model_dir(path: str | Path) -> tuple[str, dict, dict]:
  """Loads (model_type, config dict, variables) and checks the weights against the config."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file

  path = fileio.local_input(path)
  meta = read_config(path)
  weights_path = path / WEIGHTS_FILE
  if not weights_path.is_file():
    raise FileNotFoundError(f"{path}: {WEIGHTS_FILE} not found")
  try:
    flat = load_file(str(weights_path))
  except (SafetensorError, OSError, ValueError) as e:
    raise ValueError(f"{weights_path}: cannot read safetensors file ({e}); it may be truncated "
                     f"or corrupted") from e
  expected = abstract_variables(meta["model_type"], meta["config"])
  check_tree_matches(unstack_layer_params(expected), flat, str(weights_path))
  # In the layout the config builds: stacked `resblocks` when it scans its layers.
  variables = match_layer_layout(unflatten({k: jnp.asarray(v) for k, v in flat.items()}), expected)
  return meta["model_type"], meta["config"], variables



# ---------------------------------------------------------------------------------------------
# The eval view a model expects, and a model's identity
# ---------------------------------------------------------------------------------------------

# Model types that read images, and the view each gets when nothing else is known: CLIP models
# open_clip's, DINO backbones the AgriCLIP reference's (what its aligner was fitted on).
_DEFAULT_PRESETS = {"clip": "openclip", "vit": "agriclip-reference", "resnet": "agriclip-reference",
                    "dino": "agriclip-reference"}
IMAGE_MODEL_TYPES = tuple(_DEFAULT_PRESETS)
DEFAULT_DINO_POOLING = "cls"  # the final class token of a ViT; a ResNet's only (pooled) features


def image_size_of(model_type: str, config: Mapping[str, Any]) -> int:
  """The side of the square images the model is built for."""
  _, inputs = build_model(model_type, config)
  return int(inputs[0].shape[1])


def preprocess_for(model_type: str, config: Mapping[str, Any], name: str | None = None
                   ) -> PreprocessSpec:
  """The named view (`transforms.PRESETS`; default: the type's) sized for this model."""
  if model_type not in _DEFAULT_PRESETS:
    raise ValueError(f"a {model_type!r} model reads no images; it has no preprocessing")
  pooling = None if model_type == "clip" else DEFAULT_DINO_POOLING
  return preset(name or _DEFAULT_PRESETS[model_type], image_size_of(model_type, config), pooling)


def default_preprocess(model_type: str, config: Mapping[str, Any]) -> PreprocessSpec:
  return preprocess_for(model_type, config)


def read_preprocess(path: str | Path, meta: Mapping[str, Any] | None = None) -> PreprocessSpec:
  """The eval view recorded in a model directory. A directory written before views were recorded
  gets its type's default, with a one-line notice on stderr."""
  meta = read_config(path) if meta is None else meta
  source = str(Path(path) / CONFIG_FILE)
  if PREPROCESS_KEY in meta:
    return PreprocessSpec.from_dict(meta[PREPROCESS_KEY], source)
  spec = default_preprocess(meta["model_type"], meta["config"])
  print(f"notice: {source} records no {PREPROCESS_KEY!r} (written before models recorded their "
        f"view); using the {meta['model_type']} default, {spec.describe()}", file=sys.stderr)
  return spec


def content_fingerprint(model_type: str, config: Mapping[str, Any], preprocess: PreprocessSpec | None,
                        variables: Mapping[str, Any]) -> str:
  """Identity of a loaded model for provenance checks (an aligner names the DINO and CLIP models it
  was fitted with): sha256 over the model type, its config and eval view as canonical JSON, and
  every variable's name, dtype, shape and bytes. It depends on what the model computes, not on
  files: a DINO .pth and the model directory converted from it have the same fingerprint. The
  view's name and pooling are left out (the pooling is recorded and checked on its own)."""
  view = None
  if preprocess is not None:
    view = {k: v for k, v in preprocess.to_dict().items() if k not in ("name", "pooling")}
  digest = hashlib.sha256(json.dumps({"model_type": model_type, "config": config, "view": view},
                                     sort_keys=True, default=str).encode())
  for name, value in sorted(flatten(variables).items()):
    array = np.ascontiguousarray(np.asarray(value))
    digest.update(f"\0{name}|{array.dtype}|{array.shape}\0".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()[:20]


def has_tokenizer(path: str | Path) -> bool:
  path = fileio.resolve_path(path)
  return (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
