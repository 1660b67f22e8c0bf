"""ResNet in the torchvision layout, for DINO-ResNet-50 (the released AgriCLIP DINO backbone).

The network is torchvision's ResNet v1.5 (the stride of a bottleneck sits on its 3x3 conv) without
the classifier: the output is the global average pool, 2048-d for ResNet-50 (DINO sets `fc` to
Identity). Flax names mirror torchvision's so that porting is a rename plus transposes:

  torchvision                     flax
  conv1, bn1                      conv1, bn1
  layerX.Y.{conv1..3, bn1..3}     layerX_Y/{conv1..3, bn1..3}
  layerX.Y.downsample.{0, 1}      layerX_Y/{downsample_conv, downsample_bn}

BatchNorm: in evaluation (`train=False`) the running statistics in the `batch_stats` collection are
used. In training the statistics of the batch are used and the running ones updated (call `apply`
with `mutable=["batch_stats"]`). Under `jax.jit` with a batch sharded over a mesh the batch
statistics are those of the *global* batch (jnp.mean over a sharded axis is a global reduction), so
the model needs nothing extra for synchronised BatchNorm; inside `shard_map` / per-device code set
`axis_name` in the config so the statistics are averaged over that mesh axis instead.

Known difference from torch.nn.BatchNorm2d: Flax updates the running variance with the biased batch
variance, torch with the unbiased one (a factor n / (n - 1), n = batch x height x width; 1.0003 for
a 7x7 map at batch 64). The normalisation itself is identical.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# depth -> (block kind, blocks per stage). torchvision's table.
RESNET_STAGES: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
STAGE_WIDTHS = (64, 128, 256, 512)
BOTTLENECK_EXPANSION = 4
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
  depth: int = 50
  image_size: int = 224  # used only to build example inputs; any size >= 32 runs.
  bn_momentum: float = 0.9  # Flax convention: running = m * running + (1 - m) * batch (torch's 0.1).
  bn_eps: float = 1e-5
  axis_name: str | None = None  # mesh axis to average batch statistics over inside shard_map.
  zero_init_residual: bool = False  # torchvision's option: last BN of each block starts at scale 0.
  dtype: str = "float32"  # compute dtype; params and statistics are fp32.

  def __post_init__(self):
    if self.depth not in RESNET_STAGES:
      raise ValueError(f"ResNetConfig.depth={self.depth}; known depths: "
                       f"{', '.join(map(str, RESNET_STAGES))}")
    if self.dtype not in DTYPES:
      raise ValueError(f"ResNetConfig.dtype={self.dtype!r}; expected one of {DTYPES}")
    if not 0.0 <= self.bn_momentum < 1.0:
      raise ValueError(f"ResNetConfig.bn_momentum={self.bn_momentum} must be in [0, 1)")
    if self.image_size < 32:
      raise ValueError(f"ResNetConfig.image_size={self.image_size} must be at least 32 (five "
                       f"stride-2 steps)")

  @property
  def block_kind(self) -> str:
    return RESNET_STAGES[self.depth][0]

  @property
  def stage_blocks(self) -> tuple[int, int, int, int]:
    return RESNET_STAGES[self.depth][1]

  @property
  def out_features(self) -> int:
    expansion = BOTTLENECK_EXPANSION if self.block_kind == "bottleneck" else 1
    return STAGE_WIDTHS[-1] * expansion

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ResNetConfig":
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"ResNetConfig: unknown keys {sorted(unknown)}")
    return cls(**d)


# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu"), an untruncated normal.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(features: int, kernel: int, stride: int, dtype: str, name: str) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                 use_bias=False, kernel_init=conv_init, dtype=jnp.dtype(dtype), name=name)


def _batch_norm(config: ResNetConfig, name: str, zero_scale: bool = False) -> nn.BatchNorm:
  scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
  return nn.BatchNorm(momentum=config.bn_momentum, epsilon=config.bn_eps,
                      dtype=jnp.dtype(config.dtype), axis_name=config.axis_name,
                      use_fast_variance=False, scale_init=scale_init, name=name)


class Block(nn.Module):
  """One residual block: Bottleneck (1x1, 3x3 strided, 1x1 x4) or Basic (3x3 strided, 3x3)."""
  config: ResNetConfig
  width: int
  stride: int
  downsample: bool

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    cfg = self.config
    running = not train
    zero_last = cfg.zero_init_residual
    if cfg.block_kind == "bottleneck":
      out_width = self.width * BOTTLENECK_EXPANSION
      y = _conv(self.width, 1, 1, cfg.dtype, "conv1")(x)
      y = nn.relu(_batch_norm(cfg, "bn1")(y, use_running_average=running))
      y = _conv(self.width, 3, self.stride, cfg.dtype, "conv2")(y)
      y = nn.relu(_batch_norm(cfg, "bn2")(y, use_running_average=running))
      y = _conv(out_width, 1, 1, cfg.dtype, "conv3")(y)
      y = _batch_norm(cfg, "bn3", zero_last)(y, use_running_average=running)
    else:
      out_width = self.width
      y = _conv(self.width, 3, self.stride, cfg.dtype, "conv1")(x)
      y = nn.relu(_batch_norm(cfg, "bn1")(y, use_running_average=running))
      y = _conv(self.width, 3, 1, cfg.dtype, "conv2")(y)
      y = _batch_norm(cfg, "bn2", zero_last)(y, use_running_average=running)
    if self.downsample:
      x = _conv(out_width, 1, self.stride, cfg.dtype, "downsample_conv")(x)
      x = _batch_norm(cfg, "downsample_bn")(x, use_running_average=running)
    return nn.relu(x + y)


class ResNet(nn.Module):
  config: ResNetConfig

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """images [B, H, W, 3], normalised -> globally average-pooled features [B, out_features] fp32."""
    cfg = self.config
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"ResNet expects images [B, H, W, 3]; got shape {images.shape}")
    x = images.astype(jnp.dtype(cfg.dtype))
    x = _conv(64, 7, 2, cfg.dtype, "conv1")(x)
    x = nn.relu(_batch_norm(cfg, "bn1")(x, use_running_average=not train))
    # Padding with -inf (Flax's max_pool default) equals torch's MaxPool2d(3, 2, padding=1).
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    in_width = 64
    expansion = BOTTLENECK_EXPANSION if cfg.block_kind == "bottleneck" else 1
    for stage, (width, blocks) in enumerate(zip(STAGE_WIDTHS, cfg.stage_blocks)):
      for index in range(blocks):
        stride = 2 if stage > 0 and index == 0 else 1
        downsample = index == 0 and (stride != 1 or in_width != width * expansion)
        x = Block(cfg, width, stride, downsample, name=f"layer{stage + 1}_{index}")(x, train)
        in_width = width * expansion
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def example_inputs(config: ResNetConfig, batch: int = 1) -> tuple[jax.Array]:
  return (jnp.zeros((batch, config.image_size, config.image_size, 3), jnp.float32),)


def init_resnet(config: ResNetConfig, rng: jax.Array) -> tuple[ResNet, dict]:
  """Returns (module, variables) where variables = {"params": ..., "batch_stats": ...}."""
  model = ResNet(config)
  return model, model.init(rng, *example_inputs(config))
