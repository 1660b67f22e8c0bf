"""DINO: a backbone (DINO-flavour ViT or torchvision ResNet) and the projection head with
weight-normed prototypes.

Head (facebookresearch/dino `DINOHead`): Linear(in, 2048)-GELU-Linear(2048, 2048)-GELU-
Linear(2048, 256), L2 normalise, then a weight-normalised Linear(256, out_dim) without bias whose
per-prototype norm g is fixed to 1 when `norm_last_layer` (then g is not a parameter at all).

Backbones: `VisionConfig` (flavour "dino") builds `VisionTransformer`; `ResNetConfig` builds the
torchvision-layout `ResNet`, whose BatchNorm running statistics live in the `batch_stats` collection
under `backbone/...` (apply with `mutable=["batch_stats"]` in training). `DINOConfig.to_dict()`
records which one as `backbone_type` ("vit" | "resnet"; absent means "vit", as in older files).

Parameter names: `backbone/...` (the VisionTransformer's or ResNet's),
`head/mlp_{0,1,2}/{kernel,bias}`,
`head/last_layer/kernel_v` [bottleneck, out_dim] (torch `last_layer.weight_v` transposed) and,
without `norm_last_layer`, `head/last_layer/kernel_g` [out_dim] (torch `weight_g[:, 0]`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from agriclip_jax.models.configs import VisionConfig
from agriclip_jax.models.resnet import ResNet, ResNetConfig
from agriclip_jax.models.vit import VisionTransformer

BACKBONE_TYPES = ("vit", "resnet")


@dataclasses.dataclass(frozen=True)
class DINOHeadConfig:
  out_dim: int = 65536
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  n_layers: int = 3
  norm_last_layer: bool = True

  def __post_init__(self):
    for field in ("out_dim", "hidden_dim", "bottleneck_dim", "n_layers"):
      if getattr(self, field) < 1:
        raise ValueError(f"DINOHeadConfig.{field}={getattr(self, field)} must be positive")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "DINOHeadConfig":
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"DINOHeadConfig: unknown keys {sorted(unknown)}")
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class DINOConfig:
  backbone: VisionConfig | ResNetConfig = VisionConfig(
      flavour="dino", output_dim=None, act="gelu", ln_eps=1e-6, patch_bias=True, ln_pre=False)
  head: DINOHeadConfig = DINOHeadConfig()

  def __post_init__(self):
    if isinstance(self.backbone, VisionConfig):
      if self.backbone.flavour != "dino":
        raise ValueError(f"DINOConfig.backbone.flavour={self.backbone.flavour!r}; expected 'dino'")
    elif not isinstance(self.backbone, ResNetConfig):
      raise ValueError(f"DINOConfig.backbone is a {type(self.backbone).__name__}; expected a "
                       "VisionConfig (DINO flavour) or a ResNetConfig")

  @property
  def backbone_type(self) -> str:
    return "resnet" if isinstance(self.backbone, ResNetConfig) else "vit"

  @property
  def has_batch_norm(self) -> bool:
    """True when the backbone carries BatchNorm running statistics (`batch_stats`)."""
    return self.backbone_type == "resnet"

  @property
  def embed_dim(self) -> int:
    """Width of the backbone features (the head's input)."""
    if isinstance(self.backbone, ResNetConfig):
      return self.backbone.out_features
    return self.backbone.width

  def to_dict(self) -> dict[str, Any]:
    return {"backbone_type": self.backbone_type, "backbone": self.backbone.to_dict(),
            "head": self.head.to_dict()}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "DINOConfig":
    unknown = set(d) - {"backbone_type", "backbone", "head"}
    if unknown:
      raise ValueError(f"DINOConfig: unknown keys {sorted(unknown)}")
    backbone_type = d.get("backbone_type", "vit")
    if backbone_type not in BACKBONE_TYPES:
      raise ValueError(f"DINOConfig.backbone_type={backbone_type!r}; expected one of "
                       f"{BACKBONE_TYPES}")
    backbone_cls = ResNetConfig if backbone_type == "resnet" else VisionConfig
    return cls(backbone_cls.from_dict(d.get("backbone", {})),
               DINOHeadConfig.from_dict(d.get("head", {})))


def l2_normalise(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """torch.nn.functional.normalize: x / max(||x||, eps)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class WeightNormPrototypes(nn.Module):
  """Linear without bias with W = g * v / ||v||, norms taken per output prototype."""
  out_dim: int
  norm_fixed: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_dim = x.shape[-1]
    bound = in_dim ** -0.5  # torch nn.Linear's default init of the direction v.
    kernel_v = self.param("kernel_v", _uniform(bound), (in_dim, self.out_dim))
    # x @ (v / ||v||) == (x @ v) / ||v||: scaling the [B, K] output instead of the [D, K] kernel
    # avoids materialising a second K-wide kernel, which dominated the CPU profile of the step.
    scale = 1.0 / jnp.linalg.norm(kernel_v, axis=0)
    if not self.norm_fixed:
      scale = scale * self.param("kernel_g", nn.initializers.ones, (self.out_dim,))
    return (x @ kernel_v.astype(x.dtype)) * scale.astype(x.dtype)


def _uniform(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class DINOHead(nn.Module):
  config: DINOHeadConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    dense = lambda features, name: nn.Dense(
        features, dtype=self.dtype, kernel_init=nn.initializers.truncated_normal(0.02),
        bias_init=nn.initializers.zeros, name=name)
    if cfg.n_layers == 1:
      x = dense(cfg.bottleneck_dim, "mlp_0")(x)
    else:
      x = dense(cfg.hidden_dim, "mlp_0")(x)
      for i in range(1, cfg.n_layers - 1):
        x = dense(cfg.hidden_dim, f"mlp_{i}")(jax.nn.gelu(x, approximate=False))
      x = dense(cfg.bottleneck_dim, f"mlp_{cfg.n_layers - 1}")(jax.nn.gelu(x, approximate=False))
    x = l2_normalise(x.astype(jnp.float32))
    return WeightNormPrototypes(cfg.out_dim, cfg.norm_last_layer, name="last_layer")(x)


class DINO(nn.Module):
  """Backbone + head; the student and the EMA teacher are two parameter sets of this module.

  With a ResNet backbone, `train=True` normalises with the statistics of the batch (of the global
  batch under jit with a sharded batch axis: DINO's SyncBatchNorm) and, when `batch_stats` is
  mutable, updates the running statistics once per backbone call, as torch does per forward.
  """
  config: DINOConfig

  def setup(self):
    if isinstance(self.config.backbone, ResNetConfig):
      self.backbone = ResNet(self.config.backbone)
    else:
      self.backbone = VisionTransformer(self.config.backbone)
    self.head = DINOHead(self.config.head, dtype=jnp.dtype(self.config.backbone.dtype))

  def features(self, images: jax.Array, train: bool = False, **vit_pooling) -> jax.Array:
    """Backbone features [B, width]: the ViT class token or the ResNet's pooled output (what the
    aligner and zero-shot consume). `vit_pooling` (n_last_blocks, avgpool) goes to a ViT."""
    return self.backbone(images, train=train, **vit_pooling)

  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    return self.head(self.backbone(images, train=train))

  def multi_crop(self, global_crops: jax.Array, local_crops: jax.Array | None,
                 train: bool = False) -> jax.Array:
    """Head outputs [B, V, K] for crops [B, G, H, W, 3] (+ [B, N, h, w, 3]); globals first.

    As in the reference, crops of one resolution go through the backbone together (so a ResNet's
    batch statistics are those of each resolution group, as in DINO's MultiCropWrapper).
    """
    batch = global_crops.shape[0]
    groups = [global_crops] + ([local_crops] if local_crops is not None else [])
    features = []
    for crops in groups:
      flat = crops.reshape((-1,) + crops.shape[2:])  # [B*n, H, W, 3], sample-major
      features.append(self.backbone(flat, train=train).reshape(batch, crops.shape[1], -1))
    features = jnp.concatenate(features, axis=1)
    return self.head(features)
