"""DINO formats both ways: plain torch.nn peers with DINO's / torchvision's / timm's names.

The ViT peer below is written from facebookresearch/dino's vision_transformer.py (patch bias,
LayerNorm eps 1e-6, exact GELU, fused qkv, output norm(x)[:, 0]) and its DINOHead (3-layer MLP,
L2 normalisation, weight-normed last layer), with the same attribute names so that state_dict keys
are DINO's.
"""

from __future__ import annotations

import json
import warnings

import jax
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from agriclip_jax import model_io
from agriclip_jax.convert import dino as dino_convert
from agriclip_jax.convert import registry
from agriclip_jax.models.configs import VisionConfig, vision_config
from agriclip_jax.models.dino import DINO, DINOConfig, DINOHeadConfig
from agriclip_jax.models.vit import VisionTransformer, dino_pooling
from test_resnet import TorchResNet, nchw, randomise_batch_norms


# ---------------------------------------------------------------------------------------------
# PyTorch peers with DINO's names
# ---------------------------------------------------------------------------------------------

class TorchAttention(nn.Module):
  def __init__(self, dim: int, heads: int):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, dim * 3)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    batch, tokens, dim = x.shape
    qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)) * (dim // self.heads) ** -0.5
    x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, tokens, dim)
    return self.proj(x)


class TorchMlp(nn.Module):
  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = nn.GELU()
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class TorchBlock(nn.Module):
  def __init__(self, dim: int, heads: int, mlp_ratio: float):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = TorchAttention(dim, heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = TorchMlp(dim, int(dim * mlp_ratio))

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class TorchPatchEmbed(nn.Module):
  def __init__(self, patch: int, dim: int):
    super().__init__()
    self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class TorchDinoViT(nn.Module):
  """DINO's VisionTransformer with num_classes=0 (head = Identity, no keys)."""

  def __init__(self, image_size=224, patch=16, dim=384, depth=12, heads=6, mlp_ratio=4.0):
    super().__init__()
    self.patch_embed = TorchPatchEmbed(patch, dim)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2 + 1, dim))
    self.blocks = nn.ModuleList([TorchBlock(dim, heads, mlp_ratio) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=1e-6)
    with torch.no_grad():
      for p in (self.cls_token, self.pos_embed):
        nn.init.trunc_normal_(p, std=0.02)
      for module in self.modules():
        if isinstance(module, nn.Linear):
          nn.init.trunc_normal_(module.weight, std=0.02)
          module.bias.normal_(0, 0.02)
        elif isinstance(module, nn.LayerNorm):  # non-trivial norms so that a swap would show
          module.weight.uniform_(0.5, 1.5)
          module.bias.normal_(0, 0.1)

  def tokens(self, x):
    x = self.patch_embed(x)
    return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed

  def forward(self, x):
    x = self.tokens(x)
    for block in self.blocks:
      x = block(x)
    return self.norm(x)[:, 0]

  def get_intermediate_layers(self, x, n=1):
    """DINO's: the final-normed token sequences of the last n blocks."""
    x = self.tokens(x)
    outputs = []
    for i, block in enumerate(self.blocks):
      x = block(x)
      if len(self.blocks) - i <= n:
        outputs.append(self.norm(x))
    return outputs


def dino_linear_eval_features(peer: TorchDinoViT, x, n: int, avgpool: bool):
  """DINO eval_linear.py's frozen features of a ViT (written from its recipe)."""
  intermediate = peer.get_intermediate_layers(x, n)
  output = torch.cat([tokens[:, 0] for tokens in intermediate], dim=-1)
  if avgpool:
    patch_mean = torch.mean(intermediate[-1][:, 1:], dim=1)
    output = torch.cat((output.unsqueeze(-1), patch_mean.unsqueeze(-1)), dim=-1)
    output = output.reshape(output.shape[0], -1)
  return output


class TorchDINOHead(nn.Module):
  def __init__(self, in_dim, out_dim, hidden_dim=2048, bottleneck_dim=256, norm_last_layer=True):
    super().__init__()
    self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                             nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # torch deprecates weight_norm; DINO's checkpoints use it
      self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
    with torch.no_grad():
      if norm_last_layer:
        self.last_layer.weight_g.fill_(1)
      else:
        self.last_layer.weight_g.uniform_(0.5, 2.0)

  def forward(self, x):
    return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


class TorchDINOWrapper(nn.Module):
  """DINO's MultiCropWrapper: backbone + head, names `backbone.*`, `head.*`."""

  def __init__(self, backbone, head):
    super().__init__()
    self.backbone, self.head = backbone, head

  def forward(self, x):
    return self.head(self.backbone(x))


def numpy_state(model: nn.Module) -> dict[str, np.ndarray]:
  return dino_convert.tensors_to_numpy(model.state_dict(), "peer")


def torch_state(state: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
  return {k: torch.tensor(v) for k, v in state.items()}


def tiny_vit(seed: int, heads: int = 2) -> TorchDinoViT:
  torch.manual_seed(seed)
  return TorchDinoViT(image_size=32, patch=8, dim=64, depth=2, heads=heads).eval()


def tiny_dino(seed: int, norm_last_layer: bool = True) -> TorchDINOWrapper:
  backbone = tiny_vit(seed)
  torch.manual_seed(seed + 100)
  head = TorchDINOHead(64, 20, hidden_dim=32, bottleneck_dim=16, norm_last_layer=norm_last_layer)
  return TorchDINOWrapper(backbone, head).eval()


def dino_training_checkpoint(student: nn.Module, teacher: nn.Module) -> dict:
  """The layout main_dino.py saves: DDP-wrapped student, plain teacher, plus training state."""
  return {
      "student": {f"module.{k}": v for k, v in student.state_dict().items()},
      "teacher": teacher.state_dict(),
      "optimizer": {"state": {}, "param_groups": []},
      "epoch": 3,
      "dino_loss": {"center": torch.zeros(1, 20)},
  }


# ---------------------------------------------------------------------------------------------
# DINO ViT-S/16: torch -> flax -> torch
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vits16_apply():
  config = vision_config("ViT-S/16", flavour="dino")
  return config, jax.jit(VisionTransformer(config).apply)


def test_dino_vits16_features_match_torch_both_ways(tmp_path, vits16_apply):
  config, apply = vits16_apply
  torch.manual_seed(0)
  peer = TorchDinoViT().eval()
  torch.save(peer.state_dict(), tmp_path / "dino_deitsmall16.pth")
  converted = dino_convert.READERS["dino-vit"](tmp_path / "dino_deitsmall16.pth", {})
  assert converted.model_type == "vit" and converted.config == config.to_dict()

  image = np.random.default_rng(0).normal(size=(1, 224, 224, 3)).astype(np.float32)
  with torch.no_grad():
    want = peer(nchw(image)).numpy()
  got = np.asarray(apply(converted.variables, image))
  assert got.shape == (1, 384)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

  # Back: random Flax weights (a different model) exported and loaded strictly into the peer.
  flax_variables = jax.tree_util.tree_map(
      lambda v: v + np.random.default_rng(1).normal(0, 0.02, v.shape).astype(np.float32),
      converted.variables)
  exported = registry.ConvertedModel("vit", config.to_dict(), flax_variables)
  dino_convert.WRITERS["dino-vit"](exported, tmp_path / "out.pth", {})
  reloaded = TorchDinoViT().eval()
  reloaded.load_state_dict(torch.load(tmp_path / "out.pth", weights_only=True), strict=True)
  with torch.no_grad():
    want_back = reloaded(nchw(image)).numpy()
  np.testing.assert_allclose(np.asarray(apply(flax_variables, image)), want_back, atol=1e-4, rtol=0)
  assert np.abs(want_back - want).max() > 1e-3  # the exported model is not the original


@pytest.mark.parametrize("pooling", ["cls", "cls+avgpool", "last2", "last3"])
def test_dino_linear_eval_pooling_matches_torch(tmp_path, pooling):
  torch.manual_seed(5)
  peer = TorchDinoViT(image_size=32, patch=8, dim=64, depth=3, heads=2).eval()
  torch.save(peer.state_dict(), tmp_path / "vit.pth")
  converted = dino_convert.READERS["dino-vit"](tmp_path / "vit.pth", {"heads": "2"})
  config = VisionConfig.from_dict(converted.config)
  n_last_blocks, avgpool = dino_pooling(pooling)
  image = np.random.default_rng(5).normal(size=(3, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    want = dino_linear_eval_features(peer, nchw(image), n_last_blocks, avgpool).numpy()
  got = np.asarray(VisionTransformer(config).apply(converted.variables, image,
                                                   n_last_blocks=n_last_blocks, avgpool=avgpool))
  assert got.shape == want.shape == (3, 64 * (n_last_blocks + avgpool))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_dino_pooling_errors_name_the_value():
  config = vision_config("tiny", flavour="dino")
  image = np.zeros((1, 32, 32, 3), np.float32)
  module = VisionTransformer(config)
  variables = module.init(jax.random.PRNGKey(0), image)
  with pytest.raises(ValueError, match="n_last_blocks=3"):
    module.apply(variables, image, n_last_blocks=3)
  with pytest.raises(ValueError, match="avgpool goes with n_last_blocks=1"):
    module.apply(variables, image, n_last_blocks=2, avgpool=True)
  with pytest.raises(ValueError, match="unknown DINO pooling 'mean'"):
    dino_pooling("mean")
  clip_tower = VisionTransformer(vision_config("tiny"))
  with pytest.raises(ValueError, match="without projection"):
    clip_tower.apply(clip_tower.init(jax.random.PRNGKey(0), image), image, n_last_blocks=1)


def test_heads_option_is_used_since_checkpoints_do_not_store_heads(tmp_path):
  peer = tiny_vit(seed=4, heads=4)
  torch.save(peer.state_dict(), tmp_path / "vit.pth")
  image = np.random.default_rng(4).normal(size=(2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    want = peer(nchw(image)).numpy()
  converted = dino_convert.READERS["dino-vit"](tmp_path / "vit.pth", {"heads": "4"})
  assert converted.config["heads"] == 4
  module = VisionTransformer(VisionConfig.from_dict(converted.config))
  np.testing.assert_allclose(np.asarray(module.apply(converted.variables, image)), want, atol=1e-4)
  default = dino_convert.READERS["dino-vit"](tmp_path / "vit.pth", {})
  assert default.config["heads"] == 1  # width 64 / DINO's head dim 64


# ---------------------------------------------------------------------------------------------
# DINO training checkpoints: teacher / student, backbone + head
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory):
  student, teacher = tiny_dino(seed=1), tiny_dino(seed=2)
  path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pth"
  torch.save(dino_training_checkpoint(student, teacher), path)
  return path, student, teacher


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_dino_checkpoint_backbone_and_head_match_torch(checkpoint_file, which):
  path, student, teacher = checkpoint_file
  peer = teacher if which == "teacher" else student
  options = {"heads": 2} if which == "teacher" else {"heads": 2, "which": "student"}
  converted = dino_convert.READERS["dino-checkpoint"](path, options)
  assert converted.model_type == "dino"
  config = DINOConfig.from_dict(converted.config)
  assert config.head == DINOHeadConfig(out_dim=20, hidden_dim=32, bottleneck_dim=16, n_layers=3,
                                       norm_last_layer=True)
  images = np.random.default_rng(5).normal(size=(2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    want_features = peer.backbone(nchw(images)).numpy()
    want_logits = peer(nchw(images)).numpy()
  model = DINO(config)
  got_features = model.apply(converted.variables, images, method=DINO.features)
  got_logits = model.apply(converted.variables, images)
  np.testing.assert_allclose(np.asarray(got_features), want_features, atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(got_logits), want_logits, atol=1e-4, rtol=0)


def test_dino_checkpoint_written_back_loads_in_torch(checkpoint_file, tmp_path):
  path, student, teacher = checkpoint_file
  converted = dino_convert.READERS["dino-checkpoint"](path, {"heads": 2})
  dino_convert.WRITERS["dino-checkpoint"](converted, tmp_path / "back.pth", {})
  data = torch.load(tmp_path / "back.pth", weights_only=True)
  assert set(data) == {"teacher"}
  fresh = tiny_dino(seed=9)
  fresh.load_state_dict(data["teacher"], strict=True)
  for key, value in teacher.state_dict().items():
    torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0, msg=key)
  # As a student: DDP's module. prefix.
  dino_convert.WRITERS["dino-checkpoint"](converted, tmp_path / "student.pth", {"which": "student"})
  student_keys = set(torch.load(tmp_path / "student.pth", weights_only=True)["student"])
  assert student_keys == {f"module.{k}" for k in teacher.state_dict()}


def test_free_norm_last_layer_keeps_its_gain(tmp_path):
  peer = tiny_dino(seed=3, norm_last_layer=False)
  torch.save({"teacher": peer.state_dict()}, tmp_path / "c.pth")
  converted = dino_convert.READERS["dino-checkpoint"](tmp_path / "c.pth", {"heads": 2})
  assert converted.config["head"]["norm_last_layer"] is False
  images = np.random.default_rng(6).normal(size=(2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    want = peer(nchw(images)).numpy()
  got = DINO(DINOConfig.from_dict(converted.config)).apply(converted.variables, images)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def test_checkpoint_without_teacher_is_a_clear_error(tmp_path, checkpoint_file):
  _, student, _ = checkpoint_file
  torch.save({"student": {f"module.{k}": v for k, v in student.state_dict().items()}, "epoch": 1},
             tmp_path / "only_student.pth")
  with pytest.raises(KeyError, match=r"no 'teacher' entry.*entries: \['epoch', 'student'\]"):
    dino_convert.READERS["dino-checkpoint"](tmp_path / "only_student.pth", {})
  # The student is still there for whoever asks for it.
  converted = dino_convert.READERS["dino-checkpoint"](tmp_path / "only_student.pth",
                                                      {"which": "student", "part": "backbone"})
  assert converted.model_type == "vit"


def test_resnet_checkpoint_backbone_only(tmp_path):
  torch.manual_seed(0)
  backbone = TorchResNet(18)
  torch.save({"teacher": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}},
             tmp_path / "rn.pth")
  with pytest.raises(ValueError, match="part=backbone"):
    dino_convert.READERS["dino-checkpoint"](tmp_path / "rn.pth", {})
  converted = dino_convert.READERS["dino-checkpoint"](tmp_path / "rn.pth", {"part": "backbone"})
  assert converted.model_type == "resnet" and converted.config["depth"] == 18


# ---------------------------------------------------------------------------------------------
# dino-rn50 files, timm, the aligner, and the registry
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rn50_file(tmp_path_factory):
  torch.manual_seed(0)
  model = TorchResNet(50)
  randomise_batch_norms(model)
  path = tmp_path_factory.mktemp("rn50") / "dino_pretrain.pth"
  torch.save(model.state_dict(), path)
  return path, model


def test_dino_rn50_file_round_trip_is_exact(rn50_file, tmp_path):
  path, model = rn50_file
  converted = dino_convert.READERS["dino-rn50"](path, {"depth": 50})
  dino_convert.WRITERS["dino-rn50"](converted, tmp_path / "back.pth", {})
  back = torch.load(tmp_path / "back.pth", weights_only=True)
  original = model.state_dict()
  assert set(back) == set(original)
  for key, value in original.items():
    if key.endswith("num_batches_tracked"):
      continue  # not kept in Flax; torchvision's BatchNorm (momentum 0.1) never reads it
    torch.testing.assert_close(back[key], value, rtol=0, atol=0, msg=key)


def test_registry_converts_rn50_to_a_model_directory(rn50_file, tmp_path):
  path, _ = rn50_file
  registry.convert(path, "dino-rn50", tmp_path / "rn50", "flax")
  model_type, config, variables = model_io.load_model_dir(tmp_path / "rn50")
  assert model_type == "resnet" and config["depth"] == 50
  assert set(variables) == {"params", "batch_stats"}


def test_resnet_of_another_depth_is_a_clear_error(tmp_path):
  torch.save(TorchResNet(18).state_dict(), tmp_path / "rn18.pth")
  with pytest.raises(ValueError, match=r"rn18.pth: the checkpoint is a ResNet-18, but ResNet-50 was asked"):
    dino_convert.READERS["dino-rn50"](tmp_path / "rn18.pth", {"depth": 50})
  converted = dino_convert.READERS["dino-rn50"](tmp_path / "rn18.pth", {})
  with pytest.raises(ValueError, match=r"ResNet-18, not ResNet-50"):
    dino_convert.WRITERS["dino-rn50"](converted, tmp_path / "x.pth", {"depth": 50})
  # A model directory whose config says 50 but whose weights are a ResNet-18.
  model_io.save_model_dir(tmp_path / "dir", "resnet", converted.config, converted.variables)
  meta = json.loads((tmp_path / "dir" / "config.json").read_text())
  meta["config"]["depth"] = 50
  (tmp_path / "dir" / "config.json").write_text(json.dumps(meta))
  with pytest.raises(ValueError, match=r"do not match the model: missing keys .*layer1_0/bn3.*shape mismatches"):
    model_io.load_model_dir(tmp_path / "dir")


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path, rn50_file):
  torch.save(tiny_vit(seed=0).state_dict(), tmp_path / "vit.pth")
  with pytest.raises(ValueError, match=r"vit.pth: not a resnet state dict .*looks like vit -- use dino-vit"):
    dino_convert.READERS["dino-rn50"](tmp_path / "vit.pth", {})
  with pytest.raises(ValueError, match=r"not a vit state dict .*looks like resnet -- use dino-rn50"):
    dino_convert.READERS["dino-vit"](rn50_file[0], {})
  clip_like = {"visual.conv1.weight": torch.zeros(8, 3, 4, 4), "token_embedding.weight": torch.zeros(10, 8)}
  torch.save(clip_like, tmp_path / "clip.pt")
  with pytest.raises(ValueError, match=r"looks like clip -- use a CLIP format"):
    dino_convert.READERS["dino-vit"](tmp_path / "clip.pt", {})
  torch.save({"student": {}, "teacher": {}}, tmp_path / "ckpt.pth")
  with pytest.raises(ValueError, match=r"DINO training checkpoint .*dino-checkpoint"):
    dino_convert.READERS["dino-rn50"](tmp_path / "ckpt.pth", {})


def test_classifier_and_pickled_code_are_refused(tmp_path):
  model = TorchResNet(18)
  state = dict(model.state_dict())
  state["fc.weight"], state["fc.bias"] = torch.zeros(10, 512), torch.zeros(10)
  torch.save(state, tmp_path / "with_fc.pth")
  with pytest.raises(ValueError, match=r"holds a classifier .*drop_fc=true"):
    dino_convert.READERS["dino-rn50"](tmp_path / "with_fc.pth", {})
  without_fc = dino_convert.READERS["dino-rn50"](tmp_path / "with_fc.pth", {"drop_fc": "true"})
  assert without_fc.config["depth"] == 18
  torch.save(model, tmp_path / "whole_module.pth")  # pickles the class: needs code to load
  with pytest.raises(ValueError, match=r"whole_module.pth: refused: .*weights_only=True"):
    dino_convert.READERS["dino-rn50"](tmp_path / "whole_module.pth", {})


def test_timm_directory_round_trip(tmp_path):
  peer = tiny_vit(seed=7)
  converted = dino_convert.READERS["dino-vit"](_saved(peer, tmp_path / "v.pth"), {"heads": 2})
  dino_convert.WRITERS["timm-dino-vit"](converted, tmp_path / "timm", {})
  timm_config = json.loads((tmp_path / "timm" / "config.json").read_text())
  assert timm_config["model_args"]["num_heads"] == 2 and timm_config["num_classes"] == 0
  from safetensors.torch import load_file
  reloaded = tiny_vit(seed=8)
  reloaded.load_state_dict(load_file(tmp_path / "timm" / "model.safetensors"), strict=True)
  back = dino_convert.READERS["timm-dino-vit"](tmp_path / "timm", {})
  assert back.config == converted.config  # heads come from timm's config.json
  for key, value in model_io.flatten(converted.variables).items():
    np.testing.assert_array_equal(np.asarray(model_io.flatten(back.variables)[key]), value)
  # A timm classifier is not silently dropped.
  from safetensors.torch import save_file
  with_head = {**peer.state_dict(), "head.weight": torch.zeros(5, 64), "head.bias": torch.zeros(5)}
  save_file({k: v.contiguous() for k, v in with_head.items()}, tmp_path / "cls.safetensors")
  with pytest.raises(ValueError, match=r"holds a classifier .*drop_classifier=true"):
    dino_convert.READERS["timm-dino-vit"](tmp_path / "cls.safetensors", {"heads": 2})
  assert dino_convert.READERS["timm-dino-vit"](tmp_path / "cls.safetensors",
                                               {"heads": 2, "drop_classifier": True}).model_type == "vit"


def _saved(model: nn.Module, path):
  torch.save(model.state_dict(), path)
  return path


def test_reference_aligner_round_trip_and_application(tmp_path):
  generator = torch.Generator().manual_seed(0)
  weight, bias = torch.randn(8, 32, generator=generator), torch.randn(8, generator=generator)
  torch.save({"W": weight, "b": bias}, tmp_path / "Agri_Dino_aligner_DPT_CPT.pth")
  converted = dino_convert.READERS["agriclip-aligner"](tmp_path / "Agri_Dino_aligner_DPT_CPT.pth", {})
  assert converted.model_type == "linear_aligner" and converted.config == {"in_dim": 32, "out_dim": 8}
  features = np.random.default_rng(0).normal(size=(3, 32)).astype(np.float32)
  module, _ = model_io.build_model("linear_aligner", converted.config)
  got = np.asarray(module.apply(converted.variables, features))
  want = (torch.from_numpy(features) @ weight.T + bias).numpy()
  np.testing.assert_allclose(got, want, atol=1e-5)
  dino_convert.WRITERS["agriclip-aligner"](converted, tmp_path / "back.pth", {})
  back = torch.load(tmp_path / "back.pth", weights_only=True)
  assert set(back) == {"W", "b"}
  torch.testing.assert_close(back["W"], weight, rtol=0, atol=0)
  torch.testing.assert_close(back["b"], bias, rtol=0, atol=0)


def test_writers_refuse_models_of_the_wrong_type(tmp_path):
  model = registry.ConvertedModel("linear_aligner", {"in_dim": 2, "out_dim": 1},
                                  {"params": {"kernel": np.zeros((2, 1)), "bias": np.zeros(1)}})
  for fmt in ("dino-vit", "dino-rn50", "timm-dino-vit"):
    with pytest.raises(ValueError, match=f"format '{fmt}' writes"):
      dino_convert.WRITERS[fmt](model, tmp_path / "x", {})


def test_convert_command_passes_the_dino_options(checkpoint_file, tmp_path):
  """--which/--part/--heads reach the reader: the student backbone comes out, as torch computes it."""
  from agriclip_jax import cli, model_io
  path, student, _ = checkpoint_file
  out = tmp_path / "student_backbone"
  assert cli.main(["convert", "--src", str(path), "--src-format", "dino-checkpoint", "--which",
                   "student", "--part", "backbone", "--heads", "2", "--dst", str(out),
                   "--dst-format", "flax"]) == 0
  model_type, config, variables = model_io.load_model_dir(out)
  assert model_type == "vit"
  module, _ = model_io.build_model(model_type, config)
  images = np.random.default_rng(7).normal(size=(2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    want = student.backbone(nchw(images)).numpy()
  np.testing.assert_allclose(np.asarray(module.apply(variables, images)), want, atol=1e-4, rtol=0)
