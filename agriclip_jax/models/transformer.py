"""Pre-LN transformer blocks shared by the CLIP image and text towers and the DINO ViT.

Parameter names mirror the open_clip layout (`ln_1`, `attn/qkv`, `attn/out`, `ln_2`, `mlp/c_fc`,
`mlp/c_proj`) so that porting weights is a rename plus transposes. The fused `qkv` projection
([D, 3D], q; k; v in that order) is also DINO's `attn.qkv`.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from agriclip_jax.models.configs import REMAT_POLICY_NAMES

Initializer = Callable[..., jax.Array]

# The logical axis of a batch's rows. Training maps it onto the mesh's batch axes
# (train/sharding.ACTIVATION_RULES, in the step's trace); anywhere else the constraint is a no-op.
BATCH_AXIS = "batch"


def keep_batch_split(x: jax.Array) -> jax.Array:
  """Activations [B, ...] stay split by rows. Without it XLA may resolve a matmul whose weight is
  split (FSDP) over the same mesh axis as the batch by gathering the activations of the whole
  batch instead of the weight: it did inside scanned layers (scan_layers=True), 4 all-gathers of
  [global batch, tokens, width] per block."""
  return nn.with_logical_constraint(x, (BATCH_AXIS,) + (None,) * (x.ndim - 1))


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


# What a rematerialised block keeps from its forward pass for the backward pass
# (`jax.checkpoint_policies`). "nothing_saveable" (the default) keeps only each block's input and
# recomputes the rest: the least memory, one extra forward. "dots_with_no_batch_dims_saveable"
# keeps the outputs of the weight matmuls and recomputes only attention, norms and activations:
# most of the memory saving at a fraction of the recompute.
REMAT_POLICIES: dict[str, Callable[..., bool]] = {
    name: getattr(jax.checkpoint_policies, name) for name in REMAT_POLICY_NAMES}


def remat_policy(name: str) -> Callable[..., bool]:
  if name not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {name!r}; expected one of {sorted(REMAT_POLICIES)}")
  return REMAT_POLICIES[name]


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
    qkv = keep_batch_split(nn.Dense(3 * self.width, dtype=self.dtype, kernel_init=self.qkv_init,
                                    bias_init=nn.initializers.zeros, name="qkv")(x))
    qkv = qkv.reshape(batch, length, 3, self.heads, head_dim)
    query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    attended = jax.nn.dot_product_attention(query, key, value, is_causal=self.causal)
    attended = keep_batch_split(attended.reshape(batch, length, self.width))
    return keep_batch_split(nn.Dense(self.width, dtype=self.dtype, kernel_init=self.out_init,
                                     bias_init=nn.initializers.zeros, name="out")(attended))


class MLP(nn.Module):
  width: int
  mlp_dim: int
  act: str
  dtype: jnp.dtype = jnp.float32
  fc_init: Initializer = nn.initializers.lecun_normal()
  proj_init: Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = keep_batch_split(nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=self.fc_init,
                                  bias_init=nn.initializers.zeros, name="c_fc")(x))
    x = activation(self.act)(x)
    return keep_batch_split(nn.Dense(self.width, dtype=self.dtype, kernel_init=self.proj_init,
                                     bias_init=nn.initializers.zeros, name="c_proj")(x))


def drop_path(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
  """Stochastic depth: drop a whole residual branch per sample, rescaling the kept ones."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  # A scanned stack passes each layer's rate as an fp32 array: keep x's (compute) dtype, or a
  # bf16 scan carry would come out fp32.
  return jnp.where(mask, (x / keep).astype(x.dtype), jnp.zeros_like(x))


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
  scanned: bool = False  # the body of `nn.scan`: returns (output, None)
  emit_output: bool = False  # as a scan body, return (output, output): the scan stacks them

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
  def __call__(self, x: jax.Array, layer_drop_path_rate: jax.Array | None = None):
    """Returns the block output, or (output, None) as a scan body when `scanned`.

    `layer_drop_path_rate`, when given (a scanned stack passes each layer's), replaces
    `drop_path_rate`, which then only says whether stochastic depth is on at all.
    """
    qkv_init, out_init, fc_init, proj_init = self._inits()
    use_drop_path = self.drop_path_rate > 0.0 and not self.deterministic
    rate = self.drop_path_rate if layer_drop_path_rate is None else layer_drop_path_rate

    def branch_out(y: jax.Array) -> jax.Array:
      if use_drop_path:
        return drop_path(y, rate, self.make_rng("dropout"))
      return y

    x = keep_batch_split(x)
    y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln_1")(x)
    y = Attention(self.width, self.heads, self.causal, self.dtype, qkv_init, out_init, name="attn")(y)
    x = x + branch_out(y)
    y = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="ln_2")(x)
    y = MLP(self.width, self.mlp_dim, self.act, self.dtype, fc_init, proj_init, name="mlp")(y)
    x = x + branch_out(y)
    if self.scanned:
      return x, (x if self.emit_output else None)
    return x


class Transformer(nn.Module):
  """A stack of residual blocks named `resblocks_N`.

  `scan_layers=True` runs the blocks as one `nn.scan` over parameters stacked on a leading layer
  axis (`resblocks/...` of shape [layers, ...]): XLA compiles one block instead of `layers`, for
  a much shorter compile. Checkpoints and converters keep the per-layer names: convert with
  `stack_layer_params` / `unstack_layer_params`. Scanned stochastic depth draws other random
  masks than the unrolled stack (one key per layer, split by the scan), with the same rates.
  """
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
  remat_policy: str = "nothing_saveable"  # see REMAT_POLICIES; used only when `remat`
  scan_layers: bool = False

  def _layer_rate(self, i: int) -> float:
    # DINO's rule: drop-path rate rises linearly from 0 at the first block to the rate at the last.
    return self.drop_path_rate * i / max(self.layers - 1, 1)

  @nn.compact
  def __call__(self, x: jax.Array, keep_last: int = 0):
    """The stack's output; with `keep_last` = n > 0, (output, the outputs of the last n blocks)."""
    if not 0 <= keep_last <= self.layers:
      raise ValueError(f"keep_last={keep_last}: the stack has {self.layers} blocks")
    block_cls = (nn.remat(ResidualBlock, policy=remat_policy(self.remat_policy)) if self.remat
                 else ResidualBlock)
    block_args = (self.width, self.heads, self.mlp_dim, self.act, self.ln_eps, self.causal)
    if self.scan_layers:
      rates = jnp.asarray([self._layer_rate(i) for i in range(self.layers)], jnp.float32)
      stack = nn.scan(block_cls, variable_axes={"params": 0},
                      split_rngs={"params": True, "dropout": True}, in_axes=0,
                      length=self.layers)
      x, stacked = stack(*block_args, self.drop_path_rate, self.deterministic, self.dtype,
                         self.init_style, self.layers, scanned=True, emit_output=keep_last > 0,
                         name="resblocks")(x, rates)
      if keep_last:
        return x, tuple(stacked[i] for i in range(self.layers - keep_last, self.layers))
      return x
    outputs = []
    for i in range(self.layers):
      x = block_cls(*block_args, self._layer_rate(i), self.deterministic, self.dtype,
                    self.init_style, self.layers, name=f"resblocks_{i}")(x)
      outputs.append(x)
    if keep_last:
      return x, tuple(outputs[self.layers - keep_last:])
    return x


_LAYER_NAME = re.compile(r"resblocks_(\d+)")


def stack_layer_params(tree: Any) -> Any:
  """Per-layer params (`resblocks_0`, `resblocks_1`, ...) -> `resblocks` stacked on axis 0.

  Works at any depth of a nested dict (a CLIP has two stacks), leaving everything else as is.
  """
  if not isinstance(tree, Mapping):
    return tree
  layers = {int(m.group(1)): v for k, v in tree.items() if (m := _LAYER_NAME.fullmatch(k))}
  out = {k: stack_layer_params(v) for k, v in tree.items() if not _LAYER_NAME.fullmatch(k)}
  if layers:
    if sorted(layers) != list(range(len(layers))):
      raise ValueError(f"layer params are not numbered 0..N-1: got {sorted(layers)}")
    if "resblocks" in tree:
      raise ValueError("params hold both 'resblocks' and 'resblocks_N' entries")
    out["resblocks"] = jax.tree.map(lambda *xs: jnp.stack(xs),
                                    *[layers[i] for i in range(len(layers))])
  return out


def unstack_layer_params(tree: Any) -> Any:
  """The inverse of `stack_layer_params`: `resblocks` [layers, ...] -> `resblocks_N` (arrays, or
  the ShapeDtypeStructs of abstract variables)."""
  if not isinstance(tree, Mapping):
    return tree
  out = {k: unstack_layer_params(v) for k, v in tree.items() if k != "resblocks"}
  if "resblocks" in tree:
    stacked = tree["resblocks"]
    depth = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(depth):
      out[f"resblocks_{i}"] = jax.tree.map(lambda x, i=i: _layer(x, i), stacked)
  return out


def _layer(x: Any, i: int) -> Any:
  """Layer i of a stacked array, or the shape of one layer of a stacked ShapeDtypeStruct."""
  return jax.ShapeDtypeStruct(x.shape[1:], x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x[i]


def match_layer_layout(tree: Any, like: Any) -> Any:
  """`tree` with each transformer stack in the layout `like` has: stacked (`resblocks`, a model
  built with scan_layers) or per layer (`resblocks_N`). `like` is a tree of the same model (e.g.
  its abstract variables); stacks already in the right layout are left as they are."""
  if not isinstance(tree, Mapping) or not isinstance(like, Mapping):
    return tree
  stacked_here = any(_LAYER_NAME.fullmatch(k) for k in tree) and "resblocks" in like
  unstacked_here = "resblocks" in tree and any(_LAYER_NAME.fullmatch(k) for k in like)
  if stacked_here:
    tree = stack_layer_params(tree)
  elif unstacked_here:
    tree = unstack_layer_params(tree)
  return {k: match_layer_layout(v, like.get(k)) for k, v in tree.items()}
