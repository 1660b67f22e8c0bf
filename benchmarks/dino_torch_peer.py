"""The PyTorch peer of benchmarks/bench_dino_step.py: facebookresearch/dino's train step written
with plain torch.nn (ViT with SDPA attention, DINO head, loss, AdamW, clipping, EMA, centre), and
the copy of the project's Flax DINO parameters into it. Imported only where the PyTorch side runs,
so that the Flax-only checks (`bench_dino_step --gpu-check`) need no torch.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
  from benchmarks.bench_dino_step import DinoBenchConfig


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
  if rate == 0.0 or not training:
    return x
  keep = 1.0 - rate
  mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
  return x * mask / keep


class TorchBlock(nn.Module):
  """DINO's ViT block: x + attn(norm1(x)); x + mlp(norm2(x)), stochastic depth on both."""

  def __init__(self, dim: int, heads: int, mlp_dim: int, eps: float, drop_path_rate: float):
    super().__init__()
    self.heads, self.drop_path_rate = heads, drop_path_rate
    self.norm1 = nn.LayerNorm(dim, eps=eps)
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)
    self.norm2 = nn.LayerNorm(dim, eps=eps)
    self.fc1 = nn.Linear(dim, mlp_dim)
    self.fc2 = nn.Linear(mlp_dim, dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    batch, length, dim = x.shape
    qkv = self.qkv(self.norm1(x)).reshape(batch, length, 3, self.heads, dim // self.heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, length, dim)
    x = x + drop_path(self.proj(y), self.drop_path_rate, self.training)
    y = self.fc2(F.gelu(self.fc1(self.norm2(x))))
    return x + drop_path(y, self.drop_path_rate, self.training)


class TorchViT(nn.Module):
  """DINO's VisionTransformer: patch conv with bias, cls token, no ln_pre, final norm, cls out."""

  def __init__(self, patch: int, dim: int, layers: int, heads: int, mlp_dim: int, grid: int,
               eps: float, drop_path_rate: float):
    super().__init__()
    self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.pos_embed = nn.Parameter(torch.randn(1, grid * grid + 1, dim) * 0.02)
    rates = [drop_path_rate * i / max(layers - 1, 1) for i in range(layers)]
    self.blocks = nn.ModuleList(TorchBlock(dim, heads, mlp_dim, eps, r) for r in rates)
    self.norm = nn.LayerNorm(dim, eps=eps)

  def positions(self, grid: int) -> torch.Tensor:
    old = int(round(math.sqrt(self.pos_embed.shape[1] - 1)))
    if grid == old:
      return self.pos_embed
    cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
    dim = patch_pos.shape[-1]
    # DINO's interpolate_pos_encoding: scale by (grid + 0.1) / old to dodge a rounding error.
    scale = (grid + 0.1) / old
    patch_pos = F.interpolate(patch_pos.reshape(1, old, old, dim).permute(0, 3, 1, 2),
                              scale_factor=(scale, scale), mode="bicubic", align_corners=False)
    return torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)], 1)

  def forward(self, images: torch.Tensor) -> torch.Tensor:
    x = self.patch_embed(images)  # [B, D, g, g]
    grid = x.shape[-1]
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.positions(grid)
    for block in self.blocks:
      x = block(x)
    return self.norm(x[:, 0])


class TorchDINOHead(nn.Module):
  def __init__(self, in_dim: int, out_dim: int, hidden: int, bottleneck: int):
    super().__init__()
    self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                             nn.GELU(), nn.Linear(hidden, bottleneck))
    # Weight-normed prototypes with g fixed to 1 (norm_last_layer): W = v / ||v|| per row.
    self.last_layer_v = nn.Parameter(torch.randn(out_dim, bottleneck) * bottleneck ** -0.5)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.normalize(self.mlp(x), dim=-1)
    return x @ F.normalize(self.last_layer_v, dim=1).T


class TorchDINO(nn.Module):
  def __init__(self, bench: DinoBenchConfig):
    super().__init__()
    from agriclip_jax.models.configs import vision_config
    v = vision_config(bench.variant, flavour="dino", image_size=bench.global_size)
    self.backbone = TorchViT(v.patch_size, v.width, v.layers, v.heads, v.mlp_dim, v.grid_size,
                             v.ln_eps, bench.drop_path_rate)
    self.head = TorchDINOHead(v.width, bench.out_dim, bench.hidden_dim, bench.bottleneck_dim)

  def multi_crop(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None) -> torch.Tensor:
    """[B, n, 3, H, W] groups -> [B, V, K]; one backbone pass per resolution, sample-major."""
    batch = global_crops.shape[0]
    groups = [global_crops] + ([local_crops] if local_crops is not None else [])
    features = [self.backbone(g.flatten(0, 1)).reshape(batch, g.shape[1], -1) for g in groups]
    return self.head(torch.cat(features, 1))


def torch_dino_loss(student: torch.Tensor, teacher: torch.Tensor, centre: torch.Tensor,
                    teacher_temp: float, student_temp: float = 0.1) -> torch.Tensor:
  """Mean over (teacher crop i, student crop v != i) of batch-mean -sum P_t log P_s."""
  n_global, n_views = teacher.shape[1], student.shape[1]
  teacher_probs = F.softmax((teacher - centre) / teacher_temp, dim=-1).detach()
  student_log_probs = F.log_softmax(student / student_temp, dim=-1)
  per_pair = -torch.einsum("bik,bvk->iv", teacher_probs, student_log_probs) / student.shape[0]
  off_diagonal = ~torch.eye(n_global, n_views, dtype=torch.bool)
  return per_pair[off_diagonal].sum() / off_diagonal.sum()


class TorchDinoStep:
  """One DINO iteration of the reference recipe; schedules are passed in as numbers."""

  def __init__(self, bench: DinoBenchConfig, lr: float, weight_decay: float, clip: float = 3.0):
    torch.manual_seed(0)
    self.student = TorchDINO(bench)
    self.teacher = copy.deepcopy(self.student)
    for p in self.teacher.parameters():
      p.requires_grad_(False)
    decay = [p for n, p in self.student.named_parameters() if p.ndim > 1 and not n.endswith("bias")]
    no_decay = [p for n, p in self.student.named_parameters() if p.ndim <= 1 or n.endswith("bias")]
    self.optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=weight_decay),
                                        dict(params=no_decay, weight_decay=0.0)],
                                       lr=lr, betas=(0.9, 0.999), eps=1e-8, foreach=True)
    self.centre = torch.zeros(bench.out_dim)
    self.clip = clip
    self.last_layer = [self.student.head.last_layer_v]

  def load_flax(self, params: Any) -> None:
    """Student and teacher from Flax DINO params (the teacher starts as a copy of the student)."""
    copy_flax_dino_to_torch(params, self.student)
    copy_flax_dino_to_torch(params, self.teacher)

  def __call__(self, global_crops: torch.Tensor, local_crops: torch.Tensor, momentum: float,
               teacher_temp: float = 0.04, freeze_last_layer: bool = True) -> tuple[float, float]:
    """Returns (loss, global gradient norm before clipping)."""
    self.student.train()
    with torch.no_grad():
      teacher_out = self.teacher.multi_crop(global_crops, None)
    student_out = self.student.multi_crop(global_crops, local_crops)
    loss = torch_dino_loss(student_out, teacher_out, self.centre, teacher_temp)
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for p in self.student.parameters() if p.grad is not None]
    norms = torch._foreach_norm(grads)
    grad_norm = torch.linalg.vector_norm(torch.stack(norms))
    scales = [torch.clamp(self.clip / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, scales)
    if freeze_last_layer:
      for p in self.last_layer:
        p.grad = None
    self.optimizer.step()
    with torch.no_grad():
      teacher_params = list(self.teacher.parameters())
      torch._foreach_mul_(teacher_params, momentum)
      torch._foreach_add_(teacher_params, list(self.student.parameters()), alpha=1.0 - momentum)
      self.centre.mul_(0.9).add_(teacher_out.reshape(-1, teacher_out.shape[-1]).mean(0), alpha=0.1)
    return float(loss.detach()), float(grad_norm)


def copy_flax_dino_to_torch(params: Any, peer: TorchDINO) -> None:
  """Loads Flax DINO params (backbone/..., head/...) into the torch peer (Linear: kernel.T)."""
  t = lambda x: torch.from_numpy(np.array(x, dtype=np.float32))
  backbone, head = params["backbone"], params["head"]
  with torch.no_grad():
    vit = peer.backbone
    vit.patch_embed.weight.copy_(t(backbone["conv1"]["kernel"]).permute(3, 2, 0, 1))
    vit.patch_embed.bias.copy_(t(backbone["conv1"]["bias"]))
    vit.cls_token.copy_(t(backbone["class_embedding"])[None, None])
    vit.pos_embed.copy_(t(backbone["positional_embedding"])[None])
    for i, block in enumerate(vit.blocks):
      p = backbone["transformer"][f"resblocks_{i}"]
      for torch_norm, name in ((block.norm1, "ln_1"), (block.norm2, "ln_2")):
        torch_norm.weight.copy_(t(p[name]["scale"]))
        torch_norm.bias.copy_(t(p[name]["bias"]))
      for linear, (group, name) in ((block.qkv, ("attn", "qkv")), (block.proj, ("attn", "out")),
                                    (block.fc1, ("mlp", "c_fc")), (block.fc2, ("mlp", "c_proj"))):
        linear.weight.copy_(t(p[group][name]["kernel"]).T)
        linear.bias.copy_(t(p[group][name]["bias"]))
    vit.norm.weight.copy_(t(backbone["ln_post"]["scale"]))
    vit.norm.bias.copy_(t(backbone["ln_post"]["bias"]))
    for i, layer in enumerate((0, 2, 4)):
      peer.head.mlp[layer].weight.copy_(t(head[f"mlp_{i}"]["kernel"]).T)
      peer.head.mlp[layer].bias.copy_(t(head[f"mlp_{i}"]["bias"]))
    peer.head.last_layer_v.copy_(t(head["last_layer"]["kernel_v"]).T)


def to_torch_crops(crops: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
  """[B, n, H, W, 3] channels-last numpy -> [B, n, 3, H, W] contiguous torch (not timed)."""
  convert = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 1, 4, 2, 3)))
  return convert(crops["global_crops"]), convert(crops["local_crops"])
