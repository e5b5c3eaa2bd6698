"""Transcoding a video once into the prepared format, which training decodes several times more cheaply.

Decoding a clip costs CPU in proportion to the frames from the keyframe before it to its end, at the
source's resolution. The prepared format bounds both: the short side is scaled down to what the crops need
(never up), and a keyframe comes at least every clip span, so a clip never decodes more than about two
spans of small frames. Everything else a clip sees stays as it was:

- the same frames in the same order (frame ``i`` of the output is frame ``i`` of the source as training
  indexes it), written at a constant rate equal to the source's average rate, which is the rate the
  reader reports, so ``data.frame_step`` and ``data.fps`` pick the same frames;
- upright: the display rotation is applied to the pixels (the output carries none);
- only the video stream: audio, subtitles and data streams are dropped.

The output is H.264 (yuv420p, limited range, BT.601, as a reader assumes of an untagged stream) in MP4.
Encoding is deterministic: one x264 thread, no macroblock tree (on CPUs with AVX-512 it reads
uninitialised memory, see ``video.synthetic``), bit-exact scaling and muxing, so the same source and
settings give the same bytes on every run; that is what lets an interrupted preparation resume.

A lower frame rate (``fps``) is only the source's rate divided by a whole number: every k-th frame is
kept. Whether that keeps a clip's span depends on how training samples; `vjepa_ray.data.prepare` decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO, Optional

import av

from vjepa_ray.video.decode import ClipSpec, VideoSkip, video_frames

ENCODER = "libx264"
PIXEL_FORMAT = "yuv420p"
# x264's default constant quality: on downscaled frames it keeps the detail a crop sees at a fraction of
# the bits; 18 (near lossless) gave files as large as 720p sources of the same content.
CRF = 23
ENCODER_OPTIONS = {
    "preset": "fast",
    "crf": str(CRF),
    # A prepared video is decoded many times and encoded once: x264's fastdecode tune (no CABAC, no
    # deblocking filter, no weighted prediction) buys cheaper decoding with a few more bytes (README,
    # "Decode CPUs per GPU").
    "tune": "fastdecode",
    "x264-params": "mbtree=0:threads=1:lookahead-threads=1:sliced-threads=0",
}
# Bit-exact scaling: the SIMD paths of swscale otherwise round differently on different CPUs.
_SCALE_FLAGS = "bicubic+accurate_rnd+full_chroma_int+bitexact"
# What turns a frame upright, by its display rotation in degrees counter-clockwise (as ffprobe reports).
_UPRIGHT_FILTERS = {90: [("transpose", "cclock")], 270: [("transpose", "clock")], 180: [("hflip", ""), ("vflip", "")]}


@dataclass(frozen=True)
class TranscodeInfo:
    """What a transcode wrote (``frames``, ``fps``, ``width``, ``height``) from what (``source_*``, all
    upright); ``rotation`` is the source's display rotation, now applied to the pixels."""

    frames: int
    fps: float
    width: int
    height: int
    source_frames: int
    source_fps: float
    source_width: int
    source_height: int
    source_codec: str
    rotation: int


def scaled_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side scaled down to ``short_side`` (never up), both rounded down to even
    numbers (4:2:0 subsampling needs them)."""
    scale = min(1.0, short_side / min(width, height))
    return max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)


def decimation(source_fps: float, fps: Optional[float]) -> int:
    """Keep every k-th frame to go from ``source_fps`` to ``fps``; raises ValueError unless ``fps`` is the
    source's rate divided by a whole number k (1 when ``fps`` is None)."""
    if fps is None:
        return 1
    if fps <= 0 or source_fps <= 0:
        raise ValueError(f"fps: need positive rates, got {fps} for a {source_fps} fps source")
    k = round(source_fps / fps)
    if k < 1 or abs(source_fps / k - fps) > 1e-6 * fps:
        raise ValueError(f"fps: {fps} is not {source_fps} fps divided by a whole number")
    return k


def transcode_video(source: str | BinaryIO, dest: BinaryIO | str, *, short_side: int, keyframe_interval: int,
                    fps: float | None = None, spec: Optional[ClipSpec] = None) -> TranscodeInfo:
    """Transcodes the video stream of ``source`` (a local path or a seekable binary file) into ``dest`` (a
    path, or a seekable binary file) in the prepared format (module docstring).

    Args:
        short_side: the output's short side in pixels when the source's is larger.
        keyframe_interval: at most this many frames from one keyframe to the next.
        fps: the output's frame rate: None keeps the source's; else its rate divided by a whole number.
        spec: the limits a source must respect and the time limit of the whole transcode (``ClipSpec``'s
            ``max_*`` and ``decode_timeout_s``); default ``ClipSpec()``.

    Raises VideoSkip (the reasons of ``video.decode``) for a source training could not read, and ValueError
    for bad arguments.
    """
    if short_side < 2 or keyframe_interval < 1:
        raise ValueError(f"need short_side >= 2 and keyframe_interval >= 1, got {short_side}, {keyframe_interval}")
    with video_frames(source, spec) as (info, frames):
        step = decimation(info.fps, fps)
        rate = _average_rate(info.fps) / step
        writer: Optional[_Writer] = None
        decoded = 0
        try:
            for decoded, frame in enumerate(frames, 1):
                if writer is None:
                    writer = _Writer(dest, frame, rate, short_side, keyframe_interval)
                if (decoded - 1) % step == 0:
                    writer.write(frame)
            if decoded < info.frames:
                raise VideoSkip("corrupt", f"only {decoded} of {info.frames} frames decode", info)
            written = writer.finish()
        finally:
            if writer is not None:
                writer.close()
    source_width, source_height = (info.height, info.width) if writer.rotation in (90, 270) else (info.width,
                                                                                                  info.height)
    return TranscodeInfo(frames=written, fps=float(rate), width=writer.width, height=writer.height,
                         source_frames=info.frames, source_fps=info.fps, source_width=source_width,
                         source_height=source_height, source_codec=info.codec, rotation=writer.rotation)


def _average_rate(fps: float) -> Fraction:
    # The reader's rate is a float of the header's rational (30000/1001 and the like): recover that.
    return Fraction(fps).limit_denominator(1001)


class _Writer:
    """The encoder side: a filter graph (scale, turn upright, 4:2:0) and an H.264 stream in MP4, set up from
    the first decoded frame (its size, pixel format and rotation)."""

    def __init__(self, dest: BinaryIO | str, first: av.VideoFrame, rate: Fraction, short_side: int,
                 keyframe_interval: int):
        self.rate = rate
        self.rotation = round(first.rotation / 90) * 90 % 360
        width, height = scaled_size(first.width, first.height, short_side)
        self.width, self.height = (height, width) if self.rotation in (90, 270) else (width, height)
        self.graph = self._graph(first, width, height)
        # bitexact: no library version strings in the container, so FFmpeg updates do not change the bytes.
        self.container = av.open(dest, "w", format="mp4", options={"fflags": "+bitexact"})
        self.stream = self.container.add_stream(ENCODER, rate=rate,
                                                options={**ENCODER_OPTIONS, "g": str(keyframe_interval)})
        self.stream.width, self.stream.height, self.stream.pix_fmt = self.width, self.height, PIXEL_FORMAT
        self.stream.codec_context.thread_count = 1
        self.frames = 0

    def _graph(self, first: av.VideoFrame, width: int, height: int) -> av.filter.Graph:
        graph = av.filter.Graph()
        chain = [graph.add_buffer(width=first.width, height=first.height, format=first.format.name,
                                  time_base=Fraction(1, 1))]
        chain.append(graph.add("scale", f"{width}:{height}:flags={_SCALE_FLAGS}:out_range=tv:out_color_matrix=bt601"))
        chain.extend(graph.add(name, args) for name, args in _UPRIGHT_FILTERS.get(self.rotation, []))
        chain.append(graph.add("format", PIXEL_FORMAT))
        chain.append(graph.add("buffersink"))
        for upstream, downstream in zip(chain, chain[1:]):
            upstream.link_to(downstream)
        graph.configure()
        return graph

    def write(self, frame: av.VideoFrame) -> None:
        frame.pts, frame.time_base = self.frames, Fraction(1, 1)
        self.graph.push(frame)
        out = self.graph.pull()
        # A constant rate: frame i at i / rate, whatever the source's timestamps were.
        out.pts, out.time_base = self.frames, 1 / self.rate
        self.container.mux(self.stream.encode(out))
        self.frames += 1

    def finish(self) -> int:
        self.container.mux(self.stream.encode())
        return self.frames

    def close(self) -> None:
        self.container.close()
