"""Image decoding and augmentation: the CLIP views and the DINO multi-crop recipe.

Every random view is split in two steps: `sample_*` draws the parameters of a view from a numpy
Generator (cheap, no pixels involved), `apply_*` renders them with PIL. The split keeps randomness
explicit -- the pipeline seeds the Generator from (seed, record index, epoch) -- and lets tests check
the recipe's probabilities on millions of cheap draws and each operation's pixels separately.

The operations follow torchvision's PIL code paths (RandomResizedCrop, ColorJitter, RandomGrayscale)
and facebookresearch/dino's GaussianBlur and Solarization, so a PyTorch peer doing "the same PIL
work" produces the same kind of images.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import struct
import warnings
from typing import Any, Iterator, Literal, Mapping, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALISATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "clip": (CLIP_MEAN, CLIP_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
}

# A 40000 x 40000 header is the classic decompression bomb; 64 Mpx is far above any photo we train on.
DEFAULT_MAX_PIXELS = 64_000_000
# Smaller images carry no usable content at 224 px and usually are tracking pixels or icons.
DEFAULT_MIN_SIDE = 8

class BadRecord(Exception):
  """A record that cannot become a training example; `reason` is a short snake_case category."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason
    self.detail = detail


# ------------------------------------------------------------------------------------------------
# Decoding
# ------------------------------------------------------------------------------------------------

def _to_rgb(image: Image.Image) -> Image.Image:
  """Any PIL mode -> 8-bit RGB; transparency is composited on white, 16-bit data is scaled down."""
  mode = image.mode
  if mode == "RGB":
    return image
  if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
    # PIL's own convert() clips 16-bit values at 255 (a white image); scale the full range instead.
    values = np.asarray(image).astype(np.float64)
    full_scale = 65535.0 if mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
    gray = np.clip(np.round(values * (255.0 / full_scale)), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1), "RGB")
  if mode == "F":
    gray = np.clip(np.round(np.asarray(image)), 0, 255).astype(np.uint8)
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1), "RGB")
  has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
      mode == "P" and "transparency" in image.info)
  if has_alpha:
    # Fully transparent pixels hold arbitrary colours (often black); white is what a viewer shows.
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  return image.convert("RGB")


_IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def has_image_signature(data: bytes) -> bool:
  """Whether the bytes start like an image file (then a failure to open means a damaged image)."""
  return data.startswith(_IMAGE_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def open_image(data: bytes | None, max_pixels: int = DEFAULT_MAX_PIXELS,
               min_side: int = DEFAULT_MIN_SIDE) -> Image.Image:
  """Bytes -> an opened PIL image, its pixels not decoded yet, identified by content (never by
  file name) and checked on its stored size. Raises BadRecord. Decode its pixels inside
  `decoding_errors()`; decode_pil and host_decode.decode_reduced (which first picks a JPEG draft
  scale) both do, so a record is judged by one rule whichever path reads it."""
  if data is None:
    raise BadRecord("missing_image")
  if len(data) == 0:
    raise BadRecord("empty_file")
  with warnings.catch_warnings():
    # We enforce our own pixel limit below; PIL's bomb warning would only be noise.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    try:
      image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
      raise BadRecord("too_many_pixels", str(error)) from None
    except (Image.UnidentifiedImageError, SyntaxError, ValueError, OSError) as error:
      # An image cut inside its header, or damaged there, is a broken image, not "not an image".
      reason = "corrupt_image" if has_image_signature(data) else "not_an_image"
      raise BadRecord(reason, str(error)) from None
  width, height = image.size
  if width * height > max_pixels:
    raise BadRecord("too_many_pixels", f"{width}x{height} > {max_pixels} pixels")
  if min(width, height) < min_side:
    raise BadRecord("image_too_small", f"{width}x{height}, shorter side < {min_side}")
  return image


@contextlib.contextmanager
def decoding_errors() -> Iterator[None]:
  """Around the decoding of an `open_image` result: a failure there is BadRecord
  truncated_image or corrupt_image."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    try:
      yield
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as error:
      reason = "truncated_image" if "truncated" in str(error).lower() else "corrupt_image"
      raise BadRecord(reason, str(error)) from None


def decode_pil(data: bytes | None, max_pixels: int = DEFAULT_MAX_PIXELS,
               min_side: int = DEFAULT_MIN_SIDE, exif_transpose: bool = True) -> Image.Image:
  """Bytes -> RGB PIL image, by content (never by file name), turned upright by its EXIF tag unless
  `exif_transpose` is False (as PyTorch loaders read photos). Raises BadRecord."""
  image = open_image(data, max_pixels, min_side)
  with decoding_errors():
    image.load()
    if exif_transpose:
      image = ImageOps.exif_transpose(image)
    image = _to_rgb(image)
  return image


def decode_image(data: bytes | None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 min_side: int = DEFAULT_MIN_SIDE, exif_transpose: bool = True) -> np.ndarray:
  """Bytes -> uint8 [H, W, 3] RGB, EXIF orientation applied unless `exif_transpose` is False.
  Raises BadRecord(reason)."""
  return np.asarray(decode_pil(data, max_pixels, min_side, exif_transpose), dtype=np.uint8)


def as_pil(image: np.ndarray | Image.Image) -> Image.Image:
  if isinstance(image, Image.Image):
    return image if image.mode == "RGB" else _to_rgb(image)
  array = np.asarray(image)
  if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
    raise ValueError(f"expected a uint8 [H, W, 3] image, got {array.dtype} {array.shape}")
  return Image.fromarray(array, "RGB")


def normalise(images: np.ndarray, normalisation: str = "clip") -> np.ndarray:
  """uint8 [..., 3] -> float32 (x / 255 - mean) / std."""
  if normalisation not in NORMALISATIONS:
    raise ValueError(f"unknown normalisation {normalisation!r}; choose one of {sorted(NORMALISATIONS)}")
  return _normalise(images, *NORMALISATIONS[normalisation])


def _normalise(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  scale = np.asarray(std, np.float32) * 255.0
  return (images.astype(np.float32) - np.asarray(mean, np.float32) * 255.0) / scale


# ------------------------------------------------------------------------------------------------
# Geometry: random resized crop (torchvision's sampling algorithm) and the evaluation view
# ------------------------------------------------------------------------------------------------

Box = tuple[int, int, int, int]  # top, left, height, width


def sample_resized_crop(rng: np.random.Generator, height: int, width: int,
                        scale: Sequence[float], ratio: Sequence[float] = (3 / 4, 4 / 3)) -> Box:
  """torchvision RandomResizedCrop.get_params: 10 tries at (area, log-uniform aspect), then centre."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    crop_w = int(round(math.sqrt(target_area * aspect)))
    crop_h = int(round(math.sqrt(target_area / aspect)))
    if 0 < crop_w <= width and 0 < crop_h <= height:
      top = int(rng.integers(0, height - crop_h + 1))
      left = int(rng.integers(0, width - crop_w + 1))
      return top, left, crop_h, crop_w
  in_ratio = width / height
  if in_ratio < min(ratio):
    crop_w, crop_h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    crop_h, crop_w = height, int(round(height * max(ratio)))
  else:
    crop_w, crop_h = width, height
  return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def crop_resize(image: Image.Image, box: Box, size: int) -> Image.Image:
  top, left, crop_h, crop_w = box
  return image.resize((size, size), Image.BICUBIC, box=(left, top, left + crop_w, top + crop_h))


# ------------------------------------------------------------------------------------------------
# The evaluation view: one spec per model, one function that renders it
# ------------------------------------------------------------------------------------------------

ResizeRule = Literal["shorter-side", "square"]
Interpolation = Literal["bicubic", "bilinear"]
CropOffset = Literal["round", "floor"]
_PIL_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


@dataclasses.dataclass(frozen=True)
class PreprocessSpec:
  """How a model wants its evaluation images: stored in every model directory's config.json.

  resize: "shorter-side" scales the shorter side to `resize_size` (torchvision's Resize(int): the
  longer side becomes int(resize_size * long / short)), "square" scales to resize_size x resize_size;
  then a centre crop of `image_size`. The crop's top-left corner is round((H - S) / 2) as torchvision
  and open_clip place it, or floor((H - S) / 2) as HF's CLIPImageProcessor does; the two differ by
  one pixel when H - S is 3 mod 4. Pixels become (x / 255 - mean) / std. `exif_transpose` turns a
  photo upright by its EXIF tag first (torchvision's, open_clip's and HF's loaders do not).
  `pooling` names a DINO backbone's features ("cls", "cls+avgpool", "lastN"; see models.vit); it
  is None for models whose output is fixed (CLIP).
  """
  name: str
  image_size: int
  resize_size: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  resize: ResizeRule = "shorter-side"
  interpolation: Interpolation = "bicubic"
  antialias: bool = True
  crop_offset: CropOffset = "round"
  exif_transpose: bool = False
  pooling: str | None = None

  def __post_init__(self):
    problems = []
    if self.image_size < 1 or self.resize_size < self.image_size:
      problems.append(f"image_size={self.image_size}, resize_size={self.resize_size} (need "
                      f"1 <= image_size <= resize_size: the crop lies inside the resized image)")
    for key, value, allowed in (("resize", self.resize, ResizeRule.__args__),
                                ("interpolation", self.interpolation, Interpolation.__args__),
                                ("crop_offset", self.crop_offset, CropOffset.__args__)):
      if value not in allowed:
        problems.append(f"{key}={value!r} (expected one of {', '.join(allowed)})")
    if not self.antialias:
      # PIL always filters over the source footprint when shrinking; torch's antialias=False path
      # (plain sampling) is a different algorithm this project does not reproduce.
      problems.append("antialias=False (only antialiased PIL resampling is implemented)")
    for key in ("mean", "std"):
      values = getattr(self, key)
      if len(values) != 3 or (key == "std" and min(values) <= 0):
        problems.append(f"{key}={list(values)} (need 3 values{', all > 0' if key == 'std' else ''})")
    if problems:
      raise ValueError(f"preprocess spec {self.name!r}: " + "; ".join(problems))

  def to_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "mean": list(self.mean), "std": list(self.std)}

  @classmethod
  def from_dict(cls, data: Mapping[str, Any], source: str = "preprocess spec") -> "PreprocessSpec":
    if not isinstance(data, Mapping):
      raise ValueError(f"{source}: 'preprocess' must be an object, got {type(data).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
    missing = sorted(required - set(data))
    if unknown or missing:
      raise ValueError(f"{source}: 'preprocess' has unknown keys {unknown} and lacks {missing}; "
                       f"its keys are {sorted(fields)}")
    values = dict(data)
    values["mean"], values["std"] = tuple(values["mean"]), tuple(values["std"])
    try:
      return cls(**values)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{source}: {e}") from None

  def describe(self) -> str:
    rule = "shorter side" if self.resize == "shorter-side" else "square"
    normalisation = {CLIP_MEAN: "CLIP", IMAGENET_MEAN: "ImageNet"}.get(tuple(self.mean), "custom")
    return (f"{self.name}: {rule} to {self.resize_size} ({self.interpolation}), centre crop "
            f"{self.image_size}, {normalisation} mean/std"
            + (f", pooling {self.pooling}" if self.pooling else ""))


# The named views, each as its PyTorch owner defines it for a model of input size S:
# - "openclip": open_clip's eval transform (Resize(S, bicubic), CenterCrop(S), CLIP mean/std);
# - "hf-clip": HF CLIPImageProcessor's defaults, the same but with HF's floor crop offset;
# - "agriclip-reference": the AgriCLIP reference's DINO view (Resize(S) bilinear, CenterCrop(S),
#   ImageNet mean/std), what its aligner was fitted on;
# - "dino-eval": DINO's eval_linear / eval_knn view (Resize(256/224 S, bicubic), CenterCrop(S),
#   ImageNet mean/std).
PRESETS = ("openclip", "hf-clip", "agriclip-reference", "dino-eval")


def preset(name: str, image_size: int = 224, pooling: str | None = None) -> PreprocessSpec:
  """The named view for a model of input size `image_size`; the only place that picks mean/std."""
  clip, imagenet = dict(mean=CLIP_MEAN, std=CLIP_STD), dict(mean=IMAGENET_MEAN, std=IMAGENET_STD)
  common = dict(name=name, image_size=image_size, pooling=pooling)
  if name == "openclip":
    return PreprocessSpec(resize_size=image_size, interpolation="bicubic", **clip, **common)
  if name == "hf-clip":
    return PreprocessSpec(resize_size=image_size, interpolation="bicubic", crop_offset="floor",
                          **clip, **common)
  if name == "agriclip-reference":
    return PreprocessSpec(resize_size=image_size, interpolation="bilinear", **imagenet, **common)
  if name == "dino-eval":
    return PreprocessSpec(resize_size=int(image_size * 256 / 224), interpolation="bicubic",
                          **imagenet, **common)
  raise ValueError(f"unknown preprocessing {name!r}; choose one of {', '.join(PRESETS)}")


def eval_pixels(image: np.ndarray | Image.Image, spec: PreprocessSpec) -> np.ndarray:
  """The view's geometry: uint8 [S, S, 3] after resize and centre crop (EXIF is the decoder's)."""
  pil = as_pil(image)
  width, height = pil.size
  target = spec.resize_size
  if spec.resize == "square":
    new_w = new_h = target
  elif width <= height:
    new_w, new_h = target, int(target * height / width)
  else:
    new_w, new_h = int(target * width / height), target
  resized = pil.resize((new_w, new_h), _PIL_FILTERS[spec.interpolation])
  size = spec.image_size
  if spec.crop_offset == "round":
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
  else:
    top, left = (new_h - size) // 2, (new_w - size) // 2
  return np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.uint8)


def normalise_pixels(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
  """uint8 [..., 3] -> float32 (x / 255 - mean) / std with the spec's mean and std."""
  return _normalise(pixels, spec.mean, spec.std)


def eval_view(image: np.ndarray | Image.Image, spec: PreprocessSpec) -> np.ndarray:
  """A decoded image -> the model's float32 [S, S, 3] input, as `spec` says."""
  return normalise_pixels(eval_pixels(image, spec), spec)


def load_eval_image(data: bytes | None, spec: PreprocessSpec, source: str = "image") -> np.ndarray:
  """Image file bytes -> the model's input; a bad file is a ValueError naming `source`."""
  try:
    image = decode_pil(data, exif_transpose=spec.exif_transpose)
  except BadRecord as e:
    raise ValueError(f"{source}: cannot use this image ({e})") from e
  return eval_view(image, spec)


@dataclasses.dataclass(frozen=True)
class ClipViewConfig:
  """open_clip's training view: RandomResizedCrop(size, scale=(0.9, 1.0)), bicubic, no flips."""
  size: int = 224
  scale: tuple[float, float] = (0.9, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)


def clip_train_view(image: np.ndarray | Image.Image, rng: np.random.Generator,
                    config: ClipViewConfig = ClipViewConfig()) -> np.ndarray:
  pil = as_pil(image)
  box = sample_resized_crop(rng, pil.height, pil.width, config.scale, config.ratio)
  return np.asarray(crop_resize(pil, box, config.size))


# ------------------------------------------------------------------------------------------------
# The DINO multi-crop recipe
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MultiCropConfig:
  """main_dino.py's DataAugmentationDINO, every number exposed."""
  global_size: int = 224
  local_size: int = 96
  num_local: int = 8
  global_scale: tuple[float, float] = (0.4, 1.0)
  local_scale: tuple[float, float] = (0.05, 0.4)
  flip_p: float = 0.5
  jitter_p: float = 0.8
  jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, sat, hue
  grayscale_p: float = 0.2
  blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)  # global 1, global 2, local
  blur_radius: tuple[float, float] = (0.1, 2.0)
  solarize_p: float = 0.2  # second global crop only
  solarize_threshold: int = 128

  def __post_init__(self):
    for name in ("flip_p", "jitter_p", "grayscale_p", "solarize_p"):
      value = getattr(self, name)
      if not 0.0 <= value <= 1.0:
        raise ValueError(f"MultiCropConfig.{name} must be a probability in [0, 1], got {value}")
    if self.global_size <= 0 or self.local_size <= 0 or self.num_local < 0:
      raise ValueError(f"MultiCropConfig sizes must be positive: global_size={self.global_size}, "
                       f"local_size={self.local_size}, num_local={self.num_local}")


@dataclasses.dataclass(frozen=True)
class CropPlan:
  """The parameters of one augmented crop; `apply_crop_plan` renders it."""
  box: Box
  size: int
  flip: bool
  jitter: tuple[tuple[str, float], ...] | None  # ops in the order they run, or None when not applied
  grayscale: bool
  blur_radius: float | None
  solarize: bool


def train_views(data: Any) -> tuple[ClipViewConfig, MultiCropConfig]:
  """A run config's data section (agriclip_jax/train/config.py) -> the CLIP view and the DINO
  multi-crop it asks for: the one reading of those keys, for the host and the device paths."""
  clip = ClipViewConfig(data.image_size, tuple(data.clip_crop_scale))
  multicrop = MultiCropConfig(
      global_size=data.global_crop_size, local_size=data.local_crop_size,
      num_local=data.n_local_crops, global_scale=tuple(data.global_crop_scale),
      local_scale=tuple(data.local_crop_scale), flip_p=data.flip_p, jitter_p=data.jitter_p,
      jitter=tuple(data.jitter), grayscale_p=data.grayscale_p, blur_p=tuple(data.blur_p),
      solarize_p=data.solarize_p)
  return clip, multicrop


def _sample_jitter(rng: np.random.Generator, strengths: Sequence[float]) -> tuple[tuple[str, float], ...]:
  """torchvision ColorJitter.get_params: a random order of the four ops, each with a factor."""
  brightness, contrast, saturation, hue = strengths
  factors = {
      "brightness": rng.uniform(max(0.0, 1 - brightness), 1 + brightness),
      "contrast": rng.uniform(max(0.0, 1 - contrast), 1 + contrast),
      "saturation": rng.uniform(max(0.0, 1 - saturation), 1 + saturation),
      "hue": rng.uniform(-hue, hue),
  }
  order = rng.permutation(4)
  names = ("brightness", "contrast", "saturation", "hue")
  return tuple((names[i], float(factors[names[i]])) for i in order)


def sample_crop_plan(rng: np.random.Generator, height: int, width: int, *, size: int,
                     scale: Sequence[float], blur_p: float, solarize_p: float,
                     config: MultiCropConfig) -> CropPlan:
  box = sample_resized_crop(rng, height, width, scale)
  flip = bool(rng.random() < config.flip_p)
  jitter = _sample_jitter(rng, config.jitter) if rng.random() < config.jitter_p else None
  grayscale = bool(rng.random() < config.grayscale_p)
  blur_radius = float(rng.uniform(*config.blur_radius)) if rng.random() < blur_p else None
  solarize = bool(rng.random() < solarize_p)
  return CropPlan(box, size, flip, jitter, grayscale, blur_radius, solarize)


def sample_multicrop_plans(rng: np.random.Generator, height: int, width: int,
                           config: MultiCropConfig = MultiCropConfig()) -> tuple[list[CropPlan], list[CropPlan]]:
  """Two global plans (blur p 1.0 / 0.1, solarise only on the second) and `num_local` local plans."""
  blur_global_1, blur_global_2, blur_local = config.blur_p
  common = dict(config=config)
  global_plans = [
      sample_crop_plan(rng, height, width, size=config.global_size, scale=config.global_scale,
                       blur_p=blur_global_1, solarize_p=0.0, **common),
      sample_crop_plan(rng, height, width, size=config.global_size, scale=config.global_scale,
                       blur_p=blur_global_2, solarize_p=config.solarize_p, **common),
  ]
  local_plans = [
      sample_crop_plan(rng, height, width, size=config.local_size, scale=config.local_scale,
                       blur_p=blur_local, solarize_p=0.0, **common)
      for _ in range(config.num_local)
  ]
  return global_plans, local_plans


def adjust_hue(image: Image.Image, hue_factor: float) -> Image.Image:
  """torchvision's PIL adjust_hue: shift the H channel by hue_factor * 255 with uint8 wrap-around."""
  hue, saturation, value = image.convert("HSV").split()
  shift = int(hue_factor * 255) % 256  # C-style truncation, as np.uint8(hue_factor * 255) does
  shifted = (np.asarray(hue, dtype=np.uint8).astype(np.int16) + shift) % 256
  return Image.merge("HSV", (Image.fromarray(shifted.astype(np.uint8), "L"), saturation, value)).convert("RGB")


def _apply_jitter_op(image: Image.Image, name: str, factor: float) -> Image.Image:
  if name == "brightness":
    return ImageEnhance.Brightness(image).enhance(factor)
  if name == "contrast":
    return ImageEnhance.Contrast(image).enhance(factor)
  if name == "saturation":
    return ImageEnhance.Color(image).enhance(factor)
  if name == "hue":
    return adjust_hue(image, factor)
  raise ValueError(f"unknown colour-jitter op {name!r}")


def apply_crop_plan(image: Image.Image, plan: CropPlan, solarize_threshold: int = 128) -> np.ndarray:
  """Render one plan: crop+resize (bicubic), flip, colour jitter, grayscale, blur, solarise."""
  view = crop_resize(image, plan.box, plan.size)
  if plan.flip:
    view = ImageOps.mirror(view)
  if plan.jitter is not None:
    for name, factor in plan.jitter:
      view = _apply_jitter_op(view, name, factor)
  if plan.grayscale:
    view = view.convert("L").convert("RGB")
  if plan.blur_radius is not None:
    view = view.filter(ImageFilter.GaussianBlur(radius=plan.blur_radius))
  if plan.solarize:
    view = ImageOps.solarize(view, threshold=solarize_threshold)
  return np.asarray(view, dtype=np.uint8)


def dino_multicrop(image: np.ndarray | Image.Image, rng: np.random.Generator,
                   config: MultiCropConfig = MultiCropConfig()) -> tuple[np.ndarray, np.ndarray]:
  """-> (global crops uint8 [2, G, G, 3], local crops uint8 [N, S, S, 3]); normalise afterwards."""
  pil = as_pil(image)
  global_plans, local_plans = sample_multicrop_plans(rng, pil.height, pil.width, config)
  render = lambda plans, size: (  # noqa: E731
      np.stack([apply_crop_plan(pil, p, config.solarize_threshold) for p in plans])
      if plans else np.zeros((0, size, size, 3), np.uint8))
  return render(global_plans, config.global_size), render(local_plans, config.local_size)
