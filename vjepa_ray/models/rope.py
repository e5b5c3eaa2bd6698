"""3D rotary position embeddings, as V-JEPA 2.0 and 2.1 compute them.

Each head's first ``3 * axis_dim`` channels rotate in three blocks (frame, row, column of the token;
``axis_dim = 2 * ((head_dim // 3) // 2)``); the channels after them pass unrotated. Within a block,
channels (2i, 2i+1) form a rotated pair; the angle of a channel is ``position * omega_f`` with
``omega_f = 10000^(-f / (axis_dim / 2))``. The releases differ in which frequency ``f`` a channel gets:

- 2.0 repeats the frequency vector (channel j gets f = j mod axis_dim/2), so the two channels of a
  pair can turn by different angles. Meta kept this for compatibility with its released weights
  (vjepa2 PR #15), and loading them needs it exactly.
- 2.1 interleaves it (channel j gets f = j // 2), the textbook rotation, and rescales row and column
  positions so that any crop spans the positions of the grid it was trained at (256 px).

Positions come from token ids, so a subset of tokens (the encoder's context, the predictor's targets)
rotates by its true place in the clip.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vjepa_ray.models.pos_embed import Grid

ROPE_BASE = 10000.0
# 2.1's rows and columns span the positions of a 256 px crop's grid whatever the crop.
INTERPOLATED_PIXELS = 256

RopeTables = tuple[torch.Tensor, torch.Tensor]


def token_positions(ids: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Token ids [..., N] on a (t, h, w) grid, w fastest -> float positions [..., N, 3] (frame, row, column)."""
    _, grid_h, grid_w = grid
    frame = ids // (grid_h * grid_w)
    row = (ids % (grid_h * grid_w)) // grid_w
    column = ids % grid_w
    return torch.stack([frame, row, column], dim=-1).float()


@dataclass(frozen=True)
class Rotary3D:
    """The rotation of one attention layout: ``tables`` once per forward, then ``rotate`` in every block."""

    head_dim: int
    interleaved: bool = False  # False: 2.0's repeated frequencies; True: 2.1's interleaved ones
    interpolate_to: int | None = None  # 2.1: rows and columns rescaled to span a grid of this side

    @property
    def axis_dim(self) -> int:
        return 2 * ((self.head_dim // 3) // 2)

    def tables(self, ids: torch.Tensor, grid: Grid) -> RopeTables:
        """cos and sin [B or 1, 1, N, 3 * axis_dim] for tokens ``ids`` ([B, N] or [N]) of a clip on ``grid``.

        Computed in float32 (the releases compute them in the activations' dtype, the same in fp32).
        """
        if self.axis_dim == 0:
            raise ValueError(f"head_dim {self.head_dim} is too small for 3D rotary embeddings (needs >= 6)")
        positions = token_positions(ids, grid)
        if self.interpolate_to is not None:
            # Multiplied, then divided, in 2.1's order, so the angles match its bit for bit.
            frame, row, column = positions.unbind(-1)
            _, grid_h, grid_w = grid
            span = self.interpolate_to - 1
            positions = torch.stack([frame, row * span / max(grid_h - 1, 1), column * span / max(grid_w - 1, 1)], -1)
        half = self.axis_dim // 2
        omega = 1.0 / ROPE_BASE ** (torch.arange(half, dtype=torch.float32, device=ids.device) / half)
        angles = positions.unsqueeze(-1) * omega  # [..., N, 3, half]
        if self.interleaved:
            angles = angles.repeat_interleave(2, dim=-1)
        else:
            angles = torch.cat([angles, angles], dim=-1)
        angles = angles.flatten(-2)
        if angles.dim() == 2:
            angles = angles.unsqueeze(0)
        angles = angles.unsqueeze(1)  # one table for every head
        return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, tables: RopeTables) -> torch.Tensor:
    """Queries or keys [B, heads, N, head_dim] rotated by ``Rotary3D.tables`` of the same N tokens."""
    cos, sin = tables
    width = cos.shape[-1]
    rotated, rest = x[..., :width], x[..., width:]
    pairs = rotated.unflatten(-1, (-1, 2))
    # (x_2i, x_2i+1) -> (-x_2i+1, x_2i): the 90-degree turn of each pair
    turned = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    out = rotated * cos.to(x.dtype) + turned * sin.to(x.dtype)
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out
