"""Stage 3 of AgriCLIP: the linear cross-model aligner from DINO features to CLIP image embeddings.

Both encoders are frozen; the aligner is y = x @ W.T + b with W [clip_dim, dino_dim], fitted by
least squares on paired features (x: DINO, y: CLIP image embedding of the same image).

Two ways to fit it:
- `fit_exact`: the exact least-squares solution from streaming normal equations. X^T X, X^T Y, the
  column sums and sum of squares are accumulated in float64 over chunks of any size (so 600k x 2048
  features never sit in memory at once), then solved from the
  centred X^T X (Cholesky; an eigendecomposition gives the minimum-norm solution when features are
  collinear), so a whole grid of ridge strengths costs one small d x d solve each.
- `fit_sgd`: the reference AgriCLIP / Text-to-Concept recipe, kept for faithfulness: both feature
  sets rescaled to variance 4.5, SGD (lr 0.01, momentum 0.9, weight decay 5e-4 on W and b), cosine
  annealing with T_max 200 stepped once per epoch, batch 100, 70 epochs, MSE loss.
  The reference then un-scales with W <- W c1/c2 and b <- b c1/c2. The second is a defect: from
  c2 y ~ W_s (c1 x) + b_s it follows y ~ (c1/c2) W_s x + b_s / c2, so the bias must be divided by c2
  alone. We use the exact inverse; `reproduce_bias_defect=True` gives the reference's numbers.

Metrics (MSE averaged over all entries like torch.nn.MSELoss, and R^2 = 1 - SSE / SST with SST about
the per-column means) are computed on the fitting split and on a held-out split chosen by a hash of the
row index, so the split does not depend on chunking. Note the reference's R^2 divides by the variance
of all entries about one global mean, which is slightly larger than ours.

Files: `.safetensors` and `.npz` hold {"W", "b"} (ours); `.pth` is the reference format, a torch dict
{'W': [out, in], 'b': [out]} of float32 tensors, loaded back with torch.load(weights_only=True).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agriclip_jax.fileio import atomic_file

REFERENCE_TARGET_VARIANCE = 4.5
# Ridge strengths (relative to the mean feature variance) that ridge="auto" sweeps: none, and
# half-decades from 1e-6 to 10.
DEFAULT_RIDGE_GRID = (0.0,) + tuple(float(f"{10.0 ** (k / 2):.3g}") for k in range(-12, 3))
ALIGNER_SUFFIXES = (".pth", ".pt", ".safetensors", ".npz")


# ----------------------------------------------------------------------------------------------
# The aligner and its files
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LinearAligner:
  """y = x @ weight.T + bias; weight [out_dim, in_dim] (torch Linear layout), bias [out_dim]."""
  weight: np.ndarray
  bias: np.ndarray

  def __post_init__(self):
    if self.weight.ndim != 2 or self.bias.shape != (self.weight.shape[0],):
      raise ValueError(f"aligner needs weight [out, in] and bias [out]; got weight "
                       f"{self.weight.shape} and bias {self.bias.shape}")

  @property
  def in_dim(self) -> int:
    return int(self.weight.shape[1])

  @property
  def out_dim(self) -> int:
    return int(self.weight.shape[0])

  def apply(self, features):
    """Works on numpy and jax arrays alike: features [..., in_dim] -> [..., out_dim]."""
    if features.shape[-1] != self.in_dim:
      raise ValueError(f"aligner expects features of width {self.in_dim}, got {features.shape} "
                       "(fitted on another DINO model or pooling? see --dino-pooling)")
    return features @ self.weight.T.astype(features.dtype) + self.bias.astype(features.dtype)


def save_aligner(aligner: LinearAligner, path: str | os.PathLike,
                 metadata: dict[str, Any] | None = None) -> Path:
  """Writes `.pth` (reference format), `.safetensors` or `.npz`; written to a temp name, then renamed."""
  path = Path(path)
  suffix = path.suffix.lower()
  if suffix not in ALIGNER_SUFFIXES:
    raise ValueError(f"aligner file {path}: unknown suffix {suffix!r}; use one of {ALIGNER_SUFFIXES}")
  # Own, writable copies: torch.from_numpy warns on read-only arrays (e.g. from jax.device_get).
  weight = np.array(aligner.weight, dtype=np.float32, order="C")
  bias = np.array(aligner.bias, dtype=np.float32, order="C")

  def write(tmp: Path) -> None:
    if suffix in (".pth", ".pt"):
      import torch
      torch.save({"W": torch.from_numpy(weight), "b": torch.from_numpy(bias)}, tmp)
    elif suffix == ".safetensors":
      from safetensors.numpy import save_file
      meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
      save_file({"W": weight, "b": bias}, str(tmp), metadata=meta)
    else:
      with open(tmp, "wb") as f:  # np.savez appends .npz to bare names; a file object avoids that
        np.savez(f, W=weight, b=bias)

  return atomic_file(path, write)


def read_aligner_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """What a .safetensors aligner records (method, metrics and, when fitted from models, the DINO
  pooling and the fingerprints of the DINO and CLIP models); {} for .pth / .npz, which hold none."""
  path = Path(path)
  if path.suffix.lower() != ".safetensors":
    return {}
  from safetensors import safe_open
  with safe_open(str(path), framework="np") as handle:
    raw = handle.metadata() or {}
  try:
    return {key: json.loads(value) for key, value in raw.items()}
  except json.JSONDecodeError as e:
    raise ValueError(f"aligner file {path}: metadata is not JSON ({e})") from None


def resolve_pooling(recorded: Mapping[str, Any], flag: str | None, aligner: str | os.PathLike
                    ) -> str | None:
  """The DINO pooling zero-shot must use: the one the aligner records; a flag that disagrees is an
  error naming both. An aligner that records none (.pth, .npz, features fitted from arrays)
  leaves it to the flag (None: the DINO model's own)."""
  fitted = recorded.get("dino_pooling")
  if fitted is not None and flag is not None and flag != fitted:
    raise ValueError(f"aligner {aligner} was fitted on DINO pooling {fitted!r}, but --dino-pooling "
                     f"is {flag!r}; drop the flag (the aligner's pooling is used) or refit")
  return fitted if fitted is not None else flag


def check_provenance(recorded: Mapping[str, Any], aligner: str | os.PathLike,
                     models: Mapping[str, tuple[str, str | None]]) -> None:
  """Errors when a model differs from the one the aligner was fitted with.

  `models`: {"dino": (path, fingerprint), "clip": (...)} of the models zero-shot uses, compared
  with the aligner's `dino_fingerprint` / `clip_fingerprint` (model_io.content_fingerprint).
  Widths alone cannot tell two DINO models or two poolings of the same width apart; these can.
  """
  for role, (path, fingerprint) in models.items():
    fitted = recorded.get(f"{role}_fingerprint")
    if fitted is not None and fingerprint is not None and fitted != fingerprint:
      raise ValueError(f"aligner {aligner} was fitted on the {role.upper()} model "
                       f"{recorded.get(f'{role}_model', '?')} (fingerprint {fitted}), but the "
                       f"{role.upper()} model given is {path} (fingerprint {fingerprint}); "
                       f"use the same model or refit the aligner")


def load_aligner(path: str | os.PathLike) -> LinearAligner:
  """Loads any of the three formats; errors name the file and the key that is wrong."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"aligner file not found: {path}")
  suffix = path.suffix.lower()
  if suffix in (".pth", ".pt"):
    import torch
    try:
      data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with code in it, or not a torch file at all
      raise ValueError(f"aligner file {path}: cannot be loaded safely with "
                       f"torch.load(weights_only=True): {e}") from e
    if not isinstance(data, dict):
      raise ValueError(f"aligner file {path}: expected a dict {{'W', 'b'}}, got {type(data).__name__}")
    arrays = {k: (None if v is None else v.detach().float().numpy()) for k, v in data.items()
              if k in ("W", "b")}
  elif suffix == ".safetensors":
    from safetensors.numpy import load_file
    arrays = load_file(str(path))
  elif suffix == ".npz":
    with np.load(path, allow_pickle=False) as data:
      arrays = {k: data[k] for k in data.files}
  else:
    raise ValueError(f"aligner file {path}: unknown suffix {suffix!r}; use one of {ALIGNER_SUFFIXES}")
  if "W" not in arrays or arrays["W"] is None:
    raise KeyError(f"aligner file {path}: missing key 'W' (found {sorted(arrays)})")
  weight = np.asarray(arrays["W"], dtype=np.float32)
  if weight.ndim != 2:
    raise ValueError(f"aligner file {path}: 'W' must be [out, in], got shape {weight.shape}")
  if "b" not in arrays:
    raise KeyError(f"aligner file {path}: missing key 'b' (found {sorted(arrays)})")
  # The reference code saves b=None for bias-free aligners; that is a zero bias.
  bias = (np.zeros(weight.shape[0], np.float32) if arrays["b"] is None
          else np.asarray(arrays["b"], dtype=np.float32))
  if bias.shape != (weight.shape[0],):
    raise ValueError(f"aligner file {path}: 'b' has shape {bias.shape}, expected ({weight.shape[0]},)"
                     f" to match 'W' {weight.shape}")
  return LinearAligner(weight, bias)


# ----------------------------------------------------------------------------------------------
# Inputs: paired feature chunks and a chunking-independent held-out split
# ----------------------------------------------------------------------------------------------

def check_paired(dino_features: np.ndarray, clip_features: np.ndarray,
                 names: tuple[str, str] = ("DINO features", "CLIP features")) -> None:
  if dino_features.ndim != 2 or clip_features.ndim != 2:
    raise ValueError(f"{names[0]} and {names[1]} must be 2-D [rows, dim]; got shapes "
                     f"{dino_features.shape} and {clip_features.shape}")
  if dino_features.shape[0] != clip_features.shape[0]:
    raise ValueError(f"row counts differ: {names[0]} has {dino_features.shape[0]} rows, "
                     f"{names[1]} has {clip_features.shape[0]}; they must be paired image by image")
  if dino_features.shape[0] == 0:
    raise ValueError(f"{names[0]} and {names[1]} are empty")


def iterate_chunks(dino_features: np.ndarray, clip_features: np.ndarray,
                   chunk_rows: int = 8192) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Paired row chunks; works on np.load(..., mmap_mode='r') arrays without reading them whole."""
  check_paired(dino_features, clip_features)
  if chunk_rows < 1:
    raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
  for start in range(0, dino_features.shape[0], chunk_rows):
    yield (np.asarray(dino_features[start:start + chunk_rows]),
           np.asarray(clip_features[start:start + chunk_rows]))


def _splitmix64(values: np.ndarray) -> np.ndarray:
  """A fixed integer hash (SplitMix64 finaliser): uniform bits from row indices, no RNG state."""
  z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
  with np.errstate(over="ignore"):
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def holdout_mask(row_indices: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
  """True for rows in the held-out split; depends only on (row index, seed), never on chunking."""
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
  hashed = _splitmix64(np.asarray(row_indices, np.uint64) ^ _splitmix64(np.array([seed]))[0])
  uniform = (hashed >> np.uint64(11)).astype(np.float64) / float(1 << 53)
  return uniform < fraction


# ----------------------------------------------------------------------------------------------
# Streaming moments (normal equations) in float64
# ----------------------------------------------------------------------------------------------

class Moments:
  """Running sums for least squares of Y on [X, 1], in float64.

  Sums are taken about a shift (the first chunk's column means) so that features with a large
  common offset (post-ReLU ResNet features are all positive) do not lose digits when the centred
  X^T X is formed at the end.

  on_device=True accumulates with jax on the default device (float64 enabled just for these ops):
  on a GPU the X^T X products then run at its float64 rate instead of the host's.
  """

  def __init__(self, in_dim: int, out_dim: int, on_device: bool = False):
    self.in_dim, self.out_dim = in_dim, out_dim
    self.on_device = on_device
    self.count = 0
    self.shift_x: np.ndarray | None = None
    self.shift_y: np.ndarray | None = None
    self.sum_x: Any = np.zeros(in_dim)
    self.sum_y: Any = np.zeros(out_dim)
    self.xtx: Any = np.zeros((in_dim, in_dim))
    self.xty: Any = np.zeros((in_dim, out_dim))
    self.yty_trace: Any = 0.0
    self._centred = None

  def add(self, x: np.ndarray, y: np.ndarray) -> None:
    if x.shape[0] == 0:
      return
    if x.shape[1] != self.in_dim or y.shape[1] != self.out_dim:
      raise ValueError(f"chunk widths {x.shape[1]} -> {y.shape[1]} do not match the first chunk's "
                       f"{self.in_dim} -> {self.out_dim}")
    self._centred = None
    if self.on_device:
      self._add_on_device(x, y)
      return
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if self.shift_x is None:
      self.shift_x, self.shift_y = x.mean(0), y.mean(0)
    xs, ys = x - self.shift_x, y - self.shift_y
    self.count += x.shape[0]
    self.sum_x += xs.sum(0)
    self.sum_y += ys.sum(0)
    self.xtx += xs.T @ xs
    self.xty += xs.T @ ys
    self.yty_trace += float(np.einsum("ij,ij->", ys, ys))

  def _add_on_device(self, x: np.ndarray, y: np.ndarray) -> None:
    import jax
    import jax.numpy as jnp
    rows = x.shape[0]
    # Held-out masking makes every chunk a different size; padding to power-of-two buckets (with
    # a row mask) keeps the compiled update to a handful of shapes.
    bucket = max(256, 1 << (rows - 1).bit_length())
    valid = np.zeros(bucket, bool)
    valid[:rows] = True
    x = np.pad(np.asarray(x), ((0, bucket - rows), (0, 0)))
    y = np.pad(np.asarray(y), ((0, bucket - rows), (0, 0)))
    with jax.enable_x64(True):
      if self.shift_x is None:
        self.shift_x = np.asarray(x[:rows], np.float64).mean(0)
        self.shift_y = np.asarray(y[:rows], np.float64).mean(0)
        self.sum_x, self.sum_y, self.xtx, self.xty, self.yty_trace = (
            jnp.asarray(v, jnp.float64) for v in (self.sum_x, self.sum_y, self.xtx, self.xty, 0.0))
      sums = (self.sum_x, self.sum_y, self.xtx, self.xty, self.yty_trace)
      sums = _device_moment_update()(sums, jnp.asarray(x), jnp.asarray(y), jnp.asarray(valid),
                                     jnp.asarray(self.shift_x), jnp.asarray(self.shift_y))
      self.sum_x, self.sum_y, self.xtx, self.xty, self.yty_trace = sums
    self.count += rows

  def centred(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """(mean_x, mean_y, Sxx, Sxy, trace Syy) with S the sums of centred products."""
    if self.count == 0:
      raise ValueError("no rows were accumulated")
    if self._centred is None:
      n = self.count
      sum_x, sum_y = np.asarray(self.sum_x, np.float64), np.asarray(self.sum_y, np.float64)
      dx, dy = sum_x / n, sum_y / n
      sxx = np.asarray(self.xtx, np.float64) - n * np.outer(dx, dx)
      sxy = np.asarray(self.xty, np.float64) - n * np.outer(dx, dy)
      syy = float(self.yty_trace) - n * float(dy @ dy)
      self._centred = (self.shift_x + dx, self.shift_y + dy, sxx, sxy, syy)
    return self._centred

  def metrics(self, aligner: LinearAligner) -> dict[str, float]:
    """MSE (mean over rows and outputs) and R^2 of `aligner` on the accumulated rows, in closed form.

    With centred xc, yc and d = mean_y - W mean_x - b:
      SSE = tr(Syy) - 2 tr(W Sxy) + tr(W Sxx W^T) + n |d|^2.
    """
    mean_x, mean_y, sxx, sxy, syy = self.centred()
    w = aligner.weight.astype(np.float64)
    offset = mean_y - w @ mean_x - aligner.bias.astype(np.float64)
    sse = syy - 2.0 * float(np.sum(w * sxy.T)) + float(np.sum((w @ sxx) * w))
    sse = max(sse, 0.0) + self.count * float(offset @ offset)
    return {"rows": self.count, "mse": sse / (self.count * self.out_dim),
            "r2": 1.0 - sse / syy if syy > 0 else float("nan")}


@functools.cache
def _device_moment_update():
  """The jitted float64 update of the running sums (call it under jax.enable_x64)."""
  import jax
  import jax.numpy as jnp

  def update(sums, x, y, valid, shift_x, shift_y):
    # Inputs travel in their own precision and are widened on the device (half the bytes moved).
    xs = jnp.where(valid[:, None], x.astype(jnp.float64) - shift_x, 0.0)
    ys = jnp.where(valid[:, None], y.astype(jnp.float64) - shift_y, 0.0)
    sum_x, sum_y, xtx, xty, yty = sums
    return (sum_x + xs.sum(0), sum_y + ys.sum(0), xtx + xs.T @ xs, xty + xs.T @ ys,
            yty + jnp.sum(ys * ys))

  return jax.jit(update, donate_argnums=0)


def accumulate(chunks: Iterable[tuple[np.ndarray, np.ndarray]], holdout: float = 0.0,
               seed: int = 0, on_device: bool | None = None) -> tuple[Moments, Moments | None]:
  """One pass over paired chunks -> moments of the fitting split and of the held-out split.

  on_device: accumulate with jax on the default device; None = when that device is an accelerator.
  """
  if on_device is None:
    import jax
    on_device = jax.default_backend() != "cpu"
  fit: Moments | None = None
  held: Moments | None = None
  offset = 0
  for x, y in chunks:
    check_paired(x, y)
    _check_finite(x, "DINO features", offset)
    _check_finite(y, "CLIP features", offset)
    if fit is None:
      fit = Moments(x.shape[1], y.shape[1], on_device)
      held = Moments(x.shape[1], y.shape[1], on_device) if holdout > 0 else None
    mask = holdout_mask(np.arange(offset, offset + x.shape[0]), holdout, seed)
    if held is None:
      fit.add(x, y)
    else:
      fit.add(x[~mask], y[~mask])
      held.add(x[mask], y[mask])
    offset += x.shape[0]
  if fit is None or fit.count == 0:
    raise ValueError(f"no rows to fit the aligner on ({offset} rows seen, held-out fraction {holdout})")
  if held is not None and held.count == 0:
    raise ValueError(f"held-out split is empty ({offset} rows, fraction {holdout}); use more rows")
  return fit, held


def _check_finite(array: np.ndarray, name: str, row_offset: int) -> None:
  finite = np.isfinite(array).all(axis=1)
  if not finite.all():
    raise ValueError(f"{name}: row {row_offset + int(np.argmin(finite))} has NaN or inf values")


# ----------------------------------------------------------------------------------------------
# Exact least squares (+ ridge)
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class AlignResult:
  aligner: LinearAligner
  method: str
  metrics: dict[str, dict[str, float]]  # {"fit": {...}, "heldout": {...}}
  ridge: float = 0.0
  ridge_scores: dict[str, float] | None = None  # ridge strength -> held-out R^2 (ridge="auto")
  info: dict[str, Any] = dataclasses.field(default_factory=dict)

  def summary(self) -> dict[str, Any]:
    return {"method": self.method, "ridge": self.ridge, "metrics": self.metrics,
            "ridge_scores": self.ridge_scores, "in_dim": self.aligner.in_dim,
            "out_dim": self.aligner.out_dim, **self.info}


class _NormalSolver:
  """Solves (Sxx + lam I) W^T = Sxy, the centred normal equations (the bias is then exact).

  Cholesky when the system is well conditioned; otherwise (collinear or constant features) the
  minimum-norm solution from an eigendecomposition, dropping directions of (numerically) zero
  variance, as numpy.linalg.lstsq does.
  """

  def __init__(self, moments: Moments):
    self.mean_x, self.mean_y, sxx, self.sxy, _ = moments.centred()
    self.sxx = (sxx + sxx.T) / 2
    # Ridge strengths are relative to the mean eigenvalue (= trace / d), so one grid fits features
    # of any scale and any row count.
    self.scale = max(float(np.trace(self.sxx)) / self.sxx.shape[0], np.finfo(np.float64).tiny)
    self._eigen = None

  def _cholesky(self, lam: float) -> np.ndarray | None:
    import scipy.linalg
    system = self.sxx + lam * np.eye(self.sxx.shape[0])
    try:
      factor = scipy.linalg.cho_factor(system, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
      return None
    pivots = np.diag(factor[0]) ** 2
    # Tiny pivots mean near-singular: the normal equations would amplify rounding, use the eigen path.
    if pivots.min() <= pivots.max() * system.shape[0] * 1e3 * np.finfo(np.float64).eps:
      return None
    return scipy.linalg.cho_solve(factor, self.sxy, check_finite=False)

  def _minimum_norm(self, lam: float) -> np.ndarray:
    if self._eigen is None:
      eigvals, eigvecs = np.linalg.eigh(self.sxx)
      self._eigen = (eigvals, eigvecs, eigvecs.T @ self.sxy)
    eigvals, eigvecs, projected = self._eigen
    cutoff = max(float(eigvals[-1]), 0.0) * len(eigvals) * np.finfo(np.float64).eps
    shifted = eigvals + lam
    keep = shifted > cutoff
    inverse = np.where(keep, 1.0 / np.where(keep, shifted, 1.0), 0.0)
    return eigvecs @ (inverse[:, None] * projected)

  def solve(self, ridge: float) -> LinearAligner:
    if ridge < 0:
      raise ValueError(f"ridge strength must be >= 0, got {ridge}")
    lam = ridge * self.scale
    weight_t = self._cholesky(lam)
    if weight_t is None:
      weight_t = self._minimum_norm(lam)
    bias = self.mean_y - self.mean_x @ weight_t
    return LinearAligner(weight_t.T.astype(np.float32), bias.astype(np.float32))


def fit_exact(chunks: Iterable[tuple[np.ndarray, np.ndarray]], ridge: float | str = 0.0,
              holdout: float = 0.1, seed: int = 0,
              ridge_grid: Sequence[float] = DEFAULT_RIDGE_GRID,
              on_device: bool | None = None) -> AlignResult:
  """Exact least squares with bias from one streaming pass.

  ridge: a strength relative to the mean feature variance (lam = ridge * trace(Sxx) / d; the bias is
  not penalised), or "auto": the grid value whose aligner, fitted on the fitting split, has the best
  held-out R^2 (needs holdout > 0), after which the returned aligner is refitted on all rows with
  that strength. Metrics "fit" / "heldout" are always those of the fitting-split aligner, so the
  held-out numbers stay honest; with "auto", "all" adds the refitted aligner's on all rows.
  on_device: see `accumulate`.
  """
  fit, held = accumulate(chunks, holdout, seed, on_device)
  solver = _NormalSolver(fit)
  scores = None
  if ridge == "auto":
    if held is None:
      raise ValueError("ridge='auto' chooses the strength on a held-out split; set holdout > 0")
    scores = {repr(float(r)): held.metrics(solver.solve(float(r)))["r2"] for r in ridge_grid}
    ridge = float(max(ridge_grid, key=lambda r: scores[repr(float(r))]))
  elif isinstance(ridge, str):
    raise ValueError(f"ridge must be a number or 'auto', got {ridge!r}")
  aligner = solver.solve(float(ridge))
  metrics = {"fit": fit.metrics(aligner)}
  if held is not None:
    metrics["heldout"] = held.metrics(aligner)
  info = {}
  if scores is not None:
    everything = pooled_moments(fit, held)
    aligner = _NormalSolver(everything).solve(float(ridge))
    metrics["all"] = everything.metrics(aligner)
    info["refit"] = "on all rows with the ridge chosen on the held-out split"
  return AlignResult(aligner, "exact", metrics, float(ridge), scores, info)


def pooled_moments(a: Moments, b: Moments) -> Moments:
  """The moments of the rows of `a` and `b` together (the parallel-variance formula:
  S = S_a + S_b + n_a n_b / n (m_a - m_b)(m_a - m_b)^T), on the host."""
  mean_xa, mean_ya, sxx_a, sxy_a, syy_a = a.centred()
  mean_xb, mean_yb, sxx_b, sxy_b, syy_b = b.centred()
  n_a, n_b = a.count, b.count
  weight = n_a * n_b / (n_a + n_b)
  dx, dy = mean_xa - mean_xb, mean_ya - mean_yb
  pooled = Moments(a.in_dim, a.out_dim)
  pooled.count = n_a + n_b
  # Sums taken about the pooled means, so the sums of the shifted rows are zero.
  pooled.shift_x = (n_a * mean_xa + n_b * mean_xb) / pooled.count
  pooled.shift_y = (n_a * mean_ya + n_b * mean_yb) / pooled.count
  pooled.xtx = sxx_a + sxx_b + weight * np.outer(dx, dx)
  pooled.xty = sxy_a + sxy_b + weight * np.outer(dx, dy)
  pooled.yty_trace = syy_a + syy_b + weight * float(dy @ dy)
  return pooled


# ----------------------------------------------------------------------------------------------
# The reference SGD recipe
# ----------------------------------------------------------------------------------------------

def global_variance(array: np.ndarray) -> float:
  """Variance of all entries about one global mean, as the reference's get_variance (summed in
  float64 over row blocks, so no float64 copy of the whole array is made)."""
  total = total_sq = 0.0
  for start in range(0, array.shape[0], 65536):
    block = np.asarray(array[start:start + 65536], np.float64)
    total += float(block.sum())
    total_sq += float(np.einsum("ij,ij->", block, block))
  count = array.size
  return total_sq / count - (total / count) ** 2


def reference_lr(epoch: int, base_lr: float = 0.01, t_max: int = 200) -> float:
  """torch CosineAnnealingLR(T_max) stepped once per epoch, eta_min 0."""
  return base_lr * (1.0 + math.cos(math.pi * epoch / t_max)) / 2.0


def fit_sgd(dino_features: np.ndarray, clip_features: np.ndarray, holdout: float = 0.1,
            seed: int = 0, epochs: int = 70, batch_size: int = 100, learning_rate: float = 0.01,
            momentum: float = 0.9, weight_decay: float = 5e-4, t_max: int = 200,
            target_variance: float = REFERENCE_TARGET_VARIANCE,
            reproduce_bias_defect: bool = False) -> AlignResult:
  """The reference recipe in optax + jax (needs the fitting split in memory, as the reference does)."""
  import jax
  import jax.numpy as jnp
  import optax

  check_paired(dino_features, clip_features)
  mask = holdout_mask(np.arange(dino_features.shape[0]), holdout, seed)
  x_fit = np.asarray(dino_features[~mask], np.float32)
  y_fit = np.asarray(clip_features[~mask], np.float32)
  if x_fit.shape[0] == 0:
    raise ValueError("no rows to fit the aligner on")
  _check_finite(x_fit, "DINO features", 0)
  _check_finite(y_fit, "CLIP features", 0)
  c1 = math.sqrt(target_variance / global_variance(x_fit))
  c2 = math.sqrt(target_variance / global_variance(y_fit))
  x_scaled = jnp.asarray(x_fit * np.float32(c1))
  y_scaled = jnp.asarray(y_fit * np.float32(c2))

  rows, in_dim = x_fit.shape
  out_dim = y_fit.shape[1]
  steps_per_epoch = -(-rows // batch_size)  # the reference's DataLoader keeps the last short batch
  key_init, key_shuffle = jax.random.split(jax.random.PRNGKey(seed))
  bound = 1.0 / math.sqrt(in_dim)  # torch.nn.Linear's default init: U(-1/sqrt(in), 1/sqrt(in))
  key_w, key_b = jax.random.split(key_init)
  params = {"W": jax.random.uniform(key_w, (out_dim, in_dim), jnp.float32, -bound, bound),
            "b": jax.random.uniform(key_b, (out_dim,), jnp.float32, -bound, bound)}

  def schedule(step):
    epoch = step // steps_per_epoch
    return learning_rate * (1.0 + jnp.cos(jnp.pi * epoch / t_max)) / 2.0

  # torch SGD adds wd * p to the gradient of every parameter (bias included) before momentum.
  optimizer = optax.chain(optax.add_decayed_weights(weight_decay),
                          optax.sgd(schedule, momentum=momentum))
  opt_state = optimizer.init(params)

  def batch_loss(p, idx, valid):
    pred = x_scaled[idx] @ p["W"].T + p["b"]
    err = jnp.where(valid[:, None], pred - y_scaled[idx], 0.0)
    return jnp.sum(err * err) / (jnp.sum(valid) * out_dim)

  @jax.jit
  def run_epoch(p, state, key):
    order = jax.random.permutation(key, rows)
    padded = jnp.pad(order, (0, steps_per_epoch * batch_size - rows))
    valid = jnp.arange(steps_per_epoch * batch_size) < rows
    batches = (padded.reshape(steps_per_epoch, batch_size), valid.reshape(steps_per_epoch, batch_size))

    def step(carry, batch):
      p, state = carry
      loss, grads = jax.value_and_grad(batch_loss)(p, *batch)
      updates, state = optimizer.update(grads, state, p)
      return (optax.apply_updates(p, updates), state), loss

    (p, state), losses = jax.lax.scan(step, (p, state), batches)
    return p, state, jnp.mean(losses)

  epoch_losses = []
  for epoch in range(epochs):
    params, opt_state, loss = run_epoch(params, opt_state, jax.random.fold_in(key_shuffle, epoch))
    epoch_losses.append(float(loss))
    if not math.isfinite(epoch_losses[-1]):
      # Plain SGD at lr 0.01 diverges when the features share a large common offset (the variance
      # rescaling ignores the mean); say so instead of saving a NaN aligner.
      raise FloatingPointError(f"the SGD recipe diverged (loss {epoch_losses[-1]} in epoch {epoch}); "
                               "use the exact method, or centre the features first")

  weight_scaled = np.asarray(params["W"], np.float64)
  bias_scaled = np.asarray(params["b"], np.float64)
  bias_factor = c1 / c2 if reproduce_bias_defect else 1.0 / c2
  aligner = LinearAligner((weight_scaled * c1 / c2).astype(np.float32),
                          (bias_scaled * bias_factor).astype(np.float32))
  fit, held = accumulate(iterate_chunks(dino_features, clip_features), holdout, seed)
  metrics = {"fit": fit.metrics(aligner)}
  if held is not None:
    metrics["heldout"] = held.metrics(aligner)
  info = {"epochs": epochs, "batch_size": batch_size, "scale_dino": c1, "scale_clip": c2,
          "final_epoch_loss": epoch_losses[-1] if epoch_losses else None,
          "bias_unscale": "reference c1/c2 (defect)" if reproduce_bias_defect else "exact 1/c2"}
  return AlignResult(aligner, "sgd", metrics, 0.0, None, info)
