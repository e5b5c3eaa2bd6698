"""Decoding training clips with PyAV: read the stream's info once, then decode only the frames the clips need.

A frame index ``i`` means the i-th frame of the chosen video stream in presentation order, which is also
the i-th frame a full sequential decode returns. Opening a video demuxes its packets once (no decoding)
to learn every frame's presentation timestamp (pts) and where the keyframes are; a clip is then read by
seeking to the keyframe at or before its first frame and decoding until its last one. On the way, a frame
that no other frame refers to and no clip wants (a non-reference B-frame) is dropped undecoded (FFmpeg's
``skip_frame``, set per packet): about 45% of the frames a clip costs with B-pyramid H.264 or HEVC and with
MPEG-4 B-frames (25-40% of its CPU time; VP9 from libvpx has no such frames), and the frames kept are
bit-identical to a full decode. Timestamps, not frame counts, map an index to a
frame, so variable-frame-rate video is sampled correctly.

When the timestamps cannot be trusted (missing or duplicated packet pts, or decoded frames whose pts are
out of order, as in AVI files with "packed" MPEG-4 B-frames), the frames are counted from the start
instead: slower, same result.

Bad input never escapes as an arbitrary exception: it raises ``VideoSkip`` with one of ``SKIP_REASONS``.
Every decoded frame is checked against ``ClipSpec.max_pixels`` (the header's size is only a claim) and
against the first frame the call decoded (a stream may change resolution midway); an error nobody foresaw
while a video is open (an exception from PyAV or NumPy that is not a ``VideoSkip``) is a ``corrupt`` skip,
so one file never fails the task that reads it.

Time limit (``ClipSpec.decode_timeout_s``): one budget for the whole call, checked between packets and
between decoded frames. That bounds every loop a broken or hostile file can make long (the "hangs" seen
in practice: an endless or huge stream, millions of tiny packets, a slow source). Single blocking calls
are bounded where FFmpeg allows it: opening and probing, and each packet read, run under FFmpeg's
interrupt callback (PyAV's ``timeout``), which aborts FFmpeg's own I/O (files, network) when it stalls
that long. Not bounded: a Python file object's own ``read`` (give it a timeout of its own) and one
decoder call stuck inside libavcodec, which no in-process mechanism can stop; the pixel limit keeps a
single frame's work small, and a process-level bound (cancelling the Ray task) is the remedy for the rest.
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Iterator, Optional, Union

import av
import numpy as np

from vjepa_ray.video.sampling import clip_indices, frame_step_for, is_short

if TYPE_CHECKING:
    from vjepa_ray.config import DataConfig

logger = logging.getLogger(__name__)

VideoSource = Union[bytes, bytearray, memoryview, BinaryIO, str, os.PathLike]

SKIP_REASONS = (
    "missing",            # no such file
    "unreadable",         # the file exists but cannot be read (permissions, I/O error)
    "empty",              # zero bytes
    "too_large_bytes",    # above ClipSpec.max_file_bytes
    "not_video",          # not a media container at all (text, random bytes, a still image)
    "no_video_stream",    # a media file without a video stream (audio only, cover art only)
    "unsupported_codec",  # no decoder for the codec in this FFmpeg build, or a pixel format without RGB
    "too_large_pixels",   # width x height (of the header or of any decoded frame) above ClipSpec.max_pixels
    "size_changed",       # frames of different sizes in one video stream (a resolution change midway)
    "too_long",           # duration above ClipSpec.max_duration_s
    "zero_frames",        # a video stream without frames
    "too_short",          # fewer frames than a clip needs, with padding off
    "corrupt",            # a media container that fails to open or decode (truncated, damaged)
    "timeout",            # the decode ran past ClipSpec.decode_timeout_s
)

# Demuxers FFmpeg picks for things that are not videos: still images and text ("tty" renders ANSI art).
_NOT_VIDEO_FORMATS = {"tty", "image2", "image2pipe"}

# First bytes of video containers: a file that starts like one but fails to open is damaged, not foreign.
_CONTAINER_MAGIC = (
    (0, b"\x1a\x45\xdf\xa3"),          # Matroska / WebM (EBML)
    (0, b"RIFF"),                       # AVI
    (0, b"FLV"),
    (0, b"OggS"),
    (0, b"\x00\x00\x01\xba"),          # MPEG program stream
    (0, b"\x30\x26\xb2\x75\x8e\x66\xcf\x11"),  # ASF / WMV
    (4, b"ftyp"), (4, b"moov"), (4, b"mdat"), (4, b"free"), (4, b"wide"), (4, b"skip"),  # MP4 / MOV
)


class VideoSkip(Exception):
    """A video that cannot give a training clip; ``reason`` is one of ``SKIP_REASONS``."""

    def __init__(self, reason: str, detail: str = "", info: Optional["VideoInfo"] = None):
        if reason not in SKIP_REASONS:
            raise ValueError(f"reason: expected one of {SKIP_REASONS}, got {reason!r}")
        self.reason = reason
        self.detail = detail
        # What was learnt about the video before it failed (None when it failed to open).
        self.info = info
        super().__init__(f"{reason}: {detail}" if detail else reason)

    def __reduce__(self):  # keeps every field when pickled (Ray task results and errors)
        return type(self), (self.reason, self.detail, self.info)


@dataclass(frozen=True)
class ClipSpec:
    """What to sample from each video and the limits a video must respect (``cfg.data`` keys)."""

    frames_per_clip: int = 16
    frame_step: int = 4
    # When set, the step follows the video: ceil(video_fps) // fps.
    fps: Optional[float] = None
    clips_per_video: int = 1
    pad_short_videos: bool = True
    max_file_bytes: int = 4 * 1024**3
    max_pixels: int = 7680 * 4320
    max_duration_s: float = 4 * 3600.0
    decode_timeout_s: float = 60.0
    # FFmpeg decoder threads per video; match the CPUs a decode task holds (data.decode_cpus).
    decode_threads: int = 1

    @classmethod
    def from_config(cls, data_cfg: DataConfig, **overrides: Any) -> "ClipSpec":
        """From a ``DataConfig`` (``cfg.data``), with ``overrides`` for the fields a caller samples
        differently (e.g. evaluation's ``clips_per_video``). Every reader of videos builds its spec here, so
        none can miss a limit."""
        spec = cls(
            frames_per_clip=data_cfg.frames_per_clip,
            frame_step=data_cfg.frame_step,
            fps=data_cfg.fps,
            clips_per_video=data_cfg.clips_per_video,
            pad_short_videos=data_cfg.pad_short_videos,
            max_file_bytes=data_cfg.max_file_bytes,
            max_pixels=data_cfg.max_pixels,
            max_duration_s=data_cfg.max_duration_s,
            decode_timeout_s=data_cfg.decode_timeout_s,
            decode_threads=max(1, round(data_cfg.decode_cpus)),
        )
        return dataclasses.replace(spec, **overrides)

    def step_for(self, video_fps: float) -> int:
        """The frame step for a video of this frame rate (``frame_step`` unless ``fps`` is set)."""
        return frame_step_for(self.frame_step, self.fps, video_fps)


@dataclass(frozen=True)
class VideoInfo:
    """A video stream as a clip sees it. ``width``/``height`` are upright (after rotation)."""

    frames: int
    fps: float
    width: int
    height: int
    codec: str
    duration_s: float
    # Display rotation in degrees counter-clockwise (as ffprobe reports it), already applied to frames.
    rotation: int


@dataclass
class DecodedClips:
    clips: np.ndarray    # uint8 [C, T, H, W, 3], RGB, upright
    indices: np.ndarray  # int64 [C, T] frame indices (presentation order)
    info: VideoInfo
    # Frames the decoder produced to get these (seeking keeps it near the clips' own frame count).
    frames_decoded: int = 0


def read_video_info(source: VideoSource, spec: Optional[ClipSpec] = None) -> VideoInfo:
    """Frame count, rate, size, codec, duration and rotation of the video stream; raises VideoSkip.

    Decodes only the first frame (rotation lives in frame side data, and it proves the codec works).
    """
    spec = spec or ClipSpec()
    with _Video(source, spec) as video:
        video.read_frames(np.array([0]))
        return video.info


def decode_clips(source: VideoSource, spec: ClipSpec, rng: np.random.Generator) -> DecodedClips:
    """Samples ``spec.clips_per_video`` clips by the recipe's rule and decodes exactly those frames.

    ``source`` is the file's bytes, a seekable binary file object, or a local path. Raises VideoSkip.
    """
    with _Video(source, spec) as video:
        frames = video.info.frames
        if frames < spec.clips_per_video or (not spec.pad_short_videos and is_short(
                frames, spec.frames_per_clip, video.frame_step, spec.clips_per_video)):
            raise VideoSkip("too_short", f"{frames} frames; a clip needs {spec.frames_per_clip} x step "
                            f"{video.frame_step} per clip, {spec.clips_per_video} clip(s)")
        indices = clip_indices(frames, spec.frames_per_clip, video.frame_step, spec.clips_per_video, rng)
        decoded = video.read_frames(np.unique(indices))
        clips = np.empty(indices.shape + decoded[int(indices[0, 0])].shape, dtype=np.uint8)
        for (c, t), index in np.ndenumerate(indices):
            clips[c, t] = decoded[int(index)]
        return DecodedClips(clips=clips, indices=indices, info=video.info, frames_decoded=video.frames_decoded)


def verify_video(source: VideoSource, spec: Optional[ClipSpec] = None) -> VideoInfo:
    """Decodes every frame of the video stream in order (no conversion past the first) and checks that as
    many come out as the container holds; raises VideoSkip. The data-set doctor's thorough check."""
    spec = spec or ClipSpec()
    with _Video(source, spec) as video:
        count = 0
        for index, frame in video.sequential_frames():
            if index == 0:
                video.to_rgb(frame)  # the pixel format converts, and the rotation becomes known
            count = index + 1
        if count < video.info.frames:
            raise VideoSkip("corrupt", f"only {count} of {video.info.frames} frames decode")
        return video.info


@contextmanager
def video_frames(source: VideoSource, spec: Optional[ClipSpec] = None
                 ) -> Iterator[tuple[VideoInfo, Iterator[av.VideoFrame]]]:
    """The video stream as training reads it (same stream, limits and skip reasons) and all its frames in
    presentation order, as PyAV frames neither converted nor rotated (``frame.rotation`` says how). Raises
    VideoSkip; the frames end early when decoding fails, so count them against ``info.frames``."""
    callers_error = None
    with _Video(source, spec or ClipSpec()) as video:
        try:
            yield video.info, _frames(video)
        except VideoSkip:
            raise
        except Exception as err:
            # Raised by the caller's own code (its arguments, its encoder), not by the video: it leaves as it is
            # rather than as the video's skip.
            callers_error = err
    if callers_error is not None:
        raise callers_error


def _frames(video: "_Video") -> Iterator[av.VideoFrame]:
    try:
        for _, frame in video.sequential_frames():
            yield frame
    except VideoSkip:
        raise
    except Exception as exc:
        raise _unexpected_error_skip(exc, video.info) from exc


def check_file_size(source: VideoSource, spec: ClipSpec) -> None:
    """Raises VideoSkip when ``source`` (from its current position) is missing, unreadable, empty or above
    ``spec.max_file_bytes``; reads none of it."""
    size = _source_size(source)
    if size == 0:
        raise VideoSkip("empty", "0 bytes")
    if size > spec.max_file_bytes:
        raise VideoSkip("too_large_bytes", f"{size} bytes > max_file_bytes {spec.max_file_bytes}")


def check_frame_size(width: int, height: int, spec: ClipSpec) -> None:
    """Raises VideoSkip when a frame (or image) of ``width`` x ``height`` is above ``spec.max_pixels``."""
    if width * height > spec.max_pixels:
        raise VideoSkip("too_large_pixels", f"{width}x{height} > max_pixels {spec.max_pixels}")


class _Deadline:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.monotonic()

    def check(self) -> None:
        elapsed = time.monotonic() - self.start
        if elapsed > self.seconds:
            raise VideoSkip("timeout", f"still decoding after {elapsed:.1f} s (limit {self.seconds} s)")


class _TimestampMismatch(Exception):
    """Decoded frames do not line up with the demuxed timestamps: count frames from the start instead."""


class _Video:
    """An open video: its chosen stream, the pts of every frame in presentation order, the keyframes."""

    def __init__(self, source: VideoSource, spec: ClipSpec):
        self.spec = spec
        self.deadline = _Deadline(spec.decode_timeout_s)
        self._source = source
        check_file_size(source, spec)
        self._start_offset = source.tell() if _is_file_object(source) else 0
        self.container: Optional[av.container.InputContainer] = None
        self.frames_decoded = 0
        # (width, height) of the first frame decoded: every later one must match it.
        self._frame_size: Optional[tuple[int, int]] = None
        self._wanted: set[int] = set()
        try:
            self._open()
            self._index_packets()
        except BaseException as exc:
            self.__exit__(type(exc), exc, None)
            raise

    # -- opening and indexing -------------------------------------------------------------------

    def _open(self) -> None:
        self.close()
        self.container = _open_container(self._source, self._start_offset, self.spec.decode_timeout_s)
        fmt = self.container.format.name
        if fmt in _NOT_VIDEO_FORMATS or fmt.endswith("_pipe"):
            raise VideoSkip("not_video", f"FFmpeg reads it as {fmt!r}, not a video container")
        self.stream = _choose_video_stream(self.container)
        ctx = self.stream.codec_context
        if ctx is None:
            raise VideoSkip("unsupported_codec", f"no decoder for {self.stream.codec.name!r}")
        # Frame and slice threads as the CPUs allow; "AUTO" lets FFmpeg use both where the codec can.
        ctx.thread_count = self.spec.decode_threads
        ctx.thread_type = "AUTO"
        for other in self.container.streams:
            if other.index != self.stream.index:
                other.discard = av.stream.Discard.all  # the demuxer then drops their packets early

    def _index_packets(self) -> None:
        stream, spec = self.stream, self.spec
        width, height = stream.codec_context.width, stream.codec_context.height
        check_frame_size(width, height, spec)
        header_s = _header_duration_s(self.container, stream)
        if header_s is not None and header_s > spec.max_duration_s:
            raise VideoSkip("too_long", f"{header_s:.0f} s > max_duration_s {spec.max_duration_s}")
        if width <= 0 or height <= 0:
            raise VideoSkip("corrupt", f"the video stream has no frame size ({width}x{height})")

        pts, keyframe, packets = self._demux_timestamps()
        # Presentation order = packets sorted by pts (decode order differs when there are B-frames).
        self.timestamps_ok = None not in pts and len(set(pts)) == len(pts)
        if self.timestamps_ok:
            self.frame_pts = sorted(pts)
            self._index_of_pts = {p: i for i, p in enumerate(self.frame_pts)}
            self.keyframe_indices = sorted(self._index_of_pts[p] for p, k in zip(pts, keyframe) if k)
        else:
            self.frame_pts, self._index_of_pts, self.keyframe_indices = [], {}, []
        frames = len(pts)
        fps = _frame_rate(self.frame_pts, stream.time_base, stream)
        duration_s = frames / fps if fps > 0 else 0.0
        self.rotation = 0  # known once a frame is decoded (display matrix side data)
        self.info = VideoInfo(frames=frames, fps=fps, width=width, height=height, codec=stream.codec_context.name,
                              duration_s=duration_s, rotation=0)
        if duration_s > spec.max_duration_s:
            raise VideoSkip("too_long", f"{duration_s:.0f} s > max_duration_s {spec.max_duration_s}")
        truncated = self._truncation(packets, header_s)
        if truncated:
            raise VideoSkip("corrupt", f"truncated: {truncated}")
        self.frame_step = spec.step_for(fps) if spec.fps is not None else spec.frame_step

    def _demux_timestamps(self) -> tuple[list[Optional[int]], list[bool], int]:
        """(pts, is_keyframe) of every frame packet in decode order, and the count of all packets."""
        pts: list[Optional[int]] = []
        keyframe: list[bool] = []
        packets = 0
        time_base = self.stream.time_base
        # The duration limit as a pts, so the loop compares integers (Fractions cost microseconds each).
        pts_limit = int(self.spec.max_duration_s / time_base) if time_base else None
        try:
            for packet in self.container.demux(self.stream):
                self.deadline.check()
                if packet.size == 0:  # the end-of-stream flush marker
                    continue
                packets += 1
                if packet.is_discard:  # outside an edit list: decoded for reference, never shown
                    continue
                pts.append(packet.pts)
                keyframe.append(packet.is_keyframe)
                if pts_limit is not None and packet.pts is not None and packet.pts > pts_limit:
                    raise VideoSkip("too_long", f"packets past max_duration_s {self.spec.max_duration_s}")
        except av.error.ExitError:
            raise VideoSkip("timeout", "FFmpeg's I/O interrupt fired while demuxing") from None
        except av.error.FFmpegError as err:
            raise VideoSkip("corrupt", f"demuxing failed after {packets} packets: {err}") from None
        if not pts:
            raise VideoSkip("zero_frames", "the video stream has no packets")
        return pts, keyframe, packets

    def _truncation(self, packets: int, header_s: Optional[float]) -> str:
        """Why the file looks cut short ("" if it does not): fewer packets than the header's frame count
        (MP4, AVI), or, without one, frames ending well before the header's duration (Matroska, WebM)."""
        listed = self.stream.frames
        if listed > 0:
            return f"{packets} of the {listed} frames the header lists are present" if packets < listed else ""
        if header_s is None or not self.frame_pts or self.info.fps <= 0:
            return ""
        end_s = float((self.frame_pts[-1] - self.frame_pts[0]) * self.stream.time_base) + 1 / self.info.fps
        if header_s - end_s > max(0.5, 0.05 * header_s):
            return f"frames end at {end_s:.1f} s of the {header_s:.1f} s the header lists"
        return ""

    # -- reading frames ----------------------------------------------------------------------------

    def read_frames(self, wanted: np.ndarray) -> dict[int, np.ndarray]:
        """RGB arrays of the frames at the sorted unique indices ``wanted``; raises VideoSkip."""
        if self.timestamps_ok:
            try:
                return self._read_by_seeking(wanted)
            except _TimestampMismatch as err:
                logger.debug("timestamps unreliable (%s); counting frames from the start", err)
                self.timestamps_ok = False
        return self._read_sequentially(wanted)

    def _read_by_seeking(self, wanted: np.ndarray) -> dict[int, np.ndarray]:
        self._wanted = set(int(i) for i in wanted)
        out: dict[int, np.ndarray] = {}
        frames: Optional[Iterator[tuple[int, av.VideoFrame]]] = None
        position = -1  # index of the last frame the running decode returned
        for target in (int(i) for i in wanted):
            first_key = self._keyframe_at_or_before(target)
            if frames is None or first_key > position + 1:
                frames = self._frames_after_seek(first_key, target)
            for index, frame in frames:
                position = index
                if index == target:
                    out[target] = self.to_rgb(frame)
                    break
                if index > target:
                    raise _TimestampMismatch(f"frame {target} was not produced (got {index})")
            else:
                raise VideoSkip("corrupt", f"frame {target} of {self.info.frames} never came out of the decoder")
        return out

    def _keyframe_at_or_before(self, target: int) -> int:
        at = bisect.bisect_right(self.keyframe_indices, target) - 1
        return self.keyframe_indices[at] if at >= 0 else 0

    def _frames_after_seek(self, key_index: int, target: int) -> Iterator[tuple[int, av.VideoFrame]]:
        """Seeks to the keyframe ``key_index`` and yields (index, frame) from there on, checking that the
        decoded pts run in order and that the seek did not land after ``target``."""
        self._seek(self.frame_pts[key_index])
        frames = self._decoded_frames(self._wanted)
        first = next(frames, None)
        if first is None:
            raise VideoSkip("corrupt", f"nothing decodes after seeking to frame {key_index}")
        first_index = self._index_of_pts.get(first.pts)
        if first_index is None or first_index > target:
            # The demuxer landed past the keyframe we asked for (some index by decode time, not pts).
            earlier = bisect.bisect_left(self.keyframe_indices, key_index) - 1
            if first_index is not None and earlier >= 0:
                return self._frames_after_seek(self.keyframe_indices[earlier], target)
            raise _TimestampMismatch(f"seek to frame {key_index} returned pts {first.pts}")
        return self._indexed(first_index, first, frames)

    def _indexed(self, first_index: int, first: av.VideoFrame,
                 rest: Iterator[av.VideoFrame]) -> Iterator[tuple[int, av.VideoFrame]]:
        previous = first_index
        yield first_index, first
        for frame in rest:
            index = self._index_of_pts.get(frame.pts)
            if index is None or index <= previous:
                raise _TimestampMismatch(f"decoded pts {frame.pts} out of order after frame {previous}")
            previous = index
            yield index, frame

    def _read_sequentially(self, wanted: np.ndarray) -> dict[int, np.ndarray]:
        out: dict[int, np.ndarray] = {}
        targets = set(int(i) for i in wanted)
        last = int(wanted[-1])
        count = 0
        for index, frame in self.sequential_frames():
            count = index + 1
            if index in targets:
                out[index] = self.to_rgb(frame)
            if index >= last:
                return out
        raise VideoSkip("corrupt", f"only {count} of {self.info.frames} frames decode")

    def sequential_frames(self) -> Iterator[tuple[int, av.VideoFrame]]:
        """(index, frame) for every frame from the start, counted in output order."""
        self._open()  # a fresh demuxer at the start: no seek, so no timestamp is trusted
        for index, frame in enumerate(self._decoded_frames()):
            yield index, frame

    def _seek(self, pts: int) -> None:
        try:
            self.container.seek(pts, stream=self.stream, backward=True)
        except av.error.FFmpegError as err:
            raise VideoSkip("corrupt", f"cannot seek to pts {pts}: {err}") from None

    def _decoded_frames(self, wanted: Optional[set[int]] = None) -> Iterator[av.VideoFrame]:
        """Frames in output order from the demuxer's position. With ``wanted`` (frame indices), frames
        that nothing refers to and nobody wants are not decoded at all: the decoder drops their packets
        (B-frames, typically half the frames a seek has to walk through)."""
        ctx = self.stream.codec_context
        try:
            for packet in self.container.demux(self.stream):
                self.deadline.check()
                if wanted is not None:
                    ctx.skip_frame = "DEFAULT" if self._index_of_pts.get(packet.pts) in wanted else "NONREF"
                for frame in packet.decode():
                    self.deadline.check()
                    self.frames_decoded += 1
                    self._check_size(frame)
                    yield frame
        except av.error.ExitError:
            raise VideoSkip("timeout", "FFmpeg's I/O interrupt fired while decoding") from None
        except av.error.FFmpegError as err:
            raise VideoSkip("corrupt", f"decoding failed: {err}") from None

    def _check_size(self, frame: av.VideoFrame) -> None:
        size = (frame.width, frame.height)
        check_frame_size(*size, self.spec)
        if self._frame_size is None:
            self._frame_size = size
        elif size != self._frame_size:
            raise VideoSkip("size_changed", f"a {size[0]}x{size[1]} frame after {self._frame_size[0]}x"
                            f"{self._frame_size[1]} ones (frame {self.frames_decoded} decoded)")

    def to_rgb(self, frame: av.VideoFrame) -> np.ndarray:
        """uint8 [H, W, 3] RGB, rotated upright by the frame's display matrix."""
        rotation = frame.rotation % 360
        rotation = rotation - 360 if rotation > 180 else rotation  # in (-180, 180]: -180 and 180 agree
        if rotation != self.rotation:
            self._set_rotation(rotation)
        try:
            rgb = frame.to_ndarray(format="rgb24")
        except (av.error.FFmpegError, ValueError) as err:
            raise VideoSkip("unsupported_codec", f"cannot convert {frame.format.name} frames to RGB: {err}") from None
        turns = round(rotation / 90) % 4
        return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb

    def _set_rotation(self, rotation: int) -> None:
        self.rotation = rotation
        info = self.info
        width, height = self.stream.codec_context.width, self.stream.codec_context.height
        if round(rotation / 90) % 2:
            width, height = height, width
        self.info = VideoInfo(frames=info.frames, fps=info.fps, width=width, height=height, codec=info.codec,
                              duration_s=info.duration_s, rotation=rotation)

    # -- lifetime ----------------------------------------------------------------------------------

    def close(self) -> None:
        if getattr(self, "container", None) is not None:
            self.container.close()
            self.container = None

    def __enter__(self) -> "_Video":
        return self

    def __exit__(self, exc_type: object, exc: Optional[BaseException], tb: object) -> None:
        self.close()
        info = getattr(self, "info", None)
        if isinstance(exc, VideoSkip):
            if exc.info is None:
                exc.info = info
        elif isinstance(exc, Exception) and not isinstance(exc, _TimestampMismatch):
            raise _unexpected_error_skip(exc, info) from exc


def _unexpected_error_skip(exc: Exception, info: Optional[VideoInfo]) -> VideoSkip:
    """A file that PyAV fails on in a way no check foresaw is skipped as corrupt, never a failed task."""
    logger.debug("unexpected error decoding a video", exc_info=exc)
    return VideoSkip("corrupt", f"unexpected {type(exc).__name__} while decoding: {exc}", info)


def _is_file_object(source: VideoSource) -> bool:
    return hasattr(source, "read") and hasattr(source, "seek")


def _source_size(source: VideoSource) -> int:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return len(source)
    if _is_file_object(source):
        here = source.tell()
        end = source.seek(0, io.SEEK_END)
        source.seek(here)
        return end - here
    try:
        return Path(source).stat().st_size
    except FileNotFoundError:
        raise VideoSkip("missing", f"no such file: {source}") from None
    except OSError as err:
        raise VideoSkip("unreadable", f"{source}: {err.strerror or err}") from None


def _open_container(source: VideoSource, start_offset: int, timeout_s: float) -> av.container.InputContainer:
    if isinstance(source, (bytes, bytearray, memoryview)):
        target: Any = io.BytesIO(source)
    elif _is_file_object(source):
        source.seek(start_offset)
        # FFmpeg seeks to absolute byte offsets: a video that starts further in needs its own origin.
        target = _Window(source, start_offset) if start_offset else source
    else:
        target = str(source)
    try:
        return av.open(target, mode="r", timeout=timeout_s, metadata_errors="ignore")
    except av.error.ExitError:
        raise VideoSkip("timeout", "FFmpeg's I/O interrupt fired while opening") from None
    except PermissionError as err:
        raise VideoSkip("unreadable", str(err)) from None
    except FileNotFoundError:
        raise VideoSkip("missing", f"no such file: {source}") from None
    except (av.error.FFmpegError, OSError) as err:
        if _looks_like_container(_head(source, start_offset)):
            raise VideoSkip("corrupt", f"a video container that does not open: {err}") from None
        raise VideoSkip("not_video", f"FFmpeg does not recognise the format: {err}") from None


class _Window(io.RawIOBase):
    """A seekable file object seen from ``start`` on, so that byte 0 is the video's first byte."""

    def __init__(self, raw: BinaryIO, start: int):
        super().__init__()
        self._raw, self._start = raw, start

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._raw.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            offset += self._start
        return self._raw.seek(offset, whence) - self._start

    def tell(self) -> int:
        return self._raw.tell() - self._start


def _head(source: VideoSource, start_offset: int, size: int = 189) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source[:size])
    if _is_file_object(source):
        source.seek(start_offset)
        return source.read(size)
    try:
        with open(source, "rb") as f:
            return f.read(size)
    except OSError:
        return b""


def _looks_like_container(head: bytes) -> bool:
    if len(head) > 188 and head[0] == head[188] == 0x47:  # MPEG-TS: a sync byte every 188 bytes
        return True
    return any(head[offset:offset + len(magic)] == magic for offset, magic in _CONTAINER_MAGIC)


def _choose_video_stream(container: av.container.InputContainer) -> av.VideoStream:
    """The default video stream, else the largest; cover art (attached pictures) never counts."""
    candidates = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not candidates:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise VideoSkip("no_video_stream", f"streams: {', '.join(kinds)}")

    def preference(s: av.VideoStream) -> tuple[bool, int, int]:
        ctx = s.codec_context
        pixels = ctx.width * ctx.height if ctx is not None else 0
        return bool(s.disposition & av.stream.Disposition.default), pixels, -s.index

    return max(candidates, key=preference)


def _header_duration_s(container: av.container.InputContainer, stream: av.VideoStream) -> Optional[float]:
    if stream.duration is not None and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _frame_rate(frame_pts: list[int], time_base: Any, stream: av.VideoStream) -> float:
    """The header's average frame rate (what the recipe's decord reader reports), else the mean rate over
    the presentation timestamps."""
    rate = stream.average_rate or stream.guessed_rate
    if rate:
        return float(rate)
    if len(frame_pts) >= 2 and time_base:
        span = float((frame_pts[-1] - frame_pts[0]) * time_base)
        if span > 0:
            return (len(frame_pts) - 1) / span
    return 0.0
