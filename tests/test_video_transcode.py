"""Transcoding into the prepared format: same frames at the same indices, upright, smaller, only video,
keyframes at least every interval, the same bytes on every run."""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
import pytest
import torch

# Every codec and container the decoder is tested on, and the same videos (module fixtures).
from test_video_decode import FRAMES, HEIGHT, VARIANTS, WIDTH, source_frames, videos  # noqa: F401

from vjepa_ray.video.decode import ClipSpec, VideoSkip, decode_clips, read_video_info
from vjepa_ray.video.synthetic import moving_pattern, write_video
from vjepa_ray.video.transcode import decimation, scaled_size, transcode_video

SPEC = ClipSpec(frames_per_clip=8, frame_step=2)


@pytest.fixture(scope="module")
def all_videos(tmp_path_factory, source_frames, videos) -> dict[str, Path]:  # noqa: F811
    folder = tmp_path_factory.mktemp("rotated")
    rotated = {f"rotated_{r}": write_video(folder / f"r{r}.mp4", source_frames, fps=25, rotation=r)
               for r in (90, -90, 180)}
    return {**videos, **rotated}


def transcode(source: Path, **kwargs) -> tuple[bytes, object]:
    out = io.BytesIO()
    info = transcode_video(str(source), out, **{"short_side": 32, "keyframe_interval": 16, **kwargs})
    return out.getvalue(), info


def downscaled(clips: np.ndarray, height: int, width: int) -> np.ndarray:
    frames = torch.from_numpy(clips.reshape(-1, *clips.shape[-3:])).permute(0, 3, 1, 2).float()
    return torch.nn.functional.interpolate(frames, size=(height, width), mode="area").permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("name", [*VARIANTS, "rotated_90", "rotated_-90", "rotated_180"])
def test_clips_from_the_output_show_the_source_frames_at_the_same_indices(all_videos, name):
    data, info = transcode(all_videos[name])
    turned = name.startswith("rotated_") and name != "rotated_180"
    want_w, want_h = (32, 42) if turned else (42, 32)
    assert (info.frames, info.fps, info.width, info.height) == (FRAMES, 25.0, want_w, want_h)
    assert (info.source_width, info.source_height) == ((HEIGHT, WIDTH) if turned else (WIDTH, HEIGHT))
    out = read_video_info(data)
    assert (out.frames, out.fps, out.width, out.height, out.rotation, out.codec) == (
        FRAMES, 25.0, want_w, want_h, 0, "h264")
    raw = decode_clips(all_videos[name], SPEC, np.random.default_rng(3))
    prepared = decode_clips(data, SPEC, np.random.default_rng(3))
    np.testing.assert_array_equal(prepared.indices, raw.indices)
    error = np.abs(downscaled(raw.clips, want_h, want_w) - prepared.clips.reshape(-1, want_h, want_w, 3))
    # A rotation the wrong way, a dropped or shifted frame, or a colour-range slip gives errors of 30+.
    assert error.mean() < 12


def test_unscaled_output_is_close_to_the_source_and_keeps_only_video(videos):  # noqa: F811
    data, info = transcode(videos["h264_mp4_audio_subtitles"], short_side=480)
    assert (info.width, info.height) == (WIDTH, HEIGHT)  # never upscaled
    raw = decode_clips(videos["h264_mp4_audio_subtitles"], SPEC, np.random.default_rng(0)).clips.astype(float)
    prepared = decode_clips(data, SPEC, np.random.default_rng(0)).clips.astype(float)
    assert np.abs(raw - prepared).mean() < 2.5
    with av.open(io.BytesIO(data)) as container:
        assert [s.type for s in container.streams] == ["video"]


def test_the_same_source_gives_the_same_bytes(videos):  # noqa: F811
    for name in ("h264_mkv_audio_subtitles", "mpeg4_avi_bframes_audio", "vp9_webm_audio"):
        assert transcode(videos[name])[0] == transcode(videos[name])[0]


def test_keyframes_come_at_least_every_interval(tmp_path):
    long = write_video(tmp_path / "long.mp4", moving_pattern(100, 48, 64, np.random.default_rng(1)), codec="h264")
    data, _ = transcode(long, keyframe_interval=12)
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        pts = sorted((p.pts, p.is_keyframe) for p in container.demux(stream) if p.size)
    keyframes = [i for i, (_, key) in enumerate(pts) if key]
    assert keyframes[0] == 0 and max(np.diff(keyframes + [len(pts)])) <= 12


def test_lower_frame_rate_keeps_every_kth_frame(videos):  # noqa: F811
    data, info = transcode(videos["h264_mp4_audio_subtitles"], fps=12.5)
    assert (info.frames, info.fps, info.source_fps) == (FRAMES // 2, 12.5, 25.0)
    with pytest.raises(ValueError, match="whole number"):
        transcode(videos["h264_mp4_audio_subtitles"], fps=10)


def test_bad_sources_raise_videoskip_with_their_reason(tmp_path, videos):  # noqa: F811
    data = videos["h264_mp4_audio_subtitles"].read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[:len(data) // 2])
    (tmp_path / "text.mp4").write_text("hello\n" * 50)
    for name, reason in (("cut.mp4", "corrupt"), ("text.mp4", "not_video"), ("gone.mp4", "missing")):
        with pytest.raises(VideoSkip) as skip:
            transcode(tmp_path / name)
        assert skip.value.reason == reason


def test_scaled_size_and_decimation():
    assert scaled_size(1280, 720, 256) == (454, 256)
    assert scaled_size(720, 1280, 256) == (256, 454)
    assert scaled_size(321, 241, 256) == (320, 240)  # smaller than asked: never scaled up
    assert decimation(29.97, None) == 1 and decimation(30000 / 1001, 30000 / 1001 / 7) == 7
    with pytest.raises(ValueError):
        decimation(25.0, 10.0)
