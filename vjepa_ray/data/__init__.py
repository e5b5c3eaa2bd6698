"""Video data on Ray: where the videos are (`sources`) and the clip pipeline that feeds training (`pipeline`).

``python -m vjepa_ray.data check PATH...`` reports which videos decode and why the others do not.
"""

from vjepa_ray.data.sources import VideoRef, epoch_order, list_videos, open_video

__all__ = ["VideoRef", "epoch_order", "list_videos", "open_video"]
