"""Fixed 3D sine-cosine position tables (V-JEPA 1), and their trilinear resizing.

A table row is the embedding of one token; rows are in token order (t, h, w) with w fastest, the
order in which the 3D patch embedding flattens a clip. Each axis has a 1D embedding whose first half
is sin(pos * omega) and second half cos(pos * omega), omega_i = 10000^(-i / (d/2)); the three axis
embeddings are concatenated (t | h | w) and cut to the model width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Grid = tuple[int, int, int]


def axis_dims(embed_dim: int, uniform_power: bool = True) -> tuple[int, int, int]:
    """Widths of the t, h and w embeddings before the concatenation is cut to ``embed_dim``.

    ``uniform_power`` (every V-JEPA config) gives each axis 2*ceil(D/6) dims, so the w axis loses the
    overshoot; otherwise t gets D/2 and h, w get D/4 each.
    """
    if uniform_power:
        d = 2 * math.ceil(embed_dim / 6)
        return d, d, d
    dims = (embed_dim // 2, embed_dim // 4, embed_dim // 4)
    if any(d % 2 for d in dims) or sum(dims) != embed_dim:
        raise ValueError(f"uniform_power=False needs embed_dim divisible by 8, got {embed_dim}")
    return dims


def _axis_embedding(dim: int, positions: torch.Tensor) -> torch.Tensor:
    half = dim // 2
    omega = 1.0 / 10000.0 ** (torch.arange(half, dtype=torch.float64, device=positions.device) / half)
    angles = positions[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_3d(embed_dim: int, grid_t: int, grid_h: int, grid_w: int,
              uniform_power: bool = True) -> torch.Tensor:
    """The float32 table [grid_t*grid_h*grid_w, embed_dim], computed in float64 like the reference.

    It is computed on the CPU and returned on the current default device, so a model built under
    ``torch.device("meta")`` or ``torch.device("cuda")`` gets its table there. (Computing it on the meta
    device directly would import torch's decomposition machinery, seconds of start-up for nothing.)
    """
    if min(embed_dim, grid_t, grid_h, grid_w) < 1:
        raise ValueError(f"expected positive embed_dim and grid, got {embed_dim} and {(grid_t, grid_h, grid_w)}")
    cpu = torch.device("cpu")
    t, h, w = torch.meshgrid(
        *(torch.arange(n, dtype=torch.float64, device=cpu) for n in (grid_t, grid_h, grid_w)), indexing="ij")
    parts = [_axis_embedding(d, pos.flatten()) for d, pos in zip(axis_dims(embed_dim, uniform_power), (t, h, w))]
    return torch.cat(parts, dim=1)[:, :embed_dim].to(torch.get_default_device(), torch.float32)


def resize_table(table: torch.Tensor, from_grid: Grid, to_grid: Grid) -> torch.Tensor:
    """Trilinearly resizes a [1, N, D] table laid out on ``from_grid`` to ``to_grid``.

    Returns ``table`` itself when the grids match. This is how the reference encoder adapts its table
    to clips of another length or crop, so features of released weights match the reference's.
    """
    if tuple(to_grid) == tuple(from_grid):
        return table
    n, dim = table.shape[-2:]
    if n != math.prod(from_grid):
        raise ValueError(f"table has {n} rows, expected {math.prod(from_grid)} for grid {tuple(from_grid)}")
    volume = table.reshape(1, *from_grid, dim).permute(0, 4, 1, 2, 3)
    resized = F.interpolate(volume, size=tuple(to_grid), mode="trilinear", align_corners=False)
    return resized.permute(0, 2, 3, 4, 1).reshape(1, -1, dim)


def infer_sincos_grid(table: torch.Tensor, uniform_power: bool = True) -> Grid | None:
    """The grid for which ``table`` ([N, D] or [1, N, D]) is the ``sincos_3d`` table (to the
    rounding of its dtype), or None.

    Each axis embedding starts with sin(position), which takes a distinct value at each integer
    position, so counting distinct values in that column gives the axis length.
    """
    if not table.is_floating_point() or table.dim() < 2:
        return None
    atol = max(1e-5, torch.finfo(table.dtype).eps)
    table = table.reshape(-1, table.shape[-1]).detach().to("cpu", torch.float32)
    n, dim = table.shape
    dt, dh, _ = axis_dims(dim, uniform_power)
    if dt + dh >= dim:
        return None
    grid_t = torch.unique(table[:, 0]).numel()
    grid_h = torch.unique(table[:, dt]).numel()
    grid_w = n // (grid_t * grid_h)
    if grid_t * grid_h * grid_w != n:
        return None
    expected = sincos_3d(dim, grid_t, grid_h, grid_w, uniform_power).cpu()
    return (grid_t, grid_h, grid_w) if torch.allclose(table, expected, atol=atol, rtol=0) else None
