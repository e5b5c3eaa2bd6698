"""Clip frame indices follow the V-JEPA recipe's rule; expected values are worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from vjepa_ray.video.sampling import clip_indices, frame_step_for, is_short


class FixedEnds:
    """Stands in for np.random.Generator: returns the given window ends and records the ranges asked for."""

    def __init__(self, *ends: int):
        self.ends = list(ends)
        self.ranges: list[tuple[int, int]] = []

    def integers(self, low: int, high: int) -> int:
        self.ranges.append((low, high))
        return self.ends.pop(0)


def test_long_video_window_is_linspace_over_clip_len_clipped_to_end():
    # 4 frames x step 2 = 8-frame window; end 20 -> start 12; linspace(12, 20, 4) = 12, 14.67, 17.33, 20
    # -> clip to 19 -> truncate.
    rng = FixedEnds(20)
    np.testing.assert_array_equal(clip_indices(100, 4, 2, 1, rng), [[12, 14, 17, 19]])
    assert rng.ranges == [(8, 100)]  # end drawn from [clip_len, partition_len)


def test_recipe_16x4_window_has_effective_step_above_4():
    # 16 x 4 = 64; end 64 -> linspace(0, 64, 16) steps 64/15 = 4.27, last clipped to 63.
    expected = [0, 4, 8, 12, 17, 21, 25, 29, 34, 38, 42, 46, 51, 55, 59, 63]
    np.testing.assert_array_equal(clip_indices(300, 16, 4, 1, FixedEnds(64)), [expected])


def test_one_clip_per_equal_partition():
    # 40 frames, 2 clips -> partitions of 20. Clip 0: end 10 -> [2, 4.67, 7.33, 10->9];
    # clip 1: end 15 -> [7, 9.67, 12.33, 15->14] + 20.
    rng = FixedEnds(10, 15)
    np.testing.assert_array_equal(clip_indices(40, 4, 2, 2, rng), [[2, 4, 7, 9], [27, 29, 32, 34]])
    assert rng.ranges == [(8, 20), (8, 20)]


def test_short_video_is_padded_with_its_last_frame():
    # 10 frames < 8 x 2: keep 10 // 2 = 5 positions linspace(0, 10, 5) = 0, 2.5, 5, 7.5, 10, then 10 again
    # up to 8 frames, all clipped to 9.
    np.testing.assert_array_equal(clip_indices(10, 8, 2, 1, FixedEnds()), [[0, 2, 5, 7, 9, 9, 9, 9]])
    # 3 frames: 3 // 2 = 1 position (0), then the last frame (2) seven times.
    np.testing.assert_array_equal(clip_indices(3, 8, 2, 1, FixedEnds()), [[0, 2, 2, 2, 2, 2, 2, 2]])
    # Fewer frames than the step: every index is the last frame.
    np.testing.assert_array_equal(clip_indices(3, 4, 4, 1, FixedEnds()), [[2, 2, 2, 2]])


def test_partition_of_exactly_clip_len_takes_the_short_rule_without_padding():
    # 8 frames = 4 x 2: linspace(0, 8, 4) = 0, 2.67, 5.33, 8 -> clipped to 7; nothing random is drawn.
    np.testing.assert_array_equal(clip_indices(8, 4, 2, 1, FixedEnds()), [[0, 2, 5, 7]])


def test_short_partitions_with_several_clips_are_offset():
    # 12 frames, 2 clips of 4 x 2: partitions of 6 (< 8): 3 positions linspace(0, 6, 3) = 0, 3, 6->5, pad 5.
    np.testing.assert_array_equal(clip_indices(12, 4, 2, 2, FixedEnds()), [[0, 3, 5, 5], [6, 9, 11, 11]])


def test_random_windows_stay_inside_their_partition_and_are_seeded():
    for seed in range(50):
        idx = clip_indices(95, 4, 3, 3, np.random.default_rng(seed))
        assert idx.shape == (3, 4) and idx.dtype == np.int64
        for c in range(3):
            assert 31 * c <= idx[c, 0] and idx[c, -1] <= 31 * c + 31 - 2  # end < partition_len
            assert idx[c, -1] - idx[c, 0] == 11  # clip_len 12 -> window of 12 frames
            assert np.all(np.diff(idx[c]) > 0)
    np.testing.assert_array_equal(clip_indices(95, 4, 3, 3, np.random.default_rng(7)),
                                  clip_indices(95, 4, 3, 3, np.random.default_rng(7)))


def test_fewer_frames_than_clips_is_an_error():
    with pytest.raises(ValueError, match="cannot be split"):
        clip_indices(2, 4, 2, 3, FixedEnds())


@pytest.mark.parametrize("frame_step, target_fps, video_fps, expected", [
    (4, None, 30.0, 4),      # plain frame_step
    (4, 4.0, 30.0, 7),       # V-JEPA 2: ceil(30) // 4
    (4, 4.0, 25.0, 6),       # ceil(25) // 4
    (4, 4.0, 29.97, 7),      # ceil(29.97) = 30
    (4, 4.0, 60.0, 15),
    (4, 30.0, 10.0, 1),      # never below 1
])
def test_frame_step_for(frame_step, target_fps, video_fps, expected):
    assert frame_step_for(frame_step, target_fps, video_fps) == expected


def test_is_short():
    assert is_short(63, 16, 4) and not is_short(64, 16, 4)
    assert is_short(127, 16, 4, clips_per_video=2) and not is_short(128, 16, 4, clips_per_video=2)
