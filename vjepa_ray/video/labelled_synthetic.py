"""A labelled synthetic video set whose classes only time can tell apart.

Every clip shows one textured disc over a textured background that itself drifts in a random
direction. The class is how the disc moves: its direction and speed of travel, its sense of
rotation, or whether it grows (approaches) or shrinks (recedes). Everything a single frame shows is
drawn independently of the class: the disc's texture, its position and log-scale at the middle frame
(uniform), its angle, the background texture and drift. A model that sees one frame is therefore at
chance; one that sees motion, relative to a moving background, is not.

``python -m vjepa_ray.video.labelled_synthetic OUT [--train-per-class N] ...`` writes the videos
(PyAV, H.264) and ``train.txt`` / ``val.txt`` manifests (``path label`` per line, the official
V-JEPA layout) plus ``classes.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# name -> (dx, dy) in frame widths per frame, rotation in radians per frame, log-scale per frame.
# Translation speeds are well above the background's largest drift, so the disc's own motion, not the
# background's, decides the class.
_MOTIONS: dict[str, tuple[float, float, float, float]] = {
    "right_slow": (0.012, 0.0, 0.0, 0.0),
    "right_fast": (0.032, 0.0, 0.0, 0.0),
    "left_slow": (-0.012, 0.0, 0.0, 0.0),
    "left_fast": (-0.032, 0.0, 0.0, 0.0),
    "up": (0.0, -0.022, 0.0, 0.0),
    "down": (0.0, 0.022, 0.0, 0.0),
    "rotate_cw": (0.0, 0.0, 0.25, 0.0),
    "rotate_ccw": (0.0, 0.0, -0.25, 0.0),
    "approach": (0.0, 0.0, 0.0, 0.06),
    "recede": (0.0, 0.0, 0.0, -0.06),
}
MOTION_CLASSES: tuple[str, ...] = tuple(_MOTIONS)

_BACKGROUND_DRIFT = (0.0, 0.008)  # frame widths per frame, direction uniform
_DISC_RADIUS = 0.2  # frame widths, at the middle frame's median scale
_SCALE_RANGE = (0.75, 1.33)  # log-uniform factor on the radius at the middle frame


@dataclass(frozen=True)
class LabelledVideoSet:
    """What :func:`make_labelled_motion_videos` wrote."""

    train_manifest: Path
    val_manifest: Path
    classes: tuple[str, ...]
    train_videos: int
    val_videos: int


def _smooth_texture(rng: np.random.Generator, size: int, cutoff: float, saturation: float) -> np.ndarray:
    """A periodic colour texture [size, size, 3] in [0, 1]: noise low-passed at `cutoff` cycles/pixel."""
    noise = rng.standard_normal((3, size, size))
    f = np.fft.fftfreq(size)
    radius = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    smooth = np.fft.ifft2(np.fft.fft2(noise) * np.exp(-((radius / cutoff) ** 2))).real
    smooth /= smooth.std(axis=(1, 2), keepdims=True) + 1e-8
    # Mix a shared luminance with per-channel colour so `saturation` sets how colourful it is.
    lum = smooth.mean(axis=0, keepdims=True)
    tex = lum + saturation * (smooth - lum)
    return np.clip(0.5 + 0.22 * tex, 0.0, 1.0).transpose(1, 2, 0)


def render_motion_clip(motion: str, size: int, frames: int, rng: np.random.Generator) -> np.ndarray:
    """One clip of class `motion` (a name in MOTION_CLASSES) as uint8 [frames, size, size, 3]."""
    if motion not in _MOTIONS:
        raise ValueError(f"unknown motion class {motion!r}; expected one of {', '.join(MOTION_CLASSES)}")
    dx, dy, spin, grow = _MOTIONS[motion]
    mid = (frames - 1) / 2.0
    t = np.arange(frames) - mid

    bg = _smooth_texture(rng, 2 * size, cutoff=0.06, saturation=0.6)
    drift_angle = rng.uniform(0, 2 * np.pi)
    drift = rng.uniform(*_BACKGROUND_DRIFT) * size
    bg_x = rng.uniform(0, 2 * size) + drift * np.cos(drift_angle) * t
    bg_y = rng.uniform(0, 2 * size) + drift * np.sin(drift_angle) * t

    tex_size = 64
    disc_tex = _smooth_texture(rng, tex_size, cutoff=0.05, saturation=1.6)
    radius_mid = _DISC_RADIUS * size * np.exp(rng.uniform(*np.log(_SCALE_RANGE)))
    cx = rng.uniform(0.3, 0.7) * size + dx * size * t
    cy = rng.uniform(0.3, 0.7) * size + dy * size * t
    angle = rng.uniform(0, 2 * np.pi) + spin * t
    radius = radius_mid * np.exp(grow * t)

    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for i in range(frames):
        rows = (ys + bg_y[i]).astype(np.int64) % (2 * size)
        cols = (xs + bg_x[i]).astype(np.int64) % (2 * size)
        frame = bg[rows, cols]
        # Inverse map each pixel into the disc's own (rotated, scaled) texture coordinates.
        rx, ry = xs - cx[i], ys - cy[i]
        c, s = np.cos(angle[i]), np.sin(angle[i])
        u = (c * rx + s * ry) / radius[i]
        v = (-s * rx + c * ry) / radius[i]
        r2 = u * u + v * v
        inside = r2 < 1.0
        tu = ((u[inside] + 1) * 0.5 * (tex_size - 1)).astype(np.int64)
        tv = ((v[inside] + 1) * 0.5 * (tex_size - 1)).astype(np.int64)
        frame[inside] = disc_tex[tv, tu]
        frame[inside & (r2 > 0.8)] *= 0.25  # a dark rim keeps the disc's outline visible on any background
        out[i] = (frame * 255.0 + 0.5).astype(np.uint8)
    return out


def make_labelled_motion_videos(
    folder: str | Path,
    train_per_class: int,
    val_per_class: int,
    frames: int = 16,
    size: int = 64,
    fps: int = 8,
    seed: int = 0,
    classes: tuple[str, ...] | list[str] = MOTION_CLASSES,
) -> LabelledVideoSet:
    """Writes train/val videos of every class and their manifests into `folder`.

    Labels are the index of the class in `classes`. Each video has its own generator seeded from
    (seed, split, class, index), so a set is reproducible and one video never depends on another.
    """
    from vjepa_ray.video.synthetic import write_video

    if size % 2 or size < 16:
        raise ValueError(f"size must be an even number >= 16 (H.264 needs even sizes), got {size}")
    if frames < 2:
        raise ValueError(f"frames must be >= 2 for motion to exist, got {frames}")
    classes = tuple(classes)
    for name in classes:
        if name not in _MOTIONS:
            raise ValueError(f"unknown motion class {name!r}; expected some of {', '.join(MOTION_CLASSES)}")
    root = Path(folder).expanduser()
    manifests = {}
    for split_index, (split, per_class) in enumerate((("train", train_per_class), ("val", val_per_class))):
        (root / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for label, name in enumerate(classes):
            for i in range(per_class):
                rng = np.random.default_rng([seed, split_index, label, i])
                path = root / split / f"{name}_{i:05d}.mp4"
                write_video(path, render_motion_clip(name, size, frames, rng), fps=fps)
                lines.append(f"{path} {label}")
        manifests[split] = root / f"{split}.txt"
        manifests[split].write_text("\n".join(lines) + "\n")
    (root / "classes.json").write_text(json.dumps(list(classes)))
    log.info("wrote %d train and %d val videos to %s", train_per_class * len(classes),
             val_per_class * len(classes), root)
    return LabelledVideoSet(manifests["train"], manifests["val"], classes,
                            train_per_class * len(classes), val_per_class * len(classes))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vjepa_ray.video.labelled_synthetic",
                                     description=__doc__.strip().splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--val-per-class", type=int, default=20)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classes", nargs="+", default=list(MOTION_CLASSES), choices=MOTION_CLASSES)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    written = make_labelled_motion_videos(args.folder, args.train_per_class, args.val_per_class, args.frames,
                                          args.size, args.fps, args.seed, args.classes)
    print(json.dumps({"train_manifest": str(written.train_manifest), "val_manifest": str(written.val_manifest),
                      "classes": list(written.classes)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
