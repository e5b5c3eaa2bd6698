"""``mask_ratio``: a masking knob in the units people think in, mapped onto the multi-block generator.

The generator (``vjepa_ray.recipe.masks``) is parametrised by a number of blocks and a spatial scale per block;
what it masks is the union of those blocks, which overlap, so the masked share of a clip is not the
scale times the number of blocks. Here the masked share is measured on the generator itself:

    masked_fraction(config, grid) = E[#target tokens] / #tokens

over ``SAMPLES`` draws of one clip (each draw samples a block size, as once per batch, and the block
positions, as per clip), before the batch-minimum truncation. ``spatial_scale_for_ratio`` then picks, for
a config's number of blocks, aspect ratios and temporal scale, the fixed spatial scale whose masked
fraction is closest to the requested ratio. Block areas are whole numbers of tokens
(``int(h * w * scale)``), so only ``h * w`` scales are distinct: the search runs over those areas and
returns the middle of the chosen area's scale interval, and reports the fraction that scale achieves.
A ratio above what the blocks can mask while leaving context gets the scale that masks the most.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import numpy as np

from vjepa_ray.config import MaskConfig
from vjepa_ray.recipe.masks import MultiBlockMaskGenerator

# Draws per estimate: the standard error of the mean masked fraction stays below ~0.01.
SAMPLES = 400
_SEED = 0


@dataclasses.dataclass(frozen=True)
class RatioMatch:
    spatial_scale: float
    masked_fraction: float


def masked_fraction(mask_cfg: MaskConfig, grid: Sequence[int], samples: int = SAMPLES, seed: int = _SEED) -> float:
    """Expected share of a clip's tokens that ``mask_cfg`` masks (the union of its blocks), in [0, 1].

    Raises ValueError (from the generator) when the blocks cover every context token.
    """
    generator = MultiBlockMaskGenerator(mask_cfg, grid)
    rng = np.random.default_rng(seed)
    masked = sum(generator(1, rng)[1].shape[1] for _ in range(samples))
    return masked / (samples * generator.num_tokens)


def spatial_scale_for_ratio(mask_cfg: MaskConfig, grid: Sequence[int], ratio: float) -> RatioMatch:
    """The fixed spatial scale at which ``mask_cfg`` (its other fields kept) masks ``ratio`` of a clip."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio: expected a value in (0, 1), got {ratio}")
    return _match(_Key.of(mask_cfg), tuple(int(g) for g in grid), float(ratio))


@dataclasses.dataclass(frozen=True)
class _Key:
    """The fields of a MaskConfig that the fraction depends on, hashable (for the cache)."""

    num_blocks: int
    temporal_scale: tuple[float, float]
    aspect_ratio: tuple[float, float]
    max_temporal_keep: float

    @classmethod
    def of(cls, cfg: MaskConfig) -> "_Key":
        return cls(cfg.num_blocks, tuple(cfg.temporal_scale), tuple(cfg.aspect_ratio), cfg.max_temporal_keep)

    def with_area(self, area: int, plane: int) -> MaskConfig:
        scale = min(1.0, (area + 0.5) / plane)
        return MaskConfig(num_blocks=self.num_blocks, spatial_scale=[scale, scale],
                          temporal_scale=list(self.temporal_scale), aspect_ratio=list(self.aspect_ratio),
                          max_temporal_keep=self.max_temporal_keep)


@functools.lru_cache(maxsize=256)
def _match(key: _Key, grid: tuple[int, int, int], ratio: float) -> RatioMatch:
    plane = grid[1] * grid[2]

    @functools.lru_cache(maxsize=None)
    def fraction(area: int) -> float:
        if area < 1:
            return 0.0
        try:
            return masked_fraction(key.with_area(area, plane), grid)
        except ValueError:
            return math.nan  # blocks this large leave no context

    def enough(area: int) -> bool:
        # The fraction rises with the block area up to a peak; past it, only the rare draws that leave
        # context survive the generator's redraws, and the fraction falls until no draw leaves any.
        # "Reached the ratio, or past the peak" is therefore false, then true: a bisection finds the edge.
        value = fraction(area)
        return math.isnan(value) or value >= ratio or value < fraction(area - 1)

    low, high = 1, plane
    while low < high:
        mid = (low + high) // 2
        if enough(mid):
            high = mid
        else:
            low = mid + 1
    candidates = [a for a in (low - 1, low) if a >= 1 and not math.isnan(fraction(a))]
    if not candidates:
        raise ValueError(f"no spatial scale leaves context with {key.num_blocks} blocks on grid {grid}")
    best = min(candidates, key=lambda a: abs(fraction(a) - ratio))
    return RatioMatch(key.with_area(best, plane).spatial_scale[0], fraction(best))


def apply_mask_ratio(mask_cfgs: Sequence[MaskConfig], grid: Sequence[int], ratio: float) -> list[MaskConfig]:
    """Copies of ``mask_cfgs`` whose spatial scales make each of them mask ``ratio`` of a clip."""
    out = []
    for cfg in mask_cfgs:
        scale = spatial_scale_for_ratio(cfg, grid, ratio).spatial_scale
        out.append(dataclasses.replace(cfg, spatial_scale=[scale, scale]))
    return out
