"""Augmentation on the accelerator: the PIL views of transforms.py, rendered from a host batch.

The host (input_pipeline/host_decode.py) decodes each image, shrinks it to a fixed canvas and
draws every random parameter with the same `sample_*` functions and Generator as the PIL path; it
ships uint8 pixels and the plans as fixed-shape arrays. This module turns such a batch into the
arrays the train step takes (`images`, `global_crops`, `local_crops`, normalised, channels-last)
in one jitted function, vmapped over crops and images, so it runs sharded along the batch.

Each operation follows the PIL code the host path runs, including where PIL holds uint8:

- crop + resize: PIL's separable resampling (horizontal pass, uint8, then vertical pass, uint8)
  with its filters (bicubic a = -0.5, bilinear), support widened by the downscale factor
  (antialiasing), weights normalised over the pixels inside the image and rounded to PIL's 22
  fractional bits; pixels outside the valid part of the canvas get no weight.
- brightness / contrast / saturation: ImageEnhance's blend `floor(d + f * (x - d))`, clipped, in
  float32 as PIL computes it; contrast's grey level is `int(mean(L) + 0.5)` of the crop.
- hue: PIL's uint8 HSV round trip (torchvision's PIL adjust_hue, which the host path uses) with the
  hue channel shifted modulo 256.
- grayscale: PIL's fixed-point ITU-R 601-2 luma, exact in int32.
- Gaussian blur: PIL's ImageFilter.GaussianBlur, which is three extended box blurs per axis
  (horizontal passes, then vertical), each rounded to uint8: exact in uint32 arithmetic, with the
  box radius and weights worked out on the host (`host_decode.pil_box_blur`).
- flip, solarise, normalisation: exact.

Values stay float32 holding integers 0..255 between the operations, as PIL's uint8 images do, and
are normalised at the end with the host path's formula.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from input_pipeline.transforms import (NORMALISATIONS, ClipViewConfig, MultiCropConfig, PreprocessSpec,
                                       train_views)

Array = jax.Array
HIGHEST = jax.lax.Precision.HIGHEST
_PRECISION_BITS = 22  # PIL's fixed-point resampling weights for 8-bit images
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")  # the index order of plan factors

# Keys of a host batch that this module consumes; everything else passes through to the step.
PIXELS, VALID = "pixels", "pixels_valid"
PLAN_PREFIXES = ("clip_plan/", "global_plan/", "local_plan/", "eval_plan/")


# ------------------------------------------------------------------------------------------------
# Crop + resize (PIL's ImagingResample)
# ------------------------------------------------------------------------------------------------

def _bicubic(x: Array) -> Array:
  a = -0.5
  x = jnp.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
  return jnp.where(x < 1.0, near, jnp.where(x < 2.0, far, 0.0))


def _bilinear(x: Array) -> Array:
  x = jnp.abs(x)
  return jnp.where(x < 1.0, 1.0 - x, 0.0)


_FILTERS: dict[str, tuple[Callable[[Array], Array], float]] = {
    "bicubic": (_bicubic, 2.0), "bilinear": (_bilinear, 1.0)}


def _quantise(x: Array) -> Array:
  """PIL's rounding of a resampled value into uint8: floor(x + 0.5), clipped to [0, 255]."""
  return jnp.clip(jnp.floor(x + 0.5), 0.0, 255.0)


def resample_weights(start: Array, length: Array, out_size: int, valid: Array, in_size: int,
                     interpolation: str) -> Array:
  """Weights [out_size, in_size] that map input pixels [start, start + length) onto out_size.

  As PIL's precompute_coeffs: output pixel i samples at centre start + (i + 0.5) * scale with the
  filter stretched by max(scale, 1); weights are normalised over the input pixels below `valid`
  (PIL's clipping at the image border) and rounded to 22 fractional bits.
  """
  kernel, _ = _FILTERS[interpolation]
  scale = length / out_size
  stretch = jnp.maximum(scale, 1.0)
  centres = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale
  inputs = jnp.arange(in_size, dtype=jnp.float32)
  weights = kernel((inputs[None, :] + 0.5 - centres[:, None]) / stretch)
  weights = jnp.where(inputs[None, :] < valid, weights, 0.0)
  total = jnp.sum(weights, axis=1, keepdims=True)
  weights = weights / jnp.where(total == 0.0, 1.0, total)
  unit = float(1 << _PRECISION_BITS)
  # C's (int)(0.5 + w) for w >= 0 and (int)(-0.5 + w) below: rounding half away from zero.
  fixed = jnp.where(weights >= 0.0, jnp.floor(weights * unit + 0.5), jnp.ceil(weights * unit - 0.5))
  return fixed / unit


def crop_resize(pixels: Array, valid: Array, box: Array, size: int, interpolation: str = "bicubic"
                ) -> Array:
  """float32 [H, W, 3] (integers 0..255), valid int [2] (h, w), box float [4] (top, left, height,
  width) -> float32 [size, size, 3], rounded as PIL rounds (each pass to uint8)."""
  height, width = pixels.shape[0], pixels.shape[1]
  rows = resample_weights(box[0], box[2], size, valid[0], height, interpolation)
  cols = resample_weights(box[1], box[3], size, valid[1], width, interpolation)
  horizontal = _quantise(jnp.einsum("hwc,sw->hsc", pixels, cols, precision=HIGHEST))
  return _quantise(jnp.einsum("th,hsc->tsc", rows, horizontal, precision=HIGHEST))


# ------------------------------------------------------------------------------------------------
# Colour: ImageEnhance, PIL's HSV, grayscale
# ------------------------------------------------------------------------------------------------

def luma(x: Array) -> Array:
  """float32 [..., 3] RGB -> float32 [...] PIL's L: (19595 R + 38470 G + 7471 B + 2^15) >> 16."""
  xi = x.astype(jnp.int32)
  return ((xi[..., 0] * 19595 + xi[..., 1] * 38470 + xi[..., 2] * 7471 + 0x8000) >> 16
          ).astype(jnp.float32)


def _blend(degenerate: Array, x: Array, factor: Array) -> Array:
  """Image.blend(degenerate, x, factor) on uint8 data: truncated, clipped (float32 as in C)."""
  return jnp.clip(jnp.floor(degenerate + factor * (x - degenerate)), 0.0, 255.0)


def adjust_brightness(x: Array, factor: Array) -> Array:
  return _blend(jnp.zeros_like(x), x, factor)


def adjust_contrast(x: Array, factor: Array) -> Array:
  """Blend with the crop's mean grey level int(mean(L) + 0.5), in exact integer arithmetic."""
  grey = luma(x).astype(jnp.int32)
  count = grey.size
  mean = (2 * jnp.sum(grey) + count) // (2 * count)
  return _blend(jnp.broadcast_to(mean.astype(jnp.float32), x.shape), x, factor)


def adjust_saturation(x: Array, factor: Array) -> Array:
  return _blend(jnp.broadcast_to(luma(x)[..., None], x.shape), x, factor)


def _rgb_to_hsv(x: Array) -> tuple[Array, Array, Array]:
  """PIL's rgb2hsv on integer-valued float32: H and S truncated into 0..255, V = max."""
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  maxc = jnp.maximum(jnp.maximum(r, g), b)
  minc = jnp.minimum(jnp.minimum(r, g), b)
  spread = maxc - minc
  grey = spread == 0.0
  safe_spread = jnp.where(grey, 1.0, spread)
  saturation = spread / jnp.where(maxc == 0.0, 1.0, maxc)
  rc, gc, bc = (maxc - r) / safe_spread, (maxc - g) / safe_spread, (maxc - b) / safe_spread
  hue = jnp.where(r == maxc, bc - gc, jnp.where(g == maxc, 2.0 + rc - bc, 4.0 + gc - rc))
  hue = hue / 6.0
  hue = jnp.where(hue < 0.0, hue + 1.0, hue)  # fmod(h / 6 + 1, 1) for h / 6 in [-1/6, 5/6]
  uh = jnp.where(grey, 0.0, jnp.clip(jnp.trunc(hue * 255.0), 0.0, 255.0))
  us = jnp.where(grey, 0.0, jnp.clip(jnp.trunc(saturation * 255.0), 0.0, 255.0))
  return uh, us, maxc


def _hsv_to_rgb(h: Array, s: Array, v: Array) -> Array:
  """PIL's hsv2rgb on uint8 H, S, V (held in float32) -> RGB float32 [..., 3]."""
  hi = h.astype(jnp.int32)
  sector = (hi * 6) // 255
  fraction = ((hi * 6) % 255).astype(jnp.float32) / 255.0
  fs = fraction * s
  # p is a ratio of integers: round half up exactly; q and t carry PIL's float fraction.
  p = ((2 * v.astype(jnp.int32) * (255 - s.astype(jnp.int32)) + 255) // 510).astype(jnp.float32)
  q = jnp.clip(jnp.floor(v * (255.0 - fs) / 255.0 + 0.5), 0.0, 255.0)
  t = jnp.clip(jnp.floor(v * (255.0 - s + fs) / 255.0 + 0.5), 0.0, 255.0)
  sector = sector % 6
  choices = [jnp.stack(c, axis=-1) for c in
             ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))]
  rgb = choices[0]
  for index in range(1, 6):
    rgb = jnp.where((sector == index)[..., None], choices[index], rgb)
  return jnp.where((s == 0.0)[..., None], jnp.stack((v, v, v), axis=-1), rgb)


def adjust_hue(x: Array, shift: Array) -> Array:
  """torchvision's PIL adjust_hue: H + shift (mod 256) in PIL's uint8 HSV; shift = int(f*255)%256."""
  h, s, v = _rgb_to_hsv(x)
  h = jnp.mod(h + shift.astype(jnp.float32), 256.0)
  return _hsv_to_rgb(h, s, v)


def grayscale(x: Array) -> Array:
  return jnp.broadcast_to(luma(x)[..., None], x.shape)


def colour_jitter(x: Array, order: Array, factors: Array, hue_shift: Array) -> Array:
  """The four ColorJitter ops in a per-crop order: order int [4] (indices into JITTER_OPS),
  factors float32 [4] by op (brightness, contrast, saturation, hue factor), hue_shift int []."""
  ops = (lambda y: adjust_brightness(y, factors[0]), lambda y: adjust_contrast(y, factors[1]),
         lambda y: adjust_saturation(y, factors[2]), lambda y: adjust_hue(y, hue_shift))
  # A loop, not four unrolled copies: under vmap each switch computes all four ops and selects,
  # and one copy of that compiles four times faster.
  return jax.lax.fori_loop(0, 4, lambda position, y: jax.lax.switch(order[position], ops, y), x)


# ------------------------------------------------------------------------------------------------
# Blur and solarise
# ------------------------------------------------------------------------------------------------

def _box_blur_pass(x: Array, axis: int, radius: Array, weights: Array, taps: int) -> Array:
  """One of PIL's extended box blurs along `axis` of uint32 [S, S, 3]: the 2r+1 pixels around x
  weigh ww, the next one on each side fw (edges repeat), (sum + 2^23) >> 24."""
  pad = [(0, 0)] * x.ndim
  pad[axis] = (taps, taps)
  padded = jnp.pad(x, pad, mode="edge")
  length = x.shape[axis]
  total = jnp.zeros_like(x)
  for offset in range(-taps, taps + 1):
    distance = abs(offset)
    weight = jnp.where(distance <= radius, weights[0],
                       jnp.where(distance == radius + 1, weights[1], jnp.uint32(0)))
    window = jax.lax.slice_in_dim(padded, taps + offset, taps + offset + length, axis=axis)
    total = total + weight * window
  return (total + jnp.uint32(1 << 23)) >> 24


def gaussian_blur(x: Array, radius: Array, weights: Array, taps: int) -> Array:
  """PIL's GaussianBlur: 3 box passes horizontally, then 3 vertically, each rounded to uint8.
  radius int [] (the box's integer radius), weights uint32 [2] (ww, fw), taps static >= radius+1."""
  three_passes = lambda y: jax.lax.fori_loop(  # noqa: E731
      0, 3, lambda _, z: _box_blur_pass(z, 1, radius, weights, taps), y)
  y = three_passes(x.astype(jnp.uint32))
  y = jnp.swapaxes(three_passes(jnp.swapaxes(y, 0, 1)), 0, 1)  # PIL transposes for its y passes
  return y.astype(jnp.float32)


def solarize(x: Array, threshold: int) -> Array:
  return jnp.where(x >= threshold, 255.0 - x, x)


def normalise(x: Array, mean: tuple[float, ...], std: tuple[float, ...]) -> Array:
  """The host path's (x - 255 mean) / (255 std) in float32."""
  mean255 = np.asarray(mean, np.float32) * np.float32(255.0)
  std255 = np.asarray(std, np.float32) * np.float32(255.0)
  return (x - mean255) / std255


# ------------------------------------------------------------------------------------------------
# Whole views
# ------------------------------------------------------------------------------------------------

def render_crop(pixels: Array, valid: Array, plan: Mapping[str, Array], size: int, taps: int,
                solarize_threshold: int) -> Array:
  """One CropPlan (arrays, see host_decode.pack_crop_plans) -> float32 [size, size, 3] 0..255, in
  apply_crop_plan's order: crop+resize, flip, jitter, grayscale, blur, solarise."""
  x = crop_resize(pixels, valid, plan["box"], size, "bicubic")
  x = jnp.where(plan["flip"], x[:, ::-1], x)
  x = jnp.where(plan["jitter"], colour_jitter(x, plan["jitter_order"], plan["jitter_factors"],
                                              plan["hue_shift"]), x)
  x = jnp.where(plan["grayscale"], grayscale(x), x)
  if taps > 0:
    x = jnp.where(plan["blur"], gaussian_blur(x, plan["blur_radius"], plan["blur_weights"], taps), x)
  return jnp.where(plan["solarize"], solarize(x, solarize_threshold), x)


def _plan(batch: Mapping[str, Array], prefix: str) -> dict[str, Array]:
  return {key[len(prefix):]: value for key, value in batch.items() if key.startswith(prefix)}


def _crops(pixels: Array, valid: Array, plans: dict[str, Array], size: int, taps: int,
           threshold: int) -> Array:
  """[B, H, W, 3], [B, 2], plans [B, V, ...] -> float32 [B, V, size, size, 3] (0..255)."""
  if plans["box"].shape[1] == 0:
    return jnp.zeros((pixels.shape[0], 0, size, size, 3), jnp.float32)
  one_image = jax.vmap(render_crop, in_axes=(None, None, 0, None, None, None))
  return jax.vmap(one_image, in_axes=(0, 0, 0, None, None, None))(
      pixels, valid, plans, size, taps, threshold)


@dataclasses.dataclass(frozen=True)
class DeviceViews:
  """Which views a host batch carries and how to render them (all static under jit).

  `blur_taps` is the largest box radius + 1 the plans may hold (host_decode.blur_taps); the
  host refuses plans beyond it, so a jitted function never reads past its padding.
  """
  kind: str  # contrastive | dino | joint
  clip_view: ClipViewConfig = ClipViewConfig()
  multicrop: MultiCropConfig = MultiCropConfig()
  clip_normalisation: str = "clip"
  dino_normalisation: str = "imagenet"
  blur_taps: int = 2

  def __post_init__(self):
    if self.kind not in ("contrastive", "dino", "joint"):
      raise ValueError(f"DeviceViews.kind must be contrastive, dino or joint, got {self.kind!r}")
    for name in ("clip_normalisation", "dino_normalisation"):
      if getattr(self, name) not in NORMALISATIONS:
        raise ValueError(f"DeviceViews.{name}={getattr(self, name)!r}; choose one of "
                         f"{sorted(NORMALISATIONS)}")


def device_views(batch: Mapping[str, Array], views: DeviceViews) -> dict[str, Array]:
  """A host batch (pixels uint8 [B, C, C, 3], pixels_valid [B, 2], plans) -> the step's batch:
  `images` float32 [B, S, S, 3] and / or `global_crops` [B, 2, G, G, 3], `local_crops`
  [B, N, L, L, 3], normalised; the other keys (tokens, label) pass through."""
  pixels = batch[PIXELS].astype(jnp.float32)
  valid = batch[VALID]
  out = {k: v for k, v in batch.items() if k not in (PIXELS, VALID) and not k.startswith(PLAN_PREFIXES)}
  if views.kind in ("contrastive", "joint"):
    boxes = batch["clip_plan/box"]
    render = jax.vmap(lambda p, v, b: crop_resize(p, v, b, views.clip_view.size, "bicubic"))
    out["images"] = normalise(render(pixels, valid, boxes), *NORMALISATIONS[views.clip_normalisation])
  if views.kind in ("dino", "joint"):
    mc = views.multicrop
    mean_std = NORMALISATIONS[views.dino_normalisation]
    for name, size in (("global", mc.global_size), ("local", mc.local_size)):
      crops = _crops(pixels, valid, _plan(batch, f"{name}_plan/"), size, views.blur_taps,
                     mc.solarize_threshold)
      out[f"{name}_crops"] = normalise(crops, *mean_std)
  return out


def eval_views(pixels: Array, valid: Array, boxes: Array, spec: PreprocessSpec) -> Array:
  """The evaluation view on the device: uint8 [B, C, C, 3], valid [B, 2], boxes float32 [B, 4]
  (host_decode.eval_box, canvas coordinates) -> float32 [B, S, S, 3] normalised by `spec`."""
  render = jax.vmap(lambda p, v, b: crop_resize(p, v, b, spec.image_size, spec.interpolation))
  return normalise(render(pixels.astype(jnp.float32), valid, boxes), spec.mean, spec.std)


def make_device_augment(views: DeviceViews, sharding: Any = None) -> Callable[[Mapping[str, Array]], dict[str, Array]]:
  """The jitted host-batch -> step-batch function. With `sharding` (e.g. the batch's
  NamedSharding) the outputs are laid out as the inputs, split along the batch: each device
  renders its own rows and nothing crosses devices."""
  fn = lambda batch: device_views(batch, views)  # noqa: E731
  if sharding is None:
    return jax.jit(fn)
  return jax.jit(fn, out_shardings=sharding)


# ------------------------------------------------------------------------------------------------
# The training loop's switch: data.augment_on
# ------------------------------------------------------------------------------------------------

AUGMENT_ON = ("auto", "device", "host")


def resolve_augment_on(value: str, source: Any, backend: str) -> str:
  """data.augment_on -> "device" | "host". "auto": the device on GPU / TPU, the host (PIL) on CPU,
  where the device path would only move the same work onto the cores the step needs. The toy
  source renders its own views in-process and always stays on the host."""
  if value not in AUGMENT_ON:
    raise ValueError(f"config.data.augment_on={value!r}; expected one of {', '.join(AUGMENT_ON)}")
  if source == "toy":
    return "host"
  if value == "auto":
    return "host" if backend == "cpu" else "device"
  return value


def views_for_train_config(config: Any) -> DeviceViews:
  """The run config's views, as agriclip_jax/train/loop.make_dataset builds them for the pipeline."""
  from input_pipeline import host_decode
  clip_view, multicrop = train_views(config.data)
  return DeviceViews(config.kind, clip_view, multicrop,
                     blur_taps=host_decode.blur_taps(multicrop.blur_radius))


def make_batch_augment(config: Any, mesh: Any) -> Callable[[Mapping[str, Array]], Mapping[str, Array]]:
  """For the training loop: the identity when views are rendered on the host, else the jitted
  renderer with its outputs split along the batch like the inputs (train.sharding's batch axes)."""
  if resolve_augment_on(config.data.get("augment_on", "host"), config.data.source,
                        jax.default_backend()) == "host":
    return lambda batch: batch
  from agriclip_jax.train.sharding import batch_sharding
  return make_device_augment(views_for_train_config(config), batch_sharding(mesh))
