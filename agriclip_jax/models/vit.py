"""The ViT image tower, in the CLIP flavour and the DINO flavour (see `VisionConfig`)."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from agriclip_jax.models.configs import VisionConfig
from agriclip_jax.models.transformer import Transformer


def _cubic_weight(distance: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys' cubic convolution kernel with a = -0.75, the one PyTorch's bicubic mode uses."""
  x = np.abs(distance)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_matrix(in_size: int, out_size: int, scale: float | None = None) -> np.ndarray:
  """[out, in] matrix of PyTorch's 1-D bicubic interpolation (align_corners=False).

  `scale` is the output/input scale factor used to map coordinates; by default out/in, as when
  PyTorch is given a `size`. Border taps are clamped as PyTorch does.
  """
  scale = out_size / in_size if scale is None else scale
  source = (np.arange(out_size) + 0.5) / scale - 0.5
  base = np.floor(source)
  frac = source - base
  matrix = np.zeros((out_size, in_size), np.float64)
  for offset in (-1, 0, 1, 2):
    index = np.clip(base + offset, 0, in_size - 1).astype(int)
    np.add.at(matrix, (np.arange(out_size), index), _cubic_weight(frac - offset))
  return matrix


def interpolate_positions(positions: jax.Array, grid_size: int, flavour: str = "clip") -> jax.Array:
  """Resizes [1 + g*g, D] position embeddings to a grid of `grid_size` (bicubic), class slot kept.

  Used when a model runs at another image size than it was built for. The numerics follow the
  PyTorch originals so ported models give the same features: open_clip resizes to the target
  size; DINO scales by (grid + 0.1) / g, which shifts the sampling positions slightly.
  """
  old_grid = int(round((positions.shape[0] - 1) ** 0.5))
  if old_grid == grid_size:
    return positions
  scale = (grid_size + 0.1) / old_grid if flavour == "dino" else None
  resize = jnp.asarray(bicubic_matrix(old_grid, grid_size, scale), positions.dtype)
  cls_pos, patch_pos = positions[:1], positions[1:]
  width = positions.shape[-1]
  patch_pos = patch_pos.reshape(old_grid, old_grid, width)
  patch_pos = jnp.einsum("ai,bj,ijd->abd", resize, resize, patch_pos,
                         precision=jax.lax.Precision.HIGHEST)
  return jnp.concatenate([cls_pos, patch_pos.reshape(grid_size * grid_size, width)], axis=0)


# DINO's frozen-feature choices (its linear evaluation): "cls" is the final class token (what the
# AgriCLIP aligner reads), "cls+avgpool" adds the mean patch token (DINO's choice for ViT-B),
# "lastN" concatenates the class tokens of the last N blocks (N = 4 for ViT-S/16 in DINO).
_LAST_BLOCKS = re.compile(r"last([1-9][0-9]*)")


def dino_pooling(spec: str) -> tuple[int, bool]:
  """A pooling name ("cls", "cls+avgpool", "lastN") -> (n_last_blocks, avgpool)."""
  if spec == "cls":
    return 1, False
  if spec == "cls+avgpool":
    return 1, True
  match = _LAST_BLOCKS.fullmatch(spec)
  if match:
    return int(match.group(1)), False
  raise ValueError(f"unknown DINO pooling {spec!r}; expected 'cls', 'cls+avgpool' or 'lastN' "
                   "(class tokens of the last N blocks, e.g. 'last4')")


def check_dino_pooling(cfg: VisionConfig, n_last_blocks: int, avgpool: bool) -> None:
  if cfg.output_dim is not None:
    raise ValueError("DINO feature pooling (n_last_blocks / avgpool) applies to a ViT without "
                     f"projection; this one projects to {cfg.output_dim}")
  if not 1 <= n_last_blocks <= cfg.layers:
    raise ValueError(f"n_last_blocks={n_last_blocks}: expected 1..{cfg.layers} (the ViT's depth)")
  if avgpool and n_last_blocks != 1:
    raise ValueError(f"avgpool goes with n_last_blocks=1 (DINO's layout), got {n_last_blocks}")


def drop_patches(tokens: jax.Array, fraction: float, rng: jax.Array) -> jax.Array:
  """FLIP's patch dropout: [B, 1 + N, D] -> [B, 1 + K, D], the class token and K = int(N * (1 -
  fraction)) (at least 1) patch tokens drawn at random for each image, in their original order.
  K is static, so the step compiles once; position embeddings were added before, so the kept
  tokens keep their places."""
  batch, patches = tokens.shape[0], tokens.shape[1] - 1
  keep = max(1, int(patches * (1.0 - fraction)))
  scores = jax.random.uniform(rng, (batch, patches))
  kept = jnp.sort(jax.lax.top_k(scores, keep)[1], axis=-1)
  chosen = jnp.take_along_axis(tokens[:, 1:], kept[..., None], axis=1)
  return jnp.concatenate([tokens[:, :1], chosen], axis=1)


class VisionTransformer(nn.Module):
  config: VisionConfig

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False, n_last_blocks: int = 0,
               avgpool: bool = False) -> jax.Array:
    """images: [B, H, W, 3], normalised. Returns [B, out_features] (not L2-normalised).

    `n_last_blocks` = n > 0 (DINO flavour, no projection) returns DINO's linear-evaluation
    features instead: the final-normed class tokens of the last n blocks, concatenated oldest
    first ([B, n * width]); with `avgpool` (n = 1 only, as in DINO) the mean of the final-normed
    patch tokens joins the class token, interleaved as DINO lays them out ([B, 2 * width]:
    cls_0, avg_0, cls_1, avg_1, ...). See `dino_pooling`.
    """
    cfg = self.config
    if n_last_blocks or avgpool:
      check_dino_pooling(cfg, n_last_blocks, avgpool)
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
    positions = interpolate_positions(positions, height // cfg.patch_size, cfg.flavour)
    cls_tokens = jnp.broadcast_to(class_embedding.astype(dtype), (batch, 1, cfg.width))
    x = jnp.concatenate([cls_tokens, x], axis=1) + positions.astype(dtype)
    if train and cfg.patch_dropout > 0.0:
      x = drop_patches(x, cfg.patch_dropout, self.make_rng("dropout"))
    if cfg.ln_pre:
      x = nn.LayerNorm(epsilon=cfg.ln_eps, dtype=dtype, name="ln_pre")(x)
    x = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_dim, cfg.act, cfg.ln_eps,
                    causal=False, drop_path_rate=cfg.drop_path_rate, deterministic=not train,
                    remat=cfg.remat, dtype=dtype, init_style=cfg.flavour,
                    remat_policy=cfg.remat_policy, scan_layers=cfg.scan_layers,
                    name="transformer")(x, keep_last=n_last_blocks)
    ln_post = nn.LayerNorm(epsilon=cfg.ln_eps, dtype=dtype, name="ln_post")
    if n_last_blocks:
      x, blocks = x
      class_tokens = jnp.concatenate([ln_post(block[:, 0]) for block in blocks], axis=-1)
      if not avgpool:
        return class_tokens
      patch_mean = jnp.mean(ln_post(blocks[-1][:, 1:]), axis=1)
      return jnp.stack([class_tokens, patch_mean], axis=-1).reshape(batch, -1)
    # LayerNorm is per token, so normalising only the class token equals DINO's norm-then-select.
    pooled = ln_post(x[:, 0])
    if cfg.output_dim is None:
      return pooled
    proj = self.param("proj", nn.initializers.normal(scale), (cfg.width, cfg.output_dim))
    return pooled @ proj.astype(dtype)
