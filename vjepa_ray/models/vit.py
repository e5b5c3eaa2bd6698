"""The V-JEPA video encoder: a pre-norm ViT over 3D patches (tubelets), built for a model family.

The family (``vjepa_ray.models.families``) says how tokens learn their position (V-JEPA 1's sin-cos table,
2.0's rotary embeddings, 2.1's interleaved and interpolated ones), whether the blocks start depth-scaled,
and what 2.1 adds: a modality embedding added to the tokens, a second patch embedding (tubelet 1) for
single-frame inputs (images), and a LayerNorm at each of four depths (``norms_block``) whose last one takes
the place of the final ``norm``. 2.1 trains on all four: ``forward(..., all_levels=True)`` returns their
outputs concatenated, [B, N, 4 D] (the release's ``training_mode=True``), and its features are the last
level alone.

Module and parameter names follow the reference code (patch_embed.proj, pos_embed, blocks.i.{norm1,
attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm, and 2.1's patch_embed_img, img_mod_embed,
video_mod_embed, norms_block.i), so state dicts map 1:1 to Meta's checkpoints once their
``module.backbone.`` prefix is stripped.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vjepa_ray.models.families import DEFAULT_FAMILY, Family, get_family
from vjepa_ray.models.pos_embed import Grid, resize_table
from vjepa_ray.models.rope import RopeTables, Rotary3D, rotate
from vjepa_ray.models.sizes import HIERARCHICAL_LAYERS, MODEL_SPECS

LAYER_NORM_EPS = 1e-6
INIT_STD = 0.02


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rows_from: int = 0, rope: RopeTables | None = None) -> torch.Tensor:
        """Attention of rows ``rows_from:`` of x over all rows of x -> [B, N - rows_from, C].

        ``rope``: rotary tables of the N rows, applied to queries and keys.
        """
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q = q[:, :, rows_from:]
        if rope is not None:
            cos, sin = rope
            q = rotate(q, (cos[..., rows_from:, :], sin[..., rows_from:, :]))
            k = rotate(k, rope)
        out = F.scaled_dot_product_attention(q, k, v)
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

    def forward(self, x: torch.Tensor, rows_from: int = 0, rope: RopeTables | None = None) -> torch.Tensor:
        """x [B, N, C] -> rows ``rows_from:`` of the output; earlier rows only serve as keys and values.

        Every output row depends on the other rows through attention alone, so leaving rows out
        changes nothing in the rows that are kept.
        """
        x = x[:, rows_from:] + self.attn(self.norm1(x), rows_from, rope)
        return x + self.mlp(self.norm2(x))


def run_blocks(blocks: Sequence[nn.Module], x: torch.Tensor, activation_checkpointing: bool,
               rows_from: int = 0, rope: RopeTables | None = None) -> torch.Tensor:
    """Runs the blocks in order; with checkpointing, each block's activations are recomputed in backward.

    Only rows ``rows_from:`` of the last block's output are computed (and returned): callers that
    discard the first rows save that block's MLP and projections for them.
    Non-reentrant checkpointing, because DeepSpeed engines call the encoder several times per step.
    """
    recompute = activation_checkpointing and torch.is_grad_enabled()
    for i, block in enumerate(blocks):
        start = rows_from if i == len(blocks) - 1 else 0
        x = checkpoint(block, x, start, rope, use_reentrant=False) if recompute else block(x, start, rope)
    return x


def init_weights_(module: nn.Module) -> None:
    """The initialisation every family starts from.

    Linear and Conv weights trunc_normal(std 0.02) (the bounds +-2 are absolute, so nothing is
    truncated in practice), biases 0, LayerNorm 1/0. The V-JEPA 2 families then scale their blocks'
    output projections down with depth (:func:`rescale_by_depth_`).
    """
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv3d)):
            nn.init.trunc_normal_(m.weight, std=INIT_STD, a=-2.0, b=2.0)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def rescale_by_depth_(blocks: Sequence[Block]) -> None:
    """Divides block i's ``attn.proj`` and ``mlp.fc2`` weights by sqrt(2 (i + 1)), the reference's
    ``_rescale_blocks``: the branches that write into the residual stream start smaller the deeper they
    are. The attentive probe and the V-JEPA 2 families use it. V-JEPA 1's pretraining does not: both
    releases' models rescale when built, but V-JEPA 1's ``init_video_model`` then re-initialises every
    Linear, which undoes it, and V-JEPA 2's no longer does.
    """
    with torch.no_grad():
        for i, block in enumerate(blocks):
            block.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
            block.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))


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

    ``family`` (a ``Family`` or its name) picks the positions and the rest (see the module docstring). A
    position table is a buffer (the reference uses a frozen Parameter): it is fixed, so keeping it out of
    ``parameters()`` keeps it out of the optimizer, weight decay, the EMA and ZeRO partitioning, while
    ``state_dict()`` still carries it under ``pos_embed``. Families without a table take clips of any
    number of frames and any crop.
    """

    def __init__(self, img_size: int, num_frames: int, patch_size: int = 16, tubelet_size: int = 2, *,
                 embed_dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 in_chans: int = 3, uniform_power: bool = True, activation_checkpointing: bool = False,
                 family: Family | str = DEFAULT_FAMILY):
        super().__init__()
        family = get_family(family)
        if img_size <= 0 or img_size % patch_size:
            raise ValueError(f"img_size: expected a positive multiple of patch_size {patch_size}, got {img_size}")
        if num_frames <= 0 or num_frames % tubelet_size:
            raise ValueError(
                f"num_frames: expected a positive multiple of tubelet_size {tubelet_size}, got {num_frames}")
        if family.hierarchical_norms and depth not in HIERARCHICAL_LAYERS:
            raise ValueError(f"depth: V-JEPA 2.1's encoder is defined for depths "
                             f"{', '.join(map(str, HIERARCHICAL_LAYERS))}, got {depth}")
        self.family = family
        self.img_size, self.num_frames = img_size, num_frames
        self.patch_size, self.tubelet_size, self.in_chans = patch_size, tubelet_size, in_chans
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.uniform_power = uniform_power
        self.activation_checkpointing = activation_checkpointing
        self.grid: Grid = (num_frames // tubelet_size, img_size // patch_size, img_size // patch_size)
        self.num_patches = math.prod(self.grid)

        self.patch_embed = PatchEmbed3D(patch_size, tubelet_size, in_chans, embed_dim)
        # A None buffer stays out of state_dict().
        self.register_buffer("pos_embed", family.positions.table(embed_dim, self.grid, uniform_power))
        self.rope: Rotary3D | None = family.positions.rotary(embed_dim // num_heads, patch_size)
        if family.image_inputs:
            self.patch_embed_img = PatchEmbed3D(patch_size, 1, in_chans, embed_dim)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth))
        if family.hierarchical_norms:
            self.hierarchical_layers = HIERARCHICAL_LAYERS[depth]
            self.norms_block = nn.ModuleList(
                nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS) for _ in self.hierarchical_layers)
        else:
            self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        init_weights_(self)
        if family.depth_scaled_init:
            rescale_by_depth_(self.blocks)
        if family.image_inputs:
            # After init_weights_, which would not touch them anyway: 2.1 starts them near zero.
            self.img_mod_embed = nn.Parameter(torch.empty(1, 1, embed_dim).normal_(std=1e-6))
            self.video_mod_embed = nn.Parameter(torch.empty(1, 1, embed_dim).normal_(std=1e-6))

    def image_parameters(self) -> list[nn.Parameter]:
        """The parameters that only images (``is_image``) reach: 2.1's tubelet-1 patch embedding and image
        modality embedding; none for a family without image inputs."""
        if not self.family.image_inputs:
            return []
        return [*self.patch_embed_img.parameters(), self.img_mod_embed]

    def is_image(self, x: torch.Tensor) -> bool:
        """2.1 reads a single-frame clip as an image: its own patch embedding (tubelet 1) and modality."""
        return self.family.image_inputs and x.dim() == 5 and x.shape[2] == 1

    def input_grid(self, x: torch.Tensor) -> Grid:
        """Token grid of a clip; raises ValueError on a tensor that is not [B, C, T, H, W] as expected."""
        if x.dim() != 5:
            raise ValueError(f"x: expected a 5-D tensor [B, {self.in_chans}, T, H, W], got shape {list(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"x: expected {self.in_chans} channels in dim 1, got shape {list(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"x: expected a floating-point tensor, got {x.dtype}")
        t, h, w = x.shape[2:]
        tubelet = 1 if self.is_image(x) else self.tubelet_size
        if t % tubelet or h % self.patch_size or w % self.patch_size or 0 in (t, h, w):
            raise ValueError(f"x: expected T a multiple of {self.tubelet_size} and H, W multiples of "
                             f"{self.patch_size}, got T, H, W = {t}, {h}, {w}")
        return t // tubelet, h // self.patch_size, w // self.patch_size

    def embed(self, x: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, RopeTables | None]:
        """The tokens that enter the first block (the kept ones, in ``keep``'s order) and their rotary tables."""
        grid = self.input_grid(x)
        if self.is_image(x):
            tokens = self.patch_embed_img(x) + self.img_mod_embed
        else:
            tokens = self.patch_embed(x)
            if self.pos_embed is not None:
                tokens = tokens + resize_table(self.pos_embed, self.grid, grid).to(tokens.dtype)
            if self.family.image_inputs:
                tokens = tokens + self.video_mod_embed
        if keep is not None:
            check_index("keep", keep, x.shape[0], tokens.shape[1])
            tokens = gather_tokens(tokens, keep)
        if self.rope is None:
            return tokens, None
        ids = keep if keep is not None else torch.arange(tokens.shape[1], device=tokens.device)
        return tokens, self.rope.tables(ids, grid)

    def output_norm(self, layer: int) -> nn.LayerNorm:
        """The LayerNorm applied to block ``layer``'s output: ``norm``, or 2.1's norm at that depth."""
        if not self.family.hierarchical_norms:
            return self.norm
        if layer not in self.hierarchical_layers:
            raise ValueError(f"layer: V-JEPA 2.1 normalises the outputs of blocks {list(self.hierarchical_layers)}, "
                             f"got {layer}")
        return self.norms_block[self.hierarchical_layers.index(layer)]

    @property
    def output_layers(self) -> tuple[int, ...]:
        """The blocks whose normalised outputs the encoder trains on: 2.1's four hierarchical layers, else the
        last block."""
        return self.hierarchical_layers if self.family.hierarchical_norms else (len(self.blocks) - 1,)

    @property
    def num_levels(self) -> int:
        """How many D-wide levels ``forward(..., all_levels=True)`` concatenates."""
        return len(self.output_layers)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None, all_levels: bool = False) -> torch.Tensor:
        """Features [B, K or N, D] of the kept tokens (all by default); ``all_levels``: the normalised outputs of
        ``output_layers`` concatenated, [B, K or N, num_levels * D], what 2.1 trains on (one level elsewhere:
        the features)."""
        if all_levels:
            return torch.cat(self.forward_layers(x, self.output_layers, keep), dim=-1)
        tokens, rope = self.embed(x, keep)
        tokens = run_blocks(self.blocks, tokens, self.activation_checkpointing and self.training, rope=rope)
        return self.output_norm(len(self.blocks) - 1)(tokens)

    def forward_layers(self, x: torch.Tensor, layers: Sequence[int],
                       keep: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The normalised outputs of blocks ``layers`` (ascending), each [B, K or N, D].

        As the releases' ``out_layers``: ``norm`` on each (1.0, 2.0), or 2.1's norm of that depth, so 2.1's
        hierarchical features are ``torch.cat(forward_layers(x, encoder.hierarchical_layers), -1)``.
        """
        if not layers or list(layers) != sorted(set(layers)) or not 0 <= layers[0] <= layers[-1] < len(self.blocks):
            raise ValueError(f"layers: expected ascending block indices in [0, {len(self.blocks)}), got {layers}")
        norms = {layer: self.output_norm(layer) for layer in layers}
        tokens, rope = self.embed(x, keep)
        outputs, start = [], 0
        for layer in layers:
            tokens = run_blocks(self.blocks[start:layer + 1], tokens,
                                self.activation_checkpointing and self.training, rope=rope)
            outputs.append(norms[layer](tokens))
            start = layer + 1
        return outputs


def build_encoder(name: str, num_frames: int, crop_size: int, patch_size: int = 16, tubelet_size: int = 2,
                  **kwargs) -> VisionTransformer:
    """One of ``sizes.MODEL_SPECS``, for clips of ``num_frames`` x ``crop_size``^2; kwargs (e.g. ``family``) go to
    the encoder."""
    if name not in MODEL_SPECS:
        raise ValueError(f"model name: expected one of {', '.join(MODEL_SPECS)}, got {name!r}")
    embed_dim, depth, num_heads, mlp_ratio = MODEL_SPECS[name]
    return VisionTransformer(crop_size, num_frames, patch_size, tubelet_size, embed_dim=embed_dim, depth=depth,
                             num_heads=num_heads, mlp_ratio=mlp_ratio, **kwargs)
