"""The V-JEPA video encoder: a pre-norm ViT over 3D patches (tubelets) with a fixed sin-cos table.

Module and parameter names follow the reference code (patch_embed.proj, pos_embed, blocks.i.{norm1,
attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm), so state dicts map 1:1 to Meta's checkpoints
once their ``module.backbone.`` prefix is stripped.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vjepa_ray.models.pos_embed import Grid, resize_table, sincos_3d

LAYER_NORM_EPS = 1e-6
INIT_STD = 0.02

# name -> (embed_dim, depth, num_heads, mlp_ratio), as in the reference's vit_* constructors.
MODEL_SPECS: dict[str, tuple[int, int, int, float]] = {
    "vit_tiny": (192, 12, 3, 4.0),
    "vit_small": (384, 12, 6, 4.0),
    "vit_base": (768, 12, 12, 4.0),
    "vit_large": (1024, 24, 16, 4.0),
    "vit_huge": (1280, 32, 16, 4.0),
    "vit_giant": (1408, 40, 16, 48 / 11),
    # V-JEPA 2's released ViT-g (the 2.0 release's vit_giant_xformers): V-JEPA 1's giant with 22 heads.
    "vit_giant_xformers": (1408, 40, 22, 48 / 11),
}


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rows_from: int = 0) -> torch.Tensor:
        """Attention of rows ``rows_from:`` of x over all rows of x -> [B, N - rows_from, C]."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q[:, :, rows_from:], k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n - rows_from, c))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, rows_from: int = 0) -> torch.Tensor:
        """x [B, N, C] -> rows ``rows_from:`` of the output; earlier rows only serve as keys and values.

        Every output row depends on the other rows through attention alone, so leaving rows out
        changes nothing in the rows that are kept.
        """
        x = x[:, rows_from:] + self.attn(self.norm1(x), rows_from)
        return x + self.mlp(self.norm2(x))


def run_blocks(blocks: Sequence[nn.Module], x: torch.Tensor, activation_checkpointing: bool,
               rows_from: int = 0) -> torch.Tensor:
    """Runs the blocks in order; with checkpointing, each block's activations are recomputed in backward.

    Only rows ``rows_from:`` of the last block's output are computed (and returned): callers that
    discard the first rows save that block's MLP and projections for them.
    Non-reentrant checkpointing, because DeepSpeed engines call the encoder several times per step.
    """
    recompute = activation_checkpointing and torch.is_grad_enabled()
    for i, block in enumerate(blocks):
        start = rows_from if i == len(blocks) - 1 else 0
        x = checkpoint(block, x, start, use_reentrant=False) if recompute else block(x, start)
    return x


def init_weights_(module: nn.Module) -> None:
    """The initialisation V-JEPA 1 pretraining effectively uses.

    Linear and Conv weights trunc_normal(std 0.02) (the bounds +-2 are absolute, so nothing is
    truncated in practice), biases 0, LayerNorm 1/0. The reference also divides each block's
    attn.proj and mlp.fc2 weights by sqrt(2 * layer_id), but V-JEPA 1's ``init_video_model`` then
    re-initialises every Linear, which undoes it; so there is no depth rescaling here.
    """
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv3d)):
            nn.init.trunc_normal_(m.weight, std=INIT_STD, a=-2.0, b=2.0)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, N, D] at index [B, K] -> [B, K, D]."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def check_index(name: str, index: torch.Tensor, batch: int, num_tokens: int) -> None:
    """Raises ValueError unless ``index`` is an int64 [batch, K] tensor of token ids in [0, num_tokens).

    The range check reads the min and max back from the device (one sync); an out-of-range gather
    on a GPU would otherwise kill the CUDA context instead of raising.
    """
    if not isinstance(index, torch.Tensor) or index.dtype != torch.int64:
        got = index.dtype if isinstance(index, torch.Tensor) else type(index).__name__
        raise ValueError(f"{name}: expected a torch.int64 tensor, got {got}")
    if index.dim() != 2 or index.shape[0] != batch:
        raise ValueError(f"{name}: expected shape [{batch}, K], got {list(index.shape)}")
    if index.numel() and index.device.type != "meta":
        lo, hi = torch.stack(torch.aminmax(index)).tolist()
        if lo < 0 or hi >= num_tokens:
            raise ValueError(f"{name}: expected token ids in [0, {num_tokens}), got values in [{lo}, {hi}]")


class PatchEmbed3D(nn.Module):
    """Conv3d over (tubelet, patch, patch) cubes, flattened to tokens in (t, h, w) order.

    Called as a module (rather than reading ``proj.weight`` directly) so that ZeRO-3 gathers its
    partitioned weights through the usual forward hooks.
    """

    def __init__(self, patch_size: int, tubelet_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        size = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=size, stride=size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """The encoder. ``forward(x [B, 3, T, H, W], keep [B, K] | None) -> [B, K or N, D]``.

    The position table is a buffer (the reference uses a frozen Parameter):
    it is fixed, so keeping it out of ``parameters()`` keeps it out of the optimizer, weight decay,
    the EMA and ZeRO partitioning, while ``state_dict()`` still carries it under ``pos_embed``.
    """

    def __init__(self, img_size: int, num_frames: int, patch_size: int = 16, tubelet_size: int = 2, *,
                 embed_dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 in_chans: int = 3, uniform_power: bool = True, activation_checkpointing: bool = False):
        super().__init__()
        if img_size <= 0 or img_size % patch_size:
            raise ValueError(f"img_size: expected a positive multiple of patch_size {patch_size}, got {img_size}")
        if num_frames <= 0 or num_frames % tubelet_size:
            raise ValueError(
                f"num_frames: expected a positive multiple of tubelet_size {tubelet_size}, got {num_frames}")
        self.img_size, self.num_frames = img_size, num_frames
        self.patch_size, self.tubelet_size, self.in_chans = patch_size, tubelet_size, in_chans
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.uniform_power = uniform_power
        self.activation_checkpointing = activation_checkpointing
        self.grid: Grid = (num_frames // tubelet_size, img_size // patch_size, img_size // patch_size)
        self.num_patches = math.prod(self.grid)

        self.patch_embed = PatchEmbed3D(patch_size, tubelet_size, in_chans, embed_dim)
        self.register_buffer("pos_embed", sincos_3d(embed_dim, *self.grid, uniform_power).unsqueeze(0))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        init_weights_(self)

    def input_grid(self, x: torch.Tensor) -> Grid:
        """Token grid of a clip; raises ValueError on a tensor that is not [B, C, T, H, W] as expected."""
        if x.dim() != 5:
            raise ValueError(f"x: expected a 5-D tensor [B, {self.in_chans}, T, H, W], got shape {list(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"x: expected {self.in_chans} channels in dim 1, got shape {list(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x: expected a floating-point tensor, got {x.dtype}")
        t, h, w = x.shape[2:]
        if t % self.tubelet_size or h % self.patch_size or w % self.patch_size or 0 in (t, h, w):
            raise ValueError(f"x: expected T a multiple of {self.tubelet_size} and H, W multiples of "
                             f"{self.patch_size}, got T, H, W = {t}, {h}, {w}")
        return t // self.tubelet_size, h // self.patch_size, w // self.patch_size

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        grid = self.input_grid(x)
        tokens = self.patch_embed(x)
        tokens = tokens + resize_table(self.pos_embed, self.grid, grid).to(tokens.dtype)
        if keep is not None:
            check_index("keep", keep, x.shape[0], tokens.shape[1])
            tokens = gather_tokens(tokens, keep)
        tokens = run_blocks(self.blocks, tokens, self.activation_checkpointing and self.training)
        return self.norm(tokens)


def build_encoder(name: str, num_frames: int, crop_size: int, patch_size: int = 16, tubelet_size: int = 2,
                  **kwargs) -> VisionTransformer:
    """One of ``MODEL_SPECS``, for clips of ``num_frames`` x ``crop_size``^2; kwargs go to the encoder."""
    if name not in MODEL_SPECS:
        raise ValueError(f"model name: expected one of {', '.join(MODEL_SPECS)}, got {name!r}")
    embed_dim, depth, num_heads, mlp_ratio = MODEL_SPECS[name]
    return VisionTransformer(crop_size, num_frames, patch_size, tubelet_size, embed_dim=embed_dim, depth=depth,
                             num_heads=num_heads, mlp_ratio=mlp_ratio, **kwargs)
