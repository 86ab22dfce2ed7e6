"""A tiny Vision Transformer (Dosovitskiy et al. 2021) for 28-32 px images.

Patch size 4, width 96, depth 6, 3 heads, MLP ratio 2, a class token and learned position
embeddings sized to the image. Attention is written out with ``nn.Linear`` (qkv, proj) and
plain tensor ops, not ``nn.MultiheadAttention`` or fused SDPA, so the quantizer (which swaps
every Conv2d/Linear) covers every matmul weight and ONNX export is straightforward.
"""

from __future__ import annotations

import torch
from torch import nn

from quantpatch.errors import ShapeError
from quantpatch.models._base import MODELS, check_args


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each (b, heads, n, head_dim)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        patch: int = 4,
        dim: int = 96,
        depth: int = 6,
        heads: int = 3,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        tokens = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (b, tokens, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


@MODELS.register
def vit_tiny(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """Tiny ViT: patch 4, dim 96, depth 6, 3 heads, MLP x2 (0.47M params; size % 4 == 0)."""
    check_args("vit_tiny", in_channels, num_classes, image_size, min_size=8)
    if image_size % 4:
        raise ShapeError(
            f"vit_tiny needs image_size divisible by the patch size 4, got {image_size}"
        )
    return VisionTransformer(in_channels, num_classes, image_size)
