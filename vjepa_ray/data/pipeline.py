"""The Ray Data clip pipeline: video list -> seeded epochs of chunks -> decoded, augmented uint8 clips.

Ray Data's dataset iterators carry no state (through 2.60), so a restart could only replay whole epochs. Instead each
Train worker builds its own `ClipStream` inside the training function and the stream keeps the
position itself:

- an endless series of virtual epochs; epoch ``e`` visits the videos in a seeded order
  (`sources.epoch_order`) cut into chunks of ``data.chunk_size`` files (the last chunk wraps around to
  the start of the order, so every chunk is full);
- in every chunk, rank ``r`` of ``W`` takes the files ``r, r + W, ...`` (``chunk_size // W`` of them):
  shares are disjoint, and each rank yields exactly ``chunk_size // W * clips_per_video // batch_size``
  batches per chunk, refilling from the chunk's decoded clips when bad videos leave it short. Equal
  counts matter: DeepSpeed collectives and ``ray.train.report`` are barriers;
- the files are decoded by Ray Data ``map_batches`` tasks (``num_cpus=data.decode_cpus``, concurrency
  ``data.decode_concurrency``, node labels ``data.decode_label_selector``) that read the bytes
  themselves (local path, or a pyarrow stream for URIs and tar members), decode with PyAV, crop and
  flip. Every random draw for a file comes from ``(meta.seed, epoch, chunk, slot)``, so a chunk
  decodes to the same clips whichever rank, process or restart decodes it;
- ``state_dict()`` is where the stream stands: the (epoch, chunk) of its next batch, how many batches of
  that chunk it has yielded, and the last clip it yielded. A checkpoint stores every rank's; a restart
  decodes the chunk in progress again and skips the batches already trained (see *Resuming* below).

Resuming. On the same number of workers with the same micro batch, every rank re-decodes its share of the
chunk and skips the batches it had yielded: the batches that follow are bit for bit those of an
uninterrupted run, bad videos and refills included. With another world size or micro batch (an elastic
restart), the clips of the chunk that no rank had yielded yet (known from each rank's last clip) are
split afresh into equal contiguous shares, one per new rank, in whole micro batches; the fewer than
``world_size * batch_size`` clips left over are dropped, and no clip is trained twice. The chunks after it
are split as usual. Two things void the bitwise promise for a chunk: a video skipped for
``data.decode_timeout_s`` (it depends on the machine's speed, so the re-decode may keep a clip the first
decode dropped, or the reverse), and a changed video list or ``data.chunk_size`` (the positions then name
other files).

Ray Data's own answer to resuming training ingest, ``ray.train.DatasetCheckpointConfig``, records the ids of
the rows consumed and filters them out of the re-read dataset; it works for any dataset with a unique id
column but stores every consumed id. This stream keeps no ids: its decoding is a pure function of
(``meta.seed``, epoch, chunk, slot), so a position per rank identifies the consumed clips. The two agree on
what a resume means (each row trained once per epoch, the input re-read); the ``slot`` column would be the id
column should the stream move to Ray's mechanism.

Clip lengths. Each source (``data.paths`` entry) has its frames per clip
(``data.frames_per_clip_per_source``, V-JEPA 2's ``dataset_fpcs``), and image sources give static clips of
that many frames (``vjepa_ray.video.image``). A batch of clips of several lengths holds one tensor per
length, ascending (``ClipBatch.clips``), its clips in stream order within each; the positions and resuming
above count clips and are the same whatever their lengths.

Bad videos become skip rows (a placeholder clip and the reason) so that their counts reach the trainer
with the next batch (`ClipBatch.skipped`); each bad path is logged once per stream. When no video of
the list decodes at all, the stream raises `NoUsableVideosError` instead of retrying forever.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import shlex
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import pyarrow.fs as pafs
import ray
import torch

from vjepa_ray.config import ConfigError, DataConfig
from vjepa_ray.data.sources import VideoRef, epoch_order, list_videos, open_source
from vjepa_ray.video.decode import ClipSpec, VideoSkip, decode_clips
from vjepa_ray.video.image import is_image_path, read_image, static_clip
from vjepa_ray.video.transforms import random_resized_crop_clip
from vjepa_ray.worker_env import MALLOC_ENV

logger = logging.getLogger(__name__)

Position = tuple[int, int]
# A clip of an epoch: (slot of its video in the epoch's order, index among that video's clips).
ClipId = tuple[int, int]
# Videos per decode task: Ray Data's per-task cost (tens of ms of CPU: scheduling, block building,
# stats) is then spread over several decodes of 100+ ms each.
FILES_PER_TASK = 4


class NoUsableVideosError(ConfigError):
    """Every video the stream could try failed to decode: bad input for ``data.paths``, not a fault to retry."""


@dataclass(frozen=True)
class ClipBatch:
    """``clips``: uint8 [B, T, H, W, 3], or when the batch holds clips of several lengths one such tensor per
    length, ascending; ``videos``: the video each clip comes from (in the clips' order); ``position``: the
    (epoch, chunk) they come from; ``skipped``: bad videos (by reason) counted since the previous batch
    of this stream."""

    clips: torch.Tensor | tuple[torch.Tensor, ...]
    videos: tuple[str, ...]
    position: Position
    skipped: Counter = field(default_factory=Counter)


@dataclass(frozen=True)
class DecodeJob:
    """What every decode task needs besides its rows (sent once per dataset)."""

    spec: ClipSpec
    crop_size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    flip: bool
    seed: int
    epoch: int
    filesystem: Optional[pafs.FileSystem] = None
    # Frames per clip of each source (data.frames_per_clip_per_source); empty: spec.frames_per_clip for all.
    source_frames: tuple[int, ...] = ()

    @classmethod
    def from_config(cls, data: DataConfig, seed: int, epoch: int,
                    filesystem: Optional[pafs.FileSystem] = None) -> "DecodeJob":
        return cls(ClipSpec.from_config(data), data.crop_size, tuple(data.random_resize_scale),
                   tuple(data.random_resize_aspect_ratio), data.horizontal_flip, seed, epoch, filesystem,
                   tuple(data.frames_per_clip_per_source))

    def spec_for(self, source_index: int) -> ClipSpec:
        """The clip spec of a source: ``spec`` with that source's frames per clip."""
        if not self.source_frames:
            return self.spec
        return dataclasses.replace(self.spec, frames_per_clip=self.source_frames[source_index])

    def rng(self, chunk: int, slot: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, chunk, slot])


def _row(ref: VideoRef, chunk: int, slot: int) -> dict[str, Any]:
    return {"uri": ref.uri, "member": ref.member, "offset": ref.offset, "size": ref.size,
            "source": ref.source_index, "chunk": chunk, "slot": slot}


def decode_video(ref: VideoRef, job: DecodeJob, rng: np.random.Generator) -> list[np.ndarray]:
    """A decode task's work for one video (or image): read, decode ``clips_per_video`` clips, crop and flip
    each. Returns uint8 [T, crop, crop, 3] clips, T its source's frames per clip; raises VideoSkip for a bad
    file. An image gives static clips (each its own crop)."""
    spec = job.spec_for(ref.source_index)
    with open_source(ref, job.filesystem) as source:
        if is_image_path(ref.member or ref.uri):
            frame = read_image(source, spec)[None]
            return [static_clip(random_resized_crop_clip(frame, job.crop_size, job.scale, job.ratio, job.flip,
                                                         rng)[0], spec.frames_per_clip)
                    for _ in range(spec.clips_per_video)]
        decoded = decode_clips(source, spec, rng)
    return [random_resized_crop_clip(clip, job.crop_size, job.scale, job.ratio, job.flip, rng)
            for clip in decoded.clips]


def _column(arrays: list[np.ndarray]) -> np.ndarray:
    """A column of clips: one array when they have one shape, else an object array of them (Ray Data
    stores it as a variable-shaped tensor column)."""
    if len({a.shape for a in arrays}) <= 1:
        return np.stack(arrays)
    column = np.empty(len(arrays), dtype=object)
    for i, array in enumerate(arrays):
        column[i] = array
    return column


def stack_by_length(clips: Sequence[np.ndarray]) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """uint8 clips [T, H, W, 3] -> one tensor [B, T, H, W, 3] when they have one length, else one per length
    (ascending), each keeping the clips' order."""
    lengths = sorted({len(clip) for clip in clips})
    if len(lengths) == 1:
        return torch.from_numpy(np.stack(clips))
    return tuple(torch.from_numpy(np.stack([clip for clip in clips if len(clip) == t])) for t in lengths)


def decode_rows(batch: dict[str, np.ndarray], job: DecodeJob) -> dict[str, np.ndarray]:
    """The ``map_batches`` UDF: file rows -> one row per clip, or one skip row per bad file.

    Output columns: ``clip`` uint8 [T, crop, crop, 3] (zeros in skip rows), ``chunk``, ``slot``,
    ``clip_index``, ``skip_reason`` ("" for clips), ``skip_detail``, ``uri`` and ``decode_node`` (the Ray
    node that decoded it, to check placement).
    """
    clips, chunks, slots, clip_index, reasons, details, uris = [], [], [], [], [], [], []
    for i in range(len(batch["slot"])):
        chunk, slot, uri = int(batch["chunk"][i]), int(batch["slot"][i]), str(batch["uri"][i])
        name = f"{uri}:{batch['member'][i]}" if batch["member"][i] else uri
        try:
            ref = VideoRef(uri, source_index=int(batch["source"][i]), member=str(batch["member"][i]),
                           offset=int(batch["offset"][i]), size=int(batch["size"][i]))
            out = decode_video(ref, job, job.rng(chunk, slot))
            outcome = [(clip, "", "") for clip in out]
        except VideoSkip as skip:
            frames = job.spec_for(int(batch["source"][i])).frames_per_clip
            placeholder = np.zeros((frames, job.crop_size, job.crop_size, 3), np.uint8)
            outcome = [(placeholder, skip.reason, str(skip))]
        for k, (clip, reason, detail) in enumerate(outcome):
            clips.append(clip)
            chunks.append(chunk)
            slots.append(slot)
            clip_index.append(k)
            reasons.append(reason)
            details.append(detail)
            uris.append(name)
    node = ray.get_runtime_context().get_node_id()
    return {"clip": _column(clips), "chunk": np.asarray(chunks, np.int64), "slot": np.asarray(slots, np.int64),
            "clip_index": np.asarray(clip_index, np.int64), "skip_reason": np.asarray(reasons, dtype=object),
            "skip_detail": np.asarray(details, dtype=object), "uri": np.asarray(uris, dtype=object),
            "decode_node": np.asarray([node] * len(clips), dtype=object)}


def _clip_ids(clips: Iterable[Sequence[int]]) -> tuple[ClipId, ...]:
    return tuple((int(slot), int(k)) for slot, k in clips)


def decode_dataset(rows: list[dict[str, Any]], job: DecodeJob, data: DataConfig,
                   label_selector: Optional[dict[str, str]] = None) -> "ray.data.Dataset":
    """Rows (one per file, in order) -> a Dataset of decoded clip rows and skip rows, in the same order."""
    ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / FILES_PER_TASK)))
    selector = label_selector if label_selector is not None else dict(data.decode_label_selector)
    ds = ds.map_batches(
        decode_rows, fn_kwargs={"job": job}, batch_size=FILES_PER_TASK, batch_format="numpy",
        num_cpus=data.decode_cpus, concurrency=data.decode_concurrency or None,
        label_selector=selector or None, runtime_env={"env_vars": MALLOC_ENV},
    )
    ctx = ds.context  # this dataset's own copy
    # Clip order must follow the file order, or "same seed and position -> same batches" fails.
    ctx.execution_options.preserve_order = True
    # A stream starts one execution per epoch: no progress bars, no plan printed at each start.
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return ds


@dataclass
class _Item:
    clip: np.ndarray
    reason: str
    detail: str
    uri: str
    clip_id: ClipId


@dataclass(frozen=True)
class _ChunkPlan:
    """What a rank yields of the chunk it resumes in: its clips (``share``; None: its usual share of the
    chunk's files), the batches already yielded (``start``) and the chunk's batches in all (``wanted``)."""

    share: Optional[tuple[ClipId, ...]]
    start: int
    wanted: int


def resplit_chunk(states: Sequence[dict[str, Any]], shares: Sequence[Sequence[ClipId]], unassigned: Sequence[ClipId],
                  world_size: int, batch_size: int) -> list[list[ClipId]]:
    """Each new rank's clips of a chunk interrupted under another layout (world size or micro batch).

    ``states``: every old rank's ``ClipStream.state_dict()``; ``shares``: every old rank's clips of the chunk
    in the order it yields them; ``unassigned``: the chunk's clips that no old rank had (files left over by the
    split). The clips not yet yielded are cut into ``world_size`` equal contiguous shares of whole micro
    batches; the rest (fewer than ``world_size * batch_size``) is dropped.
    """
    pending = list(unassigned)
    for state, share in zip(states, shares, strict=True):
        done = state.get("done")
        pending += share if done is None else [clip for clip in share if clip > tuple(done)]
    pending.sort()
    per_rank = len(pending) // (world_size * batch_size) * batch_size
    return [pending[r * per_rank:(r + 1) * per_rank] for r in range(world_size)]


class ClipStream:
    """Endless, resumable stream of `ClipBatch` for one Train worker (see the module docstring).

    Args:
        data: the ``data`` config section.
        seed: ``meta.seed``.
        rank, world_size: this worker's place among those that share the stream.
        refs: the video list, when the caller listed it once for all workers (else listed here).
        filesystem: pyarrow filesystem for URI paths (e.g. ``S3FileSystem(endpoint_override=...)``).
        label_selector: node labels for the decode tasks; default ``data.decode_label_selector``.
    """

    def __init__(self, data: DataConfig, seed: int, rank: int = 0, world_size: int = 1, *,
                 refs: Optional[Sequence[VideoRef]] = None,
                 filesystem: Optional[pafs.FileSystem] = None,
                 label_selector: Optional[dict[str, str]] = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
        self.data, self.seed, self.rank, self.world_size = data, seed, rank, world_size
        self.filesystem, self.label_selector = filesystem, label_selector
        self.refs = list(refs) if refs is not None else list_videos(data.paths, data.weights, filesystem)
        self.files_per_rank = data.chunk_size // world_size
        self.batches_per_chunk = self.files_per_rank * data.clips_per_video // data.batch_size
        if self.batches_per_chunk == 0:
            need = world_size * math.ceil(data.batch_size / data.clips_per_video)
            raise ConfigError("data.chunk_size", f"{data.chunk_size} files per chunk give each of {world_size} "
                              f"workers fewer than data.batch_size={data.batch_size} clips; use >= {need}")
        self.num_chunks = math.ceil(len(self.refs) / data.chunk_size)
        # Where the next batch comes from: a chunk, the batches of it already yielded, the last clip yielded, and
        # the chunk's clips this rank yields when an elastic restart split it afresh (None: the usual share).
        # The beginning, until ``load_state_dict`` restores a checkpoint's.
        self._position: Position = (0, 0)
        self._batches_done = 0
        self._done: Optional[ClipId] = None
        self._share: Optional[tuple[ClipId, ...]] = None
        self._unreported: Counter = Counter()
        self._logged: dict[str, str] = {}  # bad video -> why, each logged once

    @property
    def position(self) -> Position:
        """The (epoch, chunk) of the next batch this stream yields."""
        return self._position

    def state_dict(self) -> dict[str, Any]:
        """This rank's place in the stream (JSON-able); ``load_state_dict`` takes every rank's."""
        epoch, chunk = self._position
        return {"epoch": epoch, "chunk": chunk, "batch": self._batches_done,
                "done": list(self._done) if self._done is not None else None,
                "share": [list(clip) for clip in self._share] if self._share is not None else None,
                "world_size": self.world_size, "batch_size": self.data.batch_size}

    def load_state_dict(self, states: Sequence[dict[str, Any]]) -> None:
        """Resumes where a checkpoint's ranks stood: ``states`` holds every rank's ``state_dict()`` (by rank).

        States of the older (epoch, chunk)-only form resume at the start of their chunk.
        """
        epoch, chunk = int(states[0]["epoch"]), int(states[0]["chunk"])
        if epoch < 0 or chunk < 0:
            raise ValueError(f"position: expected non-negative (epoch, chunk), got ({epoch}, {chunk})")
        self._batches_done, self._done, self._share = 0, None, None
        if chunk >= self.num_chunks:
            # The list shrank since the checkpoint: its epoch is over.
            logger.warning("position (%d, %d) is past the %d chunks of an epoch; starting epoch %d",
                           epoch, chunk, self.num_chunks, epoch + 1)
            self._position = (epoch + 1, 0)
            return
        self._position = (epoch, chunk)
        if all(not state.get("batch") and state.get("share") is None for state in states):
            return  # at the start of a chunk: the usual split of it
        if len(states) == self.world_size and all(
                (state.get("world_size"), state.get("batch_size")) == (self.world_size, self.data.batch_size)
                for state in states):
            mine = states[self.rank]
            self._batches_done = int(mine["batch"])
            self._done = tuple(mine["done"]) if mine.get("done") is not None else None
            self._share = _clip_ids(mine["share"]) if mine.get("share") is not None else None
            return
        shares = [_clip_ids(state["share"]) if state.get("share") is not None
                  else self._usual_clips(chunk, rank, len(states)) for rank, state in enumerate(states)]
        # Files the old split left over count as untrained unless an earlier restart already split the chunk.
        unassigned = [] if any(state.get("share") is not None for state in states) else sorted(
            set(self._chunk_clips(chunk)).difference(*shares))
        split = resplit_chunk(states, shares, unassigned, self.world_size, self.data.batch_size)
        self._share = tuple(split[self.rank])
        if self.rank == 0:
            logger.info("chunk (%d, %d) was interrupted on %d worker(s); its %d untrained clips are split over %d: "
                        "%d each", epoch, chunk, len(states), len(split[0]) * self.world_size, self.world_size,
                        len(split[0]))

    def _next(self, position: Position) -> Position:
        epoch, chunk = position
        return (epoch, chunk + 1) if chunk + 1 < self.num_chunks else (epoch + 1, 0)

    def _chunk_clips(self, chunk: int) -> list[ClipId]:
        slots = range(chunk * self.data.chunk_size, (chunk + 1) * self.data.chunk_size)
        return [(slot, k) for slot in slots for k in range(self.data.clips_per_video)]

    def _usual_slots(self, chunk: int, rank: int, world_size: int) -> list[int]:
        slots = range(chunk * self.data.chunk_size, (chunk + 1) * self.data.chunk_size)
        return list(slots)[rank::world_size][:self.data.chunk_size // world_size]

    def _usual_clips(self, chunk: int, rank: int, world_size: int) -> list[ClipId]:
        return [(slot, k) for slot in self._usual_slots(chunk, rank, world_size)
                for k in range(self.data.clips_per_video)]

    def share(self, epoch: int, chunk: int, order: Optional[np.ndarray] = None) -> list[tuple[int, VideoRef]]:
        """(slot, video) pairs this rank decodes in a chunk; slots index the epoch's (wrapped) order."""
        if order is None:
            order = epoch_order(self.refs, self.data.weights, self.seed, epoch)
        return [(slot, self.refs[order[slot % len(order)]])
                for slot in self._usual_slots(chunk, self.rank, self.world_size)]

    def _plan(self, chunk: int) -> _ChunkPlan:
        """How this rank yields ``chunk``: as restored by ``load_state_dict`` for the chunk it resumes in."""
        if chunk != self._position[1] or (self._share is None and not self._batches_done):
            return _ChunkPlan(None, 0, self.batches_per_chunk)
        wanted = self.batches_per_chunk if self._share is None else len(self._share) // self.data.batch_size
        return _ChunkPlan(self._share, self._batches_done, wanted)

    def _rows(self, epoch: int, chunk: int, order: np.ndarray, plan: _ChunkPlan) -> list[dict[str, Any]]:
        if plan.share is None:
            return [_row(ref, chunk, slot) for slot, ref in self.share(epoch, chunk, order)]
        slots = sorted({slot for slot, _ in plan.share})
        return [_row(self.refs[order[slot % len(order)]], chunk, slot) for slot in slots]

    def __iter__(self) -> Iterator[ClipBatch]:
        while True:
            epoch, first_chunk = self._position
            order = epoch_order(self.refs, self.data.weights, self.seed, epoch)
            plans = {chunk: self._plan(chunk) for chunk in range(first_chunk, self.num_chunks)}
            rows = [row for chunk, plan in plans.items() for row in self._rows(epoch, chunk, order, plan)]
            if not rows:  # a resumed chunk with nothing left for any rank, the last of its epoch
                self._position, self._batches_done, self._share = self._next((epoch, first_chunk)), 0, None
                continue
            job = DecodeJob.from_config(self.data, self.seed, epoch, self.filesystem)
            items = self._items(decode_dataset(rows, job, self.data, self.label_selector))
            for chunk, chunk_items in itertools.groupby(items, key=lambda pair: pair[0]):
                yield from self._chunk_batches(epoch, chunk, (item for _, item in chunk_items), order, job,
                                               plans[chunk])

    def _items(self, ds: "ray.data.Dataset") -> Iterable[tuple[int, _Item]]:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(batch["slot"])):
                yield int(batch["chunk"][i]), _Item(batch["clip"][i], str(batch["skip_reason"][i]),
                                                    str(batch["skip_detail"][i]), str(batch["uri"][i]),
                                                    (int(batch["slot"][i]), int(batch["clip_index"][i])))

    def _chunk_batches(self, epoch: int, chunk: int, items: Iterable[_Item], order: np.ndarray,
                       job: DecodeJob, plan: _ChunkPlan) -> Iterator[ClipBatch]:
        """The chunk's ``plan.wanted`` batches from its decoded items, less the ``plan.start`` already yielded
        before a restart (made again, so that the rest are the same, and dropped)."""
        size = self.data.batch_size
        share = set(plan.share) if plan.share is not None else None
        clips: list[_Item] = []
        emitted = 0
        for item in items:
            if share is not None and not item.reason and item.clip_id not in share:
                continue  # another rank's clip of a video split between ranks
            if not self._accept(item):
                continue
            clips.append(item)
            if emitted < plan.wanted and len(clips) >= (emitted + 1) * size:
                batch = self._batch(clips[emitted * size:(emitted + 1) * size], epoch, chunk, emitted, plan)
                if emitted >= plan.start:
                    yield batch
                emitted += 1
        if emitted < plan.wanted and not clips:
            clips = self._fallback_clips(epoch, chunk, order, job)
        # Bad videos left this rank short: repeat the chunk's clips so every rank yields `wanted` batches.
        while emitted < plan.wanted:
            picks = [(emitted * size + i) % len(clips) for i in range(size)]
            batch = self._batch([clips[p] for p in picks], epoch, chunk, emitted, plan, last=clips[-1])
            if emitted >= plan.start:
                yield batch
            emitted += 1

    def _accept(self, item: _Item) -> bool:
        if not item.reason:
            return True
        self._unreported[item.reason] += 1
        if item.uri not in self._logged:
            self._logged[item.uri] = item.reason
            logger.warning("skipping video %s (%s): %s", item.uri, item.reason, item.detail)
        return False

    def _batch(self, items: list[_Item], epoch: int, chunk: int, index: int, plan: _ChunkPlan,
               last: Optional[_Item] = None) -> ClipBatch:
        """Batch ``index`` of a chunk; the stream's state moves past it. ``last``: the last clip of the chunk
        yielded so far when that is not the batch's last (a refill repeats earlier clips)."""
        if index + 1 < plan.wanted:
            self._position, self._batches_done, self._share = (epoch, chunk), index + 1, plan.share
            self._done = (last or items[-1]).clip_id
        else:
            self._position, self._batches_done, self._done, self._share = self._next((epoch, chunk)), 0, None, None
        # Skips counted before a batch travel with it (and are dropped with a batch skipped on resuming).
        skipped, self._unreported = self._unreported, Counter()
        clips = stack_by_length([item.clip for item in items])
        if not isinstance(clips, torch.Tensor):  # grouped by length: the videos follow the clips
            items = sorted(items, key=lambda item: len(item.clip))
        return ClipBatch(clips, tuple(item.uri for item in items), (epoch, chunk), skipped)

    def _fallback_clips(self, epoch: int, chunk: int, order: np.ndarray, job: DecodeJob) -> list[_Item]:
        """Every file of this rank's share was bad: decode other videos (in epoch order, then the rest of
        the list, in growing groups) until one gives clips; raise when none of the list does."""
        start = (chunk + 1) * self.data.chunk_size
        rotated = np.roll(order, -(start % len(order))).tolist()
        candidates = list(dict.fromkeys(rotated + list(range(len(self.refs)))))
        first_slot = self.num_chunks * self.data.chunk_size  # beyond every real slot: distinct seeds
        tried, group = 0, max(1, self.files_per_rank)
        while tried < len(candidates):
            picked = candidates[tried:tried + group]
            rows = [_row(self.refs[i], chunk, first_slot + tried + k) for k, i in enumerate(picked)]
            clips = [item for _, item in self._items(decode_dataset(rows, job, self.data, self.label_selector))
                     if self._accept(item)]
            tried += len(picked)
            if clips:
                logger.warning("rank %d: no video of chunk (%d, %d) decoded; used %d clips from %d other videos",
                               self.rank, epoch, chunk, len(clips), tried)
                return clips
            group *= 2
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(Counter(self._logged.values()).items()))
        raise NoUsableVideosError(
            "data.paths", f"none of the {len(self.refs)} videos could be decoded ({reasons}); to see why: "
            f"python -m vjepa_ray.data check {shlex.join(self.data.paths)}")
