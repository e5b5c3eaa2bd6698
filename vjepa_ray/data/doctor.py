"""The data-set doctor: ``python -m vjepa_ray.data check PATH... [--json]``.

Says, for every video, whether training can take clips from it and, if not, why (a ``VideoSkip`` reason),
with its frame count, frame rate, size and codec; then counts files by outcome.

A file is ok when (1) a training clip decodes from it exactly as the pipeline reads it (the config's
``ClipSpec``, a fixed seed, its time limit), and (2) every frame of its video stream decodes. The second
check matters because training draws its window at random: a file whose second half is damaged
(``decord__corrupted.mp4``: 50 frames listed, decoding fails at frame 28) gives clips for some draws and
skips on others, so it is reported as ``corrupt``. ``--quick`` runs only the first check.

Directories are scanned recursively for video extensions and tar shards; a file named explicitly is checked
whatever its extension. A tar shard (``data prepare``'s output, or any WebDataset shard) is checked member by
member, each reported as ``shard.tar:member``. Exit status: 0 when every file is ok, 1 when any is skipped
or none is found, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import numpy as np

from vjepa_ray.cli import exit_on_config_error
from vjepa_ray.config import SECTIONS, ConfigError, builtin_config_path, load_config
from vjepa_ray.data.sources import MEDIA_EXTENSIONS, SHARD_EXTENSION, VideoRef, open_source, shard_members
from vjepa_ray.video.decode import ClipSpec, VideoInfo, VideoSkip, VideoSource, decode_clips, verify_video
from vjepa_ray.video.image import is_image_path, read_image

PROG = "python -m vjepa_ray.data check"
_OVERRIDE = re.compile(rf"^({'|'.join(SECTIONS)})\.[\w.]+=")


def find_videos(paths: list[str]) -> list[VideoRef]:
    """Files named explicitly (whatever their extension; missing ones too, to be reported) and the videos and
    images under directories, recursively, sorted within each directory; tar shards stand for their members."""
    found: list[VideoRef] = []
    for entry in paths:
        path = Path(entry).expanduser()
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in MEDIA_EXTENSIONS
                       | {SHARD_EXTENSION}) if path.is_dir() else [path]
        for file in files:
            found.extend(_shard_or_file(file.resolve()))
    return found


def _shard_or_file(path: Path) -> list[VideoRef]:
    if path.suffix.lower() == SHARD_EXTENSION and path.is_file():
        try:
            return shard_members(str(path), 0, None)
        except ConfigError:  # not a tar after all: report it as the file it is
            pass
    return [VideoRef(str(path))]


def check_source(source: VideoSource, name: str, spec: ClipSpec, thorough: bool = True,
                 verify_timeout_s: float = 600.0) -> dict[str, Any]:
    """One row of the report: ``{"path": name, "status": "ok"|"skipped", "reason", "detail", "frames", "fps",
    "width", "height", "codec"}``; ``reason`` is None for ok videos."""
    info: Optional[VideoInfo] = None
    try:
        info = decode_clips(source, spec, np.random.default_rng(0)).info
        if thorough:
            if hasattr(source, "seek"):
                source.seek(0)
            # A full pass takes longer than one clip may: it gets its own budget.
            info = verify_video(source, dataclasses.replace(spec, decode_timeout_s=verify_timeout_s))
    except VideoSkip as skip:
        return _row(name, skip.info or info, skip)
    return _row(name, info, None)


def check_image(source: VideoSource, name: str, spec: ClipSpec) -> dict[str, Any]:
    """The report's row for a still image, read as training reads it (a static clip of one frame)."""
    try:
        frame = read_image(source, spec)
    except VideoSkip as skip:
        return _row(name, None, skip)
    height, width = frame.shape[:2]
    return _row(name, VideoInfo(frames=1, fps=0.0, width=width, height=height, codec="image", duration_s=0.0,
                                rotation=0), None)


def _row(name: str, info: Optional[VideoInfo], skip: Optional[VideoSkip]) -> dict[str, Any]:
    return {
        "path": name,
        "status": "skipped" if skip else "ok",
        "reason": skip.reason if skip else None,
        "detail": skip.detail if skip else "",
        "frames": info.frames if info else None,
        "fps": round(info.fps, 3) if info else None,
        "width": info.width if info else None,
        "height": info.height if info else None,
        "codec": info.codec if info else None,
    }


def check_file(ref: VideoRef, spec: ClipSpec, thorough: bool = True, verify_timeout_s: float = 600.0
               ) -> dict[str, Any]:
    """``check_source`` (``check_image`` for an image) on a file or a shard member."""
    try:
        with open_source(ref) as source:
            if is_image_path(ref.member or ref.uri):
                return check_image(source, str(ref), spec)
            return check_source(source, str(ref), spec, thorough, verify_timeout_s)
    except VideoSkip as skip:  # it did not open
        return _row(str(ref), None, skip)


def check(paths: list[str], spec: ClipSpec, thorough: bool = True, workers: int = 1,
          verify_timeout_s: float = 600.0) -> dict[str, Any]:
    """``{"files": [row per video, in scan order], "counts": {"ok" or reason: n}}``."""
    files = find_videos(paths)
    # PyAV releases the GIL while it demuxes and decodes, so threads check files in parallel.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        rows = list(pool.map(lambda ref: check_file(ref, spec, thorough, verify_timeout_s), files))
    counts = Counter(row["reason"] or "ok" for row in rows)
    return {"files": rows, "counts": dict(sorted(counts.items()))}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Checks that videos decode as training will read them, and says why the others do not.",
        epilog="Clip settings come from the config's data section (default: the built-in local demo); "
               "override them as section.key=value, e.g. data.frames_per_clip=16 data.frame_step=4.")
    parser.add_argument("items", nargs="+", metavar="PATH | section.key=value",
                        help="video files and directories (scanned recursively), and config overrides")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--config", metavar="FILE", default=None, help="YAML config")
    parser.add_argument("--quick", action="store_true",
                        help="only decode one training clip per file (skip the full decode)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="files checked at once (default: min(4, CPUs))")
    parser.add_argument("--verify-timeout", type=float, default=600.0, metavar="SECONDS",
                        help="time limit of the full decode of one file (default 600)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    overrides = [item for item in args.items if _OVERRIDE.match(item)]
    paths = [item for item in args.items if not _OVERRIDE.match(item)]
    if not paths:
        _parser().error("no PATH given")
    try:
        cfg = load_config(args.config or builtin_config_path("local_demo"), overrides)
    except ConfigError as err:
        exit_on_config_error(PROG, err)
    report = check(paths, ClipSpec.from_config(cfg.data), thorough=not args.quick, workers=args.workers,
                   verify_timeout_s=args.verify_timeout)
    if args.json:
        print(json.dumps(report))
    else:
        _print_table(report)
    if not report["files"]:
        print(f"{PROG}: no video files found under {' '.join(paths)}", file=sys.stderr)
        return 1
    return 0 if set(report["counts"]) == {"ok"} else 1


def _print_table(report: dict[str, Any]) -> None:
    for row in report["files"]:
        if row["status"] == "ok":
            what = f"{row['frames']} frames, {row['fps']:g} fps, {row['width']}x{row['height']}, {row['codec']}"
            print(f"ok       {row['path']}  ({what})")
        else:
            known = f" [{row['frames']} frames, {row['codec']}]" if row["frames"] is not None else ""
            print(f"skipped  {row['path']}  {row['reason']}: {row['detail']}{known}")
    counts = ", ".join(f"{reason} {n}" for reason, n in report["counts"].items())
    print(f"{len(report['files'])} files: {counts or 'none'}")
