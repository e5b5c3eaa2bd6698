"""Spatial transforms on uint8 clips [T, H, W, 3] (RGB), as the V-JEPA recipe applies them.

Training: one Inception-style random-resized-crop box for the whole clip (scale and aspect ratio from the
config, 10 tries then a center-crop fallback), a horizontal flip with probability 0.5, and a bilinear
resize (``align_corners=False``) of the box to crop x crop. Evaluation (the attentive probe): resize the
short side, then evenly spaced square views along the long side (or one center crop).

Everything stays uint8: clips travel through Ray's object store at a quarter of float32's size, and the
training worker normalises on its device. The resize runs on torch's uint8 bilinear kernel (channels-last),
which rounds to within 1 grey level of resizing in float and rounding.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

CENTER_CROP_RATIO = 256 / 224  # one-view evaluation resizes the short side to crop * 256/224 first


def _check_clip(clip: np.ndarray) -> None:
    if not isinstance(clip, np.ndarray) or clip.dtype != np.uint8 or clip.ndim != 4 or clip.shape[-1] != 3:
        got = f"{clip.dtype} {list(clip.shape)}" if isinstance(clip, np.ndarray) else type(clip).__name__
        raise ValueError(f"clip: expected a uint8 numpy array [T, H, W, 3], got {got}")


def resize_clip(clip: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize (``align_corners=False``, no antialiasing) of every frame: uint8 [T, height, width, 3]."""
    _check_clip(clip)
    if clip.shape[1:3] == (height, width):
        return clip
    # [T, H, W, 3] viewed as [T, 3, H, W] is already channels-last in memory: no copy before the kernel.
    frames = torch.from_numpy(clip).permute(0, 3, 1, 2)
    resized = F.interpolate(frames, size=(height, width), mode="bilinear", align_corners=False)
    return resized.permute(0, 2, 3, 1).contiguous().numpy()


def sample_crop_box(
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    rng: np.random.Generator,
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """(top, left, box_height, box_width): area fraction ~ U(scale), aspect ratio (w/h) log-uniform in
    ``ratio``; up to ``attempts`` draws, then the largest center box whose ratio is within ``ratio``."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target_area = rng.uniform(scale[0], scale[1]) * area
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop_clip(
    clip: np.ndarray,
    crop_size: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    flip: bool,
    rng: np.random.Generator,
) -> np.ndarray:
    """One random box for all frames, resized to uint8 [T, crop_size, crop_size, 3]; when ``flip``, the
    clip is mirrored left-right with probability 0.5."""
    _check_clip(clip)
    top, left, h, w = sample_crop_box(clip.shape[1], clip.shape[2], scale, ratio, rng)
    out = resize_clip(clip[:, top:top + h, left:left + w], crop_size, crop_size)
    if flip and rng.random() < 0.5:
        out = np.ascontiguousarray(out[:, :, ::-1])
    return out


def resize_short_side(clip: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize so the shorter side is ``size``; the longer side keeps the aspect ratio (truncated)."""
    _check_clip(clip)
    height, width = clip.shape[1:3]
    if height <= width:
        return resize_clip(clip, size, int(size * width / height))
    return resize_clip(clip, int(size * height / width), size)


def spatial_views(clip: np.ndarray, crop_size: int, num_views: int) -> np.ndarray:
    """The evaluation views of a clip: uint8 [num_views, T, crop_size, crop_size, 3].

    One view: short side resized to ``crop_size * 256/224``, then the center crop. Several views: short
    side resized to ``crop_size``, then ``num_views`` crops along the long side starting every
    ``(long - crop_size) // (num_views - 1)`` pixels (left/center/right for three views).
    """
    _check_clip(clip)
    if num_views < 1:
        raise ValueError(f"num_views: expected >= 1, got {num_views}")
    if num_views == 1:
        resized = resize_short_side(clip, int(crop_size * CENTER_CROP_RATIO))
        height, width = resized.shape[1:3]
        top, left = int(round((height - crop_size) / 2)), int(round((width - crop_size) / 2))
        return resized[None, :, top:top + crop_size, left:left + crop_size].copy()
    resized = resize_short_side(clip, crop_size)
    height, width = resized.shape[1:3]
    step = (max(height, width) - crop_size) // (num_views - 1)
    views = []
    for i in range(num_views):
        start = i * step
        if height > width:
            views.append(resized[:, start:start + crop_size])
        else:
            views.append(resized[:, :, start:start + crop_size])
    return np.stack(views)
