"""DINO head against a plain torch.nn peer of the reference DINOHead; multi-crop forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from agriclip_jax.models.configs import vision_config
from agriclip_jax.models.dino import DINO, DINOConfig, DINOHead, DINOHeadConfig


class TorchDINOHead(torch.nn.Module):
  """facebookresearch/dino's DINOHead (no BN), weight norm written out: W = g v / ||v||."""

  def __init__(self, in_dim, out_dim, hidden, bottleneck, norm_last_layer):
    super().__init__()
    self.mlp = torch.nn.Sequential(torch.nn.Linear(in_dim, hidden), torch.nn.GELU(),
                                   torch.nn.Linear(hidden, hidden), torch.nn.GELU(),
                                   torch.nn.Linear(hidden, bottleneck))
    self.weight_v = torch.nn.Parameter(torch.randn(out_dim, bottleneck))
    self.weight_g = torch.nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)

  def forward(self, x):
    x = torch.nn.functional.normalize(self.mlp(x), dim=-1, p=2)
    weight = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
    return x @ weight.T


def _copy_head(params, peer: TorchDINOHead, norm_last_layer: bool) -> None:
  with torch.no_grad():
    for i, layer in zip(range(3), (0, 2, 4)):
      peer.mlp[layer].weight.copy_(torch.from_numpy(np.array(params[f"mlp_{i}"]["kernel"]).T))
      peer.mlp[layer].bias.copy_(torch.from_numpy(np.array(params[f"mlp_{i}"]["bias"])))
    peer.weight_v.copy_(torch.from_numpy(np.array(params["last_layer"]["kernel_v"]).T))
    if not norm_last_layer:
      peer.weight_g.copy_(torch.from_numpy(np.array(params["last_layer"]["kernel_g"]))[:, None])


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_head_matches_torch_peer(norm_last_layer):
  cfg = DINOHeadConfig(out_dim=40, hidden_dim=24, bottleneck_dim=8, norm_last_layer=norm_last_layer)
  x = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32)
  head = DINOHead(cfg)
  params = head.init(jax.random.key(0), jnp.asarray(x))["params"]
  if not norm_last_layer:  # a non-trivial g so the test sees it
    params["last_layer"]["kernel_g"] = jnp.linspace(0.5, 2.0, 40)
  assert ("kernel_g" in params["last_layer"]) == (not norm_last_layer)
  peer = TorchDINOHead(16, 40, 24, 8, norm_last_layer)
  _copy_head(params, peer, norm_last_layer)
  expected = peer(torch.from_numpy(x)).detach().numpy()
  got = head.apply({"params": params}, jnp.asarray(x))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_head_init_follows_reference():
  cfg = DINOHeadConfig(out_dim=64, hidden_dim=256, bottleneck_dim=32)
  params = DINOHead(cfg).init(jax.random.key(1), jnp.zeros((1, 128)))["params"]
  kernel = np.asarray(params["mlp_1"]["kernel"])
  assert np.abs(kernel).max() <= 2 * 0.02 + 1e-6  # truncated normal(0.02) at two std
  assert 0.015 < kernel.std() < 0.02
  assert np.all(np.asarray(params["mlp_1"]["bias"]) == 0)


def _tiny_dino() -> tuple[DINO, DINOConfig]:
  cfg = DINOConfig(vision_config("tiny", flavour="dino", image_size=16, patch_size=8, layers=1),
                   DINOHeadConfig(out_dim=16, hidden_dim=32, bottleneck_dim=8))
  return DINO(cfg), cfg


def test_multi_crop_equals_per_crop_forward():
  model, _ = _tiny_dino()
  rng = np.random.default_rng(2)
  global_crops = jnp.asarray(rng.normal(size=(3, 2, 16, 16, 3)), jnp.float32)
  local_crops = jnp.asarray(rng.normal(size=(3, 4, 8, 8, 3)), jnp.float32)
  params = jax.jit(model.init)(jax.random.key(0), global_crops[:, 0])["params"]
  outputs = jax.jit(lambda p, g, l: model.apply({"params": p}, g, l, method=DINO.multi_crop))(
      params, global_crops, local_crops)
  assert outputs.shape == (3, 6, 16)
  single_view = jax.jit(lambda p, x: model.apply({"params": p}, x))
  for view in range(6):
    crop = global_crops[:, view] if view < 2 else local_crops[:, view - 2]
    single = single_view(params, crop)
    np.testing.assert_allclose(outputs[:, view], single, rtol=1e-5, atol=1e-5)


def test_config_round_trip_and_errors():
  _, cfg = _tiny_dino()
  assert DINOConfig.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ValueError, match="out_dim"):
    DINOHeadConfig(out_dim=0)
  with pytest.raises(ValueError, match="unknown keys"):
    DINOHeadConfig.from_dict({"out_dims": 3})
