"""The demo's generated data, made once from the config where it points: videos to pretrain on
(``data.synthetic_videos``) and a labelled set for the probe (``tune.synthetic_probe_videos``).

The generators log where the data went."""

from __future__ import annotations

from pathlib import Path

from vjepa_ray.config import Config, ConfigError


def prepare_demo_videos(cfg: Config) -> None:
    """Generates ``data.synthetic_videos`` videos into ``data.paths[0]`` unless it holds that many already."""
    if not cfg.data.synthetic_videos:
        return
    folder = Path(cfg.data.paths[0]).expanduser()
    if len(list(folder.glob("*.mp4"))) >= cfg.data.synthetic_videos:
        return
    from vjepa_ray.video.synthetic import make_moving_pattern_videos

    # Longer than a clip's span so that clip starts vary; a little larger than the crop.
    frames = max(32, 2 * cfg.data.frames_per_clip * cfg.data.frame_step)
    size = max(cfg.data.crop_size + cfg.data.crop_size // 2, 64)
    make_moving_pattern_videos(folder, cfg.data.synthetic_videos, frames=frames, size=size, seed=cfg.meta.seed)


def prepare_probe_videos(cfg: Config) -> None:
    """The labelled set, written once where ``probe.train_manifest`` / ``val_manifest`` point."""
    count = cfg.tune.synthetic_probe_videos
    train, val = Path(cfg.probe.train_manifest).expanduser(), Path(cfg.probe.val_manifest).expanduser()
    if not count or (train.is_file() and val.is_file()):
        return
    if train.parent != val.parent or (train.name, val.name) != ("train.txt", "val.txt"):
        raise ConfigError("tune.synthetic_probe_videos", "needs probe.train_manifest and probe.val_manifest "
                          "to be train.txt and val.txt in one folder")
    from vjepa_ray.video.labelled_synthetic import make_labelled_motion_videos

    frames = cfg.data.frames_per_clip * cfg.data.frame_step
    # As many validation videos as training ones: the val set's size decides how finely top-1 can tell two
    # settings apart (at 20 videos a class, one video is half a point).
    make_labelled_motion_videos(train.parent, count, count, frames=frames, size=cfg.data.crop_size,
                                seed=cfg.meta.seed)
