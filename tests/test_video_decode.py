"""Clip decoding: clips equal a full sequential decode at the sampled indices, for every codec and
container we write and for the shared real clips; rotation, variable frame rate, odd pixel formats,
extra streams; every kind of bad input raises VideoSkip with its reason."""

from __future__ import annotations

import io
import pickle
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from vjepa_ray.config import builtin_config_path, load_config
from vjepa_ray.video.decode import ClipSpec, VideoSkip, decode_clips, read_video_info, verify_video
from vjepa_ray.video.sampling import clip_indices
from vjepa_ray.video.synthetic import moving_pattern, write_video

FRAMES, HEIGHT, WIDTH = 40, 48, 64
SPEC = ClipSpec(frames_per_clip=4, frame_step=2, clips_per_video=2)

# name -> (file name, write_video kwargs). gop 8 puts several keyframes in 40 frames, so seeking matters.
VARIANTS = {
    "h264_mp4_audio_subtitles": ("a.mp4", dict(codec="h264", gop=8, audio=True, subtitles=True)),
    "h264_mkv_audio_subtitles": ("b.mkv", dict(codec="h264", gop=8, audio=True, subtitles=True)),
    "vp9_webm_audio": ("c.webm", dict(codec="vp9", gop=8, audio=True)),
    "mpeg4_mp4": ("d.mp4", dict(codec="mpeg4", gop=8)),
    "mpeg4_avi_bframes_audio": ("e.avi", dict(codec="mpeg4", gop=8, audio=True)),
    "mjpeg_avi": ("f.avi", dict(codec="mjpeg")),
    "h264_yuv444p": ("g.mp4", dict(codec="h264", gop=8, pix_fmt="yuv444p")),
    "h264_10bit_422": ("h.mkv", dict(codec="h264", gop=8, pix_fmt="yuv422p10le")),
    "mjpeg_yuvj422p": ("i.avi", dict(codec="mjpeg", pix_fmt="yuvj422p")),
    "rawvideo_bgr24": ("j.avi", dict(codec="rawvideo", pix_fmt="bgr24")),
    "hevc_mp4": ("k.mp4", dict(codec="libx265", gop=8, options={"x265-params": "log-level=error"})),
}

# Encoders whose streams hold frames nothing refers to (non-reference B-frames), which a clip's decode
# skips unless it wants them. A fixed B-frame pattern and one keyframe (gop 250, no scene-cut keyframes),
# so that without skipping the decoder would walk every frame from frame 0 to each window's end.
NONREF_VARIANTS = {
    "h264_bpyramid": dict(codec="h264", options={"x264-params": "mbtree=0:bframes=3:b-adapt=0:b-pyramid=normal"}),
    "hevc_bpyramid": dict(codec="libx265", options={"x265-params": "log-level=error:bframes=3:b-adapt=0:b-pyramid=1"}),
    "mpeg4_bframes": dict(codec="mpeg4", options={"bf": "2", "sc_threshold": "1000000000"}),
}


@pytest.fixture(scope="module")
def source_frames() -> np.ndarray:
    return moving_pattern(FRAMES, HEIGHT, WIDTH, np.random.default_rng(0))


@pytest.fixture(scope="module")
def videos(tmp_path_factory, source_frames) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("videos")
    return {name: write_video(folder / file, source_frames, fps=25, **kw) for name, (file, kw) in VARIANTS.items()}


def full_decode(path: Path) -> np.ndarray:
    """The reference: plain PyAV, every frame of the first video stream in order, turned upright."""
    with av.open(str(path)) as container:
        frames = []
        for frame in container.decode(video=0):
            frames.append(np.rot90(frame.to_ndarray(format="rgb24"), round(frame.rotation / 90) % 4))
    return np.stack(frames)


def assert_clips_match_full_decode(path: Path, spec: ClipSpec, seeds=(0, 1, 2)) -> None:
    reference = full_decode(path)
    for seed in seeds:
        out = decode_clips(path, spec, np.random.default_rng(seed))
        expected_idx = clip_indices(len(reference), spec.frames_per_clip, spec.frame_step, spec.clips_per_video,
                                    np.random.default_rng(seed))
        np.testing.assert_array_equal(out.indices, expected_idx)
        assert out.clips.dtype == np.uint8
        assert out.clips.shape == (spec.clips_per_video, spec.frames_per_clip) + reference.shape[1:]
        np.testing.assert_array_equal(out.clips, reference[out.indices])


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_clips_equal_full_decode(videos, name):
    assert_clips_match_full_decode(videos[name], SPEC)
    info = read_video_info(videos[name])
    assert (info.frames, info.width, info.height, info.fps, info.rotation) == (FRAMES, WIDTH, HEIGHT, 25.0, 0)


@pytest.mark.parametrize("name", ["h264_mp4_audio_subtitles", "vp9_webm_audio", "mpeg4_avi_bframes_audio", "hevc_mp4"])
def test_decoder_threads_give_the_same_clips(videos, name):
    spec = ClipSpec(frames_per_clip=4, frame_step=2, clips_per_video=2, decode_threads=3)
    assert_clips_match_full_decode(videos[name], spec, seeds=(0,))


def test_lossless_clips_equal_the_written_frames(videos, source_frames):
    out = decode_clips(videos["rawvideo_bgr24"], SPEC, np.random.default_rng(3))
    np.testing.assert_array_equal(out.clips, source_frames[out.indices])


def test_lossy_clips_are_close_to_the_written_frames(videos, source_frames):
    out = decode_clips(videos["h264_yuv444p"], SPEC, np.random.default_rng(3))
    error = np.abs(out.clips.astype(int) - source_frames[out.indices]).mean()
    elsewhere = np.abs(out.clips.astype(int) - source_frames[(out.indices + 10) % FRAMES]).mean()
    assert error < 8 and elsewhere > 2 * error, (error, elsewhere)


def test_bytes_file_object_and_path_give_the_same_clips(videos):
    path = videos["h264_mp4_audio_subtitles"]
    data = path.read_bytes()
    by_path = decode_clips(path, SPEC, np.random.default_rng(5))
    by_bytes = decode_clips(data, SPEC, np.random.default_rng(5))
    with open(path, "rb") as f:
        by_file = decode_clips(f, SPEC, np.random.default_rng(5))
    # A file object positioned at the video inside a larger stream (a tar member, say).
    prefixed = io.BytesIO(b"x" * 100 + data)
    prefixed.seek(100)
    by_offset = decode_clips(prefixed, SPEC, np.random.default_rng(5))
    for other in (by_bytes, by_file, by_offset):
        np.testing.assert_array_equal(other.clips, by_path.clips)


def test_seeking_decodes_far_fewer_frames_than_the_video(tmp_path, source_frames):
    long_frames = np.concatenate([source_frames] * 5)  # 200 frames, a keyframe every 8
    path = write_video(tmp_path / "long.mp4", long_frames, fps=25, codec="h264", gop=8)
    spec = ClipSpec(frames_per_clip=4, frame_step=2)  # one 8-frame window
    for seed in range(5):
        out = decode_clips(path, spec, np.random.default_rng(seed))
        # The window, plus at most a GOP before it and the decoder's reorder delay after it.
        assert out.frames_decoded <= 8 + 8 + 4, (out.indices, out.frames_decoded)
    np.testing.assert_array_equal(out.clips, full_decode(path)[out.indices])


@pytest.mark.parametrize("rotation, turns", [(90, 1), (-90, 3), (180, 2)])
def test_rotated_video_comes_out_upright(tmp_path, rotation, turns):
    # A bright block in the stored frames' top-left corner; the display matrix turns it counter-clockwise.
    frames = np.full((12, HEIGHT, WIDTH, 3), 40, np.uint8)
    frames[:, :16, :16] = 230
    path = write_video(tmp_path / "rotated.mp4", frames, fps=25, codec="h264", rotation=rotation)
    spec = ClipSpec(frames_per_clip=4, frame_step=2)
    out = decode_clips(path, spec, np.random.default_rng(0))
    upright = np.rot90(frames[0], turns)
    assert out.clips.shape[2:4] == upright.shape[:2]
    assert (out.info.width, out.info.height) == (upright.shape[1], upright.shape[0])
    assert out.info.rotation == rotation
    bright = out.clips[0, 0, ..., 0] > 135
    np.testing.assert_array_equal(bright, upright[..., 0] > 135)
    assert_clips_match_full_decode(path, spec)


def test_variable_frame_rate_indexes_frames_in_presentation_order(tmp_path, source_frames):
    # Irregular gaps (ms): frame i is still the i-th frame shown, whatever its timestamp.
    gaps = np.tile([33, 50, 17, 100], FRAMES // 4)
    pts = np.concatenate([[0], np.cumsum(gaps)[:-1]]).tolist()
    for suffix in (".mp4", ".mkv"):
        path = write_video(tmp_path / f"vfr{suffix}", source_frames, fps=25, codec="h264", gop=8, pts=pts,
                           time_base=Fraction(1, 1000))
        with av.open(str(path)) as container:
            shown = [f.time for f in container.decode(video=0)]
        assert np.allclose(np.diff(shown), gaps[:-1] / 1000, atol=2e-3)  # the file really is VFR
        assert_clips_match_full_decode(path, SPEC)
        assert read_video_info(path).frames == FRAMES


def test_the_default_video_stream_is_chosen(tmp_path, source_frames):
    path = tmp_path / "two_streams.mkv"
    with av.open(str(path), "w") as container:
        small = container.add_stream("libx264", rate=25)
        small.width, small.height, small.pix_fmt = 32, 24, "yuv420p"
        main = container.add_stream("libx264", rate=25)
        main.width, main.height, main.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        small.disposition = av.stream.Disposition(0)
        main.disposition = av.stream.Disposition.default
        for image in source_frames[:10]:
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            container.mux(small.encode(frame.reformat(width=32, height=24)))
            container.mux(main.encode(frame))
        container.mux(small.encode())
        container.mux(main.encode())
    out = decode_clips(path, ClipSpec(frames_per_clip=4, frame_step=2), np.random.default_rng(0))
    assert out.clips.shape == (1, 4, HEIGHT, WIDTH, 3)
    assert out.info.frames == 10


def test_short_video_is_padded_with_its_last_frame(tmp_path, source_frames):
    path = write_video(tmp_path / "short.mp4", source_frames[:5], fps=25, codec="h264")
    out = decode_clips(path, ClipSpec(frames_per_clip=8, frame_step=2), np.random.default_rng(0))
    # 5 // 2 = 2 positions of linspace(0, 5): 0 and 5 -> clipped to 4, then padded with 4.
    np.testing.assert_array_equal(out.indices, [[0, 4, 4, 4, 4, 4, 4, 4]])
    reference = full_decode(path)
    np.testing.assert_array_equal(out.clips[0], reference[[0, 4, 4, 4, 4, 4, 4, 4]])
    with pytest.raises(VideoSkip) as err:
        decode_clips(path, ClipSpec(frames_per_clip=8, frame_step=2, pad_short_videos=False), np.random.default_rng(0))
    assert err.value.reason == "too_short"


def test_fps_target_sets_the_step_from_the_video_rate(tmp_path, source_frames):
    path = write_video(tmp_path / "fps.mp4", source_frames, fps=25, codec="h264", gop=8)
    out = decode_clips(path, ClipSpec(frames_per_clip=4, fps=5.0), np.random.default_rng(0))
    assert out.indices[0, -1] - out.indices[0, 0] == 4 * (25 // 5) - 1  # step ceil(25) // 5 = 5


# -- bad input -----------------------------------------------------------------------------------------


class SlowReader(io.RawIOBase):
    """A source that hands out 256 bytes per read, slowly: a decode that would run far past its limit."""

    def __init__(self, data: bytes):
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        time.sleep(0.005)
        chunk = self._data.read(min(len(buffer), 256))
        buffer[:len(chunk)] = chunk
        return len(chunk)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._data.seek(offset, whence)

    def tell(self) -> int:
        return self._data.tell()


def _audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=48000)
        stream.layout = "mono"
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 48000, i * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def _zero_frames(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mjpeg", rate=25)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuvj420p"
        container.start_encoding()
    return path


def _png(path: Path) -> Path:
    frame = av.VideoFrame.from_ndarray(np.zeros((HEIGHT, WIDTH, 3), np.uint8), format="rgb24")
    frame.save(str(path))
    return path


def bad_inputs(folder: Path, good: Path) -> dict[str, tuple[object, ClipSpec, str]]:
    """name -> (source, spec, expected reason)."""
    data = good.read_bytes()
    mkv = write_video(folder / "cut.mkv", moving_pattern(FRAMES, HEIGHT, WIDTH, np.random.default_rng(1)),
                      fps=25, codec="h264", gop=8).read_bytes()
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "notes.mp4").write_text("not a video\n" * 50)
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 2])  # moov atom (at the end) lost
    spec = SPEC
    return {
        "missing": (folder / "nope.mp4", spec, "missing"),
        "empty_file": (folder / "empty.mp4", spec, "empty"),
        "empty_bytes": (b"", spec, "empty"),
        "text": (folder / "notes.mp4", spec, "not_video"),
        "random_bytes": (np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(), spec,
                         "not_video"),
        "still_image": (_png(folder / "still.png"), spec, "not_video"),
        "audio_only": (_audio_only(folder / "audio.m4a"), spec, "no_video_stream"),
        "zero_frames": (_zero_frames(folder / "zero.avi"), spec, "zero_frames"),
        "truncated_mp4": (folder / "truncated.mp4", spec, "corrupt"),
        "truncated_mkv": (mkv[: len(mkv) // 3], spec, "corrupt"),
        "damaged_header": (data[:8] + bytes(4000), spec, "corrupt"),
        "too_short_unpadded": (data, ClipSpec(frames_per_clip=16, frame_step=4, pad_short_videos=False),
                               "too_short"),
        "too_large_bytes": (data, ClipSpec(max_file_bytes=len(data) - 1), "too_large_bytes"),
        "too_large_pixels": (data, ClipSpec(max_pixels=WIDTH * HEIGHT - 1), "too_large_pixels"),
        "too_long": (data, ClipSpec(max_duration_s=1.0), "too_long"),
        "timeout": (SlowReader(data), ClipSpec(frames_per_clip=4, frame_step=2, decode_timeout_s=0.05), "timeout"),
    }


def test_bad_inputs_raise_videoskip_with_their_reason(tmp_path, videos):
    cases = bad_inputs(tmp_path, videos["h264_mp4_audio_subtitles"])
    reasons = {}
    for name, (source, spec, _) in cases.items():
        try:
            decode_clips(source, spec, np.random.default_rng(0))
            reasons[name] = "decoded"
        except VideoSkip as skip:
            reasons[name] = skip.reason
    assert reasons == {name: expected for name, (_, _, expected) in cases.items()}


def test_too_large_pixels_default_limit_is_8k():
    assert ClipSpec().max_pixels == 7680 * 4320


def test_videoskip_survives_pickling_with_what_was_known(tmp_path, videos):
    with pytest.raises(VideoSkip) as err:
        decode_clips(videos["h264_mp4_audio_subtitles"], ClipSpec(pad_short_videos=False), np.random.default_rng(0))
    again = pickle.loads(pickle.dumps(err.value))
    assert (again.reason, again.detail) == (err.value.reason, err.value.detail)
    assert again.info is not None and again.info.frames == FRAMES
    with pytest.raises(ValueError, match="reason"):
        VideoSkip("no_such_reason")


def test_clip_spec_from_config():
    cfg = load_config(builtin_config_path("local_demo"), ["data.fps=4", "data.decode_cpus=2", "data.clips_per_video=3"])
    spec = ClipSpec.from_config(cfg.data)
    assert (spec.frames_per_clip, spec.frame_step, spec.fps, spec.clips_per_video) == (8, 2, 4.0, 3)
    assert spec.decode_threads == 2 and spec.max_pixels == cfg.data.max_pixels


@pytest.mark.parametrize("threads", [1, 3])  # frame threads take each packet's skip setting with it
@pytest.mark.parametrize("name", sorted(NONREF_VARIANTS))
def test_skipping_nonreference_frames_keeps_the_clips_bit_identical(tmp_path, source_frames, name, threads):
    path = write_video(tmp_path / f"{name}.mp4", np.concatenate([source_frames] * 3), fps=25, gop=250,
                       **NONREF_VARIANTS[name])
    reference = full_decode(path)
    spec = ClipSpec(frames_per_clip=8, frame_step=4, clips_per_video=2, decode_threads=threads)
    for seed in range(4):
        out = decode_clips(path, spec, np.random.default_rng(seed))
        np.testing.assert_array_equal(out.clips, reference[out.indices])
        # Without skipping, the decode walks every frame from the keyframe (frame 0) to the last one wanted;
        # with it, 45-60% of them here: the non-reference B-frames no clip wants are dropped undecoded.
        walked = int(out.indices.max()) + 1
        assert out.frames_decoded < 0.7 * walked, (out.indices, out.frames_decoded)


# -- real clips ----------------------------------------------------------------------------------------

GOOD_SHARED = ["decord__flipping_a_pancake.mkv", "mmaction2__demo.mp4", "mmaction2__test.mp4",
               "mmaction2__test.avi", "decord__video_0.mov"]


@pytest.mark.parametrize("name", GOOD_SHARED)
def test_shared_clips_equal_full_decode(shared_videos, name):
    assert_clips_match_full_decode(shared_videos / name, ClipSpec(frames_per_clip=8, frame_step=4, clips_per_video=2),
                                   seeds=(0, 1))


def test_shared_info(shared_videos):
    got = {name: read_video_info(shared_videos / name) for name in GOOD_SHARED}
    assert {n: (i.frames, round(i.fps, 3), i.width, i.height, i.codec) for n, i in got.items()} == {
        "decord__flipping_a_pancake.mkv": (310, 30.0, 426, 240, "h264"),
        "mmaction2__demo.mp4": (280, 28.0, 340, 256, "h264"),
        "mmaction2__test.mp4": (300, 30.0, 340, 256, "h264"),
        "mmaction2__test.avi": (164, 25.0, 320, 240, "mpeg4"),
        "decord__video_0.mov": (3, 30.0, 568, 320, "h264"),
    }


class FixedEnd:
    def __init__(self, end: int):
        self.end = end

    def integers(self, low: int, high: int) -> int:
        return self.end


def test_shared_corrupted_clip_decodes_early_windows_only(shared_videos):
    """decord__corrupted.mp4 lists 50 frames; decoding fails after 28. Windows before the damage give
    clips (equal to the frames a full decode gets); windows reaching it skip as corrupt, and so does a
    full verification."""
    path = shared_videos / "decord__corrupted.mp4"
    with av.open(str(path)) as container:
        good = []
        with pytest.raises(av.error.InvalidDataError):
            for frame in container.decode(video=0):
                good.append(frame.to_ndarray(format="rgb24"))
    assert len(good) == 28
    spec = ClipSpec(frames_per_clip=4, frame_step=2)
    early = decode_clips(path, spec, FixedEnd(20))
    np.testing.assert_array_equal(early.indices, [[12, 14, 17, 19]])
    np.testing.assert_array_equal(early.clips[0], np.stack(good)[[12, 14, 17, 19]])
    with pytest.raises(VideoSkip) as late:
        decode_clips(path, spec, FixedEnd(45))
    assert late.value.reason == "corrupt" and late.value.info.frames == 50
    with pytest.raises(VideoSkip) as full:
        verify_video(path)
    assert full.value.reason == "corrupt"
