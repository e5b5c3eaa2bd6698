"""Small videos written with PyAV's encoders: test fixtures, the local demo's data and benchmark inputs.

``write_video`` covers what the decoder must cope with (several codecs and containers, an audio and a
subtitle stream beside the video, rotation metadata, variable frame rate); ``make_moving_pattern_videos``
makes a folder of textured patterns that move, cheap to generate and not trivially predictable.
"""

from __future__ import annotations

import itertools
import logging
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import av
import numpy as np

logger = logging.getLogger(__name__)

# Short codec names -> PyAV encoder and the pixel format it is fed by default.
ENCODERS = {
    "h264": ("libx264", "yuv420p"),
    "vp9": ("libvpx-vp9", "yuv420p"),
    "mpeg4": ("mpeg4", "yuv420p"),
    "mjpeg": ("mjpeg", "yuvj420p"),
}

# Encoder options that keep writing fast while leaving the stream structure realistic: libx264's
# "veryfast" still uses B-frames (so presentation order differs from decode order), unlike "ultrafast".
# Its macroblock tree is off because, on CPUs with AVX-512, it reads uninitialised heap memory: with it
# the same frames encoded to different bytes depending on what the process had allocated before.
_ENCODER_OPTIONS = {
    "libx264": {"preset": "veryfast", "x264-params": "mbtree=0"},
    "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8"},
    "mpeg4": {"bf": "2", "qscale": "3"},
    "mjpeg": {"qscale": "3"},
}

_AUDIO_CODEC = {".webm": "libopus", ".avi": "mp2"}  # everything else: aac
_SUBTITLE_CODEC = {".mp4": "mov_text", ".mov": "mov_text", ".m4v": "mov_text", ".webm": "webvtt",
                   ".mkv": "subrip"}
_AUDIO_RATE = 48_000
_SUBTITLE_HEADER = (b"[Script Info]\nScriptType: v4.00+\n\n[V4+ Styles]\nFormat: Name\nStyle: Default\n\n"
                    b"[Events]\nFormat: Layer, Start, End, Style, Text\n")


def write_video(
    path: str | Path,
    frames: np.ndarray | Iterable[np.ndarray],
    fps: float = 25,
    codec: str = "h264",
    *,
    gop: Optional[int] = None,
    pix_fmt: Optional[str] = None,
    audio: bool = False,
    subtitles: bool = False,
    rotation: int = 0,
    pts: Optional[Sequence[int]] = None,
    time_base: Optional[Fraction] = None,
    options: Optional[dict[str, str]] = None,
) -> Path:
    """Encodes RGB ``frames`` (uint8 [T, H, W, 3], or an iterable of [H, W, 3] frames, so long videos
    need not fit in memory) into ``path``; the container follows the extension.

    Args:
        codec: "h264", "vp9", "mpeg4", "mjpeg", or any PyAV encoder name.
        gop: keyframe interval in frames (encoder default when None).
        pix_fmt: the stream's pixel format (e.g. "yuv444p", "yuv422p10le"); the codec's usual one when None.
        audio: add a sine-tone audio stream as long as the video.
        subtitles: add a subtitle stream with one cue (mp4/mov/mkv/webm).
        rotation: display-matrix rotation in degrees counter-clockwise, as ffprobe reports it: a player
            shows ``np.rot90(frame, rotation // 90)``. Needs an mp4/mov container.
        pts: presentation timestamps in ``time_base`` units, one per frame, strictly increasing: a
            variable frame rate. ``fps`` then only sets the nominal rate in the header.
        time_base: timestamp unit for ``pts`` (default 1/1000 s).
    """
    if pts is not None and np.any(np.diff(np.asarray(pts)) <= 0):
        raise ValueError("pts: timestamps must be strictly increasing")
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError("frames: expected at least one frame")
    path = Path(path)
    encoder, default_pix_fmt = ENCODERS.get(codec, (codec, "yuv420p"))
    rate = Fraction(fps).limit_denominator(1001)
    opts = {**_ENCODER_OPTIONS.get(encoder, {}), **(options or {})}
    if gop is not None:
        opts["g"] = str(gop)

    container = av.open(str(path), "w")
    try:
        stream = container.add_stream(encoder, rate=rate, options=opts)
        stream.height, stream.width = np.shape(first)[:2]
        stream.pix_fmt = pix_fmt or default_pix_fmt
        if pts is not None:
            stream.codec_context.time_base = time_base or Fraction(1, 1000)
        if rotation:
            stream.set_display_rotation(rotation)
        audio_stream = _add_audio(container, path.suffix.lower()) if audio else None
        subtitle_stream = _add_subtitles(container, path.suffix.lower()) if subtitles else None
        container.start_encoding()

        count = 0
        for i, image in enumerate(itertools.chain([first], frames)):
            if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.shape != np.shape(first) \
                    or image.shape[-1:] != (3,):
                raise ValueError(f"frames: expected uint8 [T, H, W, 3]; frame {i} is "
                                 f"{getattr(image, 'dtype', type(image).__name__)} {list(np.shape(image))}")
            if pts is not None and i >= len(pts):
                raise ValueError(f"pts: {len(pts)} timestamps for more frames")
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            if pts is not None:
                frame.pts = int(pts[i])
                frame.time_base = stream.codec_context.time_base
            else:
                frame.pts = i
                frame.time_base = 1 / rate
            container.mux(stream.encode(frame))
            count = i + 1
        if pts is not None and count != len(pts):
            raise ValueError(f"pts: {len(pts)} timestamps for {count} frames")
        container.mux(stream.encode())
        duration_s = float(pts[-1] * (time_base or Fraction(1, 1000))) if pts is not None else count / float(rate)
        if audio_stream is not None:
            _write_tone(container, audio_stream, duration_s)
        if subtitle_stream is not None:
            cue = av.Packet(b"a subtitle")
            cue.stream = subtitle_stream
            cue.time_base = Fraction(1, 1000)
            cue.pts = cue.dts = 0
            cue.duration = max(1, int(duration_s * 1000))
            container.mux(cue)
    finally:
        container.close()
    return path


def _add_audio(container: av.container.OutputContainer, suffix: str) -> av.AudioStream:
    stream = container.add_stream(_AUDIO_CODEC.get(suffix, "aac"), rate=_AUDIO_RATE)
    stream.layout = "mono"
    return stream


def _add_subtitles(container: av.container.OutputContainer, suffix: str) -> av.SubtitleStream:
    if suffix not in _SUBTITLE_CODEC:
        raise ValueError(f"subtitles: no subtitle codec for {suffix!r} containers; use one of "
                         f"{', '.join(_SUBTITLE_CODEC)}")
    stream = container.add_stream(_SUBTITLE_CODEC[suffix])
    stream.time_base = Fraction(1, 1000)
    # Subtitle encoders refuse to open without a header, whatever the format.
    stream.codec_context.subtitle_header = _SUBTITLE_HEADER
    return stream


def _write_tone(container: av.container.OutputContainer, stream: av.AudioStream, duration_s: float) -> None:
    samples = int(duration_s * _AUDIO_RATE)
    chunk = stream.codec_context.frame_size or 1024
    t = np.arange(samples) / _AUDIO_RATE
    tone = (0.2 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    for start in range(0, samples, chunk):
        piece = tone[start:start + chunk]
        if len(piece) < chunk:  # fixed-frame-size encoders (aac, opus, mp2) want whole frames
            piece = np.pad(piece, (0, chunk - len(piece)))
        frame = av.AudioFrame.from_ndarray(piece[None, :], format="flt", layout="mono")
        frame.sample_rate = _AUDIO_RATE
        frame.pts = start
        frame.time_base = Fraction(1, _AUDIO_RATE)
        container.mux(stream.encode(frame))
    container.mux(stream.encode())


def iter_moving_pattern(frames: int, height: int, width: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """``frames`` uint8 [height, width, 3] frames: a smooth random texture translating at a random velocity.

    The texture is a sum of 2-D sinusoids with whole numbers of cycles across the frame, so it tiles, and
    moving it is a wrap-around shift by the rounded displacement: one texture, then one copy per frame
    (fast even at 720p). Detail lives in brightness while colour varies slowly, as in camera footage, so
    4:2:0 chroma subsampling keeps the pattern intact.
    """
    y = np.arange(height, dtype=np.float32)[:, None] / height
    x = np.arange(width, dtype=np.float32)[None, :] / width

    def field(count: int, max_cycles_per_pixel: float) -> np.ndarray:
        ky = rng.integers(-int(max_cycles_per_pixel * height), int(max_cycles_per_pixel * height) + 1, count)
        kx = rng.integers(-int(max_cycles_per_pixel * width), int(max_cycles_per_pixel * width) + 1, count)
        phase = rng.uniform(0, 2 * np.pi, count)
        waves = [np.sin(2 * np.pi * (a * y + b * x) + p) for a, b, p in zip(ky, kx, phase)]
        return np.mean(waves, axis=0)  # in [-1, 1]

    brightness = field(6, 0.15)
    texture = np.stack([128 + 140 * brightness + 60 * field(2, 0.03) for _ in range(3)], axis=-1)
    texture = np.clip(texture, 0, 255).astype(np.uint8)
    speed, angle = rng.uniform(0.5, 3.0), rng.uniform(0, 2 * np.pi)
    steps = np.arange(frames)
    shifts_y = np.round(speed * np.sin(angle) * steps).astype(int)
    shifts_x = np.round(speed * np.cos(angle) * steps).astype(int)
    for dy, dx in zip(shifts_y, shifts_x):
        yield np.roll(texture, (dy, dx), axis=(0, 1))


def moving_pattern(frames: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """``iter_moving_pattern`` as one uint8 [frames, height, width, 3] array."""
    return np.stack(list(iter_moving_pattern(frames, height, width, rng)))


def make_moving_pattern_videos(
    folder: str | Path,
    count: int,
    frames: int = 64,
    size: int | tuple[int, int] = 64,
    fps: float = 25,
    seed: int = 0,
    codec: str = "h264",
    gop: Optional[int] = None,
) -> list[Path]:
    """Writes ``count`` videos of moving textures into ``folder`` (MP4, or WebM for vp9); returns their paths.

    ``size`` is an int (square) or (height, width). Video ``i`` depends only on (seed, i), so a re-run
    rewrites the same files. Frames are generated one at a time: long, large videos are fine.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    height, width = (size, size) if isinstance(size, int) else size
    suffix = ".webm" if codec == "vp9" else ".mp4"
    paths = []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        path = folder / f"pattern_{i:05d}{suffix}"
        write_video(path, iter_moving_pattern(frames, height, width, rng), fps=fps, codec=codec, gop=gop)
        paths.append(path)
    logger.info("wrote %d moving-pattern videos (%d frames, %dx%d) to %s", count, frames, width, height, folder)
    return paths
