"""The two-tower CLIP model with a learned log logit scale and an optional logit bias."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from agriclip_jax.models.configs import CLIPConfig
from agriclip_jax.models.text import TextTransformer
from agriclip_jax.models.vit import VisionTransformer


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class CLIP(nn.Module):
  config: CLIPConfig

  def setup(self):
    cfg = self.config
    self.visual = VisionTransformer(cfg.vision)
    self.text = TextTransformer(cfg.text)
    # Stored as a log so that the optimiser works on an unconstrained value.
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(cfg.init_logit_scale), ())
    if cfg.init_logit_bias is not None:
      self.logit_bias = self.param("logit_bias", nn.initializers.constant(cfg.init_logit_bias), ())

  def encode_image(self, images: jax.Array, train: bool = False) -> jax.Array:
    return self.visual(images, train=train)

  def encode_text(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    return self.text(tokens, train=train)

  def logit_parameters(self) -> tuple[jax.Array, jax.Array | None]:
    """(logit scale = exp(stored log), logit bias or None): what the losses take besides the
    embeddings."""
    bias = self.logit_bias if self.config.init_logit_bias is not None else None
    return jnp.exp(self.logit_scale), bias

  def __call__(self, images: jax.Array, tokens: jax.Array, train: bool = False) -> dict:
    image_embeddings = l2_normalize(self.encode_image(images, train))
    text_embeddings = l2_normalize(self.encode_text(tokens, train))
    logit_scale, logit_bias = self.logit_parameters()
    return dict(image_embeddings=image_embeddings, text_embeddings=text_embeddings,
                logit_scale=logit_scale, logit_bias=logit_bias)
