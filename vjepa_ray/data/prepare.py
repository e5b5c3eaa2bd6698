"""Preparing a corpus: ``python -m vjepa_ray.data prepare SOURCE... --out DEST``.

Every video that ``data.paths`` would list from the SOURCEs is transcoded once (`video.transcode`: short
side scaled down, upright, a keyframe every clip span, video only) and written into WebDataset-style tar
shards that training reads in place (``data.paths: [DEST]``). A shard holds, per video, ``<key>.mp4``,
``<key>.cls`` (its label, when it has one) and ``<key>.json`` (its source and what the transcode changed);
the key is the video's position in the sorted source list.

DEST holds::

    manifest.json          settings and their fingerprint, then (once complete) every shard, its members,
                           and every skipped video with the doctor's reason
    shard-000000.tar       videos 0 .. N-1 of the sorted list (bad ones left out), N = --videos-per-shard
    shard-000000.json      that shard's record; written last, so its presence means the shard is complete

Shard i always holds the same videos, and the same video always transcodes to the same bytes, with tar
headers that carry no time or owner: an interrupted preparation resumes by doing only the shards without
a record, and ends with exactly the shards an uninterrupted one writes. Each shard is written under a
temporary name and renamed when complete. Shards are prepared by Ray Data tasks (``data.decode_cpus``,
``data.decode_concurrency``, ``data.decode_label_selector``), each writing its shard to DEST itself.

A video that training could not read (``video.decode.SKIP_REASONS``: missing, corrupt, too short, ...)
is left out and reported; the output of every transcode passes the doctor's check before it is written.

Frame rate: kept, unless ``--fps`` asks for fewer frames. Under ``data.frame_step`` a clip spans a fixed
number of frames, so dropping frames would stretch its time span: refused. Under ``data.fps`` a video of
rate r is sampled every s = ceil(r) // data.fps frames; keeping every k-th frame (k dividing s) keeps
every clip's span when the prepared rate r / k gives the step s / k. Each video takes the largest such k
whose rate stays at or above ``--fps``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import logging
import math
import posixpath
import re
import sys
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence
from urllib.parse import urlsplit

import av
import numpy as np
import pyarrow.fs as pafs

from vjepa_ray import runs
from vjepa_ray.cli import exit_on_config_error
from vjepa_ray.config import SECTIONS, Config, ConfigError, builtin_config_path, load_config
from vjepa_ray.data.doctor import check_source
from vjepa_ray.data.sources import VideoRef, list_videos, open_source
from vjepa_ray.redaction import install_log_redaction, redact
from vjepa_ray.video.decode import ClipSpec, VideoSkip, read_video_info
from vjepa_ray.video.sampling import frame_step_for
from vjepa_ray.video.transcode import ENCODER, ENCODER_OPTIONS, TranscodeInfo, transcode_video

logger = logging.getLogger(__name__)

PROG = "python -m vjepa_ray.data prepare"
MANIFEST = "manifest.json"
FORMAT = "vjepa_ray.prepare/1"
DEFAULT_VIDEOS_PER_SHARD = 256
# The short side covers a crop at the resize ratio of the usual eval transform (256 for 224 crops).
_SHORT_SIDE_PER_CROP = 256 / 224
_MIN_SHORT_SIDE = 256
_PARTIAL_SUFFIX = ".partial"
# What a preparation writes in DEST (each also under its temporary name): nothing else is ever deleted.
_OWN_NAME = re.compile(r"(manifest\.json|shard-\d{6}\.(tar|json))(\.partial)?")
_GLOB_CHARS = re.compile(r"[*?\[{]")


class DestinationError(Exception):
    """DEST cannot take this preparation (it holds another one, or a write was refused). The message names
    DEST without its credentials: it reaches logs and the terminal."""

    def __init__(self, message: str):
        super().__init__(redact(message))


@dataclass(frozen=True)
class PrepareSettings:
    """What decides the bytes of every shard (with the source list and the encoder's version)."""

    short_side: int
    videos_per_shard: int
    # None: each video's clip span in frames (frames_per_clip x its frame step).
    keyframe_interval: Optional[int]
    # None: every video keeps its rate; else the lowest rate a video may be reduced to (see module docstring).
    min_fps: Optional[float]
    spec: ClipSpec

    @classmethod
    def from_config(cls, cfg: Config, short_side: Optional[int] = None,
                    videos_per_shard: int = DEFAULT_VIDEOS_PER_SHARD, keyframe_interval: Optional[int] = None,
                    fps: Optional[float] = None, video_timeout_s: float = 600.0) -> "PrepareSettings":
        """From the config's data section and the command's options; raises ConfigError naming the option."""
        data = cfg.data
        if short_side is None:
            short_side = max(_MIN_SHORT_SIDE, 2 * math.ceil(data.crop_size * _SHORT_SIDE_PER_CROP / 2))
        if short_side < data.crop_size:
            raise ConfigError("--short-side", f"{short_side} is below data.crop_size={data.crop_size}")
        if videos_per_shard < 1:
            raise ConfigError("--videos-per-shard", f"must be >= 1, got {videos_per_shard}")
        if keyframe_interval is not None and keyframe_interval < 1:
            raise ConfigError("--keyframe-interval", f"must be >= 1, got {keyframe_interval}")
        if fps is not None:
            if data.fps is None:
                raise ConfigError("--fps", "under data.frame_step a clip spans a number of frames: fewer frames "
                                  "per second would stretch it; sample by data.fps to prepare at a lower rate")
            if fps < data.fps:
                raise ConfigError("--fps", f"{fps} is below data.fps={data.fps}, the rate clips are sampled at")
        # One thread per transcode; the time limit covers a whole video, as the doctor's full decode does.
        spec = ClipSpec.from_config(data, decode_timeout_s=video_timeout_s, decode_threads=1)
        return cls(short_side, videos_per_shard, keyframe_interval, fps, spec)

    def plan(self, source_fps: float) -> tuple[int, Optional[float]]:
        """(keyframe interval, output fps or None to keep it) for a video of ``source_fps``."""
        spec = self.spec
        step = frame_step_for(spec.frame_step, spec.fps, source_fps) if source_fps > 0 else spec.frame_step
        keep_every = 1
        if self.min_fps is not None and source_fps > 0:
            for k in range(step, 1, -1):
                if step % k == 0 and source_fps / k >= self.min_fps and \
                        frame_step_for(spec.frame_step, spec.fps, source_fps / k) == step // k:
                    keep_every = k
                    break
        interval = self.keyframe_interval or spec.frames_per_clip * step // keep_every
        return interval, (source_fps / keep_every if keep_every > 1 else None)

    def to_json(self) -> dict[str, Any]:
        return {"short_side": self.short_side, "videos_per_shard": self.videos_per_shard,
                "keyframe_interval": self.keyframe_interval, "min_fps": self.min_fps,
                "clip_spec": dataclasses.asdict(self.spec), "encoder": ENCODER, "encoder_options": ENCODER_OPTIONS,
                "pyav": av.__version__, "ffmpeg": av.ffmpeg_version_info}


def fingerprint(settings: PrepareSettings, refs: Sequence[VideoRef]) -> str:
    """Identifies the shards a preparation writes: its settings, the encoder's version and the sources."""
    text = json.dumps({"settings": settings.to_json(), "sources": [[str(r), r.label] for r in refs]},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def _record_name(index: int) -> str:
    return f"shard-{index:06d}.json"


@dataclass(frozen=True)
class ShardJob:
    """What every shard task needs besides its shard (sent once)."""

    settings: PrepareSettings
    dest: str


def _tar_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    # Nothing that varies between runs: no time, owner or permissions taken from the environment.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
    return info, io.BytesIO(data)


def prepare_video(ref: VideoRef, settings: PrepareSettings) -> tuple[bytes, TranscodeInfo]:
    """One video in the prepared format, checked as the doctor checks it; raises VideoSkip."""
    with open_source(ref) as source:
        interval, fps = settings.plan(read_video_info(source, settings.spec).fps)
        if hasattr(source, "seek"):
            source.seek(0)
        out = io.BytesIO()
        info = transcode_video(source, out, short_side=settings.short_side, keyframe_interval=interval, fps=fps,
                               spec=settings.spec)
    data = out.getvalue()
    row = check_source(data, str(ref), settings.spec)
    if row["reason"] is not None:
        raise VideoSkip(row["reason"], row["detail"])
    return data, info


def write_shard(index: int, refs: Sequence[tuple[int, VideoRef]], job: ShardJob) -> dict[str, Any]:
    """Transcodes ``refs`` ((key, video) pairs) into shard ``index`` at DEST, then writes its record; returns
    the record: ``{"shard", "members", "bytes", "skipped": [{"source", "reason", "detail"}]}``."""
    fs, root = runs.filesystem(job.dest)
    final = posixpath.join(root, shard_name(index))
    partial = final + _PARTIAL_SUFFIX
    members, skipped = [], []
    try:
        with fs.open_output_stream(partial) as stream, tarfile.open(fileobj=stream, mode="w|",
                                                                    format=tarfile.USTAR_FORMAT) as tar:
            for key_index, ref in refs:
                try:
                    data, info = prepare_video(ref, job.settings)
                except VideoSkip as skip:
                    logger.warning("skipping %s (%s): %s", ref, skip.reason, skip.detail)
                    skipped.append(redact({"source": str(ref), "reason": skip.reason, "detail": skip.detail}))
                    continue
                key = f"{key_index:09d}"
                meta = redact({"source": str(ref), "label": ref.label, **dataclasses.asdict(info)})
                tar.addfile(*_tar_member(f"{key}.mp4", data))
                if ref.label is not None:
                    tar.addfile(*_tar_member(f"{key}.cls", str(ref.label).encode()))
                tar.addfile(*_tar_member(f"{key}.json", json.dumps(meta, sort_keys=True).encode()))
                members.append(key)
        fs.move(partial, final)
        record = {"index": index, "shard": shard_name(index), "members": members, "bytes": fs.get_file_info(final).size,
                  "skipped": skipped}
        _write_atomically(fs, posixpath.join(root, _record_name(index)), json.dumps(record).encode())
    except OSError as err:
        raise DestinationError(f"cannot write shard {shard_name(index)} at {job.dest}: {err}") from None
    return record


def _write_atomically(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path + _PARTIAL_SUFFIX) as out:
        out.write(data)
    fs.move(path + _PARTIAL_SUFFIX, path)


def _shard_rows(batch: dict[str, np.ndarray], job: ShardJob) -> dict[str, np.ndarray]:
    """The ``map_batches`` UDF: shard rows -> their records (JSON)."""
    install_log_redaction()  # this worker's log lines name the videos
    records = []
    for index, refs in zip(batch["shard"], batch["refs"]):
        pairs = [(key, VideoRef(**ref)) for key, ref in json.loads(refs)]
        records.append(json.dumps(write_shard(int(index), pairs, job)))
    return {"record": np.asarray(records, dtype=object)}


def _find_cause(err: BaseException, kind: type[BaseException]) -> Optional[BaseException]:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
            return err
        seen.add(id(err))
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__
    return None


def _location(path: str) -> tuple[str, tuple[str, ...]]:
    """Where a path or URI points, comparable with another's: (store, path components). A glob stands for
    the folder above its first wildcard; a URI's credentials and query do not count."""
    if runs.is_uri(path):
        parts = urlsplit(path)
        store = f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}"
        inner = parts.path
    else:
        store, inner = "", str(Path(path).expanduser().resolve())
    components = []
    for name in inner.split("/"):
        if _GLOB_CHARS.search(name):
            break
        if name and name != ".":
            components.append(name)
    return store, tuple(components)


def _check_not_a_source(dest: str, sources: Sequence[str]) -> None:
    """Raises DestinationError when DEST is, contains or lies inside a SOURCE: its shards would mix with the
    videos, or (``--overwrite``) a preparation's clean-up would reach them."""
    dest_store, dest_path = _location(dest)
    for source in sources:
        store, path = _location(source)
        if store != dest_store:
            continue
        shared = min(len(path), len(dest_path))
        if path[:shared] == dest_path[:shared]:
            relation = ("is" if path == dest_path else "contains" if len(dest_path) < len(path) else "lies inside")
            raise DestinationError(f"--out {dest} {relation} the source {source}; write the shards to a folder "
                                   "apart from the videos")


def check_destination(dest: str, sources: Sequence[str]) -> None:
    """What DEST must be before anything is listed or written: apart from every SOURCE, and either empty or
    a preparation (its ``manifest.json`` of this format). Raises DestinationError."""
    _check_not_a_source(dest, sources)
    existing = runs.list_names(dest)
    if existing and _manifest_format(dest, existing) != FORMAT:
        shown = ", ".join(existing[:3]) + (", ..." if len(existing) > 3 else "")
        raise DestinationError(f"{dest} holds files that are not a preparation ({shown}); give --out an empty "
                               "or new folder")


def _manifest_format(dest: str, existing: Sequence[str]) -> Optional[str]:
    if MANIFEST not in existing:
        return None
    try:
        found = json.loads(runs.read_bytes(runs.join(dest, MANIFEST)))
    except (OSError, ValueError):
        return None
    return found.get("format") if isinstance(found, dict) else None


def remove_preparation(dest: str) -> list[str]:
    """Deletes what a preparation wrote in DEST (its manifest, shards and shard records, finished or not) and
    nothing else; returns the names deleted. Call ``check_destination`` first."""
    fs, root = runs.filesystem(dest)
    names = [name for name in runs.list_names(dest) if _OWN_NAME.fullmatch(name)]
    # The manifest last: until it goes, what is left is still recognisably a preparation.
    for name in sorted(names, key=lambda n: n.startswith(MANIFEST)):
        fs.delete_file(posixpath.join(root, name))
    return names


def _claim(dest: str, manifest: dict[str, Any], overwrite: bool) -> None:
    """Makes DEST this preparation's: new, the same preparation resumed, or (``overwrite``) another preparation
    removed. ``check_destination`` has ruled out foreign files."""
    fs, root = runs.filesystem(dest)
    existing = runs.list_names(dest)
    if existing and not overwrite:
        found = json.loads(runs.read_bytes(runs.join(dest, MANIFEST)))
        if found.get("fingerprint") != manifest["fingerprint"]:
            raise DestinationError(f"{dest} holds another preparation ({posixpath.join(root, MANIFEST)}); use "
                                   "--overwrite to replace it, or another --out")
        return
    try:
        if existing:
            logger.info("--overwrite: deleting the preparation at %s", dest)
            remove_preparation(dest)
        fs.create_dir(root, recursive=True)
        _write_atomically(fs, posixpath.join(root, MANIFEST), json.dumps(manifest, indent=1).encode())
    except OSError as err:
        raise DestinationError(f"cannot write to {dest}: {err}") from None


def prepare(cfg: Config, sources: Sequence[str], dest: str, settings: PrepareSettings,
            overwrite: bool = False) -> dict[str, Any]:
    """Prepares ``sources`` into ``dest`` (module docstring); returns the manifest. Needs a Ray cluster
    (`vjepa_ray.cluster.connect`). Raises ConfigError for sources that list nothing and DestinationError."""
    import ray

    check_destination(dest, sources)
    refs = sorted(list_videos(list(sources)), key=lambda r: (r.uri, r.member))
    manifest: dict[str, Any] = {"format": FORMAT, "fingerprint": fingerprint(settings, refs),
                                "settings": settings.to_json(), "sources": redact(list(sources)), "videos": len(refs),
                                "complete": False}
    _claim(dest, manifest, overwrite)
    count = math.ceil(len(refs) / settings.videos_per_shard)
    done = {name: json.loads(runs.read_bytes(runs.join(dest, name))) for name in runs.list_names(dest)
            if name.startswith("shard-") and name.endswith(".json")}
    todo = [i for i in range(count) if _record_name(i) not in done]
    logger.info("preparing %d videos into %d shards at %s (%d already done)", len(refs), count, dest,
                count - len(todo))
    if todo:
        rows = [{"shard": i, "refs": json.dumps([(k, dataclasses.asdict(refs[k])) for k in range(
            i * settings.videos_per_shard, min(len(refs), (i + 1) * settings.videos_per_shard))])} for i in todo]
        data = cfg.data
        ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            _shard_rows, fn_kwargs={"job": ShardJob(settings, dest)}, batch_size=1, batch_format="numpy",
            num_cpus=data.decode_cpus, concurrency=data.decode_concurrency or None,
            label_selector=dict(data.decode_label_selector) or None)
        ds.context.enable_progress_bars = False
        try:
            for row in ds.iter_rows():
                record = json.loads(row["record"])
                done[_record_name(record["index"])] = record
                logger.info("wrote %s: %d videos, %d skipped", record["shard"], len(record["members"]),
                            len(record["skipped"]))
        except Exception as err:
            # A task's DestinationError reaches here wrapped in Ray's task and user-code errors.
            cause = _find_cause(err, DestinationError)
            if cause is None:
                raise
            raise cause from None
    records = [done[_record_name(i)] for i in range(count)]
    skipped = [s for r in records for s in r["skipped"]]
    counts = Counter(s["reason"] for s in skipped)
    counts["ok"] = sum(len(r["members"]) for r in records)
    manifest.update(complete=True, shards=[{k: r[k] for k in ("shard", "members", "bytes")} for r in records],
                    skipped=skipped, counts=dict(sorted(counts.items())), resumed_shards=count - len(todo))
    fs, root = runs.filesystem(dest)
    try:
        _write_atomically(fs, posixpath.join(root, MANIFEST), json.dumps(manifest, indent=1).encode())
    except OSError as err:
        raise DestinationError(f"cannot write the manifest at {dest}: {err}") from None
    return manifest


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Transcodes videos once into tar shards that training decodes cheaply.",
        epilog="Clip settings and limits come from the config's data section (default: the built-in local demo); "
               "override them as section.key=value. Training reads the output with data.paths: [DEST].")
    parser.add_argument("items", nargs="+", metavar="SOURCE | section.key=value",
                        help="what data.paths accepts (folders, globs, manifests, tar shards, URIs), and overrides")
    parser.add_argument("--out", required=True, metavar="DEST", help="folder or URI to write the shards to")
    parser.add_argument("--config", metavar="FILE", default=None, help="YAML config")
    parser.add_argument("--short-side", type=int, default=None, metavar="PIXELS",
                        help=f"scale the short side down to this (default: {_SHORT_SIDE_PER_CROP:.3g} x "
                             f"data.crop_size, at least {_MIN_SHORT_SIDE})")
    parser.add_argument("--videos-per-shard", type=int, default=DEFAULT_VIDEOS_PER_SHARD, metavar="N")
    parser.add_argument("--keyframe-interval", type=int, default=None, metavar="FRAMES",
                        help="default: the clip span, data.frames_per_clip x the frame step")
    parser.add_argument("--fps", type=float, default=None,
                        help="drop frames down to no less than this rate where clips keep their span (data.fps only)")
    parser.add_argument("--video-timeout", type=float, default=600.0, metavar="SECONDS",
                        help="time limit of one video's transcode (default 600)")
    parser.add_argument("--overwrite", action="store_true", help="replace what DEST holds")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON instead of a summary")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    from vjepa_ray.cluster import connect

    args = _parser().parse_intermixed_args(argv)
    install_log_redaction()
    overrides = [item for item in args.items if item.split(".", 1)[0] in SECTIONS and "=" in item]
    sources = [item for item in args.items if item not in overrides]
    if not sources:
        _parser().error("no SOURCE given")
    try:
        cfg = load_config(args.config or builtin_config_path("local_demo"), overrides)
        settings = PrepareSettings.from_config(cfg, args.short_side, args.videos_per_shard, args.keyframe_interval,
                                               args.fps, args.video_timeout)
        check_destination(args.out, sources)
        connect(cfg)
        started = time.monotonic()
        manifest = prepare(cfg, sources, args.out, settings, args.overwrite)
    except ConfigError as err:
        exit_on_config_error(PROG, err)
    except DestinationError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(manifest))
    else:
        for skip in manifest["skipped"]:
            print(f"skipped  {skip['source']}  {skip['reason']}: {skip['detail']}")
        counts = ", ".join(f"{reason} {n}" for reason, n in manifest["counts"].items())
        print(f"{manifest['videos']} videos -> {len(manifest['shards'])} shards at {redact(args.out)} "
              f"({manifest['resumed_shards']} already there) in {time.monotonic() - started:.0f} s: {counts}")
    return 0 if manifest["counts"]["ok"] else 1
