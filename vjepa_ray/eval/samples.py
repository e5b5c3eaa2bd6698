"""One labelled example as the probe sees it: uint8 [views, segments, T, crop, crop, 3].

Videos give ``num_segments`` clips spread over the video (the recipe's sampling); images become a
static clip (the image repeated ``frames_per_clip`` times, as the reference evaluates images with a
video model). Training examples get one random-resized-crop view (one box for all segments, and no
flip: a mirrored clip can change the label, e.g. the direction of motion); evaluation examples get
``num_views`` spatial views of every segment.

Every entry honours the data config's limits (``data.max_file_bytes``, ``data.max_pixels``, ...): a video
through the decoder's own checks, an image through the same checks on its file size and on the size its
header declares, before any pixel is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vjepa_ray.config import Config
from vjepa_ray.data.sources import VideoRef, open_video
from vjepa_ray.video.decode import ClipSpec, decode_clips
from vjepa_ray.video.image import is_image_path, read_image
from vjepa_ray.video.transforms import random_resized_crop_clip, spatial_views


@dataclass(frozen=True)
class SampleSpec:
    clip: ClipSpec  # frames_per_clip, frame_step, and clips_per_video = segments
    crop_size: int
    num_views: int
    train_scale: tuple[float, float]
    train_ratio: tuple[float, float]


def sample_spec(cfg: Config) -> SampleSpec:
    """What evaluation takes from each manifest entry: ``probe.num_segments`` clips shaped and limited by
    ``cfg.data`` as in training, and ``probe.num_views`` views."""
    # One decoder thread: entries are decoded inside the probe worker, not in data.decode_cpus-sized tasks.
    clip = ClipSpec.from_config(cfg.data, clips_per_video=cfg.probe.num_segments, decode_threads=1)
    return SampleSpec(clip, cfg.data.crop_size, cfg.probe.num_views, tuple(cfg.data.random_resize_scale),
                      tuple(cfg.data.random_resize_aspect_ratio))


def load_segments(ref: VideoRef, spec: SampleSpec, rng: np.random.Generator) -> np.ndarray:
    """uint8 [segments, T, H, W, 3]: a video's clips, or an image as static clips. Raises VideoSkip.

    An image fills every segment with the same static clip, so images and videos batch alike (attention
    over identical segments equals attention over one; set probe.num_segments=1 for image sets).
    """
    with open_video(ref) as source:
        if is_image_path(ref.member or ref.uri):
            image = read_image(source, spec.clip)
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
