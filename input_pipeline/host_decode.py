"""Host half of `data.augment_on = "device"`: decode small, draw the plans, ship fixed shapes.

Per record, on the host CPU:
1. decode with the checks and bad-record reasons of transforms.decode_pil; a JPEG much larger
   than needed is decoded at 1/2, 1/4 or 1/8 scale (PIL's draft mode: the DCT does the shrinking);
2. shrink so the shorter side is at most `short_side` and the longer at most `canvas` (antialiased
   bicubic, mapping the full original extent onto the result), never enlarge;
3. pad into a uint8 [canvas, canvas, 3] array, recording the valid (height, width);
4. draw the view parameters with the path's own functions (`sample_resized_crop`,
   `sample_multicrop_plans`) from the same Generator in the same order as TrainTransform, on the
   ORIGINAL upright size -- so a seed gives the very plans the PIL path would render -- and express
   each box in canvas coordinates by the exact per-axis resize factors (fractional boxes are fine
   for the device's resampler). Sampling on the shrunk size instead would change the boxes the
   Generator yields (its integer draws depend on the size) and so the run a seed describes.

input_pipeline/device_augment.py renders the result. The square canvas makes the shape
independent of orientation; an image longer than canvas / short_side (1.5 by default) in aspect
keeps its longer side at `canvas` and a shorter side below `short_side`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Mapping, Sequence

import grain
import numpy as np
from PIL import Image

from input_pipeline import transforms
from input_pipeline.transforms import BadRecord, ClipViewConfig, CropPlan, MultiCropConfig, PreprocessSpec

_TRANSPOSES = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
               4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
               6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
               8: Image.Transpose.ROTATE_90}


@dataclasses.dataclass(frozen=True)
class HostDecodeConfig:
  """short_side: the decoded image's shorter side at most (256 for 224 crops, as DINO's and
  ImageNet's recipes resize); canvas: the side of the fixed uint8 array that carries it."""
  short_side: int = 256
  canvas: int = 384

  def __post_init__(self):
    if self.short_side < 1 or self.canvas < self.short_side:
      raise ValueError(f"HostDecodeConfig(short_side={self.short_side}, canvas={self.canvas}): "
                       f"need 1 <= short_side <= canvas")


def decode_config_for(kind: str, clip_view: ClipViewConfig, multicrop: MultiCropConfig
                      ) -> HostDecodeConfig:
  """The decode size for the largest crop a run renders: shorter side 256/224 of it (256 for
  224 crops), canvas 1.5 times that."""
  largest = max(clip_view.size if kind in ("contrastive", "joint") else 0,
                multicrop.global_size if kind in ("dino", "joint") else 0)
  short_side = math.ceil(largest * 256 / 224)
  return HostDecodeConfig(short_side=short_side, canvas=math.ceil(short_side * 1.5))


@dataclasses.dataclass(frozen=True)
class Decoded:
  pixels: np.ndarray  # uint8 [canvas, canvas, 3], zero outside the valid part
  valid: tuple[int, int]  # (height, width) of the image inside `pixels`
  original: tuple[int, int]  # upright (height, width) at full resolution

  @property
  def scale(self) -> tuple[float, float]:
    """Canvas pixels per original pixel, (y, x)."""
    return self.valid[0] / self.original[0], self.valid[1] / self.original[1]


def reduced_size(height: int, width: int, config: HostDecodeConfig) -> tuple[int, int]:
  """The (height, width) an image of this size is shrunk to (never enlarged)."""
  scale = min(1.0, config.short_side / min(height, width), config.canvas / max(height, width))
  if scale >= 1.0:
    return height, width
  return (min(config.canvas, max(1, round(height * scale))),
          min(config.canvas, max(1, round(width * scale))))


def _orientation(image: Image.Image) -> int:
  try:
    return int(image.getexif().get(0x0112, 1))
  except Exception:  # noqa: BLE001 -- a broken EXIF block: decode_pil's exif_transpose ignores it too
    return 1


def decode_reduced(data: bytes | None, config: HostDecodeConfig = HostDecodeConfig(),
                   max_pixels: int = transforms.DEFAULT_MAX_PIXELS,
                   min_side: int = transforms.DEFAULT_MIN_SIDE, exif_transpose: bool = True) -> Decoded:
  """Bytes -> Decoded; raises BadRecord by decode_pil's rule (transforms.open_image judges the
  stored size, before any reduction; transforms.decoding_errors the pixels). With nothing to
  shrink the pixels equal decode_pil's."""
  image = transforms.open_image(data, max_pixels, min_side)
  width, height = image.size
  # The square canvas makes the target symmetric in height and width: it can be chosen in the
  # stored orientation and the EXIF turn applied to the small result.
  target_h, target_w = reduced_size(height, width, config)
  with transforms.decoding_errors():
    factor = 1
    if image.format == "JPEG" and (target_w, target_h) != (width, height):
      drafted = image.draft(image.mode, (target_w, target_h))
      if drafted is not None:
        factor = round(width / drafted[1][2])  # the draft's box is (0, 0, width / factor, ...)
    image.load()
    orientation = _orientation(image) if exif_transpose else 1
    image = transforms._to_rgb(image)
    if (target_w, target_h) != image.size or factor != 1:
      # The box maps the original extent exactly: a drafted image is ceil(size / factor) wide.
      box = (0.0, 0.0, width / factor, height / factor)
      image = image.resize((target_w, target_h), Image.BICUBIC, box=box)
    if orientation in _TRANSPOSES:
      image = image.transpose(_TRANSPOSES[orientation])
      if orientation >= 5:
        width, height = height, width
    pixels = np.asarray(image, dtype=np.uint8)
  canvas = np.zeros((config.canvas, config.canvas, 3), np.uint8)
  canvas[:pixels.shape[0], :pixels.shape[1]] = pixels
  return Decoded(canvas, (pixels.shape[0], pixels.shape[1]), (height, width))


# ------------------------------------------------------------------------------------------------
# PIL's Gaussian blur as box blurs (the numbers its C code computes, in its float32 arithmetic)
# ------------------------------------------------------------------------------------------------

def pil_box_blur(sigma: float, passes: int = 3) -> tuple[int, int, int]:
  """GaussianBlur(radius=sigma) -> (integer box radius r, ww, fw): PIL's _gaussian_blur_radius
  (Gwosdek et al. 2011) and ImagingHorizontalBoxBlur's fixed-point weights, in C's float32."""
  f32 = np.float32
  radius = f32(sigma)
  sigma2 = f32(radius * radius / f32(passes))
  box_length = f32(math.sqrt(12.0 * float(sigma2) + 1.0))
  whole = f32(math.floor((float(box_length) - 1.0) / 2.0))
  part = f32(f32(2) * whole + f32(1)) * f32(whole * f32(whole + f32(1)) - f32(3) * sigma2)
  part = f32(part / f32(f32(6) * f32(sigma2 - f32(whole + f32(1)) * f32(whole + f32(1)))))
  box_radius = f32(whole + part)
  r = int(box_radius)
  ww = int(f32(1 << 24) / f32(box_radius * f32(2) + f32(1)))
  fw = ((1 << 24) - (2 * r + 1) * ww) // 2
  return r, ww, fw


def blur_taps(sigma_range: Sequence[float]) -> int:
  """The device's static blur half-width: 1 + the largest box radius over the sigma range."""
  return _blur_taps(float(sigma_range[0]), float(sigma_range[1]))


@functools.lru_cache(maxsize=16)
def _blur_taps(low: float, high: float) -> int:
  return 1 + max(pil_box_blur(s)[0] for s in np.linspace(low, high, 257))


# ------------------------------------------------------------------------------------------------
# Plans as fixed-shape arrays
# ------------------------------------------------------------------------------------------------

def canvas_box(box: transforms.Box, scale: tuple[float, float]) -> np.ndarray:
  """(top, left, height, width) in original pixels -> float32 [4] in canvas pixels."""
  top, left, height, width = box
  sy, sx = scale
  return np.asarray([top * sy, left * sx, height * sy, width * sx], np.float32)


def pack_crop_plans(plans: Sequence[CropPlan], scale: tuple[float, float], taps: int
                    ) -> dict[str, np.ndarray]:
  """V CropPlans -> arrays with leading dim V: box [V,4] f32, flip/jitter/grayscale/blur/solarize
  [V] bool, jitter_order [V,4] i32, jitter_factors [V,4] f32 (by JITTER_OPS), hue_shift [V] i32,
  blur_sigma [V] f32, blur_radius [V] i32, blur_weights [V,2] u32."""
  n = len(plans)
  out = {"box": np.zeros((n, 4), np.float32), "flip": np.zeros(n, bool), "jitter": np.zeros(n, bool),
         "jitter_order": np.tile(np.arange(4, dtype=np.int32), (n, 1)),
         "jitter_factors": np.tile(np.asarray([1, 1, 1, 0], np.float32), (n, 1)),
         "hue_shift": np.zeros(n, np.int32), "grayscale": np.zeros(n, bool),
         "blur": np.zeros(n, bool), "blur_sigma": np.zeros(n, np.float32),
         "blur_radius": np.zeros(n, np.int32), "blur_weights": np.zeros((n, 2), np.uint32),
         "solarize": np.zeros(n, bool)}
  names = ("brightness", "contrast", "saturation", "hue")
  for i, plan in enumerate(plans):
    out["box"][i] = canvas_box(plan.box, scale)
    out["flip"][i] = plan.flip
    if plan.jitter is not None:
      out["jitter"][i] = True
      out["jitter_order"][i] = [names.index(name) for name, _ in plan.jitter]
      for name, factor in plan.jitter:
        out["jitter_factors"][i, names.index(name)] = factor
        if name == "hue":
          out["hue_shift"][i] = int(factor * 255) % 256  # as transforms.adjust_hue truncates
    out["grayscale"][i] = plan.grayscale
    if plan.blur_radius is not None:
      r, ww, fw = pil_box_blur(plan.blur_radius)
      if r + 1 > taps:
        raise ValueError(f"blur sigma {plan.blur_radius} needs box radius {r}, beyond the device's "
                         f"blur_taps={taps}: build DeviceViews with blur_taps >= {r + 1}")
      out["blur"][i], out["blur_sigma"][i], out["blur_radius"][i] = True, plan.blur_radius, r
      out["blur_weights"][i] = (ww, fw)
    out["solarize"][i] = plan.solarize
  return out


def eval_box(height: int, width: int, spec: PreprocessSpec) -> tuple[float, float, float, float]:
  """The spec's resize-then-centre-crop (transforms.eval_pixels) as one box in original pixels:
  resampling that box to image_size gives the same weights as resizing, then cropping."""
  target, size = spec.resize_size, spec.image_size
  if spec.resize == "square":
    new_w = new_h = target
  elif width <= height:
    new_w, new_h = target, int(target * height / width)
  else:
    new_w, new_h = int(target * width / height), target
  if spec.crop_offset == "round":
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
  else:
    top, left = (new_h - size) // 2, (new_w - size) // 2
  sy, sx = height / new_h, width / new_w
  return top * sy, left * sx, size * sy, size * sx


# ------------------------------------------------------------------------------------------------
# Per-record work and the Grain transform
# ------------------------------------------------------------------------------------------------

def device_example(decoded: Decoded, rng: np.random.Generator, kind: str, clip_view: ClipViewConfig,
                   multicrop: MultiCropConfig, taps: int, captions: Sequence[str] = (),
                   tokenize: Any = None) -> dict[str, Any]:
  """Decoded image -> pixels + plans, drawing from `rng` in TrainTransform's order: the CLIP box,
  the caption, then the multi-crop plans."""
  height, width = decoded.original
  example: dict[str, Any] = {"pixels": decoded.pixels,
                             "pixels_valid": np.asarray(decoded.valid, np.int32)}
  if kind in ("contrastive", "joint"):
    box = transforms.sample_resized_crop(rng, height, width, clip_view.scale, clip_view.ratio)
    example["clip_plan/box"] = canvas_box(box, decoded.scale)
    if captions:
      caption = captions[int(rng.integers(len(captions)))]
      if tokenize is not None:
        example["tokens"] = np.asarray(tokenize([caption]), dtype=np.int32)[0]
  if kind in ("dino", "joint"):
    global_plans, local_plans = transforms.sample_multicrop_plans(rng, height, width, multicrop)
    for name, plans in (("global_plan", global_plans), ("local_plan", local_plans)):
      for key, value in pack_crop_plans(plans, decoded.scale, taps).items():
        example[f"{name}/{key}"] = value
  return example


@dataclasses.dataclass(frozen=True)
class DeviceTrainTransform(grain.transforms.RandomMap):
  """pipeline.TrainTransform's counterpart for augment_on="device": the same checks, bad-record
  markers and draws; uint8 canvas + plans instead of rendered views."""
  kind: str
  checks: Any  # pipeline.RecordChecks
  clip_view: ClipViewConfig
  multicrop: MultiCropConfig
  tokenize: Any
  decode: HostDecodeConfig | None = None  # None: decode_config_for the views

  def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    from input_pipeline import pipeline
    decode = self.decode or decode_config_for(self.kind, self.clip_view, self.multicrop)
    try:
      if record.get("error"):
        raise BadRecord(record["error"])
      captions = pipeline.usable_captions(record, self.checks)
      decoded = decode_reduced(record["image_bytes"], decode, self.checks.max_pixels,
                               self.checks.min_side)
    except BadRecord as bad:
      return pipeline._bad_marker(bad.reason, record["path"])
    example = device_example(decoded, rng, self.kind, self.clip_view, self.multicrop,
                             blur_taps(self.multicrop.blur_radius), captions, self.tokenize)
    example["label"] = np.int32(record["label"])
    return example


# ------------------------------------------------------------------------------------------------
# Host cost per view and placement (`agriclip data inspect`, benchmarks/bench_pipeline.py)
# ------------------------------------------------------------------------------------------------

def host_cpu_ms_per_image(records: Sequence[Mapping[str, Any]], view: str, placement: str,
                          clip_view: ClipViewConfig = ClipViewConfig(),
                          multicrop: MultiCropConfig = MultiCropConfig(),
                          decode: HostDecodeConfig | None = None, seed: int = 0) -> float:
  """Host CPU milliseconds per image (time.process_time: this process's CPU, all threads) of one
  view ("clip" | "dino") placed on the "host" (decode + PIL views + normalise) or the "device"
  (reduced decode + plans; the rendering is the accelerator's). Bad records are skipped."""
  if view not in ("clip", "dino") or placement not in ("host", "device"):
    raise ValueError(f"view must be clip or dino and placement host or device, got {view!r}, "
                     f"{placement!r}")
  taps = blur_taps(multicrop.blur_radius)
  kind = "contrastive" if view == "clip" else "dino"
  decode = decode or decode_config_for(kind, clip_view, multicrop)
  done, start = 0, time.process_time()
  for index, record in enumerate(records):
    rng = np.random.default_rng([seed, index])
    try:
      if placement == "host":
        image = transforms.decode_pil(record["image_bytes"])
        if view == "clip":
          transforms.normalise(transforms.clip_train_view(image, rng, clip_view), "clip")
        else:
          crops = transforms.dino_multicrop(image, rng, multicrop)
          [transforms.normalise(c, "imagenet") for c in crops]
      else:
        device_example(decode_reduced(record["image_bytes"], decode), rng, kind, clip_view,
                       multicrop, taps)
    except BadRecord:
      continue
    done += 1
  return 1000.0 * (time.process_time() - start) / max(done, 1)


def view_costs(records: Sequence[Mapping[str, Any]], clip_view: ClipViewConfig = ClipViewConfig(),
               multicrop: MultiCropConfig = MultiCropConfig()) -> dict[str, dict[str, float]]:
  """{"clip": {"host": ms, "device": ms}, "dino": {...}}: host CPU-ms per image of each view and
  placement over the same records (for `agriclip data inspect --view-cost N`)."""
  return {view: {placement: round(host_cpu_ms_per_image(records, view, placement, clip_view,
                                                        multicrop), 3)
                 for placement in ("host", "device")}
          for view in ("clip", "dino")}
