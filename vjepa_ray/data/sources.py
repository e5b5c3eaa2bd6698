"""Where the videos are: `data.paths` entries -> a flat, deterministic list of `VideoRef`.

An entry of `data.paths` is one of

- a directory (searched recursively for video files and tar shards),
- a glob (``/data/k400/**/*.mp4``, ``s3://bucket/clips/*.mp4``) or a WebDataset brace range
  (``shards/train-{0000..0099}.tar``),
- a manifest: ``.csv``/``.txt`` with the reference's space-delimited ``path label`` lines, a CSV with a
  header that names ``path`` (and optionally ``label``) columns, or ``.jsonl`` with ``{"path", "label"}``;
  relative paths in a manifest are relative to the manifest,
- a video file or a WebDataset-style ``.tar`` shard of videos (members are read in place, by offset),
- still images (``video.image.IMAGE_EXTENSIONS``) anywhere a video may be: a directory, glob, manifest or
  shard of them, or one image file; pretraining reads each as a static clip (``vjepa_ray.video.image``),
- any of the above as a URI (``s3://``, ``gs://``, ``hdfs://`` ... whatever ``pyarrow.fs`` resolves).

URIs resolve through ``pyarrow.fs.FileSystem.from_uri`` (query parameters such as
``?endpoint_override=host:port&scheme=http`` are kept on every listed file), or through the
``filesystem`` argument when one is given; plain paths are always the local disk. Listing is sorted so
that every Train worker that lists the same paths gets the same list.

`epoch_order` turns the list into one epoch's seeded visiting order; with `data.weights` each slot
draws its source with those proportions (honoured in expectation).
"""

from __future__ import annotations

import collections
import csv
import fnmatch
import functools
import glob
import io
import json
import logging
import os
import posixpath
import re
import tarfile
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import BinaryIO, Collection, Iterator, Optional, Sequence, Union
from urllib.parse import urlsplit

import numpy as np
import pyarrow.fs as pafs

from vjepa_ray.config import ConfigError
from vjepa_ray.runs import is_uri
from vjepa_ray.video.decode import VideoSkip
from vjepa_ray.video.image import IMAGE_EXTENSIONS

VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mkv", ".webm", ".mov", ".avi", ".mpg", ".mpeg", ".ts",
                              ".flv", ".wmv", ".3gp", ".ogv"})
# What a directory, glob or shard yields as training media: videos, and images read as static clips.
MEDIA_EXTENSIONS = VIDEO_EXTENSIONS | IMAGE_EXTENSIONS
MANIFEST_EXTENSIONS = frozenset({".csv", ".txt", ".jsonl", ".ndjson"})
SHARD_EXTENSION = ".tar"
# WebDataset keeps a sample's label beside its video as "<key>.cls" (or .label).
_LABEL_MEMBER_EXTENSIONS = (".cls", ".label")
# The most of a label member that is read: a class index or name, never a file's worth.
MAX_LABEL_BYTES = 4096
_GLOB_CHARS = re.compile(r"[*?\[]")
_BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
# Object stores whose pyarrow path is "bucket/key" (no need to build a client just to parse a URI).
_BUCKET_SCHEMES = frozenset({"s3", "gs", "gcs"})
# Remote reads go through a read-ahead buffer: decoders issue many small reads, each a round trip.
_READ_BUFFER_BYTES = 1 << 20

Label = Union[int, str, None]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VideoRef:
    """One video: a file, or a member of a tar shard (``member`` set; bytes at ``offset``, ``size``)."""

    uri: str
    label: Label = None
    source_index: int = 0
    member: str = ""
    offset: int = 0
    size: int = -1  # -1: the whole file

    def __str__(self) -> str:
        return f"{self.uri}:{self.member}" if self.member else self.uri


@functools.lru_cache(maxsize=16)
def _filesystem_from_uri(uri: str) -> pafs.FileSystem:
    # One filesystem per (scheme, host, query): creating an S3/GCS client is expensive.
    return pafs.FileSystem.from_uri(uri)[0]


def resolve(uri: str, filesystem: Optional[pafs.FileSystem] = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI; ``filesystem`` overrides URIs only."""
    if not is_uri(uri):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    parts = urlsplit(uri)
    # The bucket without the credentials a URI may carry ("s3://KEY:SECRET@bucket/..."): those open the store.
    bucket_path = (parts.netloc.rpartition("@")[2] + parts.path).rstrip("/")
    if filesystem is not None:
        return filesystem, bucket_path
    fs = _filesystem_from_uri(f"{parts.scheme}://{parts.netloc}/" + (f"?{parts.query}" if parts.query else ""))
    if parts.scheme in _BUCKET_SCHEMES:
        return fs, bucket_path
    return fs, pafs.FileSystem.from_uri(uri)[1]


def _split_query(uri: str) -> tuple[str, str]:
    base, sep, query = uri.partition("?")
    return base, (sep + query if sep else "")


def _extension(path: str) -> str:
    return os.path.splitext(_split_query(path)[0])[1].lower()


def _expand_braces(entry: str) -> list[str]:
    """WebDataset shard ranges: ``a-{000..002}.tar`` -> a-000.tar, a-001.tar, a-002.tar."""
    match = _BRACE_RANGE.search(entry)
    if match is None:
        return [entry]
    first, last = match.group(1), match.group(2)
    width = len(first)
    out = []
    for number in range(int(first), int(last) + 1):
        out.extend(_expand_braces(entry[:match.start()] + str(number).zfill(width) + entry[match.end():]))
    return out


class _Lister:
    """Expands entries against their filesystem, keeping URIs (with their query) on what it finds."""

    def __init__(self, entry: str, source_index: int, filesystem: Optional[pafs.FileSystem]):
        self.source_index = source_index
        self.filesystem = filesystem
        self.remote = is_uri(entry)
        base, self.query = _split_query(entry)
        self.fs, self.root_path = resolve(entry, filesystem)
        # The URI text that stands for root_path, so child paths map back to URIs.
        self.root_uri = base.rstrip("/") if self.remote else self.root_path

    def uri_of(self, path: str) -> str:
        if not self.remote:
            return path
        rel = path[len(self.root_path):] if path.startswith(self.root_path) else "/" + path
        return self.root_uri + rel + self.query

    def expand(self, entry: str) -> list[VideoRef]:
        base = _split_query(entry)[0]
        if _GLOB_CHARS.search(base):
            return [ref for uri in self._glob(base) for ref in self._from_file(uri)]
        info = self.fs.get_file_info(self.root_path)
        if info.type == pafs.FileType.Directory:
            selector = pafs.FileSelector(self.root_path, recursive=True)
            files = sorted(i.path for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File)
            return [ref for path in files if _extension(path) in MEDIA_EXTENSIONS | {SHARD_EXTENSION}
                    for ref in self._from_file(self.uri_of(path))]
        if info.type == pafs.FileType.NotFound:
            raise ConfigError("data.paths", f"{entry!r} does not exist")
        # Absolute: decode tasks run in other working directories.
        return self._from_file(self.uri_of(self.root_path))

    def _glob(self, pattern: str) -> list[str]:
        if not self.remote:
            return sorted(os.path.abspath(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                          if os.path.isfile(p))
        # Remote stores have no glob: list below the fixed prefix and match (``*`` also crosses "/").
        prefix = pattern[:_GLOB_CHARS.search(pattern).start()].rsplit("/", 1)[0]
        lister = _Lister(prefix + self.query, self.source_index, self.filesystem)
        selector = pafs.FileSelector(lister.root_path, recursive=True, allow_not_found=True)
        uris = (lister.uri_of(i.path) for i in lister.fs.get_file_info(selector) if i.type == pafs.FileType.File)
        return sorted(u for u in uris if fnmatch.fnmatchcase(_split_query(u)[0], pattern))

    def _from_file(self, uri: str) -> list[VideoRef]:
        ext = _extension(uri)
        if ext == SHARD_EXTENSION:
            return shard_members(uri, self.source_index, self.filesystem)
        if ext in MANIFEST_EXTENSIONS:
            return _read_manifest(uri, self.source_index, self.filesystem)
        return [VideoRef(uri, None, self.source_index)]


def list_videos(paths: Sequence[str], weights: Sequence[float] = (),
                filesystem: Optional[pafs.FileSystem] = None) -> list[VideoRef]:
    """Every video that `paths` name, in a stable order; raises ConfigError for an entry with none.

    Entries with weight 0 are not listed (they would never be drawn).
    """
    if not paths:
        raise ConfigError("data.paths", "is empty; give directories, globs, manifests, URIs or tar shards")
    if weights and len(weights) != len(paths):
        raise ConfigError("data.weights", f"has {len(weights)} entries for {len(paths)} data.paths")
    refs: list[VideoRef] = []
    for index, entry in enumerate(paths):
        if weights and weights[index] == 0:
            continue
        found = [ref for part in _expand_braces(str(entry))
                 for ref in _Lister(part, index, filesystem).expand(part)]
        if not found:
            raise ConfigError("data.paths", f"{entry!r} holds no videos (extensions: "
                              f"{', '.join(sorted(MEDIA_EXTENSIONS))}, {SHARD_EXTENSION} "
                              "shards, manifests)")
        refs.extend(found)
    return refs


def check_sources(paths: Sequence[str], weights: Sequence[float] = (), *, skip: Collection[str] = (),
                  remote: bool = True) -> None:
    """What the driver checks before anything starts: every entry of ``paths`` (but those in ``skip``, and
    URIs unless ``remote``) names videos, and at least one of the local files a manifest lists exists.

    Entries are listed as training lists them, never decoded. Raises ConfigError naming ``data.paths``.
    """
    if not paths:
        raise ConfigError("data.paths", "is empty; give directories, globs, manifests, URIs or tar shards")
    for index, entry in enumerate(paths):
        if entry in skip or (weights and weights[index] == 0) or (is_uri(str(entry)) and not remote):
            continue
        try:
            refs = list_videos([entry])
        except ConfigError as err:
            found = _what_is_there(str(entry))
            raise ConfigError("data.paths", f"{err.message}; found {found}" if found else err.message) from None
        local = [ref.uri for ref in refs if not ref.member and not is_uri(ref.uri)]
        if len(local) == len(refs) and not any(os.path.isfile(uri) for uri in local):
            raise ConfigError("data.paths", f"{entry!r} lists {len(refs)} videos and none of them exists "
                              f"(the first: {local[0]})")


def _what_is_there(entry: str) -> str:
    """For a local folder or glob that yields no video: what it holds instead (``""`` for anything else)."""
    if is_uri(entry):
        return ""
    path = os.path.expanduser(entry)
    if _GLOB_CHARS.search(path):
        files = [p for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
    elif os.path.isdir(path):
        files = [os.path.join(root, name) for root, _, names in os.walk(path) for name in names]
    else:
        return ""
    if not files:
        return "no files" if _GLOB_CHARS.search(path) else "an empty folder"
    kinds = collections.Counter(_extension(f) or "no extension" for f in files)
    listed = ", ".join(f"{kind} {n}" for kind, n in kinds.most_common(5))
    return f"{len(files)} file{'s' if len(files) > 1 else ''}: {listed}"


def _parse_label(text: Optional[str]) -> Label:
    if text is None or str(text).strip() == "":
        return None
    text = str(text).strip()
    try:
        return int(text)
    except ValueError:
        return text


def _manifest_entry_uri(manifest_uri: str, path: str) -> str:
    if is_uri(path) or os.path.isabs(path):
        return path
    base, query = _split_query(manifest_uri)
    if is_uri(base):
        return posixpath.join(posixpath.dirname(base), path) + query
    return os.path.join(os.path.dirname(base), path)


def _read_manifest(uri: str, source_index: int, filesystem: Optional[pafs.FileSystem]) -> list[VideoRef]:
    fs, path = resolve(uri, filesystem)
    with fs.open_input_stream(path) as stream:
        text = stream.read().decode("utf-8")
    rows: list[tuple[str, Label]] = []
    lines = [line for line in text.splitlines() if line.strip()]
    if _extension(uri) in (".jsonl", ".ndjson"):
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                rows.append((str(record["path"]), _parse_label(record.get("label"))))
            except (ValueError, KeyError, TypeError):
                raise ConfigError("data.paths", f"{uri} line {number}: expected a JSON object with a 'path'") \
                    from None
    elif lines and "path" in [c.strip() for c in next(csv.reader([lines[0]]))]:
        rows = [(r["path"].strip(), _parse_label(r.get("label"))) for r in csv.DictReader(lines)
                if (r.get("path") or "").strip()]
    else:
        # The reference's format: "<path> <label>" (the path itself may hold spaces; the label is last).
        for line in lines:
            head, _, tail = line.strip().rpartition(" ")
            if head and re.fullmatch(r"-?\d+", tail):
                rows.append((head.strip(), int(tail)))
            else:
                rows.append((line.strip(), None))
    return [VideoRef(_manifest_entry_uri(uri, p), label, source_index) for p, label in rows]


def shard_members(uri: str, source_index: int, filesystem: Optional[pafs.FileSystem]) -> list[VideoRef]:
    """The video and image members of an uncompressed tar, with their data offsets (read in place, never
    extracted)."""
    with open_range(uri, filesystem) as stream:
        try:
            with tarfile.open(fileobj=stream, mode="r:") as tar:
                members = [m for m in tar.getmembers() if m.isfile()]
                labels = {}
                for m in members:
                    key, ext = os.path.splitext(m.name)
                    if ext.lower() not in _LABEL_MEMBER_EXTENSIONS:
                        continue
                    if m.size > MAX_LABEL_BYTES:
                        logger.warning("%s: label member %s has %d bytes (a label has at most %d); its video "
                                       "goes unlabelled", uri, m.name, m.size, MAX_LABEL_BYTES)
                        continue
                    labels[key] = _parse_label(tar.extractfile(m).read(MAX_LABEL_BYTES).decode("utf-8", "replace"))
        except tarfile.TarError as err:
            raise ConfigError("data.paths", f"{uri} is not an uncompressed tar shard: {err}") from None
    # WebDataset keys run to the first dot of the basename ("clip.0001.mp4" would be key "clip").
    return [VideoRef(uri, labels.get(os.path.splitext(m.name)[0]), source_index, m.name, m.offset_data, m.size)
            for m in members if _extension(m.name) in MEDIA_EXTENSIONS]


class _FileWindow(io.RawIOBase):
    """A seekable read-only view of bytes [start, start + size) of a pyarrow random-access file."""

    def __init__(self, raw: pafs.NativeFile, start: int, size: int):
        super().__init__()
        self._raw, self._start, self._size, self._pos = raw, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        count = max(0, min(len(buffer), self._size - self._pos))
        if count == 0:
            return 0
        data = self._raw.read_at(count, self._start + self._pos)
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


@contextmanager
def open_range(uri: str, filesystem: Optional[pafs.FileSystem] = None, offset: int = 0,
               size: int = -1) -> Iterator[BinaryIO]:
    """A buffered, seekable stream over ``size`` bytes at ``offset`` of a file (size -1: to its end)."""
    fs, path = resolve(uri, filesystem)
    raw = fs.open_input_file(path)
    if size < 0:
        size = raw.size() - offset
    stream = io.BufferedReader(_FileWindow(raw, offset, size), buffer_size=_READ_BUFFER_BYTES)
    try:
        yield stream
    finally:
        stream.close()


@contextmanager
def open_video(ref: VideoRef, filesystem: Optional[pafs.FileSystem] = None) -> Iterator[Union[str, BinaryIO]]:
    """What the decoder reads: a local file's path (the decoder seeks in it itself), or a seekable stream
    over a remote file or a shard member. Bytes go straight from the store to the decoder, no temp files."""
    if not ref.member and not is_uri(ref.uri):
        yield ref.uri
        return
    with open_range(ref.uri, filesystem, ref.offset, ref.size) as stream:
        yield stream


@contextmanager
def open_source(ref: VideoRef, filesystem: Optional[pafs.FileSystem] = None) -> Iterator[Union[str, BinaryIO]]:
    """``open_video`` for readers that skip bad videos: a file that cannot be opened raises VideoSkip."""
    with ExitStack() as stack:
        try:
            source = stack.enter_context(open_video(ref, filesystem))
        except FileNotFoundError as err:
            raise VideoSkip("missing", str(err)) from None
        except OSError as err:
            raise VideoSkip("unreadable", str(err)) from None
        yield source


def epoch_order(refs: Sequence[VideoRef], weights: Sequence[float], seed: int, epoch: int) -> np.ndarray:
    """One epoch's visiting order: indices into `refs`, as many as there are refs.

    Without weights: a seeded permutation (each video once). With weights: every slot draws its source
    with probability weight/sum(weights), then takes the next video of that source's own seeded
    permutation (cycled), so proportions hold in expectation and a source's videos recur evenly.
    """
    count = len(refs)
    rng = np.random.default_rng([seed, epoch])
    if not weights:
        return rng.permutation(count)
    sources = np.fromiter((r.source_index for r in refs), dtype=np.int64, count=count)
    members = [np.flatnonzero(sources == s) for s in range(len(weights))]
    probs = np.array([w if len(m) else 0.0 for w, m in zip(weights, members)], dtype=np.float64)
    if probs.sum() <= 0:
        raise ConfigError("data.weights", "no source with a positive weight holds videos")
    picks = rng.choice(len(weights), size=count, p=probs / probs.sum())
    order = np.empty(count, dtype=np.int64)
    for s, files in enumerate(members):
        slots = np.flatnonzero(picks == s)
        if len(slots):
            rounds = -(-len(slots) // len(files))
            order[slots] = np.concatenate([rng.permutation(files) for _ in range(rounds)])[:len(slots)]
    return order
