"""Flax ResNet (torchvision layout) against a plain torch.nn ResNet with torchvision's module names.

torchvision does not import beside torch 2.13 here, so `TorchResNet` below is written from the
torchvision architecture (v1.5 bottleneck, stride on the 3x3 conv, projection shortcut on the first
block of each stage) with the same attribute names, so its state_dict keys are torchvision's.
Other test files import it (`from test_resnet import TorchResNet`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from torch import nn

from agriclip_jax.convert import dino as dino_convert
from agriclip_jax.models.resnet import RESNET_STAGES, ResNet, ResNetConfig, init_resnet


# ---------------------------------------------------------------------------------------------
# The PyTorch peer
# ---------------------------------------------------------------------------------------------

class TorchBottleneck(nn.Module):
  expansion = 4

  def __init__(self, in_width: int, width: int, stride: int, downsample: nn.Module | None):
    super().__init__()
    self.conv1 = nn.Conv2d(in_width, width, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(width * 4)
    self.relu = nn.ReLU()
    self.downsample = downsample

  def forward(self, x):
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    shortcut = x if self.downsample is None else self.downsample(x)
    return self.relu(y + shortcut)


class TorchBasicBlock(nn.Module):
  expansion = 1

  def __init__(self, in_width: int, width: int, stride: int, downsample: nn.Module | None):
    super().__init__()
    self.conv1 = nn.Conv2d(in_width, width, 3, stride=stride, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU()
    self.downsample = downsample

  def forward(self, x):
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    shortcut = x if self.downsample is None else self.downsample(x)
    return self.relu(y + shortcut)


class TorchResNet(nn.Module):
  """torchvision.models.resnetN with fc removed (DINO: fc = Identity): NCHW in, pooled features out."""

  def __init__(self, depth: int = 50):
    super().__init__()
    kind, blocks = RESNET_STAGES[depth]
    block = TorchBottleneck if kind == "bottleneck" else TorchBasicBlock
    self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU()
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    in_width = 64
    for stage, (width, count) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
      layers = []
      for index in range(count):
        stride = 2 if stage > 1 and index == 0 else 1
        downsample = None
        if index == 0 and (stride != 1 or in_width != width * block.expansion):
          downsample = nn.Sequential(
              nn.Conv2d(in_width, width * block.expansion, 1, stride=stride, bias=False),
              nn.BatchNorm2d(width * block.expansion))
        layers.append(block(in_width, width, stride, downsample))
        in_width = width * block.expansion
      setattr(self, f"layer{stage}", nn.Sequential(*layers))
    self.avgpool = nn.AdaptiveAvgPool2d(1)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    for stage in range(1, 5):
      x = getattr(self, f"layer{stage}")(x)
    return torch.flatten(self.avgpool(x), 1)


def randomise_batch_norms(model: nn.Module, seed: int = 0) -> None:
  """Non-trivial BN affine params and running statistics, so eval-mode BN is not the identity."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.BatchNorm2d):
        n = module.num_features
        module.weight.copy_(0.5 + torch.rand(n, generator=generator))
        module.bias.copy_(0.1 * torch.randn(n, generator=generator))
        module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
        module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
        module.num_batches_tracked.fill_(7)


def torch_resnet(depth: int = 50, seed: int = 0) -> TorchResNet:
  torch.manual_seed(seed)
  model = TorchResNet(depth)
  randomise_batch_norms(model, seed)
  return model.eval()


def state_numpy(model: nn.Module) -> dict[str, np.ndarray]:
  return dino_convert.tensors_to_numpy(model.state_dict(), "torch peer")


def nchw(images: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


# One jitted ResNet-50 evaluation shared by the tests (compiled once for [2, 64, 64, 3]).
rn50_apply = jax.jit(ResNet(ResNetConfig(depth=50)).apply)


@pytest.fixture(scope="module")
def rn50_pair():
  model = torch_resnet(50)
  converted = dino_convert.resnet_from_torch_state(state_numpy(model), "peer")
  return model, converted


@pytest.fixture(scope="module")
def images_64() -> np.ndarray:
  return np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Parity with torch
# ---------------------------------------------------------------------------------------------

def test_resnet50_eval_features_match_torch(rn50_pair, images_64):
  torch_model, converted = rn50_pair
  assert converted.model_type == "resnet" and converted.config["depth"] == 50
  with torch.no_grad():
    want = torch_model(nchw(images_64)).numpy()
  got = np.asarray(rn50_apply(converted.variables, images_64))
  assert got.shape == want.shape == (2, 2048)
  assert np.abs(want).max() > 0.05  # features are not trivially zero
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def random_flax_resnet_variables(config: ResNetConfig, seed: int) -> dict:
  """Random variables in the Flax layout, drawn with numpy (quicker than an op-by-op init)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: init_resnet(config, jax.random.PRNGKey(0))[1])

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "kernel" in name:  # HWIO, He-scaled by fan-out as torchvision initialises
      fan_out = leaf.shape[0] * leaf.shape[1] * leaf.shape[3]
      return rng.normal(0, (2 / fan_out) ** 0.5, leaf.shape).astype(np.float32)
    if "scale" in name and "'bn3'" in name:  # small residual branches keep features O(1)
      return rng.uniform(0.0, 0.3, leaf.shape).astype(np.float32)
    if "scale" in name or "'var'" in name:
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return rng.normal(0, 0.1, leaf.shape).astype(np.float32)  # biases and running means

  return jax.tree_util.tree_map_with_path(draw, shapes)


def test_resnet50_exported_weights_load_strictly_into_torch(images_64):
  config = ResNetConfig(depth=50)
  variables = random_flax_resnet_variables(config, seed=3)
  state = dino_convert.resnet_to_torch_state(
      dino_convert.ConvertedModel("resnet", config.to_dict(), variables), "flax")
  torch_model = TorchResNet(50)
  torch_model.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=True)
  torch_model.eval()
  with torch.no_grad():
    want = torch_model(nchw(images_64)).numpy()
  got = np.asarray(rn50_apply(variables, images_64))
  assert np.abs(want).max() > 0.05
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_train_mode_uses_batch_statistics_like_torch():
  """Training-mode outputs and running-mean updates equal torch's; running var differs by n/(n-1)."""
  torch_model = torch_resnet(18, seed=1)
  converted = dino_convert.resnet_from_torch_state(state_numpy(torch_model), "peer")
  images = np.random.default_rng(1).normal(size=(4, 64, 64, 3)).astype(np.float32)
  torch_model.train()
  with torch.no_grad():
    want = torch_model(nchw(images)).numpy()
  config = ResNetConfig(depth=18)
  got, updates = ResNet(config).apply(converted.variables, images, train=True,
                                      mutable=["batch_stats"])
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
  stats = updates["batch_stats"]
  np.testing.assert_allclose(np.asarray(stats["bn1"]["mean"]),
                             torch_model.bn1.running_mean.numpy(), atol=1e-5)
  # bn1 sees 4 x 32 x 32 values per channel; torch stores the unbiased variance in its update.
  n = 4 * 32 * 32
  old_var = converted.variables["batch_stats"]["bn1"]["var"]
  flax_batch_var = (np.asarray(stats["bn1"]["var"]) - 0.9 * old_var) / 0.1
  torch_batch_var = (torch_model.bn1.running_var.numpy() - 0.9 * old_var) / 0.1
  np.testing.assert_allclose(flax_batch_var * n / (n - 1), torch_batch_var, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Synchronised BatchNorm: 8 simulated devices equal 1 device
# ---------------------------------------------------------------------------------------------

def _train_step(model: ResNet):
  def step(variables, images):
    features, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    return features, updates["batch_stats"]
  return step


def _assert_trees_close(a, b, atol=1e-4):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-4,
                               err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def sync_setup():
  assert len(jax.devices()) >= 8, "tests/conftest.py sets 8 simulated CPU devices"
  config = ResNetConfig(depth=18, image_size=32)
  model = ResNet(config)
  variables = random_flax_resnet_variables(config, seed=0)
  # Per-device halves that differ strongly, so per-device statistics would be visibly wrong.
  rng = np.random.default_rng(2)
  images = rng.normal(size=(16, 32, 32, 3)).astype(np.float32)
  images += np.repeat(np.arange(8, dtype=np.float32), 2)[:, None, None, None]
  single = jax.jit(_train_step(model))(variables, images)
  return config, model, variables, images, single


def test_batch_norm_statistics_are_global_under_jit_on_8_devices(sync_setup):
  _, model, variables, images, (want_features, want_stats) = sync_setup
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  sharded_images = jax.device_put(images, NamedSharding(mesh, P("data")))
  replicated = jax.device_put(variables, NamedSharding(mesh, P()))
  features, stats = jax.jit(_train_step(model))(replicated, sharded_images)
  assert len(sharded_images.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(features), np.asarray(want_features), atol=1e-4, rtol=1e-4)
  _assert_trees_close(stats, want_stats)


def test_batch_norm_statistics_sync_over_axis_name_in_shard_map(sync_setup):
  config, _, variables, images, (want_features, want_stats) = sync_setup
  synced = ResNet(ResNetConfig(**{**config.to_dict(), "axis_name": "data"}))
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  step = jax.shard_map(_train_step(synced), mesh=mesh, in_specs=(P(), P("data")),
                       out_specs=(P("data"), P()))
  features, stats = jax.jit(step)(variables, images)
  np.testing.assert_allclose(np.asarray(features), np.asarray(want_features), atol=1e-4, rtol=1e-4)
  _assert_trees_close(stats, want_stats)
  # Without the axis name each device would normalise by its own 2 images: different features.
  local = jax.shard_map(_train_step(ResNet(config)), mesh=mesh, in_specs=(P(), P("data")),
                        out_specs=(P("data"), P("data")))
  local_features, _ = jax.jit(local)(variables, images)
  assert np.abs(np.asarray(local_features) - np.asarray(want_features)).max() > 1e-2


# ---------------------------------------------------------------------------------------------
# Configs and shapes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth,width", [(18, 512), (34, 512), (50, 2048), (101, 2048)])
def test_output_width_and_parameter_count_match_torchvision(depth, width):
  shapes = jax.eval_shape(lambda: init_resnet(ResNetConfig(depth=depth), jax.random.PRNGKey(0))[1])
  count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes["params"]))
  torch_count = sum(p.numel() for p in TorchResNet(depth).parameters())
  assert count == torch_count
  # torchvision's published counts minus the 1000-way fc: resnet18 11,689,512, resnet50 25,557,032.
  published = {18: 11_689_512 - 513_000, 50: 25_557_032 - 2_049_000}
  if depth in published:
    assert count == published[depth]
  out = jax.eval_shape(lambda v: ResNet(ResNetConfig(depth=depth)).apply(v, jnp.zeros((1, 64, 64, 3))),
                       shapes)
  assert out.shape == (1, width)


def test_unknown_depth_is_a_clear_error():
  with pytest.raises(ValueError, match=r"depth=42; known depths: 18, 34, 50, 101, 152"):
    ResNetConfig(depth=42)
