"""Position-embedding interpolation equals PyTorch's bicubic resampling as open_clip and DINO use it."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from agriclip_jax.models.vit import bicubic_matrix, interpolate_positions


def _torch_resize(positions: np.ndarray, grid: int, flavour: str) -> np.ndarray:
  old = int(math.isqrt(positions.shape[0] - 1))
  patch = torch.from_numpy(positions[1:]).reshape(1, old, old, -1).permute(0, 3, 1, 2)
  if flavour == "dino":  # DINO's interpolate_pos_encoding: scale_factor with the +0.1 offset
    resized = F.interpolate(patch, scale_factor=((grid + 0.1) / old, (grid + 0.1) / old), mode="bicubic")
  else:  # open_clip's resize_pos_embed: a target size
    resized = F.interpolate(patch, size=(grid, grid), mode="bicubic", align_corners=False)
  assert resized.shape[-1] == grid
  resized = resized.permute(0, 2, 3, 1).reshape(grid * grid, -1).numpy()
  return np.concatenate([positions[:1], resized], axis=0)


@pytest.mark.parametrize("flavour", ["clip", "dino"])
@pytest.mark.parametrize("old_grid,new_grid", [(14, 20), (14, 7), (4, 6)])
def test_matches_torch_bicubic(flavour, old_grid, new_grid):
  rng = np.random.default_rng(0)
  positions = rng.normal(size=(old_grid * old_grid + 1, 8)).astype(np.float32) * 3
  want = _torch_resize(positions, new_grid, flavour)
  got = np.asarray(interpolate_positions(positions, new_grid, flavour))
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_same_grid_is_identity():
  positions = np.arange(17 * 3, dtype=np.float32).reshape(17, 3)
  assert interpolate_positions(positions, 4, "dino") is positions


def test_matrix_rows_sum_to_one():
  # A constant field stays constant: cubic weights form a partition of unity.
  np.testing.assert_allclose(bicubic_matrix(7, 12).sum(axis=1), 1.0, atol=1e-12)
