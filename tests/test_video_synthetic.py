"""Synthetic videos: deterministic moving textures, and write_video's checks."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from vjepa_ray.video.decode import ClipSpec, decode_clips, read_video_info
from vjepa_ray.video.synthetic import make_moving_pattern_videos, moving_pattern, write_video


def test_moving_patterns_are_deterministic_textured_and_moving(tmp_path):
    first = make_moving_pattern_videos(tmp_path / "a", 2, frames=12, size=(48, 64), fps=10, seed=3)
    again = make_moving_pattern_videos(tmp_path / "b", 2, frames=12, size=(48, 64), fps=10, seed=3)
    assert [p.name for p in first] == ["pattern_00000.mp4", "pattern_00001.mp4"]
    spec = ClipSpec(frames_per_clip=12, frame_step=1)
    clips = [decode_clips(p, spec, np.random.default_rng(0)).clips[0] for p in first + again]
    np.testing.assert_array_equal(clips[0], clips[2])
    np.testing.assert_array_equal(clips[1], clips[3])
    assert np.abs(clips[0].astype(int) - clips[1]).mean() > 10  # two videos, two textures
    frames = clips[0].astype(int)
    assert frames[0].std() > 20  # textured, not flat
    assert all(np.abs(frames[t + 1] - frames[t]).mean() > 1 for t in range(11))  # moving
    info = read_video_info(first[0])
    assert (info.frames, info.fps, info.width, info.height) == (12, 10.0, 64, 48)


def test_moving_pattern_videos_do_not_depend_on_leftover_heap_memory(tmp_path):
    # glibc's MALLOC_PERTURB_ fills fresh allocations with a chosen byte, standing in for whatever an earlier
    # workload (a training run, say) left on the heap. libx264's macroblock tree read such memory on AVX-512
    # CPUs, so this video came out as different bytes under different fills.
    write = ("import sys; from vjepa_ray.video.synthetic import make_moving_pattern_videos; "
             "make_moving_pattern_videos(sys.argv[1], 1, frames=12, size=(48, 64), fps=10, seed=3)")
    for fill in ("1", "77", "200"):
        subprocess.run([sys.executable, "-c", write, str(tmp_path / fill)], env={**os.environ, "MALLOC_PERTURB_": fill},
                       timeout=60, check=True)
    videos = [(tmp_path / fill / "pattern_00000.mp4").read_bytes() for fill in ("1", "77", "200")]
    assert videos[0] == videos[1] == videos[2]


def test_moving_pattern_wraps_around_as_it_moves():
    frames = moving_pattern(8, 48, 64, np.random.default_rng(0))
    assert frames.shape == (8, 48, 64, 3) and frames.dtype == np.uint8
    # Every frame is a circular shift of the first: the same pixel values, moved.
    for frame in frames:
        np.testing.assert_array_equal(np.sort(frame.reshape(-1, 3), axis=0), np.sort(frames[0].reshape(-1, 3), axis=0))


def test_write_video_rejects_bad_frames_and_timestamps(tmp_path):
    with pytest.raises(ValueError, match=r"uint8 \[T, H, W, 3\]"):
        write_video(tmp_path / "x.mp4", np.zeros((4, 48, 64, 3), np.float32))
    with pytest.raises(ValueError, match="strictly increasing"):
        write_video(tmp_path / "x.mp4", np.zeros((3, 48, 64, 3), np.uint8), pts=[0, 40, 40])
    with pytest.raises(ValueError, match="3 timestamps for 4 frames|timestamps for more frames"):
        write_video(tmp_path / "x.mp4", np.zeros((4, 48, 64, 3), np.uint8), pts=[0, 40, 80])
    with pytest.raises(ValueError, match="subtitle codec"):
        write_video(tmp_path / "x.avi", np.zeros((2, 48, 64, 3), np.uint8), codec="mjpeg", subtitles=True)
