"""Manifest entries as evaluation loads them: the data config's limits hold for videos and images alike,
and an entry over a limit is skipped with its reason before any of its pixels is decoded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from vjepa_ray.config import load_config
from vjepa_ray.data.sources import VideoRef
from vjepa_ray.eval.samples import load_example, load_segments, sample_spec
from vjepa_ray.video import decode
from vjepa_ray.video.decode import VideoSkip
from vjepa_ray.video.synthetic import moving_pattern, write_video

HEIGHT, WIDTH = 48, 64
BASE = ["data.frames_per_clip=4", "data.frame_step=1", "data.crop_size=32", "probe.num_segments=2",
        "probe.num_views=1"]


def spec_for(*overrides: str):
    return sample_spec(load_config(None, [*BASE, *overrides]))


@pytest.fixture
def entries(tmp_path: Path) -> dict[str, tuple[VideoRef, np.ndarray]]:
    """A 12-frame video and a PNG image, both HEIGHT x WIDTH, with their pixels."""
    frames = moving_pattern(12, HEIGHT, WIDTH, np.random.default_rng(0))
    video = write_video(tmp_path / "clip.mp4", frames, codec="mpeg4")
    image = np.random.default_rng(1).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "still.png")
    return {"video": (VideoRef(str(video), label=0), frames),
            "image": (VideoRef(str(tmp_path / "still.png"), label=1), image)}


@pytest.fixture
def no_decoding(monkeypatch):
    """Makes decoding any pixel of a video or an image fail the test."""
    def decoded(*_args, **_kwargs):
        raise AssertionError("an entry over a limit was decoded")

    monkeypatch.setattr(decode._Video, "_decoded_frames", decoded)
    monkeypatch.setattr(ImageFile.ImageFile, "load", decoded)


def test_sample_spec_takes_the_clip_and_every_limit_from_the_data_config():
    spec = spec_for("data.max_file_bytes=1000", "data.max_pixels=2000", "data.max_duration_s=30",
                    "data.pad_short_videos=false", "data.decode_timeout_s=5", "data.fps=4", "probe.num_segments=3",
                    "probe.num_views=2", "data.random_resize_scale=[0.5,1.0]")
    clip = spec.clip
    assert (clip.frames_per_clip, clip.frame_step, clip.fps, clip.clips_per_video) == (4, 1, 4.0, 3)
    assert (clip.max_file_bytes, clip.max_pixels, clip.max_duration_s, clip.pad_short_videos) == (1000, 2000, 30, False)
    assert (clip.decode_timeout_s, clip.decode_threads) == (5, 1)
    assert (spec.crop_size, spec.num_views, spec.train_scale) == (32, 2, (0.5, 1.0))


def test_entries_within_the_limits_load(entries):
    spec = spec_for(f"data.max_pixels={HEIGHT * WIDTH}")
    rng = np.random.default_rng(0)
    video_ref, _ = entries["video"]
    assert load_example(video_ref, spec, False, rng).shape == (1, 2, 4, 32, 32, 3)
    image_ref, image = entries["image"]
    # An image is a static clip of its exact pixels in every segment.
    segments = load_segments(image_ref, spec, rng)
    assert segments.shape == (2, 4, HEIGHT, WIDTH, 3) and (segments == image).all()


@pytest.mark.parametrize("kind", ["video", "image"])
@pytest.mark.parametrize("limit, reason", [("max_file_bytes", "too_large_bytes"),
                                           ("max_pixels", "too_large_pixels")])
def test_an_entry_over_a_limit_is_skipped_with_its_reason_undecoded(entries, kind, limit, reason, no_decoding):
    ref, _ = entries[kind]
    just_below = {"max_file_bytes": Path(ref.uri).stat().st_size - 1, "max_pixels": HEIGHT * WIDTH - 1}[limit]
    spec = spec_for(f"data.{limit}={just_below}")
    with pytest.raises(VideoSkip) as skipped:
        load_example(ref, spec, True, np.random.default_rng(0))
    assert skipped.value.reason == reason and str(just_below) in skipped.value.detail
