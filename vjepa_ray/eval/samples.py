"""One labelled example as the probe sees it: uint8 [views, segments, T, crop, crop, 3].

Videos give ``num_segments`` clips spread over the video (the recipe's sampling); images become a
static clip (the image repeated ``frames_per_clip`` times, as the reference evaluates images with a
video model). Training examples get one random-resized-crop view (one box for all segments, and no
flip: a mirrored clip can change the label, e.g. the direction of motion); evaluation examples get
``num_views`` spatial views of every segment.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

import av
import numpy as np

from vjepa_ray.data.sources import VideoRef, open_video
from vjepa_ray.video.decode import ClipSpec, VideoSkip, decode_clips
from vjepa_ray.video.transforms import random_resized_crop_clip, spatial_views

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


@dataclass(frozen=True)
class SampleSpec:
    clip: ClipSpec  # frames_per_clip, frame_step, and clips_per_video = segments
    crop_size: int
    num_views: int
    train_scale: tuple[float, float]
    train_ratio: tuple[float, float]


def is_image(ref: VideoRef) -> bool:
    name = ref.member or ref.uri.split("?", 1)[0]
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def decode_image(source) -> np.ndarray:
    """An image file (path or binary stream) as uint8 [H, W, 3], decoded with PyAV; raises VideoSkip."""
    try:
        with av.open(source) as container:
            for frame in container.decode(video=0):
                return frame.to_ndarray(format="rgb24")
    except (av.error.FFmpegError, OSError, ValueError) as err:
        raise VideoSkip("corrupt", f"image does not decode: {err}") from None
    raise VideoSkip("empty", "image holds no frame")


def load_segments(ref: VideoRef, spec: SampleSpec, rng: np.random.Generator) -> np.ndarray:
    """uint8 [segments, T, H, W, 3]: a video's clips, or an image as static clips. Raises VideoSkip.

    An image fills every segment with the same static clip, so images and videos batch alike (attention
    over identical segments equals attention over one; set probe.num_segments=1 for image sets).
    """
    with open_video(ref) as source:
        if is_image(ref):
            image = decode_image(source)
            shape = (spec.clip.clips_per_video, spec.clip.frames_per_clip, *image.shape)
            return np.broadcast_to(image, shape).copy()
        return decode_clips(source, spec.clip, rng).clips


def load_example(ref: VideoRef, spec: SampleSpec, train: bool, rng: np.random.Generator) -> np.ndarray:
    """uint8 [views, segments, T, crop, crop, 3] (one view when ``train``). Raises VideoSkip."""
    segments = load_segments(ref, spec, rng)
    s, t = segments.shape[:2]
    if train:
        # One box for every segment: the segments are stacked on the time axis and cropped together.
        crop = random_resized_crop_clip(segments.reshape(s * t, *segments.shape[2:]), spec.crop_size,
                                        spec.train_scale, spec.train_ratio, flip=False, rng=rng)
        return crop.reshape(1, s, t, *crop.shape[1:])
    views = np.stack([spatial_views(segment, spec.crop_size, spec.num_views) for segment in segments])
    return views.transpose(1, 0, 2, 3, 4, 5)  # [segments, views, ...] -> [views, segments, ...]
