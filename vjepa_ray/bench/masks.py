"""Mask statistics: mean context and target fractions of the collated masks, per mask config.

Fractions are of all tokens, after the batch's equal-length truncation (what the encoder and the
predictor really see), averaged over many batches. Baseline, from the same batches: the per-clip
fractions before truncation, so ``target_dropped`` is the share of target tokens truncation discards.
At 224 px / 16 frames / batch 24 the reference code gives about 23% / 48% (short-range) and
6.6% / 70% (long-range); ``reference`` carries those numbers for that setting.
"""

from __future__ import annotations

import argparse
import time

from vjepa_ray.config import load_config

# numpy and the mask collator (torch) are imported by ``run``: ``bench masks --help`` reads the options without
# them.

REFERENCE_224_16F_B24 = [{"context_fraction": 0.23, "target_fraction": 0.48},
                         {"context_fraction": 0.066, "target_fraction": 0.70}]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--tubelet", type=int, default=2)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> dict:
    import numpy as np

    from vjepa_ray.recipe.masks import MaskCollator

    cfg = load_config(None, [f"data.frames_per_clip={args.frames}", f"data.crop_size={args.crop}",
                             f"model.patch_size={args.patch}", f"model.tubelet_size={args.tubelet}"])
    grid = (args.frames // args.tubelet, args.crop // args.patch, args.crop // args.patch)
    num_tokens = int(np.prod(grid))
    collator = MaskCollator(cfg.mask, grid)
    # Per config: collated context, collated target, and the untruncated per-clip target.
    sums = np.zeros((len(collator), 3))
    start = time.perf_counter()
    for step in range(args.batches):
        # The masks training draws for rank 0's first micro batch of each step.
        for i, (ctx, tgt) in enumerate(collator(args.batch, (args.seed, step, 0))):
            sums[i, :2] += (ctx.shape[1], tgt.shape[1])
    seconds = time.perf_counter() - start
    # Untruncated sizes: one clip per draw has nothing cut.
    for step in range(args.batches):
        for i, (_, tgt) in enumerate(collator(1, (args.seed, step, 1))):
            sums[i, 2] += tgt.shape[1]
    means = sums / (args.batches * num_tokens)
    configs = [{"num_blocks": mc.num_blocks, "spatial_scale": mc.spatial_scale[0],
                "context_fraction": round(ctx, 4), "target_fraction": round(tgt, 4),
                "per_clip_target_fraction": round(full_tgt, 4),
                "target_dropped": round(1 - tgt / full_tgt, 4)}
               for mc, (ctx, tgt, full_tgt) in zip(cfg.mask, means)]
    is_reference_setting = (grid, args.batch) == ((8, 14, 14), 24)
    return {
        "figure": "masks",
        "configs": configs,
        "reference": REFERENCE_224_16F_B24 if is_reference_setting else None,
        "ms_per_batch": 1e3 * seconds / args.batches,
        "settings": {"frames": args.frames, "crop": args.crop, "batch": args.batch, "grid": list(grid),
                     "tokens": num_tokens, "batches": args.batches},
    }
