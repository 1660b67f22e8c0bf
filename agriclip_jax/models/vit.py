"""The ViT image tower, in the CLIP flavour and the DINO flavour (see `VisionConfig`)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from agriclip_jax.models.configs import VisionConfig
from agriclip_jax.models.transformer import Transformer


def interpolate_positions(positions: jax.Array, grid_size: int) -> jax.Array:
  """Resizes [1 + g*g, D] position embeddings to a grid of `grid_size` (bicubic), class slot kept.

  Used when a model runs at another image size than it was built for (DINO evaluates this way).
  """
  old_grid = int(round((positions.shape[0] - 1) ** 0.5))
  if old_grid == grid_size:
    return positions
  cls_pos, patch_pos = positions[:1], positions[1:]
  width = positions.shape[-1]
  patch_pos = patch_pos.reshape(old_grid, old_grid, width)
  patch_pos = jax.image.resize(patch_pos, (grid_size, grid_size, width), method="bicubic")
  return jnp.concatenate([cls_pos, patch_pos.reshape(grid_size * grid_size, width)], axis=0)


class VisionTransformer(nn.Module):
  config: VisionConfig

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """images: [B, H, W, 3], normalised. Returns [B, out_features] (not L2-normalised)."""
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"VisionTransformer expects images [B, H, W, 3]; got shape {images.shape}")
    height, width_px = images.shape[1:3]
    if height != width_px or height % cfg.patch_size:
      raise ValueError(f"image size {height}x{width_px} must be square and divisible by the patch "
                       f"size {cfg.patch_size}")
    dino = cfg.flavour == "dino"
    scale = cfg.width ** -0.5
    token_init = nn.initializers.truncated_normal(0.02) if dino else nn.initializers.normal(scale)
    patch_init = nn.initializers.lecun_normal() if dino else nn.initializers.normal(0.02)

    x = nn.Conv(cfg.width, (cfg.patch_size, cfg.patch_size), strides=cfg.patch_size,
                padding="VALID", use_bias=cfg.patch_bias, dtype=dtype, kernel_init=patch_init,
                name="conv1")(images.astype(dtype))
    batch = x.shape[0]
    x = x.reshape(batch, -1, cfg.width)
    class_embedding = self.param("class_embedding", token_init, (cfg.width,))
    positions = self.param("positional_embedding", token_init, (cfg.grid_size ** 2 + 1, cfg.width))
    positions = interpolate_positions(positions, height // cfg.patch_size)
    cls_tokens = jnp.broadcast_to(class_embedding.astype(dtype), (batch, 1, cfg.width))
    x = jnp.concatenate([cls_tokens, x], axis=1) + positions.astype(dtype)
    if cfg.ln_pre:
      x = nn.LayerNorm(epsilon=cfg.ln_eps, dtype=dtype, name="ln_pre")(x)
    x = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_dim, cfg.act, cfg.ln_eps,
                    causal=False, drop_path_rate=cfg.drop_path_rate, deterministic=not train,
                    remat=cfg.remat, dtype=dtype, init_style=cfg.flavour, name="transformer")(x)
    # LayerNorm is per token, so normalising only the class token equals DINO's norm-then-select.
    pooled = nn.LayerNorm(epsilon=cfg.ln_eps, dtype=dtype, name="ln_post")(x[:, 0])
    if cfg.output_dim is None:
      return pooled
    proj = self.param("proj", nn.initializers.normal(scale), (cfg.width, cfg.output_dim))
    return pooled @ proj.astype(dtype)
