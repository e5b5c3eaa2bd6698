"""Which frames a training clip takes: the V-JEPA recipe's rule (``loadvideo_decord`` in the reference).

The video is split into ``clips_per_video`` equal partitions and each clip comes from its own partition.
A clip covers ``clip_len = frames_per_clip * frame_step`` frames:

- partition longer than ``clip_len``: a random window ``[end - clip_len, end)`` with ``end`` drawn from
  ``[clip_len, partition_len)`` (so, as in the reference, the partition's last frame is never the window's
  end), and ``frames_per_clip`` indices spread evenly over it (``linspace(start, end)`` clipped to
  ``end - 1`` and truncated to integers: the effective step is ``clip_len / (frames_per_clip - 1)``);
- otherwise (a short video): every ``frame_step``-th position of the partition, then the last frame
  repeated up to ``frames_per_clip`` (``linspace(0, partition_len, partition_len // frame_step)``, padded
  with ``partition_len`` and clipped to ``partition_len - 1``).

Indices count frames in presentation order from the first frame of the video.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np


def frame_step_for(frame_step: int, target_fps: Optional[float], video_fps: float) -> int:
    """The step between sampled frames: ``frame_step``, or with a target fps ``ceil(video_fps) // fps``.

    The fps rule is V-JEPA 2's (30 fps video at 4 fps -> step 7, 25 fps -> 6); it never goes below 1.
    """
    if target_fps is None:
        return frame_step
    if video_fps <= 0:
        raise ValueError(f"video_fps: need a positive frame rate to sample at {target_fps} fps, got {video_fps}")
    return max(1, int(math.ceil(video_fps) // target_fps))


def is_short(num_frames: int, frames_per_clip: int, frame_step: int, clips_per_video: int = 1) -> bool:
    """True when a partition holds fewer than ``frames_per_clip * frame_step`` frames (clips get padded)."""
    return num_frames // clips_per_video < frames_per_clip * frame_step


def clip_indices(
    num_frames: int,
    frames_per_clip: int,
    frame_step: int,
    clips_per_video: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """int64 [clips_per_video, frames_per_clip] frame indices, by the recipe's rule (module docstring).

    Raises ValueError when the video has fewer frames than clips (a partition would be empty).
    """
    if frames_per_clip < 1 or frame_step < 1 or clips_per_video < 1:
        raise ValueError(f"need frames_per_clip, frame_step, clips_per_video >= 1, got "
                         f"{frames_per_clip}, {frame_step}, {clips_per_video}")
    partition_len = num_frames // clips_per_video
    if partition_len < 1:
        raise ValueError(f"{num_frames} frames cannot be split into {clips_per_video} clips")
    clip_len = frames_per_clip * frame_step
    out = np.empty((clips_per_video, frames_per_clip), dtype=np.int64)
    for i in range(clips_per_video):
        if partition_len > clip_len:
            end = int(rng.integers(clip_len, partition_len))
            start = end - clip_len
            positions = np.clip(np.linspace(start, end, num=frames_per_clip), start, end - 1)
        else:
            kept = partition_len // frame_step
            positions = np.concatenate([np.linspace(0, partition_len, num=kept),
                                        np.full(frames_per_clip - kept, partition_len)])
            positions = np.clip(positions, 0, partition_len - 1)
        out[i] = positions.astype(np.int64) + i * partition_len
    return out
