"""Multi-block 3D masks: which tokens the encoder sees (context) and which the predictor must predict (target).

The recipe (V-JEPA 1, ``multiblock3d``): for each mask config, a block size (frames x rows x columns
of tokens) is drawn once per batch; each clip then gets ``num_blocks`` blocks of that size at random
positions. The target is the union of the blocks, the context is every other token, and a clip whose
context came out empty is drawn again. To keep the batch rectangular, each clip's sorted index lists
are cut to the shortest in the batch, which drops the highest token ids (the latest frames) of the
longer lists, from the context and from the target alike.

The reference seeds the block size from a step counter that every rank shares, so all ranks of a
step use the same block size; so does :class:`MaskCollator` (the size comes from the step's seed, the
positions from the seed and the rank). Unlike the reference, which draws block positions from the
global torch RNG, everything here comes from ``numpy.random.Generator``s seeded by the caller, so a
(seed, rank, batch size) triple always gives the same masks on any machine and in any process.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import numpy as np
import torch

from vjepa_ray.config import MaskConfig
from vjepa_ray.models.rope import token_positions

Grid = tuple[int, int, int]
Seed = Union[int, Sequence[int]]
MaskPair = tuple[torch.Tensor, torch.Tensor]

# A clip whose context is empty is drawn again; a config that keeps producing empty contexts cannot
# work (blocks that cover the whole clip), and this many tries make the failure loud instead of a hang.
MAX_DRAWS_PER_CLIP = 1000


def _check_grid(grid: Sequence[int]) -> Grid:
    if len(grid) != 3 or not all(isinstance(g, (int, np.integer)) and g >= 1 for g in grid):
        raise ValueError(f"grid: expected three positive ints (t, h, w) in tokens, got {tuple(grid)}")
    return int(grid[0]), int(grid[1]), int(grid[2])


class MultiBlockMaskGenerator:
    """Masks of one config over a (t, h, w) token grid; ``__call__(batch_size, rng) -> (ctx, tgt)``."""

    def __init__(self, mask_cfg: MaskConfig, grid: Sequence[int]):
        self.cfg = mask_cfg
        self.grid = _check_grid(grid)
        self.num_tokens = math.prod(self.grid)
        # Frames past this index never hold context (the reference's max_temporal_keep).
        self.max_context_frames = max(1, int(self.grid[0] * mask_cfg.max_temporal_keep))

    def sample_block_size(self, rng: np.random.Generator) -> Grid:
        """(frames, rows, columns) of every block of a batch, drawn as the reference does.

        Rows and columns come from the drawn area and aspect ratio, rounded with Python's round()
        like the reference. Each side is at least one token (the reference allows a zero-area block
        on tiny grids, which would leave a clip with no target).
        """
        duration, height, width = self.grid
        t_scale = rng.uniform(*self.cfg.temporal_scale)
        s_scale = rng.uniform(*self.cfg.spatial_scale)
        aspect = rng.uniform(*self.cfg.aspect_ratio)
        t = max(1, int(duration * t_scale))
        area = int(height * width * s_scale)
        h = max(1, min(round(math.sqrt(area * aspect)), height))
        w = max(1, min(round(math.sqrt(area / aspect)), width))
        return min(t, duration), h, w

    def _sample_context(self, block: Grid, rng: np.random.Generator) -> np.ndarray:
        """bool [t, h, w]: True where a token is context, for one clip."""
        duration, height, width = self.grid
        t, h, w = block
        context = np.ones(self.grid, dtype=bool)
        starts = rng.integers(0, duration - t + 1, size=self.cfg.num_blocks)
        tops = rng.integers(0, height - h + 1, size=self.cfg.num_blocks)
        lefts = rng.integers(0, width - w + 1, size=self.cfg.num_blocks)
        for s, top, left in zip(starts, tops, lefts):
            context[s:s + t, top:top + h, left:left + w] = False
        context[self.max_context_frames:] = False
        return context

    def __call__(self, batch_size: int, rng: np.random.Generator, block: Grid | None = None) -> MaskPair:
        """(context ids int64 [B, Nc], target ids int64 [B, Nt]), ids ascending along each row.

        ``block`` is the batch's block size; without it, it is drawn from ``rng`` first. Every clip's
        context and target are disjoint; with the tokens cut off by the equal-length truncation they
        partition the grid.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {batch_size}")
        if block is None:
            block = self.sample_block_size(rng)
        contexts, targets = [], []
        for _ in range(batch_size):
            for _ in range(MAX_DRAWS_PER_CLIP):
                context = self._sample_context(block, rng).reshape(-1)
                if context.any():
                    break
            else:
                raise ValueError(f"mask config {self.cfg}: {MAX_DRAWS_PER_CLIP} draws of {self.cfg.num_blocks} "
                                 f"blocks of {block} tokens on grid {self.grid} all covered every context token")
            contexts.append(np.flatnonzero(context))
            targets.append(np.flatnonzero(~context))
        keep_context = min(len(c) for c in contexts)
        if self.cfg.max_keep is not None:
            keep_context = min(keep_context, self.cfg.max_keep)
        keep_target = min(len(t) for t in targets)
        ctx = np.stack([c[:keep_context] for c in contexts])
        tgt = np.stack([t[:keep_target] for t in targets])
        return torch.from_numpy(ctx).long(), torch.from_numpy(tgt).long()


class MaskCollator:
    """All mask configs of a step: ``collator(batch_size, seed, rank) -> [(ctx [B, Nc], tgt [B, Nt]), ...]``.

    One (ctx, tgt) pair per config, in config order (the predictor's ``mask_index``). ``seed`` is an int
    or a sequence of ints that names the batch, e.g. ``(meta.seed, step, micro_step)``. Each config
    draws its block size from its own stream of ``seed`` alone, so every rank of a step gets the same
    sizes, and its positions from a stream of ``seed`` and ``rank``.
    """

    def __init__(self, mask_cfgs: Sequence[MaskConfig], grid: Sequence[int]):
        if len(mask_cfgs) == 0:
            raise ValueError("mask_cfgs: expected at least one mask config, got none")
        self.grid = _check_grid(grid)
        self.generators = [MultiBlockMaskGenerator(cfg, self.grid) for cfg in mask_cfgs]

    def __len__(self) -> int:
        return len(self.generators)

    def on_grid(self, grid: Sequence[int]) -> "MaskCollator":
        """The same mask configs on another token grid (clips of another length); ``self`` on its own grid.

        Given the same seed, every grid's collator draws the same block scales, as the 2.0 release's
        generators of every frames-per-clip setting do (they count steps in lockstep from one seed).
        """
        grid = _check_grid(grid)
        return self if grid == self.grid else MaskCollator([gen.cfg for gen in self.generators], grid)

    def __call__(self, batch_size: int, seed: Seed, rank: int = 0) -> list[MaskPair]:
        entropy = [seed] if isinstance(seed, (int, np.integer)) else list(seed)
        if not entropy or not all(isinstance(s, (int, np.integer)) and s >= 0 for s in entropy):
            raise ValueError(f"seed: expected a non-negative int or a sequence of them, got {seed!r}")
        if not isinstance(rank, (int, np.integer)) or rank < 0:
            raise ValueError(f"rank: expected a non-negative int, got {rank!r}")
        pairs = []
        for index, gen in enumerate(self.generators):
            block = gen.sample_block_size(np.random.default_rng([*entropy, index]))
            pairs.append(gen(batch_size, np.random.default_rng([*entropy, index, rank]), block))
        return pairs


def distance_to_targets(context_ids: torch.Tensor, target_ids: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """The Euclidean distance of each context token to the nearest target token of its clip, in tokens over
    (frame, row, column) of ``grid`` (a frame is a tubelet): context ids [B, Nc], target ids [B, Nt] -> float32
    [B, Nc]. V-JEPA 2.1 weights its context loss by it (``compute_mask_distance``); a context token is never
    a target, so every distance is at least 1.
    """
    grid = _check_grid(grid)
    # Integer positions: the direct differences are exact, where the matrix-product shortcut may round.
    distances = torch.cdist(token_positions(context_ids, grid), token_positions(target_ids, grid),
                            compute_mode="donot_use_mm_for_euclid_dist")
    return distances.amin(dim=-1)
