"""Training crop (one box per clip, Inception-style sampling, flip, bilinear resize) and evaluation views."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vjepa_ray.video.transforms import (
    random_resized_crop_clip,
    resize_clip,
    resize_short_side,
    sample_crop_box,
    spatial_views,
)


def coordinate_clip(frames: int, height: int, width: int) -> np.ndarray:
    """R = column, G = row (so a crop tells where it came from), B = frame number."""
    clip = np.zeros((frames, height, width, 3), np.uint8)
    clip[..., 0] = np.arange(width)[None, None, :]
    clip[..., 1] = np.arange(height)[None, :, None]
    clip[..., 2] = np.arange(frames)[:, None, None]
    return clip


def test_crop_boxes_respect_scale_ratio_and_bounds():
    rng = np.random.default_rng(0)
    height, width = 120, 160
    for _ in range(500):
        top, left, h, w = sample_crop_box(height, width, (0.3, 1.0), (0.75, 1.35), rng)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        # Rounding each side to whole pixels moves area and ratio a little off the drawn values.
        assert 0.3 * 0.95 <= h * w / (height * width) <= 1.0
        assert 0.75 * 0.95 <= w / h <= 1.35 * 1.05


def test_crop_box_falls_back_to_the_center_after_ten_failed_tries():
    rng = np.random.default_rng(0)
    # Any area in [0.9, 1] of a square at ratio 10 is wider than the image: every try fails, and the
    # fallback is the full width at the nearest allowed ratio, centred.
    assert sample_crop_box(100, 100, (0.9, 1.0), (10.0, 10.0), rng) == (45, 0, 10, 100)
    # A ratio range that holds the image's own ratio falls back to the whole image.
    assert sample_crop_box(100, 100, (2.0, 3.0), (0.5, 2.0), rng) == (0, 0, 100, 100)


def test_one_box_for_every_frame_of_the_clip():
    clip = coordinate_clip(6, 60, 80)
    rng = np.random.default_rng(1)
    for _ in range(20):
        out = random_resized_crop_clip(clip, 32, (0.3, 1.0), (0.75, 1.35), flip=True, rng=rng)
        assert out.shape == (6, 32, 32, 3) and out.dtype == np.uint8
        for t in range(6):
            np.testing.assert_array_equal(out[t, ..., :2], out[0, ..., :2])  # same box, same flip
            assert np.all(out[t, ..., 2] == t)


def test_crop_is_a_bilinear_resize_of_the_box():
    clip = np.random.default_rng(0).integers(0, 256, (3, 40, 50, 3), dtype=np.uint8)
    rng = np.random.default_rng(2)
    top, left, h, w = sample_crop_box(40, 50, (0.3, 1.0), (0.75, 1.35), np.random.default_rng(2))
    out = random_resized_crop_clip(clip, 24, (0.3, 1.0), (0.75, 1.35), flip=False, rng=rng)
    box = torch.from_numpy(clip[:, top:top + h, left:left + w]).permute(0, 3, 1, 2).float()
    expected = F.interpolate(box, size=(24, 24), mode="bilinear", align_corners=False).round()
    expected = expected.permute(0, 2, 3, 1).numpy()
    assert np.abs(out.astype(float) - expected).max() <= 1  # uint8 kernel vs float-then-round


def test_flip_happens_about_half_the_time_and_only_when_enabled():
    clip = coordinate_clip(2, 40, 40)
    rng = np.random.default_rng(3)
    flipped = 0
    for _ in range(400):
        out = random_resized_crop_clip(clip, 16, (0.5, 1.0), (0.75, 1.35), flip=True, rng=rng)
        columns = out[0, 8, :, 0].astype(int)
        assert np.all(np.diff(columns) >= 0) or np.all(np.diff(columns) <= 0)
        flipped += columns[0] > columns[-1]
    assert 160 <= flipped <= 240
    for _ in range(50):
        out = random_resized_crop_clip(clip, 16, (0.5, 1.0), (0.75, 1.35), flip=False, rng=rng)
        assert out[0, 8, 0, 0] < out[0, 8, -1, 0]


def test_full_box_crop_of_a_constant_clip_is_constant():
    clip = np.full((2, 30, 30, 3), 77, np.uint8)
    out = random_resized_crop_clip(clip, 64, (1.0, 1.0), (1.0, 1.0), flip=False, rng=np.random.default_rng(0))
    assert out.shape == (2, 64, 64, 3) and np.all(out == 77)


def test_resize_matches_torch_float_bilinear():
    clip = np.random.default_rng(0).integers(0, 256, (2, 33, 47, 3), dtype=np.uint8)
    out = resize_clip(clip, 20, 30)
    ref = F.interpolate(torch.from_numpy(clip).permute(0, 3, 1, 2).float(), size=(20, 30), mode="bilinear",
                        align_corners=False).round().permute(0, 2, 3, 1).numpy()
    assert out.shape == (2, 20, 30, 3) and np.abs(out - ref).max() <= 1


def test_resize_short_side_keeps_the_aspect_ratio():
    assert resize_short_side(np.zeros((1, 48, 64, 3), np.uint8), 32).shape == (1, 32, 42, 3)  # int(32 * 64/48)
    assert resize_short_side(np.zeros((1, 64, 48, 3), np.uint8), 32).shape == (1, 42, 32, 3)


def test_three_views_are_evenly_spaced_along_the_long_side():
    clip = np.random.default_rng(0).integers(0, 256, (2, 48, 64, 3), dtype=np.uint8)
    views = spatial_views(clip, 32, 3)
    assert views.shape == (3, 2, 32, 32, 3) and views.dtype == np.uint8
    resized = resize_short_side(clip, 32)  # 32 x 42: views start at 0, 5, 10 ((42 - 32) // 2 = 5)
    for i, start in enumerate((0, 5, 10)):
        np.testing.assert_array_equal(views[i], resized[:, :, start:start + 32])
    portrait = np.ascontiguousarray(clip.transpose(0, 2, 1, 3))
    views = spatial_views(portrait, 32, 3)
    resized = resize_short_side(portrait, 32)
    for i, start in enumerate((0, 5, 10)):
        np.testing.assert_array_equal(views[i], resized[:, start:start + 32])


def test_one_view_is_a_center_crop_after_resizing_to_256_over_224():
    clip = np.random.default_rng(0).integers(0, 256, (2, 48, 64, 3), dtype=np.uint8)
    views = spatial_views(clip, 28, 1)
    short = int(28 * 256 / 224)  # 32
    resized = resize_short_side(clip, short)  # 32 x 42
    assert views.shape == (1, 2, 28, 28, 3)
    np.testing.assert_array_equal(views[0], resized[:, 2:30, 7:35])  # offsets round(4/2), round(14/2)
    assert math.isclose(short / 28, 256 / 224, rel_tol=0.05)


@pytest.mark.parametrize("bad", [np.zeros((4, 8, 8, 3), np.float32), np.zeros((8, 8, 3), np.uint8),
                                 np.zeros((2, 8, 8, 4), np.uint8)])
def test_wrong_clips_raise_value_error(bad):
    with pytest.raises(ValueError, match=r"uint8 numpy array \[T, H, W, 3\]"):
        random_resized_crop_clip(bad, 8, (0.3, 1.0), (0.75, 1.35), flip=True, rng=np.random.default_rng(0))
