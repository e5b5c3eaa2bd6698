"""The demo's generated data, kept in the demo's own cache folders: videos to pretrain on
(``data.synthetic_videos``, when ``data.paths`` is ``DEMO_VIDEOS``) and a labelled set for the probe
(``tune.synthetic_probe_videos``, when the probe manifests are ``DEMO_LABELLED``'s ``train.txt`` and ``val.txt``).

Nothing is generated anywhere else: a folder a user names is read, never written. A generation that was
interrupted is made again (a marker file says which finished). The generators log where the data went."""

from __future__ import annotations

import shutil
from pathlib import Path

from vjepa_ray.config import Config

DEMO_VIDEOS = "~/.cache/vjepa_ray/demo_videos"
DEMO_LABELLED = "~/.cache/vjepa_ray/motion_demo"
COMPLETE = ".generated"


def _local(path: str) -> Path:
    return Path(path).expanduser().absolute()


def uses_demo_videos(cfg: Config) -> bool:
    """Whether the run trains on the demo's generated videos (``data.paths`` is the built-in default)."""
    return bool(cfg.data.synthetic_videos) and [_local(p) for p in cfg.data.paths] == [_local(DEMO_VIDEOS)]


def uses_demo_labelled(cfg: Config) -> bool:
    """Whether the probe's manifests are the demo's generated labelled set."""
    folder = _local(DEMO_LABELLED)
    return bool(cfg.tune.synthetic_probe_videos) and (
        _local(cfg.probe.train_manifest), _local(cfg.probe.val_manifest)) == (folder / "train.txt", folder / "val.txt")


def generated_paths(cfg: Config) -> set[Path]:
    """The paths that the demo generates for this config (absent until the run makes them)."""
    paths = {_local(DEMO_VIDEOS)} if uses_demo_videos(cfg) else set()
    if uses_demo_labelled(cfg):
        paths |= {_local(DEMO_LABELLED) / "train.txt", _local(DEMO_LABELLED) / "val.txt"}
    return paths


def prepare_demo_videos(cfg: Config) -> None:
    """Generates the demo's videos into ``DEMO_VIDEOS`` when the run uses them and they are not there yet."""
    if uses_demo_videos(cfg):
        _generate_once(_local(DEMO_VIDEOS), write_demo_videos, cfg)


def prepare_probe_videos(cfg: Config) -> None:
    """Generates the demo's labelled set into ``DEMO_LABELLED`` when the probe uses it and it is not there yet."""
    if uses_demo_labelled(cfg):
        _generate_once(_local(DEMO_LABELLED), write_probe_videos, cfg)


def _generate_once(folder: Path, write, cfg: Config) -> None:
    """``write(folder, cfg)`` unless a generation finished there before (its marker file is written last); a
    generation interrupted before that (only ever in the demo's own folders) is removed and made again."""
    done = folder / COMPLETE
    if done.exists():
        return
    if folder.exists():
        shutil.rmtree(folder)
    write(folder, cfg)
    done.touch()


def write_demo_videos(folder: Path, cfg: Config) -> None:
    """``data.synthetic_videos`` moving-pattern videos in ``folder``."""
    from vjepa_ray.video.synthetic import make_moving_pattern_videos

    # Longer than a clip's span so that clip starts vary; a little larger than the crop.
    frames = max(32, 2 * cfg.data.frames_per_clip * cfg.data.frame_step)
    size = max(cfg.data.crop_size + cfg.data.crop_size // 2, 64)
    make_moving_pattern_videos(folder, cfg.data.synthetic_videos, frames=frames, size=size, seed=cfg.meta.seed)


def write_probe_videos(folder: Path, cfg: Config) -> None:
    """The labelled motion set in ``folder`` (``train.txt``, ``val.txt`` and their videos):
    ``tune.synthetic_probe_videos`` per class for training and as many for validation."""
    from vjepa_ray.video.labelled_synthetic import make_labelled_motion_videos

    count = cfg.tune.synthetic_probe_videos
    frames = cfg.data.frames_per_clip * cfg.data.frame_step
    # As many validation videos as training ones: the val set's size decides how finely top-1 can tell two
    # settings apart (at 20 videos a class, one video is half a point).
    make_labelled_motion_videos(folder, count, count, frames=frames, size=cfg.data.crop_size, seed=cfg.meta.seed)
