"""The CLIP text tower: causal transformer pooled at the end-of-text token."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from agriclip_jax.models.configs import TextConfig
from agriclip_jax.models.transformer import Transformer


class TextTransformer(nn.Module):
  config: TextConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    """tokens: [B, L] int ids, L <= context_length. Returns [B, output_dim] (not L2-normalised)."""
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    if tokens.ndim != 2:
      raise ValueError(f"TextTransformer expects tokens [B, L]; got shape {tokens.shape}")
    length = tokens.shape[1]
    if length > cfg.context_length:
      raise ValueError(f"token sequence length {length} exceeds context_length {cfg.context_length}")
    token_embedding = nn.Embed(cfg.vocab_size, cfg.width, embedding_init=nn.initializers.normal(0.02),
                               name="token_embedding")
    positions = self.param("positional_embedding", nn.initializers.normal(0.01),
                           (cfg.context_length, cfg.width))
    x = token_embedding(tokens).astype(dtype) + positions[:length].astype(dtype)
    x = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_dim, cfg.act, cfg.ln_eps, causal=True,
                    deterministic=not train, remat=cfg.remat, dtype=dtype,
                    remat_policy=cfg.remat_policy, scan_layers=cfg.scan_layers,
                    name="transformer")(x)
    x = nn.LayerNorm(epsilon=cfg.ln_eps, dtype=dtype, name="ln_final")(x)
    # The end-of-text token has the largest id in CLIP's vocabulary; its feature summarises the text.
    eot_index = jnp.argmax(tokens, axis=-1)
    pooled = jnp.take_along_axis(x, eot_index[:, None, None], axis=1)[:, 0]
    projection = self.param("text_projection", nn.initializers.normal(cfg.width ** -0.5),
                            (cfg.width, cfg.output_dim))
    return pooled @ projection.astype(dtype)
