"""The V-JEPA predictor: from the context tokens' features, predict the features at the target positions.

Names follow the reference (predictor_embed, mask_tokens.{i}, predictor_pos_embed, predictor_blocks,
predictor_norm, predictor_proj, and 2.1's video_mod_embed, img_mod_embed, predictor_proj_context) so state
dicts map 1:1 to Meta's checkpoints. V-JEPA 2.0's predictor is V-JEPA 1's with rotary embeddings (2.0's
layout) in place of the table. 2.1's reads and predicts the encoder's four levels (4 D wide), adds a
modality embedding to every token, and, for its dense context loss, also predicts the context tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from vjepa_ray.models.families import DEFAULT_FAMILY, Family, get_family
from vjepa_ray.models.pos_embed import Grid
from vjepa_ray.models.rope import Rotary3D
from vjepa_ray.models.sizes import HIERARCHICAL_LEVELS
from vjepa_ray.models.vit import (
    LAYER_NORM_EPS,
    Block,
    check_index,
    init_weights_,
    rescale_by_depth_,
    run_blocks,
)


class Predictor(nn.Module):
    """Narrow transformer over [context tokens, mask tokens at the target positions].

    There are ``num_mask_tokens`` learnable mask tokens (``mask_index`` picks one; the family's
    ``mask_tokens`` rule says which for each mask config), zero-initialised as in V-JEPA 1. Positions on the
    encoder's token ``grid`` follow the family's scheme at the predictor's own width: V-JEPA 1 adds a fixed
    sin-cos table, 2.0 and 2.1 rotate queries and keys in every block instead (2.1's rows and columns rescaled
    by the ``patch_size``-pixel patches, as the encoder's).

    ``embed_dim`` is the encoder's width D. A family with ``hierarchical_norms`` reads and predicts the
    encoder's ``num_levels`` = 4 levels: ``predictor_embed`` is Linear(4 D -> D), GELU, Linear(D -> width)
    and ``predictor_proj`` is width -> 4 D (the release's predictor has a depth table too, 4, 8, 12, 20, 24
    or 40 blocks, but it only sets that count, so any depth is built here). A family with ``image_inputs``
    adds a modality embedding (image or video) to every token, context and mask tokens alike. A family with
    a ``context_loss`` also projects the context tokens' outputs (``predictor_proj_context``, width -> 4 D):
    ``forward(..., predict_context=True)``.
    """

    def __init__(self, grid: Grid, embed_dim: int, predictor_embed_dim: int = 384, depth: int = 12, *,
                 num_heads: int, num_mask_tokens: int = 2, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 uniform_power: bool = True, activation_checkpointing: bool = False, patch_size: int = 16,
                 family: Family | str = DEFAULT_FAMILY):
        super().__init__()
        family = get_family(family)
        if num_mask_tokens < 1:
            raise ValueError(f"num_mask_tokens: expected >= 1, got {num_mask_tokens}")
        self.family = family
        self.grid: Grid = tuple(grid)
        self.num_patches = math.prod(self.grid)
        self.embed_dim, self.predictor_embed_dim = embed_dim, predictor_embed_dim
        self.num_levels = HIERARCHICAL_LEVELS if family.hierarchical_norms else 1
        self.num_heads, self.uniform_power = num_heads, uniform_power
        self.activation_checkpointing = activation_checkpointing

        levels_dim = self.num_levels * embed_dim
        if self.num_levels == 1:
            self.predictor_embed = nn.Linear(embed_dim, predictor_embed_dim)
        else:
            # Down to the encoder's width first: 4 D straight to the predictor's width would be a large cut.
            self.predictor_embed = nn.Sequential(nn.Linear(levels_dim, embed_dim), nn.GELU(),
                                                 nn.Linear(embed_dim, predictor_embed_dim))
        self.mask_tokens = nn.ParameterList(
            nn.Parameter(torch.zeros(1, 1, predictor_embed_dim)) for _ in range(num_mask_tokens))
        # A buffer, not a frozen Parameter, for the reasons given on VisionTransformer.
        self.register_buffer("predictor_pos_embed", family.positions.table(predictor_embed_dim, self.grid,
                                                                           uniform_power))
        self.rope: Rotary3D | None = family.positions.rotary(predictor_embed_dim // num_heads, patch_size)
        self.predictor_blocks = nn.ModuleList(
            Block(predictor_embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth))
        self.predictor_norm = nn.LayerNorm(predictor_embed_dim, eps=LAYER_NORM_EPS)
        self.predictor_proj = nn.Linear(predictor_embed_dim, levels_dim)
        if family.context_loss is not None:
            self.predictor_proj_context = nn.Linear(predictor_embed_dim, levels_dim)
        init_weights_(self)  # leaves the mask tokens at zero
        if family.depth_scaled_init:
            rescale_by_depth_(self.predictor_blocks)
        if family.image_inputs:
            # As the encoder's: near zero, after init_weights_.
            self.video_mod_embed = nn.Parameter(torch.empty(1, 1, predictor_embed_dim).normal_(std=1e-6))
            self.img_mod_embed = nn.Parameter(torch.empty(1, 1, predictor_embed_dim).normal_(std=1e-6))

    @property
    def num_mask_tokens(self) -> int:
        return len(self.mask_tokens)

    def image_parameters(self) -> list[nn.Parameter]:
        """The parameters that only images reach (``forward(..., image=True)``): 2.1's image modality embedding."""
        return [self.img_mod_embed] if self.family.image_inputs else []

    @property
    def predicts_context(self) -> bool:
        """Whether ``forward(..., predict_context=True)`` can also predict the context tokens."""
        return hasattr(self, "predictor_proj_context")

    def forward(self, context: torch.Tensor, context_idx: torch.Tensor, target_idx: torch.Tensor,
                mask_index: int, grid: Grid | None = None, *, predict_context: bool = False,
                image: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """context [B, Nc, L D] at token ids context_idx [B, Nc] -> predictions [B, Nt, L D] at target_idx
        [B, Nt] (L: ``num_levels``).

        Output rows follow the order of ``target_idx``. ``grid``: the token grid of the clips the ids index
        (default: the predictor's); rotary positions take any grid, a position table only its own.
        ``predict_context``: also the predictions at the context tokens, [B, Nc, L D], returned second.
        ``image``: the tokens are an image's (2.1's image modality embedding, else the video one).
        """
        grid = self.grid if grid is None else tuple(grid)
        if self.predictor_pos_embed is not None and grid != self.grid:
            raise ValueError(f"grid: a predictor with a position table takes its own grid {self.grid}, got {grid}")
        levels_dim = self.num_levels * self.embed_dim
        if context.dim() != 3 or context.shape[-1] != levels_dim:
            raise ValueError(f"context: expected shape [B, Nc, {levels_dim}], got {list(context.shape)}")
        if predict_context and not self.predicts_context:
            raise ValueError(f"predict_context: family {self.family.name}'s predictor predicts the targets only")
        batch, num_context = context.shape[:2]
        num_tokens = math.prod(grid)
        check_index("context_idx", context_idx, batch, num_tokens)
        if context_idx.shape[1] != num_context:
            raise ValueError(f"context_idx: expected shape [{batch}, {num_context}] to match context, "
                             f"got {list(context_idx.shape)}")
        check_index("target_idx", target_idx, batch, num_tokens)
        if not 0 <= mask_index < self.num_mask_tokens:
            raise ValueError(f"mask_index: expected an int in [0, {self.num_mask_tokens}), got {mask_index}")

        x = self.predictor_embed(context)
        queries = self.mask_tokens[mask_index].expand(batch, target_idx.shape[1], -1)
        if self.predictor_pos_embed is not None:
            pos = self.predictor_pos_embed[0]
            x = x + pos[context_idx].to(x.dtype)
            queries = queries + pos[target_idx]
        x = torch.cat([x, queries.to(x.dtype)], dim=1)
        if self.family.image_inputs:
            x = x + (self.img_mod_embed if image else self.video_mod_embed).to(x.dtype)
        rope = None
        if self.rope is not None:
            rope = self.rope.tables(torch.cat([context_idx, target_idx], dim=1), grid)
        # Without the context's predictions only the query rows are output, so the last block computes only those.
        rows_from = 0 if predict_context else num_context
        x = self.predictor_norm(run_blocks(self.predictor_blocks, x, self.activation_checkpointing and self.training,
                                           rows_from=rows_from, rope=rope))
        if not predict_context:
            return self.predictor_proj(x)
        return self.predictor_proj(x[:, num_context:]), self.predictor_proj_context(x[:, :num_context])
