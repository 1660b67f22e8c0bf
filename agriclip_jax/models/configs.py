"""Model configurations and the one table of named variants.

A variant name such as "ViT-B/16" decodes to widths, depths and heads here and nowhere else.
Configs are frozen dataclasses so they can be hashed into jit caches and written to config.json.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh")
DTYPES = ("float32", "bfloat16", "float16")
FLAVOURS = ("clip", "dino")
# jax.checkpoint_policies a rematerialised block may use (what each keeps: models/transformer.py).
REMAT_POLICY_NAMES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """A ViT image tower.

  flavour "clip": conv patch embedding without bias, `ln_pre`, projection to the joint space.
  flavour "dino": patch bias, no `ln_pre`, no projection, LayerNorm eps 1e-6, exact GELU.
  """
  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  layers: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  output_dim: int | None = 512  # None: return the normed class token without projection.
  act: str = "quick_gelu"
  ln_eps: float = 1e-5
  patch_bias: bool = False
  ln_pre: bool = True
  flavour: str = "clip"
  drop_path_rate: float = 0.0  # stochastic depth (DINO student); rates rise linearly over blocks.
  # FLIP: the fraction of patch tokens dropped at random per image in training (static shapes:
  # int(N * (1 - p)) patches are kept); off at evaluation.
  patch_dropout: float = 0.0
  remat: bool = False
  remat_policy: str = "nothing_saveable"  # what a rematerialised block keeps (transformer.py)
  scan_layers: bool = False  # blocks as one nn.scan (one compiled block); weights on disk per layer
  dtype: str = "float32"  # compute dtype; params are always fp32.

  def __post_init__(self):
    _check_common(self, "VisionConfig")
    if not 0.0 <= self.patch_dropout < 1.0:
      raise ValueError(f"VisionConfig.patch_dropout={self.patch_dropout} must be in [0, 1)")
    if self.image_size % self.patch_size:
      raise ValueError(f"VisionConfig.image_size={self.image_size} is not divisible by "
                       f"patch_size={self.patch_size}")
    if self.flavour not in FLAVOURS:
      raise ValueError(f"VisionConfig.flavour={self.flavour!r}; expected one of {FLAVOURS}")
    if not 0.0 <= self.drop_path_rate < 1.0:
      raise ValueError(f"VisionConfig.drop_path_rate={self.drop_path_rate} must be in [0, 1)")

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def out_features(self) -> int:
    return self.output_dim if self.output_dim is not None else self.width

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "VisionConfig":
    return _from_dict(cls, d)


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """A causal text transformer pooled at the end-of-text token (the largest token id)."""
  vocab_size: int = 49408
  context_length: int = 77
  width: int = 512
  layers: int = 12
  heads: int = 8
  mlp_dim: int = 2048
  output_dim: int = 512
  act: str = "quick_gelu"
  ln_eps: float = 1e-5
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  scan_layers: bool = False
  dtype: str = "float32"

  def __post_init__(self):
    _check_common(self, "TextConfig")
    if self.vocab_size < 2 or self.context_length < 2:
      raise ValueError(f"TextConfig: vocab_size={self.vocab_size} and context_length="
                       f"{self.context_length} must be at least 2")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "TextConfig":
    return _from_dict(cls, d)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  vision: VisionConfig = dataclasses.field(default_factory=lambda: VisionConfig())
  text: TextConfig = dataclasses.field(default_factory=lambda: TextConfig())
  init_logit_scale: float = math.log(1 / 0.07)
  init_logit_bias: float | None = None  # set (e.g. -10) for the sigmoid loss.

  def __post_init__(self):
    if self.vision.output_dim != self.text.output_dim:
      raise ValueError(f"CLIPConfig: vision.output_dim={self.vision.output_dim} differs from "
                       f"text.output_dim={self.text.output_dim}")

  @property
  def embed_dim(self) -> int:
    return self.text.output_dim

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "CLIPConfig":
    d = dict(d)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"CLIPConfig: unknown keys {sorted(unknown)}")
    d["vision"] = VisionConfig.from_dict(d.get("vision", {}))
    d["text"] = TextConfig.from_dict(d.get("text", {}))
    return cls(**d)

  def replace(self, **changes) -> "CLIPConfig":
    return dataclasses.replace(self, **changes)


def _check_common(cfg, name: str) -> None:
  if cfg.act not in ACTIVATIONS:
    raise ValueError(f"{name}.act={cfg.act!r}; expected one of {ACTIVATIONS}")
  if cfg.dtype not in DTYPES:
    raise ValueError(f"{name}.dtype={cfg.dtype!r}; expected one of {DTYPES}")
  if cfg.width % cfg.heads:
    raise ValueError(f"{name}.width={cfg.width} is not divisible by heads={cfg.heads}")
  for field in ("width", "layers", "heads", "mlp_dim"):
    if getattr(cfg, field) <= 0:
      raise ValueError(f"{name}.{field}={getattr(cfg, field)} must be positive")
  if cfg.remat_policy not in REMAT_POLICY_NAMES:
    raise ValueError(f"{name}.remat_policy={cfg.remat_policy!r}; expected one of "
                     f"{REMAT_POLICY_NAMES}")


def _from_dict(cls, d: dict[str, Any]):
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = set(d) - known
  if unknown:
    raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
  return cls(**d)


# name -> (image tower: patch, width, layers, heads, mlp; text tower: width, layers, heads; embed dim)
_TOWERS: dict[str, dict[str, int]] = {
    "ViT-B/16": dict(patch=16, width=768, layers=12, heads=12, mlp=3072,
                     text_width=512, text_layers=12, text_heads=8, embed=512),
    "ViT-B/32": dict(patch=32, width=768, layers=12, heads=12, mlp=3072,
                     text_width=512, text_layers=12, text_heads=8, embed=512),
    "ViT-L/14": dict(patch=14, width=1024, layers=24, heads=16, mlp=4096,
                     text_width=768, text_layers=12, text_heads=12, embed=768),
    "ViT-S/16": dict(patch=16, width=384, layers=12, heads=6, mlp=1536,
                     text_width=384, text_layers=12, text_heads=6, embed=384),
    # Tiny towers for tests and CPU demos.
    "tiny": dict(patch=8, width=64, layers=2, heads=2, mlp=256,
                 text_width=64, text_layers=2, text_heads=2, embed=32),
    "tiny/4": dict(patch=4, width=64, layers=2, heads=2, mlp=256,
                   text_width=64, text_layers=2, text_heads=2, embed=32),
}
VARIANTS = tuple(_TOWERS)
_DEFAULT_IMAGE_SIZE = {"tiny": 32, "tiny/4": 32}


def _lookup(name: str) -> dict[str, int]:
  if name not in _TOWERS:
    close = difflib.get_close_matches(name, VARIANTS, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ValueError(f"unknown model variant {name!r}{hint}; known variants: {', '.join(VARIANTS)}")
  return _TOWERS[name]


def vision_config(name: str, flavour: str = "clip", **overrides) -> VisionConfig:
  """The image tower of a named variant in the CLIP or DINO flavour."""
  t = _lookup(name)
  base: dict[str, Any] = dict(
      image_size=_DEFAULT_IMAGE_SIZE.get(name, 224), patch_size=t["patch"], width=t["width"],
      layers=t["layers"], heads=t["heads"], mlp_dim=t["mlp"], flavour=flavour)
  if flavour == "clip":
    base.update(output_dim=t["embed"], act="quick_gelu", ln_eps=1e-5, patch_bias=False, ln_pre=True)
  elif flavour == "dino":
    base.update(output_dim=None, act="gelu", ln_eps=1e-6, patch_bias=True, ln_pre=False)
  else:
    raise ValueError(f"unknown flavour {flavour!r}; expected one of {FLAVOURS}")
  base.update(overrides)
  return VisionConfig(**base)


def text_config(name: str, **overrides) -> TextConfig:
  t = _lookup(name)
  base: dict[str, Any] = dict(width=t["text_width"], layers=t["text_layers"], heads=t["text_heads"],
                              mlp_dim=4 * t["text_width"], output_dim=t["embed"])
  base.update(overrides)
  return TextConfig(**base)


def clip_config(name: str, *, act: str = "quick_gelu", dtype: str = "float32",
                init_logit_bias: float | None = None, **vision_overrides) -> CLIPConfig:
  """A two-tower CLIP of a named variant. OpenAI weights use QuickGELU (the default)."""
  vision = vision_config(name, "clip", act=act, dtype=dtype, **vision_overrides)
  text = text_config(name, act=act, dtype=dtype)
  return CLIPConfig(vision=vision, text=text, init_logit_bias=init_logit_bias)
