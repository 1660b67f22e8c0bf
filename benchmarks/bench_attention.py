"""`jax.nn.dot_product_attention` (what the models use) vs an explicit softmax attention.

Numerics: largest absolute difference of outputs and of input gradients (fp32), which must be at
rounding level. Speed: forward + backward of each, jitted, interleaved repeats in one process,
at the CLIP ViT-B/16 image tower's shapes (197 tokens, 12 heads of 64) and its text tower's
(77 tokens, causal, 8 heads of 64).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def explicit_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                       causal: bool) -> jax.Array:
  """softmax(q k^T / sqrt(d) [+ causal mask]) v over [B, L, H, D] arrays."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", query, key) * query.shape[-1] ** -0.5
  if causal:
    length = query.shape[1]
    logits = jnp.where(jnp.tril(jnp.ones((length, length), bool)), logits, -jnp.inf)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), value)


def library_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                      causal: bool) -> jax.Array:
  return jax.nn.dot_product_attention(query, key, value, is_causal=causal)


def forward_backward(attention, causal: bool):
  def loss(q, k, v, cotangent):
    return jnp.sum(attention(q, k, v, causal) * cotangent)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def compare(batch: int, length: int, heads: int, head_dim: int, causal: bool,
            repeats: int) -> tuple[float, float, float, float]:
  """(max |output diff|, max |grad diff|, library median s, explicit median s)."""
  keys = jax.random.split(jax.random.key(0), 4)
  shape = (batch, length, heads, head_dim)
  q, k, v, cotangent = (jax.random.normal(key, shape, jnp.float32) for key in keys)
  out_diff = float(jnp.max(jnp.abs(library_attention(q, k, v, causal)
                                   - explicit_attention(q, k, v, causal))))
  library, explicit = forward_backward(library_attention, causal), forward_backward(
      explicit_attention, causal)
  results = {}
  for name, fn in (("library", library), ("explicit", explicit)):
    results[name] = jax.block_until_ready(fn(q, k, v, cotangent))  # compile + warm-up
  grad_diff = max(float(jnp.max(jnp.abs(a - b)))
                  for a, b in zip(results["library"][1], results["explicit"][1]))
  times = {"library": [], "explicit": []}
  for _ in range(repeats):
    for name, fn in (("library", library), ("explicit", explicit)):
      start = time.perf_counter()
      jax.block_until_ready(fn(q, k, v, cotangent))
      times[name].append(time.perf_counter() - start)
  return (out_diff, grad_diff, statistics.median(times["library"]),
          statistics.median(times["explicit"]))


def main(quick: bool = False) -> None:
  batch, repeats = (2, 3) if quick else (8, 7)
  cases = (("image", 197, 12, False), ("text", 77, 8, True))
  if quick:
    cases = (("image", 17, 2, False), ("text", 16, 2, True))
  for name, length, heads, causal in cases:
    out_diff, grad_diff, library_s, explicit_s = compare(batch, length, heads, 64, causal, repeats)
    label = f"B={batch}, L={length}, {heads} heads of 64, {'causal' if causal else 'full'}, fp32"
    print(f"attention_{name}_max_abs_diff: {out_diff:.2e} (outputs; gradients {grad_diff:.2e}; "
          f"{label})")
    print(f"attention_{name}_fwd_bwd_library: {library_s * 1e3:.2f} ms (jax.nn.dot_product_attention,"
          f" {label}, median of {repeats})")
    print(f"attention_{name}_fwd_bwd_explicit: {explicit_s * 1e3:.2f} ms (einsum-softmax-einsum, "
          f"{label}, median of {repeats})")
    print(f"attention_{name}_speed_ratio: {explicit_s / library_s:.2f} x (library over explicit, "
          f"same run; >1 means the library call is faster)")
    if out_diff > 1e-4 or grad_diff > 1e-3:
      raise SystemExit(f"attention implementations disagree: {out_diff}, {grad_diff}")


if __name__ == "__main__":
  import argparse
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--quick", action="store_true")
  main(parser.parse_args().quick)
