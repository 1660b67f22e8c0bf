"""ALive-synth: procedurally rendered crop, fish and livestock images with caption metadata.

The offline demo and the tests cannot download ALive or its downstream sets, so this module draws
a small stand-in with numpy + PIL: crop leaves (diseases and deficiencies), fish (markings and fin
colours) and livestock (coat colours and patch patterns), each with random background, pose, scale
and lighting. Several conditions are deliberately subtle (tiny spots, thin bars, fin colour, roan
speckles), so a model only gets them right from fine-grained detail.

Every image is a `SampleSpec` (subject + condition + rendering style) rendered with an explicit
`np.random.Generator`; the same spec and seed give the same pixels. Rendering draws the layout
(pose, background, lighting, noise) and the condition's pattern from separate child generators, so
the same seed with and without a condition gives the same picture except where the condition is.

On disk:
- `write_pretraining_set`: `DATASET/CLASS/NNNNN.png`, `metadata.json` (the caption-metadata schema:
  `{"datasets": [{"name", "domain", "task", "classes": [{"name", "readable", "attributes"}]}]}`)
  and `manifest.jsonl` (one line per image: image, captions, dataset, class, ...).
- `write_downstream_tasks`: zero-shot ImageFolder tasks disjoint from the pretraining set (held-out
  images, held-out subject x condition pairs, a rendering-style shift) and `tasks.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from agriclip_jax.fileio import atomic_write_json, atomic_write_text, read_json

Domain = Literal["crop", "fish", "livestock"]
RGB = tuple[float, float, float]
FloatArray = np.ndarray

# ================================================================================================
# Vocabulary: what can be drawn.
# ================================================================================================


@dataclasses.dataclass(frozen=True)
class LeafShape:
  """Leaf outline and veins in local units; the midrib runs from u=-1 (base) to u=1 (tip)."""
  outline: Literal["profile", "palmate"]
  width: float  # largest half-width (profile) or radius (palmate)
  base_exponent: float = 0.5  # profile: half-width ~ t**base * (1-t)**tip, t in [0, 1]
  tip_exponent: float = 0.8
  veins: Literal["pinnate", "parallel", "palmate"] = "pinnate"
  vein_slope: float = 0.8  # pinnate: side veins follow u - slope*|v| = const
  vein_period: float = 0.25
  wavy_margin: float = 0.0
  petiole: bool = True


@dataclasses.dataclass(frozen=True)
class FishShape:
  """Side view of a fish; u runs from the caudal peduncle (u=-1) to the snout (u=1)."""
  depth: float  # largest body half-height
  tail_exponent: float  # body half-height ~ t**tail * (1-t)**head
  head_exponent: float
  tail: Literal["forked", "rounded", "fan"]
  tail_length: float
  tail_spread: float
  barbels: bool = False


@dataclasses.dataclass(frozen=True)
class AnimalShape:
  """Side view of a quadruped: body ellipse centred at the origin, head at +u."""
  body: tuple[float, float]  # semi-axes (length, height)
  leg_length: float
  leg_radius: float
  neck: tuple[float, float, float]  # end point (u, v) relative to the body front-top, radius
  head: tuple[float, float, float]  # semi-axes (length, height), tilt in radians (< 0: snout down)
  tail: tuple[float, float, float]  # end point (u, v) relative to the rump, radius
  horns: float = 0.0  # horn length (0: none)
  ears: float = 0.06
  snout: float = 0.0  # pig snout disc radius
  wool: float = 0.0  # amplitude of the fleece's bumpy outline
  mane: bool = False
  beard: bool = False


@dataclasses.dataclass(frozen=True)
class Subject:
  """What is pictured: a crop's leaf, a fish species or a livestock species."""
  name: str  # folder-safe id
  readable: str
  domain: Domain
  shape: LeafShape | FishShape | AnimalShape
  colour: RGB  # leaf green, fish body colour, livestock nose/hoof colour
  attributes: tuple[str, ...]
  fin_colour: RGB = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class Condition:
  """What distinguishes classes on a subject: a disease, a marking or a coat."""
  name: str  # folder-safe id
  readable: str  # fits "a SUBJECT with {readable}"
  domain: Domain
  pattern: str  # which pattern the renderer draws
  attributes: tuple[str, ...]
  colour: RGB = (0.0, 0.0, 0.0)
  subtle: bool = False  # only a few pixels change: the fine-grained cases


@dataclasses.dataclass(frozen=True)
class RenderStyle:
  """Scene statistics: backgrounds per domain, lighting, framing and sensor noise."""
  name: str
  backgrounds: dict[str, tuple[str, ...]]  # domain -> background kinds
  brightness: tuple[float, float]
  tint: float  # largest per-channel colour cast
  light_gradient: float  # largest brightness change across the frame
  noise_std: float
  scale: tuple[float, float]  # subject size relative to the frame

  def __hash__(self) -> int:
    return hash(self.name)


@dataclasses.dataclass(frozen=True)
class SampleSpec:
  """One image to render."""
  subject: Subject
  condition: Condition
  style: RenderStyle

  def __post_init__(self):
    if self.subject.domain != self.condition.domain:
      raise ValueError(f"subject {self.subject.name!r} is {self.subject.domain} but condition "
                       f"{self.condition.name!r} is {self.condition.domain}")
    if self.subject.domain not in self.style.backgrounds:
      raise ValueError(f"style {self.style.name!r} has no backgrounds for {self.subject.domain}")


def _leaf(name: str, shape: LeafShape, colour: RGB, attributes: tuple[str, ...]) -> Subject:
  return Subject(name, f"{name} leaf", "crop", shape, colour, attributes)


CROP_SUBJECTS: tuple[Subject, ...] = (
    _leaf("maize", LeafShape("profile", 0.17, 0.35, 0.9, veins="parallel", vein_period=0.055,
                             petiole=False),
          (0.30, 0.56, 0.18), ("long narrow blade", "parallel veins")),
    _leaf("bean", LeafShape("profile", 0.55, 0.55, 0.85, vein_slope=0.9, vein_period=0.3),
          (0.28, 0.52, 0.20), ("broad oval leaf with a pointed tip", "branching veins")),
    _leaf("coffee", LeafShape("profile", 0.40, 0.8, 0.8, vein_slope=0.7, vein_period=0.24,
                              wavy_margin=0.05),
          (0.14, 0.40, 0.15), ("glossy dark green elliptic leaf", "wavy margins")),
    _leaf("banana", LeafShape("profile", 0.36, 0.12, 0.15, vein_slope=0.2, vein_period=0.08,
                              petiole=False),
          (0.36, 0.62, 0.26),
          ("large oblong leaf", "fine side veins at right angles to the midrib")),
    _leaf("grape", LeafShape("palmate", 0.95, veins="palmate"),
          (0.33, 0.56, 0.21), ("palmate leaf with five lobes", "veins radiating from the base")),
)

CROP_CONDITIONS: tuple[Condition, ...] = (
    Condition("healthy", "no disease", "crop", "none",
              ("uniformly green", "no spots or lesions")),
    Condition("leaf_spot", "leaf spot", "crop", "small_spots",
              ("small dark brown spots scattered over the leaf",), (0.22, 0.13, 0.07), subtle=True),
    Condition("rust", "rust", "crop", "pustules",
              ("tiny orange-brown pustules", "powdery rust-coloured dots"), (0.82, 0.45, 0.10),
              subtle=True),
    Condition("early_blight", "early blight", "crop", "halo_lesions",
              ("brown lesions with yellow halos", "concentric rings inside the lesions"),
              (0.30, 0.18, 0.08)),
    Condition("magnesium_deficiency", "magnesium deficiency", "crop", "interveinal_chlorosis",
              ("yellowing between the veins", "veins stay green"), (0.88, 0.82, 0.26)),
    Condition("powdery_mildew", "powdery mildew", "crop", "powdery",
              ("white powdery patches on the surface",), (0.93, 0.93, 0.90)),
    Condition("leaf_curl", "leaf curl", "crop", "curl",
              ("curled and rolled edges", "pale underside showing along the margins"),
              (0.70, 0.78, 0.52)),
)

FISH_SUBJECTS: tuple[Subject, ...] = (
    Subject("tilapia", "tilapia", "fish", FishShape(0.42, 0.9, 0.45, "rounded", 0.32, 0.34),
            (0.45, 0.50, 0.42), ("deep compressed body", "rounded tail"), (0.42, 0.44, 0.42)),
    Subject("trout", "trout", "fish", FishShape(0.25, 0.8, 0.45, "forked", 0.34, 0.30),
            (0.56, 0.60, 0.52), ("slender streamlined body", "slightly forked tail"),
            (0.50, 0.52, 0.48)),
    Subject("carp", "carp", "fish", FishShape(0.34, 1.0, 0.55, "forked", 0.36, 0.36),
            (0.64, 0.52, 0.30), ("heavy bronze body", "deeply forked tail"), (0.55, 0.45, 0.30)),
    Subject("catfish", "catfish", "fish", FishShape(0.20, 0.5, 0.25, "rounded", 0.28, 0.22,
                                                    barbels=True),
            (0.36, 0.34, 0.31), ("long flat-headed body", "whisker-like barbels"),
            (0.30, 0.29, 0.27)),
    Subject("goldfish", "goldfish", "fish", FishShape(0.44, 1.1, 0.5, "fan", 0.55, 0.55),
            (0.96, 0.55, 0.14), ("round orange body", "long flowing fan tail"), (0.98, 0.66, 0.30)),
)

FISH_CONDITIONS: tuple[Condition, ...] = (
    Condition("plain", "plain colouring", "fish", "none", ("no markings", "even colouring")),
    Condition("thin_bars", "thin vertical bars", "fish", "bars",
              ("thin dark vertical bars across the body",), (0.10, 0.10, 0.12), subtle=True),
    Condition("lateral_stripe", "a dark lateral stripe", "fish", "lateral_stripe",
              ("a dark horizontal stripe along the side",), (0.12, 0.12, 0.15)),
    Condition("small_spots", "small dark spots", "fish", "small_spots",
              ("many small dark spots on the back and sides",), (0.10, 0.09, 0.09), subtle=True),
    Condition("eyespot", "a tail eyespot", "fish", "eyespot",
              ("a black eyespot ringed with orange near the tail",), (0.05, 0.05, 0.05)),
    Condition("red_fins", "red fins", "fish", "fin_colour", ("bright red fins and tail",),
              (0.88, 0.14, 0.10), subtle=True),
    Condition("yellow_fins", "yellow fins", "fish", "fin_colour", ("bright yellow fins and tail",),
              (0.98, 0.84, 0.12), subtle=True),
)

LIVESTOCK_SUBJECTS: tuple[Subject, ...] = (
    Subject("cattle", "cattle", "livestock",
            AnimalShape((0.70, 0.32), 0.42, 0.075, (0.20, 0.22, 0.12), (0.22, 0.13, -0.5),
                        (0.10, -0.45, 0.022), horns=0.10),
            (0.25, 0.20, 0.18), ("large heavy body", "short horns", "long tufted tail")),
    Subject("goat", "goat", "livestock",
            AnimalShape((0.55, 0.25), 0.50, 0.055, (0.15, 0.30, 0.09), (0.18, 0.10, -0.4),
                        (0.10, 0.15, 0.025), horns=0.18, beard=True),
            (0.25, 0.22, 0.20), ("slim body on long legs", "swept-back horns and a beard")),
    Subject("sheep", "sheep", "livestock",
            AnimalShape((0.62, 0.34), 0.40, 0.045, (0.12, 0.16, 0.10), (0.17, 0.10, -0.6),
                        (0.08, -0.20, 0.035), wool=0.035),
            (0.18, 0.16, 0.15), ("round woolly fleece", "thin dark legs")),
    Subject("pig", "pig", "livestock",
            AnimalShape((0.72, 0.36), 0.24, 0.08, (0.10, 0.05, 0.16), (0.20, 0.15, -0.2),
                        (0.12, 0.05, 0.015), ears=0.09, snout=0.07),
            (0.45, 0.30, 0.30), ("round barrel body on short legs", "flat snout and curly tail")),
    Subject("horse", "horse", "livestock",
            AnimalShape((0.62, 0.26), 0.62, 0.05, (0.22, 0.42, 0.09), (0.24, 0.09, -0.9),
                        (0.16, -0.50, 0.045), mane=True),
            (0.15, 0.12, 0.10), ("long legs and long neck", "flowing mane and tail")),
)

LIVESTOCK_CONDITIONS: tuple[Condition, ...] = (
    Condition("black", "a solid black coat", "livestock", "solid", ("solid black coat",),
              (0.11, 0.10, 0.10)),
    Condition("red", "a reddish-brown coat", "livestock", "solid", ("solid reddish-brown coat",),
              (0.52, 0.26, 0.12)),
    Condition("white", "a white coat", "livestock", "solid", ("solid white coat",),
              (0.90, 0.88, 0.82)),
    Condition("piebald", "black and white patches", "livestock", "patches",
              ("black coat with large white patches",), (0.11, 0.10, 0.10)),
    Condition("white_face", "a white face", "livestock", "white_face",
              ("reddish-brown body", "white face"), (0.52, 0.26, 0.12)),
    Condition("belted", "a white belt", "livestock", "belt",
              ("black coat with a white belt around the middle",), (0.11, 0.10, 0.10)),
    Condition("spotted", "small dark spots", "livestock", "spots",
              ("white coat with small dark spots",), (0.90, 0.88, 0.82), subtle=True),
    Condition("roan", "a roan coat", "livestock", "roan",
              ("reddish coat flecked with fine white hairs",), (0.52, 0.26, 0.12), subtle=True),
)

SUBJECTS: dict[str, tuple[Subject, ...]] = {
    "crop": CROP_SUBJECTS, "fish": FISH_SUBJECTS, "livestock": LIVESTOCK_SUBJECTS}
CONDITIONS: dict[str, tuple[Condition, ...]] = {
    "crop": CROP_CONDITIONS, "fish": FISH_CONDITIONS, "livestock": LIVESTOCK_CONDITIONS}
DOMAINS: tuple[Domain, ...] = ("crop", "fish", "livestock")

# Breed names for livestock classes; other subject x coat pairs are described in words.
BREED_NAMES: dict[tuple[str, str], str] = {
    ("cattle", "black"): "angus", ("cattle", "red"): "red poll", ("cattle", "white"): "charolais",
    ("cattle", "piebald"): "holstein", ("cattle", "white_face"): "hereford",
    ("cattle", "belted"): "belted galloway", ("cattle", "roan"): "shorthorn",
    ("goat", "white"): "saanen", ("goat", "red"): "kiko", ("goat", "black"): "black bengal",
    ("sheep", "white"): "merino", ("sheep", "black"): "black welsh mountain",
    ("sheep", "spotted"): "jacob",
    ("pig", "white"): "large white", ("pig", "red"): "duroc", ("pig", "black"): "large black",
    ("pig", "belted"): "hampshire", ("pig", "spotted"): "gloucestershire old spots",
    ("horse", "black"): "friesian", ("horse", "spotted"): "appaloosa",
    ("horse", "piebald"): "pinto",
}

PRETRAIN_STYLE = RenderStyle(
    "field",
    backgrounds={"crop": ("plain", "soil", "grass", "gradient"),
                 "fish": ("water", "plain", "gradient"),
                 "livestock": ("pasture", "soil", "gradient")},
    brightness=(0.85, 1.12), tint=0.06, light_gradient=0.25, noise_std=0.02, scale=(0.62, 0.85))

# The style-shift tasks: backgrounds never used in pretraining, dim or coloured light, more noise.
SHIFTED_STYLE = RenderStyle(
    "shifted",
    backgrounds={"crop": ("tiles", "dark", "sand"), "fish": ("tiles", "dark", "sand"),
                 "livestock": ("tiles", "dark", "sand")},
    brightness=(0.55, 0.8), tint=0.16, light_gradient=0.5, noise_std=0.035, scale=(0.55, 0.8))

STYLES: dict[str, RenderStyle] = {s.name: s for s in (PRETRAIN_STYLE, SHIFTED_STYLE)}


def subject(domain: str, name: str) -> Subject:
  """Looks a subject up by domain and name; a bad name raises ValueError listing the known ones."""
  for s in SUBJECTS[_check_domain(domain)]:
    if s.name == name:
      return s
  known = [s.name for s in SUBJECTS[domain]]
  raise ValueError(f"unknown {domain} subject {name!r}; known: {known}")


def condition(domain: str, name: str) -> Condition:
  """Looks a condition up by domain and name; a bad name raises ValueError listing known ones."""
  for c in CONDITIONS[_check_domain(domain)]:
    if c.name == name:
      return c
  raise ValueError(
      f"unknown {domain} condition {name!r}; known: {[c.name for c in CONDITIONS[domain]]}")


def _check_domain(domain: str) -> str:
  if domain not in SUBJECTS:
    raise ValueError(f"unknown domain {domain!r}; known: {list(SUBJECTS)}")
  return domain


# ================================================================================================
# Rendering.
# ================================================================================================


@dataclasses.dataclass(frozen=True)
class Pose:
  """Similarity transform from a subject's local units to the frame's [-1, 1] square (y up)."""
  centre: tuple[float, float]
  angle: float
  scale: float
  flip: bool

  def local_coords(self, x: FloatArray, y: FloatArray) -> tuple[FloatArray, FloatArray]:
    dx, dy = x - self.centre[0], y - self.centre[1]
    c, s = math.cos(self.angle), math.sin(self.angle)
    u = (c * dx + s * dy) / self.scale
    v = (-s * dx + c * dy) / self.scale
    return (-u if self.flip else u), v

  def to_pixels(self, u: FloatArray, v: FloatArray, size: int) -> tuple[FloatArray, FloatArray]:
    """Local points -> (column, row) in pixel units (pixel centres at integer + 0.5)."""
    u = -u if self.flip else u
    c, s = math.cos(self.angle), math.sin(self.angle)
    x = self.centre[0] + self.scale * (c * u - s * v)
    y = self.centre[1] + self.scale * (s * u + c * v)
    return (x + 1) * size / 2, (1 - y) * size / 2


@dataclasses.dataclass(frozen=True)
class Rendering:
  """A rendered image and the subject's coverage (1 inside the subject, 0 on the background)."""
  image: np.ndarray  # uint8 [size, size, 3]
  subject_alpha: np.ndarray  # float32 [size, size]


@dataclasses.dataclass
class _Canvas:
  """Per-image geometry shared by the subject renderers.

  Subjects are drawn only inside `window` (rows, cols), the frame's part that can hold the
  subject: `u`, `v` and everything a renderer returns cover the window, not the whole frame.
  """
  size: int
  pose: Pose
  window: tuple[slice, slice]
  u: FloatArray
  v: FloatArray
  pixel: float  # one pixel in local units (for anti-aliased edges)

  def noise(self, rng: np.random.Generator, cells: tuple[int, int]) -> FloatArray:
    """Frame-wide smooth noise, cut to the window."""
    return _smooth_noise(rng, self.size, cells)[self.window]

  def grain(self, rng: np.random.Generator) -> FloatArray:
    """Per-pixel uniform noise, drawn for the whole frame so the window does not change it."""
    return rng.random((self.size, self.size), dtype=np.float32)[self.window]


@functools.lru_cache(maxsize=16)
def _frame_grid(size: int) -> tuple[FloatArray, FloatArray]:
  centres = (np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0
  x, y = np.meshgrid(centres, -centres)
  x.setflags(write=False)
  y.setflags(write=False)
  return x, y


def _clip01(x: FloatArray) -> FloatArray:
  """np.clip(x, 0, 1) without np.clip's Python-level overhead (it dominates at 64 px)."""
  return np.minimum(np.maximum(x, 0.0), 1.0)


def _coverage(signed_distance: FloatArray, pixel: float) -> FloatArray:
  """Anti-aliased inside-ness from an (approximate) signed distance, negative inside."""
  return _clip01(0.5 - signed_distance / pixel)


def _mix(base: FloatArray, colour, amount: FloatArray) -> FloatArray:
  """base * (1 - amount) + colour * amount, amount [H, W] broadcast over channels."""
  amount = np.asarray(amount, np.float32)[..., None]
  return base + (np.asarray(colour, np.float32) - base) * amount


def _smooth_noise(rng: np.random.Generator, size: int, cells: tuple[int, int]) -> FloatArray:
  """Value noise in [0, 1]: a coarse random grid bilinearly upsampled to the frame."""
  grid = rng.random(cells, dtype=np.float32)
  return np.asarray(Image.fromarray(grid).resize((size, size), Image.BILINEAR))


def _capsule(u: FloatArray, v: FloatArray, a: tuple[float, float], b: tuple[float, float],
             radius: float) -> FloatArray:
  """Signed distance to a segment thickened by `radius`."""
  du, dv = b[0] - a[0], b[1] - a[1]
  t = _clip01(((u - a[0]) * du + (v - a[1]) * dv) / (du * du + dv * dv + 1e-12))
  return np.hypot(u - a[0] - t * du, v - a[1] - t * dv) - radius


def _ellipse(u: FloatArray, v: FloatArray, centre: tuple[float, float], axes: tuple[float, float],
             tilt: float = 0.0) -> FloatArray:
  """Approximate signed distance to an ellipse (exact on the axes, good enough for edges)."""
  du, dv = u - centre[0], v - centre[1]
  if tilt:
    c, s = math.cos(tilt), math.sin(tilt)
    du, dv = c * du + s * dv, -s * du + c * dv
  return (np.hypot(du / axes[0], dv / axes[1]) - 1.0) * min(axes)


def _disc_stamps(canvas: _Canvas, centres: np.ndarray, radii: np.ndarray,
                 reach: float = 1.0) -> list[tuple[slice, slice, FloatArray, float]]:
  """For each disc (local units), the pixel window it touches and the distances there in pixels.

  Discs stay discs under a similarity transform, so small marks are drawn window by window instead
  of over the whole frame: that keeps dozens of spots cheap.
  """
  cols, rows = canvas.pose.to_pixels(centres[:, 0], centres[:, 1], canvas.size)
  rows = rows - canvas.window[0].start  # window coordinates
  cols = cols - canvas.window[1].start
  height, width = canvas.u.shape
  radii_px = radii * canvas.pose.scale * canvas.size / 2
  stamps = []
  for col, row, r in zip(cols, rows, radii_px):
    extent = r * reach + 1.5
    r0, r1 = max(int(row - extent), 0), min(int(row + extent) + 1, height)
    c0, c1 = max(int(col - extent), 0), min(int(col + extent) + 1, width)
    if r0 >= r1 or c0 >= c1:
      continue
    yy = np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5 - row
    xx = np.arange(c0, c1, dtype=np.float32)[None, :] + 0.5 - col
    stamps.append((slice(r0, r1), slice(c0, c1), np.hypot(yy, xx), float(r)))
  return stamps


def _paint_discs(colour: FloatArray, canvas: _Canvas, centres: np.ndarray, radii: np.ndarray,
                 rgb: RGB, opacity: float = 1.0) -> None:
  """Paints anti-aliased discs of one colour in place."""
  rgb_arr = np.asarray(rgb, np.float32)
  for rows, cols, dist, r in _disc_stamps(canvas, centres, radii):
    amount = _clip01(r + 0.5 - dist)[..., None] * opacity
    window = colour[rows, cols]
    colour[rows, cols] = window + (rgb_arr - window) * amount


def _share_threshold(field: FloatArray, alpha: FloatArray, share: float) -> float:
  """The level of `field` exceeded on about `share` of the subject's pixels.

  Thresholding noise at a fixed level can miss a small subject entirely; a condition must show
  on every image of its class.
  """
  values = field[alpha > 0.5]
  if values.size == 0:
    return 0.5
  return float(np.partition(values, int((1.0 - share) * (values.size - 1)))[
      int((1.0 - share) * (values.size - 1))])


def _points_inside(rng: np.random.Generator, count: int, box: tuple[float, float, float, float],
                   inside: Callable[[FloatArray, FloatArray], FloatArray]) -> np.ndarray:
  """Up to `count` random points in box (u0, u1, v0, v1) where inside(u, v) holds (rejection)."""
  candidates = np.stack([rng.uniform(box[0], box[1], 8 * count + 16),
                         rng.uniform(box[2], box[3], 8 * count + 16)], axis=1).astype(np.float32)
  keep = inside(candidates[:, 0], candidates[:, 1])
  return candidates[keep][:count]


# ------------------------------------------------------------------------------------------------
# Leaves.
# ------------------------------------------------------------------------------------------------


def _leaf_outline(shape: LeafShape, u: FloatArray, v: FloatArray) -> FloatArray:
  """Approximate signed distance to the leaf blade (without the petiole)."""
  if shape.outline == "palmate":
    r = np.hypot(u, v)
    phi = np.arctan2(v, u)  # 0 points to the tip; the notch at phi = pi is where the stalk joins
    radius = shape.width * (0.76 + 0.2 * np.cos(5 * phi) + 0.03 * np.cos(23 * phi))
    return (r - radius) * 0.8
  t = _clip01((u + 1.0) * 0.5)
  a, b = shape.base_exponent, shape.tip_exponent
  peak = (a / (a + b)) ** a * (b / (a + b)) ** b
  half_width = shape.width * t ** a * (1.0 - t) ** b / peak
  if shape.wavy_margin:
    half_width = half_width * (1.0 + shape.wavy_margin * np.sin(u * 23.0))
  return np.maximum(np.abs(v) - half_width, np.abs(u) - 1.0)


def _leaf_vein_distance(shape: LeafShape, u: FloatArray, v: FloatArray
                        ) -> tuple[FloatArray, FloatArray]:
  """(distance to the midrib / main veins, distance to the side veins), in local units."""
  if shape.veins == "palmate":
    phi = np.arctan2(v, u)
    sector = 2 * np.pi / 5
    off = np.mod(phi + sector / 2, sector) - sector / 2
    main = np.hypot(u, v) * np.abs(np.sin(off))
    # Side veins: arcs of constant radius crossing each lobe.
    q = np.hypot(u, v) / shape.vein_period
    return main, np.abs(q - np.round(q)) * shape.vein_period + 0.5 * main
  midrib = np.abs(v)
  if shape.veins == "parallel":
    q = v / shape.vein_period
    return midrib, np.abs(q - np.round(q)) * shape.vein_period
  q = (u - shape.vein_slope * np.abs(v)) / shape.vein_period
  side = np.abs(q - np.round(q)) * shape.vein_period / math.sqrt(1 + shape.vein_slope ** 2)
  return midrib, side


def _leaf_stalk(shape: LeafShape, u: FloatArray, v: FloatArray) -> FloatArray:
  """Signed distance to the petiole (leaf stalk)."""
  stalk_start = (-0.45, 0.0) if shape.outline == "palmate" else (-0.95, 0.0)
  return _capsule(u, v, stalk_start, (-1.25, 0.0), 0.025)


def _render_leaf(spec: SampleSpec, canvas: _Canvas, layout_rng: np.random.Generator,
                 pattern_rng: np.random.Generator) -> tuple[FloatArray, FloatArray]:
  shape: LeafShape = spec.subject.shape
  u, v, px = canvas.u, canvas.v, canvas.pixel
  blade = _leaf_outline(shape, u, v)
  cond = spec.condition
  if cond.pattern == "curl":
    # Rolled margins pull the outline inwards in waves around the leaf.
    amplitude = 0.3 * min(shape.width, 0.4)
    phase = float(pattern_rng.uniform(0, 2 * np.pi))
    waves = 0.5 + 0.5 * np.sin(6.0 * np.arctan2(v, u * 0.5) + phase)
    blade = blade + amplitude * (0.35 + 0.65 * waves)
  alpha = _coverage(blade, px)
  if shape.petiole:
    alpha = np.maximum(alpha, _coverage(_leaf_stalk(shape, u, v), px))

  base = np.asarray(spec.subject.colour, np.float32) * layout_rng.uniform(0.9, 1.1, 3).astype(
      np.float32)
  # Light from above in leaf coordinates plus a darker rim: the blade looks curved.
  rim = _clip01(1.0 + blade / 0.08)
  shade = (1.0 + 0.12 * np.minimum(np.maximum(v, -1.0), 1.0) + 0.05 * u) * (1.0 - 0.18 * rim)
  colour = base * shade[..., None]
  main, side = _leaf_vein_distance(shape, u, v)
  vein_colour = np.minimum(base * 1.3 + 0.06, 1.0)
  colour = _mix(colour, vein_colour, 0.75 * _coverage(main - 0.018, px))
  colour = _mix(colour, vein_colour, 0.35 * _coverage(side - 0.008, px))

  inside = lambda pu, pv: _leaf_outline(shape, pu, pv) < -0.04
  box = (-0.85, 0.85, -shape.width, shape.width)
  if cond.pattern == "small_spots":
    centres = _points_inside(pattern_rng, int(pattern_rng.integers(10, 22)), box, inside)
    radii = pattern_rng.uniform(0.035, 0.055, len(centres)).astype(np.float32)
    _paint_discs(colour, canvas, centres, radii, cond.colour)
  elif cond.pattern == "pustules":
    centres = _points_inside(pattern_rng, int(pattern_rng.integers(18, 34)), box, inside)
    radii = pattern_rng.uniform(0.025, 0.04, len(centres)).astype(np.float32)
    _paint_discs(colour, canvas, centres, radii, cond.colour)
  elif cond.pattern == "halo_lesions":
    lesion_scale = min(1.0, shape.width / 0.4)
    centres = _points_inside(pattern_rng, int(pattern_rng.integers(3, 7)), box, inside)
    radii = (pattern_rng.uniform(0.08, 0.13, len(centres)) * lesion_scale).astype(np.float32)
    _paint_discs(colour, canvas, centres, radii * 1.7, (0.86, 0.80, 0.22), opacity=0.85)
    _paint_discs(colour, canvas, centres, radii, cond.colour)
    _paint_discs(colour, canvas, centres, radii * 0.6, (0.45, 0.30, 0.14))
    _paint_discs(colour, canvas, centres, radii * 0.3, cond.colour)
  elif cond.pattern == "interveinal_chlorosis":
    between = _clip01((side - 0.012) / (0.3 * shape.vein_period))
    between = between * _clip01((main - 0.02) / 0.05)
    mottle = canvas.noise(pattern_rng, (6, 6))
    strength = float(pattern_rng.uniform(0.7, 0.95))
    colour = _mix(colour, cond.colour, strength * between * (0.5 + 0.5 * mottle))
  elif cond.pattern == "powdery":
    blotches = canvas.noise(pattern_rng, (5, 5))
    threshold = _share_threshold(blotches, alpha, float(pattern_rng.uniform(0.2, 0.45)))
    patches = _clip01((blotches - threshold) / 0.08)
    grain = canvas.grain(pattern_rng)
    colour = _mix(colour, cond.colour, patches * (0.55 + 0.4 * grain))
  elif cond.pattern == "curl":
    # The rolled band shows the paler underside, with a dark crease where the margin folds over.
    depth = 0.3 * min(shape.width, 0.4)
    band = _coverage(-blade - 0.5 * depth, px)  # within half the curl depth of the new outline
    colour = _mix(colour, cond.colour, 0.8 * band)
    crease = _coverage(np.abs(blade + 0.5 * depth) - 0.6 * px, px)
    colour = _mix(colour, (0.12, 0.22, 0.08), 0.6 * crease)
  elif cond.pattern != "none":
    raise ValueError(f"crop condition {cond.name!r} has unknown pattern {cond.pattern!r}")
  return alpha, colour


# ------------------------------------------------------------------------------------------------
# Fish.
# ------------------------------------------------------------------------------------------------


def _fish_half_height(shape: FishShape, u: FloatArray) -> FloatArray:
  t = _clip01((u + 1.0) * 0.5)
  a, b = shape.tail_exponent, shape.head_exponent
  peak = (a / (a + b)) ** a * (b / (a + b)) ** b
  return shape.depth * (0.82 * t ** a * (1 - t) ** b / peak + 0.18 * (1 - t) ** 2)


def _fish_parts(shape: FishShape, u: FloatArray, v: FloatArray) -> dict[str, FloatArray]:
  """Signed distances of body, fins (tail, dorsal, anal) and barbels, in local units."""
  h = _fish_half_height(shape, u)
  body = np.maximum(np.abs(v) - h, np.abs(u) - 1.0)
  # Tail: a fan from the peduncle; forked tails lose a wedge, rounded ones shrink at the tips.
  s = _clip01((-0.97 - u) / shape.tail_length)
  peduncle = 0.18 * shape.depth
  if shape.tail == "rounded":
    spread = peduncle + shape.tail_spread * np.sqrt(s) * (1.0 - s ** 6)
  else:
    spread = peduncle + shape.tail_spread * s
  tail = np.maximum.reduce([np.abs(v) - spread, -0.97 - shape.tail_length - u, u + 0.9])
  if shape.tail == "forked":
    tail = np.maximum(tail, 0.8 * shape.tail_spread * (s - 0.45) - np.abs(v))
  top = _fish_half_height(shape, np.float32(0.0))
  dorsal_t = _clip01((u + 0.45) / 0.75)
  dorsal_height = h + 0.45 * top * np.sqrt(dorsal_t) * (1.0 - dorsal_t)
  dorsal = np.maximum.reduce([v - dorsal_height, 0.5 * h - v, -0.45 - u, u - 0.3])
  anal_t = _clip01((u + 0.8) / 0.4)
  anal = np.maximum.reduce([-v - (h + 0.3 * top * np.sqrt(anal_t) * (1 - anal_t)), v + 0.5 * h,
                            -0.8 - u, u + 0.4])
  parts = {"body": body, "fins": np.minimum.reduce([tail, dorsal, anal])}
  if shape.barbels:
    parts["barbels"] = np.minimum(_capsule(u, v, (0.92, -0.02), (1.22, -0.2), 0.012),
                                  _capsule(u, v, (0.92, 0.02), (1.2, 0.12), 0.012))
  return parts


def _render_fish(spec: SampleSpec, canvas: _Canvas, layout_rng: np.random.Generator,
                 pattern_rng: np.random.Generator) -> tuple[FloatArray, FloatArray]:
  shape: FishShape = spec.subject.shape
  u, v, px = canvas.u, canvas.v, canvas.pixel
  h = _fish_half_height(shape, u)
  top = _fish_half_height(shape, np.float32(0.0))
  parts = _fish_parts(shape, u, v)
  body_alpha = _coverage(parts["body"], px)
  fin_alpha = _coverage(parts["fins"], px)
  pectoral = _ellipse(u, v, (0.4, -0.3 * top), (0.16, 0.05), tilt=0.35)
  alpha = np.maximum(body_alpha, fin_alpha)
  if "barbels" in parts:
    alpha = np.maximum(alpha, _coverage(parts["barbels"], px))

  tone = layout_rng.uniform(0.9, 1.1, 3).astype(np.float32)
  mid = np.asarray(spec.subject.colour, np.float32) * tone
  back, belly = mid * 0.62, mid * 0.45 + 0.5
  upper = _clip01(0.5 + 0.5 * v / np.maximum(h, 1e-3))[..., None]  # countershading
  colour = belly + (back - belly) * upper ** 1.3
  cond = spec.condition
  fin_rgb = cond.colour if cond.pattern == "fin_colour" else tuple(
      np.asarray(spec.subject.fin_colour) * tone)
  # Fins sit behind the body; they are a little translucent, hence the blend with the body colour.
  fin_only = fin_alpha * (1.0 - body_alpha)
  colour = _mix(colour, fin_rgb, 0.9 * fin_only)
  colour = _mix(colour, fin_rgb, 0.8 * _coverage(pectoral, px) * body_alpha)

  inside = lambda pu, pv: (np.abs(pv) < 0.75 * _fish_half_height(shape, pu))
  if cond.pattern == "bars":
    period = float(pattern_rng.uniform(0.17, 0.22))
    q = (u + float(pattern_rng.uniform(0, period))) / period
    bar = _coverage(np.abs(q - np.round(q)) * period - 0.022, px)
    on_trunk = _clip01((0.45 - u) / 0.1) * (u > -1.0)
    colour = _mix(colour, cond.colour, 0.85 * bar * on_trunk * body_alpha)
  elif cond.pattern == "lateral_stripe":
    stripe = _coverage(np.abs(v + 0.05 * h) - 0.15 * top, px) * (u < 0.6)
    colour = _mix(colour, cond.colour, 0.85 * stripe * body_alpha)
  elif cond.pattern == "small_spots":
    count = int(pattern_rng.integers(14, 28))
    centres = _points_inside(pattern_rng, count, (-0.9, 0.55, -0.1, shape.depth), inside)
    radii = pattern_rng.uniform(0.03, 0.042, len(centres)).astype(np.float32)
    _paint_discs(colour, canvas, centres, radii, cond.colour)
  elif cond.pattern == "eyespot":
    centre = np.array([[-0.78, 0.25 * float(_fish_half_height(shape, np.float32(-0.78)))]],
                      np.float32)
    radius = np.array([0.06 + 0.1 * shape.depth], np.float32)
    _paint_discs(colour, canvas, centre, radius * 1.5, (0.95, 0.5, 0.1))
    _paint_discs(colour, canvas, centre, radius, cond.colour)
  elif cond.pattern not in ("none", "fin_colour"):
    raise ValueError(f"fish condition {cond.name!r} has unknown pattern {cond.pattern!r}")

  # Eye and gill cover are drawn last: no marking covers them.
  gill = np.abs(u - 0.58 - 0.12 * (v / np.maximum(h, 1e-3)) ** 2) - 0.012
  colour = _mix(colour, back * 0.7, 0.7 * _coverage(gill, px) * body_alpha)
  eye_centre = np.array([[0.76, 0.22 * shape.depth]], np.float32)
  _paint_discs(colour, canvas, eye_centre, np.array([0.055], np.float32), (0.85, 0.8, 0.6))
  _paint_discs(colour, canvas, eye_centre, np.array([0.034], np.float32), (0.03, 0.03, 0.03))
  return alpha, colour


# ------------------------------------------------------------------------------------------------
# Livestock.
# ------------------------------------------------------------------------------------------------


def _animal_parts(shape: AnimalShape, u: FloatArray, v: FloatArray) -> dict[str, FloatArray]:
  """Signed distances of the body parts, in local units (body centred at the origin)."""
  a, b = shape.body
  body = _ellipse(u, v, (0.0, 0.0), (a, b))
  if shape.wool:
    body = body + shape.wool * np.sin(14.0 * np.arctan2(v, u))
  hip = -0.55 * b
  foot = hip - shape.leg_length - 0.45 * b
  legs_near = np.minimum(_capsule(u, v, (0.55 * a, hip), (0.57 * a, foot), shape.leg_radius),
                         _capsule(u, v, (-0.62 * a, hip), (-0.6 * a, foot), shape.leg_radius))
  legs_far = np.minimum(
      _capsule(u, v, (0.42 * a, hip), (0.4 * a, foot + 0.02), shape.leg_radius * 0.9),
      _capsule(u, v, (-0.48 * a, hip), (-0.5 * a, foot + 0.02), shape.leg_radius * 0.9))
  neck_base = (0.78 * a, 0.35 * b)
  neck_end = (neck_base[0] + shape.neck[0], neck_base[1] + shape.neck[1])
  neck = _capsule(u, v, neck_base, neck_end, shape.neck[2])
  head_axes, tilt = shape.head[:2], shape.head[2]
  head_centre = (neck_end[0] + head_axes[0] * 0.7 * math.cos(tilt),
                 neck_end[1] + head_axes[0] * 0.7 * math.sin(tilt))
  head = _ellipse(u, v, head_centre, head_axes, tilt)
  rump = (-0.92 * a, 0.45 * b)
  tail = _capsule(u, v, rump, (rump[0] - shape.tail[0], rump[1] + shape.tail[1]), shape.tail[2])
  extras = [_ellipse(u, v, (neck_end[0] - 0.02, neck_end[1] + 0.1), (0.035, shape.ears), -0.3)]
  if shape.horns:
    extras.append(_capsule(u, v, (neck_end[0] + 0.02, neck_end[1] + 0.08),
                           (neck_end[0] - 0.4 * shape.horns, neck_end[1] + 0.08 + shape.horns),
                           0.018))
  if shape.beard:
    chin = (head_centre[0] + 0.05, head_centre[1] - head_axes[1])
    extras.append(_capsule(u, v, chin, (chin[0] - 0.02, chin[1] - 0.1), 0.02))
  if shape.snout:
    tip = (head_centre[0] + head_axes[0] * math.cos(tilt), head_centre[1]
           + head_axes[0] * math.sin(tilt))
    extras.append(_ellipse(u, v, tip, (0.025, shape.snout)))
  parts = {"body": np.minimum(body, neck), "head": head, "legs_near": legs_near,
           "legs_far": legs_far, "tail": tail, "extras": np.minimum.reduce(extras)}
  if shape.mane:
    parts["mane"] = _capsule(u, v, (neck_base[0] - 0.02, neck_base[1] + 0.14),
                             (neck_end[0] - 0.03, neck_end[1] + 0.05), 0.045)
  return parts


def _render_livestock(spec: SampleSpec, canvas: _Canvas, layout_rng: np.random.Generator,
                      pattern_rng: np.random.Generator) -> tuple[FloatArray, FloatArray]:
  shape: AnimalShape = spec.subject.shape
  u, v, px = canvas.u, canvas.v, canvas.pixel
  parts = _animal_parts(shape, u, v)
  cover = {k: _coverage(d, px) for k, d in parts.items()}
  alpha = np.maximum.reduce(list(cover.values()))

  cond = spec.condition
  coat = np.asarray(cond.colour, np.float32) * layout_rng.uniform(0.92, 1.08, 3).astype(np.float32)
  colour = np.broadcast_to(coat, u.shape + (3,)).copy()
  a, b = shape.body
  white = (0.92, 0.9, 0.85)
  if cond.pattern == "patches":
    blotches = canvas.noise(pattern_rng, (5, 5))
    threshold = _share_threshold(blotches, cover["body"], float(pattern_rng.uniform(0.3, 0.55)))
    colour = _mix(colour, white, _clip01((blotches - threshold) / 0.04))
  elif cond.pattern == "white_face":
    colour = _mix(colour, white, cover["head"])
  elif cond.pattern == "belt":
    centre = float(pattern_rng.uniform(-0.1, 0.1)) * a
    belt = _coverage(np.abs(u - centre) - 0.22 * a, px) * (v > -0.8 * b)
    colour = _mix(colour, white, belt * (1.0 - cover["head"]))
  elif cond.pattern == "spots":
    box = (-a, a, -b, b)
    inside = lambda pu, pv: _ellipse(pu, pv, (0.0, 0.0), (a, b)) < -0.03
    centres = _points_inside(pattern_rng, int(pattern_rng.integers(14, 26)), box, inside)
    radii = pattern_rng.uniform(0.03, 0.045, len(centres)).astype(np.float32)
    _paint_discs(colour, canvas, centres, radii, (0.12, 0.1, 0.09))
  elif cond.pattern == "roan":
    flecks = canvas.grain(pattern_rng)
    colour = _mix(colour, white, 0.6 * (flecks > 0.85))
  elif cond.pattern != "solid":
    raise ValueError(f"livestock condition {cond.name!r} has unknown pattern {cond.pattern!r}")

  # Far legs in shadow, hooves / nose / horns in the subject's dark colour, light from above.
  dark = np.asarray(spec.subject.colour, np.float32)
  colour = colour * (1.0 - 0.35 * cover["legs_far"] * (1 - cover["body"]))[..., None]
  hooves = cover["legs_near"] * (v < -0.55 * b - shape.leg_length - 0.45 * b + 0.06)
  colour = _mix(colour, dark, np.maximum(cover["extras"] * 0.9, hooves))
  if "mane" in cover:
    colour = _mix(colour, coat * 0.45, cover["mane"])
  colour = colour * (0.88 + 0.2 * _clip01(v / (2 * b) + 0.5))[..., None]
  return alpha, colour


# ------------------------------------------------------------------------------------------------
# Backgrounds, lighting, the public entry points.
# ------------------------------------------------------------------------------------------------


def _background(kind: str, size: int, rng: np.random.Generator) -> FloatArray:
  x, y = _frame_grid(size)
  jitter = lambda rgb: np.asarray(rgb, np.float32) * rng.uniform(0.85, 1.15, 3).astype(np.float32)
  if kind == "plain":
    tone = jitter(rng.uniform(0.7, 0.95) * np.ones(3))
    vignette = 1.0 - 0.12 * (x * x + y * y)
    return tone * vignette[..., None]
  if kind == "gradient":
    top, bottom = jitter(rng.uniform(0.3, 0.9, 3)), jitter(rng.uniform(0.2, 0.8, 3))
    t = (0.5 + 0.5 * y)[..., None]
    return bottom + (top - bottom) * t
  if kind in ("soil", "sand", "grass"):
    base = {"soil": (0.42, 0.3, 0.2), "sand": (0.82, 0.72, 0.5), "grass": (0.3, 0.5, 0.2)}[kind]
    cells = (16, 3) if kind == "grass" else (6, 6)  # grass: vertical streaks
    texture = _smooth_noise(rng, size, cells) - 0.5
    grain = rng.random((size, size), dtype=np.float32) - 0.5
    return jitter(base) * (1.0 + 0.35 * texture + 0.15 * grain)[..., None]
  if kind == "water":
    deep, shallow = jitter((0.1, 0.3, 0.5)), jitter((0.35, 0.6, 0.75))
    ripples = _smooth_noise(rng, size, (4, 8)) - 0.5
    t = (0.5 + 0.5 * y + 0.3 * ripples)[..., None]
    return deep + (shallow - deep) * t
  if kind == "pasture":
    horizon = float(rng.uniform(-0.3, 0.2))
    sky, grass = jitter((0.6, 0.75, 0.92)), jitter((0.32, 0.52, 0.22))
    texture = _smooth_noise(rng, size, (12, 6)) - 0.5
    is_sky = _clip01((y - horizon) * size)  # one-pixel soft horizon
    ground = grass * (1.0 + 0.3 * texture * (1.0 - is_sky))[..., None]
    return _mix(ground, sky, is_sky)
  if kind == "tiles":
    period, rot = float(rng.uniform(0.3, 0.6)), float(rng.uniform(0, np.pi))
    xr, yr = math.cos(rot) * x + math.sin(rot) * y, -math.sin(rot) * x + math.cos(rot) * y
    checker = ((np.floor(xr / period) + np.floor(yr / period)) % 2)[..., None]
    first, second = jitter(rng.uniform(0.2, 0.9, 3)), jitter(rng.uniform(0.2, 0.9, 3))
    return first + (second - first) * checker
  if kind == "dark":
    texture = _smooth_noise(rng, size, (8, 8))
    return jitter((0.2, 0.2, 0.24)) * (0.6 + 0.8 * texture)[..., None]
  raise ValueError(f"unknown background kind {kind!r}")


_SUBJECT_RENDERERS = {"crop": _render_leaf, "fish": _render_fish, "livestock": _render_livestock}


def _silhouette(subject: Subject, u: FloatArray, v: FloatArray) -> FloatArray:
  """Signed distance to everything a subject can cover (conditions only ever shrink it)."""
  shape = subject.shape
  if isinstance(shape, LeafShape):
    blade = _leaf_outline(shape, u, v)
    return np.minimum(blade, _leaf_stalk(shape, u, v)) if shape.petiole else blade
  parts = _fish_parts(shape, u, v) if isinstance(shape, FishShape) else _animal_parts(shape, u, v)
  return np.minimum.reduce(list(parts.values()))


@functools.lru_cache(maxsize=None)
def _local_extent(subject: Subject) -> tuple[float, float, float, float]:
  """(u0, u1, v0, v1): a box in local units holding the whole subject, found once per subject."""
  step = 0.01
  grid = np.arange(-2.5, 2.5 + step, step, dtype=np.float32)
  u, v = np.meshgrid(grid, grid)
  inside = _silhouette(subject, u, v) < step
  if not inside.any() or inside[[0, -1]].any() or inside[:, [0, -1]].any():
    raise ValueError(f"subject {subject.name!r} does not fit in the local box [-2.5, 2.5]^2")
  us, vs = u[inside], v[inside]
  margin = 2 * step
  return (float(us.min()) - margin, float(us.max()) + margin, float(vs.min()) - margin,
          float(vs.max()) + margin)


def _subject_window(subject: Subject, pose: Pose, size: int) -> tuple[slice, slice]:
  """The frame's rows and columns that can hold the subject, plus two pixels for edge blending."""
  u0, u1, v0, v1 = _local_extent(subject)
  cols, rows = pose.to_pixels(np.array([u0, u0, u1, u1]), np.array([v0, v1, v0, v1]), size)
  r0, r1 = max(int(rows.min()) - 2, 0), min(int(math.ceil(rows.max())) + 2, size)
  c0, c1 = max(int(cols.min()) - 2, 0), min(int(math.ceil(cols.max())) + 2, size)
  return slice(r0, max(r1, r0 + 1)), slice(c0, max(c1, c0 + 1))


def _sample_pose(domain: str, style: RenderStyle, rng: np.random.Generator) -> Pose:
  scale = rng.uniform(*style.scale)
  if domain == "crop":  # leaves lie at any angle; the shape spans u in [-1.25, 1]
    angle, centre = rng.uniform(-np.pi, np.pi), (0.0, 0.0)
    scale *= 0.92
  elif domain == "fish":  # mostly level; the shape spans u in [-1.5, 1]
    angle = rng.normal(0.0, 0.2)
    scale *= 0.9
    centre = (0.22 * scale, 0.0)
  else:  # upright animals; the shape spans about u in [-0.9, 1.2], v in [-1.05, 0.7]
    angle = rng.normal(0.0, 0.06)
    scale *= 1.1
    centre = (-0.15 * scale, 0.18 * scale)
  flip = bool(rng.integers(2))
  if flip:
    centre = (-centre[0], centre[1])
  shift = rng.uniform(-0.08, 0.08, 2)
  return Pose((float(centre[0] + shift[0]), float(centre[1] + shift[1])), float(angle),
              float(scale), flip)


def render_layers(spec: SampleSpec, size: int, rng: np.random.Generator,
                  full_frame: bool = False) -> Rendering:
  """Renders `spec` and also returns the subject's coverage (for tests and masks).

  The subject is computed only in the window that can hold it (about a third of the frame);
  `full_frame=True` computes it everywhere instead, which gives the same pixels, only slower.
  """
  if size < 16:
    raise ValueError(f"image size must be at least 16 pixels, got {size}")
  # Separate streams: the layout (pose, background, light, noise) does not depend on the condition.
  layout_rng, pattern_rng = (np.random.default_rng(s) for s in rng.integers(0, 2 ** 63, size=2))
  domain = spec.subject.domain
  pose = _sample_pose(domain, spec.style, layout_rng)
  background = _background(str(layout_rng.choice(spec.style.backgrounds[domain])), size,
                           layout_rng)
  x, y = _frame_grid(size)
  window = ((slice(0, size), slice(0, size)) if full_frame
            else _subject_window(spec.subject, pose, size))
  u, v = pose.local_coords(x[window], y[window])
  canvas = _Canvas(size, pose, window, u, v, pixel=2.0 / (size * pose.scale))
  window_alpha, colour = _SUBJECT_RENDERERS[domain](spec, canvas, layout_rng, pattern_rng)
  alpha = np.zeros((size, size), np.float32)
  alpha[window] = window_alpha

  # A soft contact shadow, then the subject over the background.
  shadow = np.roll(alpha, (max(1, size // 40), max(1, size // 48)), axis=(0, 1))
  image = background * (1.0 - 0.3 * shadow)[..., None]
  image[window] += (colour - image[window]) * window_alpha[..., None]

  style = spec.style
  brightness = float(layout_rng.uniform(*style.brightness))
  tint = 1.0 + layout_rng.uniform(-style.tint, style.tint, 3).astype(np.float32)
  direction = float(layout_rng.uniform(0, 2 * np.pi))
  gradient = float(layout_rng.uniform(0, style.light_gradient))
  # Lighting, the 0..255 range and the rounding offset folded into few full-frame passes.
  light = (255.0 * brightness) * (1.0 + gradient * (math.cos(direction) * x
                                                     + math.sin(direction) * y))
  image = image * light[..., None] * tint
  # Luminance-only sensor noise: a third of the draws of per-channel noise, for the same look.
  noise = layout_rng.standard_normal((size, size, 1), dtype=np.float32)
  image += noise * (255.0 * style.noise_std) + 0.5
  pixels = np.minimum(np.maximum(image, 0.0), 255.0).astype(np.uint8)
  return Rendering(pixels, alpha)


def render(spec: SampleSpec, size: int, rng: np.random.Generator) -> np.ndarray:
  """Renders one image, uint8 [size, size, 3]; the same spec and rng state give the same bytes."""
  return render_layers(spec, size, rng).image


# ================================================================================================
# Datasets: pretraining classes, downstream tasks, captions, writers.
# ================================================================================================


@dataclasses.dataclass(frozen=True)
class ClassSpec:
  """One class folder: a subject with one or several conditions (drawn per image)."""
  name: str  # folder name
  readable: str
  subject: Subject
  conditions: tuple[Condition, ...]
  attributes: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """A pretraining dataset (an ALive member) or the class list of a downstream task."""
  name: str
  domain: Domain
  task: str  # "disease", "variety", "breed", "species"
  template: str  # zero-shot prompt with one "{}" for the class's readable name
  classes: tuple[ClassSpec, ...]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """A downstream zero-shot task written to disk as an ImageFolder."""
  name: str
  kind: Literal["heldout_images", "heldout_combinations", "style_shift"]
  domain: Domain
  path: Path
  template: str
  class_folders: tuple[str, ...]  # sorted, so index i is ImageFolder's label i
  class_names: tuple[str, ...]  # readable names in the same order
  num_images: int

  @property
  def num_classes(self) -> int:
    return len(self.class_folders)


@functools.lru_cache(maxsize=None)
def held_out_pairs(domain: str) -> tuple[tuple[Subject, Condition], ...]:
  """Subject x condition pairs that pretraining never shows.

  Subject i loses conditions 2i and 2i+1 of the marked conditions (cyclically), so each held-out
  subject and each held-out condition appears in two held-out pairs: a classifier over them needs
  both the subject and the condition, and every part is still seen in pretraining with others.
  """
  subjects = SUBJECTS[_check_domain(domain)]
  marked = [c for c in CONDITIONS[domain] if c.pattern != "none"]
  return tuple((s, marked[(2 * i + k) % len(marked)]) for i, s in enumerate(subjects)
               for k in range(2))


def _is_held_out(s: Subject, c: Condition) -> bool:
  return any(s == hs and c == hc for hs, hc in held_out_pairs(s.domain))


def _pair_readable(s: Subject, c: Condition) -> str:
  # A held-out pair is always described by its parts: pretraining never shows its breed name.
  if s.domain == "livestock" and not _is_held_out(s, c):
    breed = BREED_NAMES.get((s.name, c.name))
    return f"{breed} {s.readable}" if breed else f"{s.readable} with {c.readable}"
  if c.pattern == "none":
    return f"healthy {s.readable}" if s.domain == "crop" else f"{s.readable} with {c.readable}"
  return f"{s.readable} with {c.readable}"


def _per_subject_dataset(s: Subject) -> DatasetSpec:
  """The disease / variety / breed dataset of one subject, without its held-out pairs."""
  conditions = [c for c in CONDITIONS[s.domain] if not _is_held_out(s, c)]
  if s.domain == "crop":
    name, task = f"{s.name}_leaf_disease", "disease"
    template = f"a photo of a {s.readable} with {{}}"
    classes = [ClassSpec(c.name, c.readable, s, (c,), s.attributes + c.attributes)
               for c in conditions]
  elif s.domain == "fish":
    name, task = f"{s.name}_variety", "variety"
    template = f"a photo of a {s.readable} with {{}}"
    classes = [ClassSpec(c.name, c.readable, s, (c,), s.attributes + c.attributes)
               for c in conditions]
  else:
    name, task, template = f"{s.name}_breeds", "breed", "a photo of a {}"
    classes = [ClassSpec(c.name, _pair_readable(s, c), s, (c,), s.attributes + c.attributes)
               for c in conditions]
  return DatasetSpec(name, s.domain, task, template, tuple(classes))


def _species_dataset(domain: Domain) -> DatasetSpec:
  """Which subject is it; each image gets one of the subject's pretraining conditions."""
  classes = [ClassSpec(s.name, s.readable, s,
                       tuple(c for c in CONDITIONS[domain] if not _is_held_out(s, c)),
                       s.attributes) for s in SUBJECTS[domain]]
  return DatasetSpec(f"{domain}_species", domain, "species", "a photo of a {}", tuple(classes))


def pretraining_datasets() -> list[DatasetSpec]:
  """The ALive-synth members: per subject (disease / variety / breed) and per domain (species)."""
  datasets = []
  for domain in DOMAINS:
    datasets.extend(_per_subject_dataset(s) for s in SUBJECTS[domain])
    datasets.append(_species_dataset(domain))
  return datasets


def _held_out_pairs_dataset(domain: Domain) -> DatasetSpec:
  classes = [ClassSpec(f"{s.name}_{c.name}", _pair_readable(s, c), s, (c,),
                       s.attributes + c.attributes) for s, c in held_out_pairs(domain)]
  return DatasetSpec(f"{domain}_unseen_pairs", domain, "species and condition", "a photo of a {}",
                     tuple(classes))


def downstream_task_plan() -> list[tuple[str, DatasetSpec, RenderStyle]]:
  """(kind, classes, style) of each downstream task, in a fixed order."""
  by_name = {d.name: d for d in pretraining_datasets()}
  plan: list[tuple[str, DatasetSpec, RenderStyle]] = []
  for name in ("bean_leaf_disease", "fish_species", "cattle_breeds"):
    plan.append(("heldout_images", by_name[name], PRETRAIN_STYLE))
  for domain in DOMAINS:
    plan.append(("heldout_combinations", _held_out_pairs_dataset(domain), PRETRAIN_STYLE))
  for name in ("coffee_leaf_disease", "trout_variety", "livestock_species"):
    plan.append(("style_shift", by_name[name], SHIFTED_STYLE))
  return plan


def _task_name(kind: str, dataset: DatasetSpec) -> str:
  if kind == "heldout_combinations":  # the dataset is already named after its unseen pairs
    return dataset.name
  return f"{dataset.name}_{'heldout' if kind == 'heldout_images' else kind}"


def captions(dataset: DatasetSpec, cls: ClassSpec, cond: Condition) -> list[str]:
  """A few ALive-style caption variants for one image (templates + attributes)."""
  s = cls.subject
  pair = _pair_readable(s, cond)
  looks = " and ".join(s.attributes[:1] + cond.attributes)
  variants = [f"a photo of a {pair}.",
              f"a photo of a {pair}, characterized by {looks}.",
              f"{pair}: {', '.join(cond.attributes + s.attributes)}.",
              f"an image from the {dataset.name.replace('_', ' ')} dataset showing a {pair}."]
  if dataset.task == "species":
    variants.append(f"a {dataset.domain} photo of a {s.readable}.")
  else:
    variants.append(dataset.template.format(cls.readable) + ".")
  return variants


def _metadata_entry(dataset: DatasetSpec) -> dict:
  return {"name": dataset.name, "domain": dataset.domain, "task": dataset.task,
          "template": dataset.template,
          "classes": [{"name": c.name, "readable": c.readable, "attributes": list(c.attributes),
                       "subject": c.subject.name,
                       "conditions": [cond.name for cond in c.conditions]}
                      for c in dataset.classes]}


def _save_image(pixels: np.ndarray, path: Path) -> None:
  # PNG keeps one-pixel spots and bars intact; compress_level 1 keeps writing cheap.
  Image.fromarray(pixels).save(path, format="PNG", compress_level=1)


def _image_rng(seed: int, stream: int, dataset_index: int, class_index: int,
               image_index: int) -> np.random.Generator:
  """Independent generator per image: pretraining (stream 0) and each task never share one."""
  return np.random.default_rng([seed, stream, dataset_index, class_index, image_index])


def _empty_output_dir(out_dir: str | Path) -> Path:
  """Creates `out_dir`; refuses a non-empty one, whose old images would mix with the new set."""
  root = Path(out_dir)
  if root.exists() and (not root.is_dir() or any(root.iterdir())):
    raise FileExistsError(f"output directory {root} exists and is not empty; choose a new one or "
                          f"remove it first")
  root.mkdir(parents=True, exist_ok=True)
  return root


def write_pretraining_set(out_dir: str | Path, num_images: int = 3000, size: int = 64,
                          seed: int = 0) -> Path:
  """Writes the ALive-synth pretraining set and returns its root directory.

  Images are spread round-robin over every (dataset, class), so each class gets
  num_images // num_classes or one more. Layout: DATASET/CLASS/NNNNN.png, metadata.json,
  manifest.jsonl (image relative path, caption variants, dataset, class, domain, subject,
  condition, attributes).
  """
  datasets = pretraining_datasets()
  slots = [(di, ci) for di, d in enumerate(datasets) for ci in range(len(d.classes))]
  if num_images < len(slots):
    raise ValueError(f"num_images={num_images} is fewer than the {len(slots)} pretraining classes")
  root = _empty_output_dir(out_dir)
  for d in datasets:
    for c in d.classes:
      (root / d.name / c.name).mkdir(parents=True, exist_ok=True)
  lines = []
  for index in range(num_images):
    di, ci = slots[index % len(slots)]
    dataset, cls = datasets[di], datasets[di].classes[ci]
    rng = _image_rng(seed, 0, di, ci, index)
    cond = cls.conditions[int(rng.integers(len(cls.conditions)))]
    pixels = render(SampleSpec(cls.subject, cond, PRETRAIN_STYLE), size, rng)
    rel = f"{dataset.name}/{cls.name}/{index:05d}.png"
    _save_image(pixels, root / rel)
    lines.append(json.dumps({
        "image": rel, "captions": captions(dataset, cls, cond), "dataset": dataset.name,
        "class": cls.name, "domain": dataset.domain, "subject": cls.subject.name,
        "condition": cond.name, "attributes": list(cls.subject.attributes + cond.attributes)}))
  atomic_write_json(root / "metadata.json", {"datasets": [_metadata_entry(d) for d in datasets]})
  atomic_write_text(root / "manifest.jsonl", "\n".join(lines) + "\n")
  return root


def write_downstream_tasks(out_dir: str | Path, size: int = 64, seed: int = 0,
                           images_per_class: int = 20) -> list[TaskSpec]:
  """Writes the zero-shot tasks (one ImageFolder each) and `tasks.json`; returns their specs.

  Disjoint from the pretraining set by construction: other random streams (held-out images),
  subject x condition pairs pretraining never renders (held-out combinations), or backgrounds and
  lighting it never uses (style shift).
  """
  if images_per_class < 1:
    raise ValueError(f"images_per_class must be at least 1, got {images_per_class}")
  root = _empty_output_dir(out_dir)
  specs = []
  for task_index, (kind, dataset, style) in enumerate(downstream_task_plan()):
    name = _task_name(kind, dataset)
    ordered = sorted(dataset.classes, key=lambda c: c.name)
    for ci, cls in enumerate(ordered):
      folder = root / name / cls.name
      folder.mkdir(parents=True, exist_ok=True)
      for index in range(images_per_class):
        rng = _image_rng(seed, 1000 + task_index, 0, ci, index)
        cond = cls.conditions[int(rng.integers(len(cls.conditions)))]
        _save_image(render(SampleSpec(cls.subject, cond, style), size, rng),
                    folder / f"{index:05d}.png")
    specs.append(TaskSpec(name, kind, dataset.domain, root / name, dataset.template,
                          tuple(c.name for c in ordered), tuple(c.readable for c in ordered),
                          images_per_class * len(ordered)))
  atomic_write_json(root / "tasks.json", {"tasks": [
      {"name": t.name, "kind": t.kind, "domain": t.domain, "path": t.name, "template": t.template,
       "classes": list(t.class_names), "class_folders": list(t.class_folders),
       "num_classes": t.num_classes, "num_images": t.num_images} for t in specs]})
  return specs


def load_tasks(tasks_dir: str | Path) -> list[TaskSpec]:
  """Reads the `tasks.json` of `write_downstream_tasks`, checking that each class folder exists."""
  root = Path(tasks_dir)
  listing = root / "tasks.json"
  specs = []
  for i, entry in enumerate(read_json(listing, "task listing")["tasks"]):
    missing = {"name", "kind", "domain", "path", "template", "classes", "class_folders",
               "num_images"} - set(entry)
    if missing:
      raise ValueError(f"{listing}: task {i} lacks keys {sorted(missing)}")
    path = root / entry["path"]
    absent = [f for f in entry["class_folders"] if not (path / f).is_dir()]
    if absent or len(entry["classes"]) != len(entry["class_folders"]):
      raise ValueError(f"{listing}: task {entry['name']!r} has missing class folders {absent} or "
                       f"{len(entry['classes'])} names for {len(entry['class_folders'])} folders")
    specs.append(TaskSpec(entry["name"], entry["kind"], entry["domain"], path, entry["template"],
                          tuple(entry["class_folders"]), tuple(entry["classes"]),
                          int(entry["num_images"])))
  return specs


def render_grid(specs: Sequence[SampleSpec], size: int, seed: int, columns: int = 8) -> np.ndarray:
  """Renders specs side by side (uint8 [rows*size, columns*size, 3]) for eyeballing and reports."""
  rows = -(-len(specs) // columns)
  grid = np.zeros((rows * size, columns * size, 3), np.uint8)
  for i, spec in enumerate(specs):
    r, c = divmod(i, columns)
    grid[r * size:(r + 1) * size, c * size:(c + 1) * size] = render(
        spec, size, np.random.default_rng([seed, i]))
  return grid


# ----------------------------------------------------------------------------------------------
# ALive captions from the metadata
# ----------------------------------------------------------------------------------------------

_DOMAIN_SUBJECT = {"crop": "plant", "fish": "fish", "livestock": "animal"}


def caption_metadata(entry: dict):
  """One ALive-synth dataset (its metadata.json entry) as `prompts.DatasetMetadata`, what the
  demo writes its ALive captions from.

  Leaf disease sets keep prompts' disease phrasing ("a maize leaf with rust"); every other set
  (fish varieties, breeds, species) is phrased as species names over the whole class description
  ("a trout with thin vertical bars", "a holstein cattle"), which keeps each caption grammatical.
  """
  from agriclip_jax import prompts
  domain = entry["domain"]
  classes = []
  if entry["task"] == "disease":
    subject_name = subject(domain, entry["classes"][0]["subject"]).readable
    for cls in entry["classes"]:
      healthy = cls["conditions"] == ["healthy"]
      classes.append({"name": cls["name"], "readable": "healthy" if healthy else cls["readable"],
                      "attributes": cls["attributes"], "healthy": healthy})
    task = "disease"
  else:
    subject_name = _DOMAIN_SUBJECT[domain]
    for cls in entry["classes"]:
      readable = cls["readable"]
      if entry["task"] == "variety":  # class "red fins" of the trout set -> "trout with red fins"
        readable = f"{subject(domain, cls['subject']).readable} with {readable}"
      classes.append({"name": cls["name"], "readable": readable, "attributes": cls["attributes"]})
    task = "species"
  return prompts.parse_metadata({"name": entry["name"], "domain": domain, "task": task,
                                 "subject": subject_name, "classes": classes},
                                f"ALive-synth dataset {entry['name']!r}")
