"""Pre-LN transformer blocks shared by the CLIP image and text towers and the DINO ViT.

Parameter names mirror the open_clip layout (`ln_1`, `attn/qkv`, `attn/out`, `ln_2`, `mlp/c_fc`,
`mlp/c_proj`) so that porting weights is a rename plus transposes. The fused `qkv` projection
([D, 3D], q; k; v in that order) is also DINO's `attn.qkv`.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]


def quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name == "quick_gelu":
    return quick_gelu
  if name == "gelu":
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name == "gelu_tanh":
    return lambda x: jax.nn.gelu(x, approximate=True)
  raise ValueError(f"unknown activation {name!r}")


def compute_dtype(name: str) -> jnp.dtype:
  return jnp.dtype(name)


class Attention(nn.Module):
  """Multi-head self-attention through `jax.nn.dot_product_attention` (fused where XLA can)."""
  width: int
  heads: int
  causal: bool = False
  dtype: jnp.dtype = jnp.float32
  qkv_init: Initializer = nn.initializers.lecun_normal()
  out_init: Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, length, _ = x.shape
    head_dim = self.width // self.heads
    qkv = nn.Dense(3 * self.width, dtype=self.dtype, kernel_init=self.qkv_init,
                   bias_init=nn.initializers.zeros, name="qkv")(x)
    qkv = qkv.reshape(batch, length, 3, self.heads, head_dim)
    query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    attended = jax.nn.dot_product_attention(query, key, value, is_causal=self.causal)
    attended = attended.reshape(batch, length, self.width)
    return nn.Dense(self.width, dtype=self.dtype, kernel_init=self.out_init,
                    bias_init=nn.initializers.zeros, name="out")(attended)


class MLP(nn.Module):
  width: int
  mlp_dim: int
  act: str
  dtype: jnp.dtype = jnp.float32
  fc_init: Initializer = nn.initializers.lecun_normal()
  proj_init: Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=self.fc_init,
                 bias_init=nn.initializers.zeros, name="c_fc")(x)
    x = activation(self.act)(x)
    return nn.Dense(self.width, dtype=self.dtype, kernel_init=self.proj_init,
                    bias_init=nn.initializers.zeros, name="c_proj")(x)


def drop_path(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
  """Stochastic depth: drop a whole residual branch per sample, rescaling the kept ones."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, jnp.zeros_like(x))


class ResidualBlock(nn.Module):
  """x + attn(ln_1(x)); x + mlp(ln_2(x)), with optional stochastic depth on both branches."""
  width: int
  heads: int
  mlp_dim: int
  act: str
  ln_eps: float
  causal: bool = False
  drop_path_rate: float = 0.0
  deterministic: bool = True
  dtype: jnp.dtype = jnp.float32
  init_style: str = "clip"
  layers: int = 12  # depth of the whole stack, for the CLIP init scale

  def _inits(self) -> tuple[Initializer, Initializer, Initializer, Initializer]:
    if self.init_style == "dino":
      trunc = nn.initializers.truncated_normal(0.02)
      return trunc, trunc, trunc, trunc
    # open_clip's scheme: attention and fc scaled by width, output projections by depth too.
    attn_std = self.width ** -0.5
    proj_std = attn_std * (2 * self.layers) ** -0.5
    fc_std = (2 * self.width) ** -0.5
    normal = nn.initializers.normal
    return normal(attn_std), normal(proj_std), normal(fc_std), normal(proj_std)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    qkv_init, out_init, fc_init, proj_init = self._inits()
    use_drop_path = self.drop_path_rate > 0.0 and not self.deterministic

    def branch_out(y: jax.Array) -> jax.Array:
      if use_drop_path:
        return drop_path(y, self.drop_path_rate, self.make_rng("dropout"))
      return y

    y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln_1")(x)
    y = Attention(self.width, self.heads, self.causal, self.dtype, qkv_init, out_init, name="attn")(y)
    x = x + branch_out(y)
    y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln_2")(x)
    y = MLP(self.width, self.mlp_dim, self.act, self.dtype, fc_init, proj_init, name="mlp")(y)
    return x + branch_out(y)


class Transformer(nn.Module):
  """A stack of residual blocks named `resblocks_N`."""
  width: int
  layers: int
  heads: int
  mlp_dim: int
  act: str
  ln_eps: float
  causal: bool = False
  drop_path_rate: float = 0.0
  deterministic: bool = True
  remat: bool = False
  dtype: jnp.dtype = jnp.float32
  init_style: str = "clip"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    block_cls = nn.remat(ResidualBlock) if self.remat else ResidualBlock
    for i in range(self.layers):
      # DINO's rule: drop-path rate rises linearly from 0 at the first block to the rate at the last.
      rate = self.drop_path_rate * i / max(self.layers - 1, 1)
      x = block_cls(self.width, self.heads, self.mlp_dim, self.act, self.ln_eps, self.causal,
                    rate, self.deterministic, self.dtype, self.init_style, self.layers,
                    name=f"resblocks_{i}")(x)
    return x
