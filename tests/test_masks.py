"""Multi-block masks: exact partitions, the recipe's block sizes and statistics, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vjepa_ray.config import MaskConfig
from vjepa_ray.recipe.masks import MaskCollator, MultiBlockMaskGenerator

SHORT = MaskConfig(num_blocks=8, spatial_scale=[0.15, 0.15])
LONG = MaskConfig(num_blocks=2, spatial_scale=[0.7, 0.7])
GRID_224 = (8, 14, 14)  # 16 frames, 224 px, tubelet 2, patch 16


def _check_partition(ctx: torch.Tensor, tgt: torch.Tensor, num_tokens: int) -> None:
    """Per clip: disjoint ascending ids, and every id left out was cut from the tail of one of the lists."""
    assert ctx.dtype == tgt.dtype == torch.int64
    for c, t in zip(ctx.tolist(), tgt.tolist()):
        assert c == sorted(set(c)) and t == sorted(set(t))
        assert not set(c) & set(t)
        dropped = set(range(num_tokens)) - set(c) - set(t)
        assert all(u > c[-1] or u > t[-1] for u in dropped)


@pytest.mark.parametrize("cfg", [SHORT, LONG], ids=["short", "long"])
def test_one_clip_is_an_exact_partition(cfg):
    gen = MultiBlockMaskGenerator(cfg, GRID_224)
    for seed in range(5):
        ctx, tgt = gen(1, np.random.default_rng(seed))
        assert sorted(ctx[0].tolist() + tgt[0].tolist()) == list(range(1568))


@pytest.mark.parametrize("cfg", [SHORT, LONG], ids=["short", "long"])
def test_batch_rows_are_truncated_partitions_of_equal_length(cfg):
    gen = MultiBlockMaskGenerator(cfg, GRID_224)
    for seed in range(3):
        ctx, tgt = gen(6, np.random.default_rng(seed))
        assert ctx.shape[0] == tgt.shape[0] == 6 and ctx.shape[1] > 0 and tgt.shape[1] > 0
        _check_partition(ctx, tgt, 1568)


def test_truncation_cuts_to_the_shortest_list():
    ctx, tgt = MultiBlockMaskGenerator(SHORT, GRID_224)(8, np.random.default_rng(1))
    rows = [(c, t, set(range(1568)) - set(c) - set(t)) for c, t in zip(ctx.tolist(), tgt.tolist())]
    # Some clip kept its whole context (only target ids were cut) and some clip its whole target.
    assert any(all(u > t[-1] for u in dropped) for c, t, dropped in rows)
    assert any(all(u > c[-1] for u in dropped) for c, t, dropped in rows)


def test_block_sizes_follow_the_recipe():
    gen = MultiBlockMaskGenerator(SHORT, GRID_224)
    rng = np.random.default_rng(0)
    sizes = {gen.sample_block_size(rng) for _ in range(300)}
    # area int(196 * 0.15) = 29 tokens, aspect 0.75-1.5: rows round(sqrt(29a)), columns round(sqrt(29/a)).
    assert {t for t, _, _ in sizes} == {8}
    assert {h for _, h, _ in sizes} == {5, 6, 7}
    assert {w for _, _, w in sizes} == {4, 5, 6}
    long_sizes = {MultiBlockMaskGenerator(LONG, GRID_224).sample_block_size(rng) for _ in range(300)}
    assert all(10 <= h <= 14 and 10 <= w <= 14 and t == 8 for t, h, w in long_sizes)


def test_block_size_is_shared_by_the_batch_and_target_is_the_union_of_blocks():
    gen = MultiBlockMaskGenerator(SHORT, GRID_224)
    t, h, w = gen.sample_block_size(np.random.default_rng(7))  # the first draw of gen(..., same rng)
    ctx, tgt = gen(1, np.random.default_rng(7))
    assert t * h * w <= tgt.shape[1] <= SHORT.num_blocks * t * h * w
    grid = np.zeros(1568, dtype=bool)
    grid[tgt[0].numpy()] = True
    grid = grid.reshape(GRID_224)
    assert (grid == grid[0]).all()  # blocks span all 8 time steps (temporal scale 1.0)


def test_same_seed_same_masks_and_different_seed_different_masks():
    collator = MaskCollator([SHORT, LONG], GRID_224)
    a, b, c = collator(4, (234, 10, 0)), collator(4, (234, 10, 0)), collator(4, (234, 10, 1))
    assert len(a) == 2
    for (ca, ta), (cb, tb) in zip(a, b):
        assert torch.equal(ca, cb) and torch.equal(ta, tb)
    assert any(not torch.equal(ca, cc) for (ca, _), (cc, _) in zip(a, c))
    assert not torch.equal(collator(4, 5)[0][1], collator(4, 6)[0][1])


def test_fractions_match_the_reference_statistics():
    """224 px, 16 frames, batch 24: context/target fractions after truncation as the reference code gives."""
    collator = MaskCollator([SHORT, LONG], GRID_224)
    sums = np.zeros((2, 2))
    batches = 60
    for step in range(batches):
        for i, (ctx, tgt) in enumerate(collator(24, (0, step))):
            sums[i] += (ctx.shape[1] / 1568, tgt.shape[1] / 1568)
    (short_ctx, short_tgt), (long_ctx, long_tgt) = sums / batches
    assert abs(short_ctx - 0.23) < 0.02 and abs(short_tgt - 0.48) < 0.02
    assert abs(long_ctx - 0.066) < 0.02 and abs(long_tgt - 0.70) < 0.02


def test_max_keep_and_max_temporal_keep_limit_the_context():
    cfg = MaskConfig(num_blocks=2, spatial_scale=[0.15, 0.15], max_temporal_keep=0.5, max_keep=50)
    gen = MultiBlockMaskGenerator(cfg, GRID_224)
    ctx, tgt = gen(4, np.random.default_rng(0))
    assert ctx.shape[1] == 50
    assert ctx.max() < 4 * 196  # no context in the last 4 of 8 time steps
    _check_partition(ctx, tgt, 1568)
    ctx, tgt = gen(1, np.random.default_rng(0))  # one clip: nothing truncated
    assert set(range(4 * 196, 1568)) <= set(tgt[0].tolist())  # those time steps are all target


def test_tiny_grid_blocks_are_never_empty():
    collator = MaskCollator([SHORT, LONG], (4, 4, 4))  # 8 frames of 64 px: 0.15 * 16 = 2 tokens per block
    for ctx, tgt in collator(4, 0):
        assert ctx.shape[1] > 0 and tgt.shape[1] > 0
        _check_partition(ctx, tgt, 64)


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="covered every context token"):
        MaskCollator([MaskConfig(num_blocks=1, spatial_scale=[1.0, 1.0])], (2, 4, 4))(2, 0)
    with pytest.raises(ValueError, match="grid"):
        MaskCollator([SHORT], (8, 0, 14))
    with pytest.raises(ValueError, match="seed"):
        MaskCollator([SHORT], GRID_224)(2, -1)
    with pytest.raises(ValueError, match="batch_size"):
        MaskCollator([SHORT], GRID_224)(0, 1)
    with pytest.raises(ValueError, match="at least one"):
        MaskCollator([], GRID_224)


def test_ranks_of_a_step_share_block_sizes_but_not_positions():
    """The reference's block size comes from a step counter every rank shares; positions differ per rank."""
    one_block = MaskConfig(num_blocks=1, spatial_scale=[0.1, 0.4], aspect_ratio=[0.5, 2.0])
    collator = MaskCollator([one_block, LONG], GRID_224)
    for step in range(20):
        per_rank = [collator(3, (0, step), rank=rank) for rank in range(4)]
        # One block per clip: the target is exactly the block, so its length is the block's volume.
        assert len({masks[0][1].shape[1] for masks in per_rank}) == 1
        assert any(not torch.equal(per_rank[0][0][1], masks[0][1]) for masks in per_rank[1:])


def test_a_collator_on_another_grid_keeps_its_configs_and_block_scales():
    collator = MaskCollator([SHORT, LONG], (4, 14, 14))
    assert collator.on_grid((4, 14, 14)) is collator
    longer = collator.on_grid((8, 14, 14))
    assert longer.grid == (8, 14, 14) and [g.cfg for g in longer.generators] == [SHORT, LONG]
    for index, (a, b) in enumerate(zip(collator.generators, longer.generators)):
        rng_a, rng_b = (np.random.default_rng([5, index]) for _ in range(2))
        assert a.sample_block_size(rng_a)[1:] == b.sample_block_size(rng_b)[1:]  # same spatial block per step
