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
- ``stream.position`` / ``state_dict()`` is the (epoch, chunk) to resume from: a checkpoint stores it
  and a restart replays at most the chunk that was in progress.

Bad videos become skip rows (a placeholder clip and the reason) so that their counts reach the trainer
with the next batch (`ClipBatch.skipped`); each bad path is logged once per stream. When no video of
the list decodes at all, the stream raises `NoUsableVideosError` instead of retrying forever.
"""

from __future__ import annotations

import itertools
import logging
import math
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
from vjepa_ray.video.transforms import random_resized_crop_clip
from vjepa_ray.worker_env import MALLOC_ENV

logger = logging.getLogger(__name__)

Position = tuple[int, int]
# Videos per decode task: Ray Data's per-task cost (tens of ms of CPU: scheduling, block building,
# stats) is then spread over several decodes of 100+ ms each.
FILES_PER_TASK = 4


class NoUsableVideosError(RuntimeError):
    """Every video the stream could try failed to decode."""


@dataclass(frozen=True)
class ClipBatch:
    """``clips``: uint8 [B, T, H, W, 3]; ``videos``: the video each clip comes from; ``position``: the
    (epoch, chunk) they come from; ``skipped``: bad videos (by reason) counted since the previous batch
    of this stream."""

    clips: torch.Tensor
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

    @classmethod
    def from_config(cls, data: DataConfig, seed: int, epoch: int,
                    filesystem: Optional[pafs.FileSystem] = None) -> "DecodeJob":
        return cls(ClipSpec.from_config(data), data.crop_size, tuple(data.random_resize_scale),
                   tuple(data.random_resize_aspect_ratio), data.horizontal_flip, seed, epoch, filesystem)

    def rng(self, chunk: int, slot: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, chunk, slot])


def _row(ref: VideoRef, chunk: int, slot: int) -> dict[str, Any]:
    return {"uri": ref.uri, "member": ref.member, "offset": ref.offset, "size": ref.size,
            "chunk": chunk, "slot": slot}


def decode_video(ref: VideoRef, job: DecodeJob, rng: np.random.Generator) -> list[np.ndarray]:
    """A decode task's work for one video: read, decode ``clips_per_video`` clips, crop and flip each.
    Returns uint8 [T, crop, crop, 3] clips; raises VideoSkip for a bad video."""
    with open_source(ref, job.filesystem) as source:
        decoded = decode_clips(source, job.spec, rng)
    return [random_resized_crop_clip(clip, job.crop_size, job.scale, job.ratio, job.flip, rng)
            for clip in decoded.clips]


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
            ref = VideoRef(uri, member=str(batch["member"][i]), offset=int(batch["offset"][i]),
                           size=int(batch["size"][i]))
            out = decode_video(ref, job, job.rng(chunk, slot))
            outcome = [(clip, "", "") for clip in out]
        except VideoSkip as skip:
            placeholder = np.zeros((job.spec.frames_per_clip, job.crop_size, job.crop_size, 3), np.uint8)
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
    return {"clip": np.stack(clips), "chunk": np.asarray(chunks, np.int64), "slot": np.asarray(slots, np.int64),
            "clip_index": np.asarray(clip_index, np.int64), "skip_reason": np.asarray(reasons, dtype=object),
            "skip_detail": np.asarray(details, dtype=object), "uri": np.asarray(uris, dtype=object),
            "decode_node": np.asarray([node] * len(clips), dtype=object)}


def _drop_skip_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    keep = batch["skip_reason"] == ""
    return {k: v[keep] for k, v in batch.items() if k not in ("skip_reason", "skip_detail")}


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


def build_clip_dataset(data: DataConfig, seed: int, epoch: int = 0, *, refs: Optional[Sequence[VideoRef]] = None,
                       filesystem: Optional[pafs.FileSystem] = None,
                       label_selector: Optional[dict[str, str]] = None) -> "ray.data.Dataset":
    """One epoch of decoded clips (bad videos dropped) as a Dataset, for ``TorchTrainer(datasets=...)``.

    Columns ``clip`` (uint8 [T, crop, crop, 3]), ``chunk``, ``slot``, ``clip_index``, ``uri``,
    ``decode_node``. Ray Data (through 2.60) cannot resume such a dataset mid-epoch and does not balance skipped
    videos across workers; `ClipStream` does both.
    """
    refs = list(refs) if refs is not None else list_videos(data.paths, data.weights, filesystem)
    order = epoch_order(refs, data.weights, seed, epoch)
    rows = [_row(refs[i], slot // data.chunk_size, slot) for slot, i in enumerate(order)]
    job = DecodeJob.from_config(data, seed, epoch, filesystem)
    return decode_dataset(rows, job, data, label_selector).map_batches(_drop_skip_rows, batch_format="numpy")


@dataclass
class _Item:
    clip: np.ndarray
    reason: str
    detail: str
    uri: str


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
        # Where to start: the beginning, until ``load_state_dict`` restores a checkpoint's position.
        self._position: Position = (0, 0)
        self._unreported: Counter = Counter()
        self._logged: set[str] = set()

    @property
    def position(self) -> Position:
        """The (epoch, chunk) a restart resumes from: the chunk of the next batch this stream yields."""
        return self._position

    def state_dict(self) -> dict[str, int]:
        epoch, chunk = self._position
        return {"epoch": epoch, "chunk": chunk}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, chunk = int(state["epoch"]), int(state["chunk"])
        if epoch < 0 or chunk < 0:
            raise ValueError(f"position: expected non-negative (epoch, chunk), got ({epoch}, {chunk})")
        if chunk >= self.num_chunks:
            # The list shrank since the checkpoint: its epoch is over.
            logger.warning("position (%d, %d) is past the %d chunks of an epoch; starting epoch %d",
                           epoch, chunk, self.num_chunks, epoch + 1)
            epoch, chunk = epoch + 1, 0
        self._position = (epoch, chunk)

    def _next(self, position: Position) -> Position:
        epoch, chunk = position
        return (epoch, chunk + 1) if chunk + 1 < self.num_chunks else (epoch + 1, 0)

    def share(self, epoch: int, chunk: int, order: Optional[np.ndarray] = None) -> list[tuple[int, VideoRef]]:
        """(slot, video) pairs this rank decodes in a chunk; slots index the epoch's (wrapped) order."""
        if order is None:
            order = epoch_order(self.refs, self.data.weights, self.seed, epoch)
        slots = range(chunk * self.data.chunk_size, (chunk + 1) * self.data.chunk_size)
        mine = list(slots)[self.rank::self.world_size][:self.files_per_rank]
        return [(slot, self.refs[order[slot % len(order)]]) for slot in mine]

    def __iter__(self) -> Iterator[ClipBatch]:
        while True:
            epoch, first_chunk = self._position
            order = epoch_order(self.refs, self.data.weights, self.seed, epoch)
            rows = [_row(ref, chunk, slot) for chunk in range(first_chunk, self.num_chunks)
                    for slot, ref in self.share(epoch, chunk, order)]
            job = DecodeJob.from_config(self.data, self.seed, epoch, self.filesystem)
            items = self._items(decode_dataset(rows, job, self.data, self.label_selector))
            for chunk, chunk_items in itertools.groupby(items, key=lambda pair: pair[0]):
                yield from self._chunk_batches(epoch, chunk, (item for _, item in chunk_items), order, job)

    def _items(self, ds: "ray.data.Dataset") -> Iterable[tuple[int, _Item]]:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(batch["slot"])):
                yield int(batch["chunk"][i]), _Item(batch["clip"][i], str(batch["skip_reason"][i]),
                                                    str(batch["skip_detail"][i]), str(batch["uri"][i]))

    def _chunk_batches(self, epoch: int, chunk: int, items: Iterable[_Item], order: np.ndarray,
                       job: DecodeJob) -> Iterator[ClipBatch]:
        size, wanted = self.data.batch_size, self.batches_per_chunk
        clips: list[_Item] = []
        emitted = 0
        for item in items:
            if not self._accept(item):
                continue
            clips.append(item)
            if emitted < wanted and len(clips) >= (emitted + 1) * size:
                yield self._batch(clips[emitted * size:(emitted + 1) * size], epoch, chunk, emitted)
                emitted += 1
        if emitted < wanted and not clips:
            clips = self._fallback_clips(epoch, chunk, order, job)
        # Bad videos left this rank short: repeat the chunk's clips so every rank yields `wanted` batches.
        while emitted < wanted:
            picks = [(emitted * size + i) % len(clips) for i in range(size)]
            yield self._batch([clips[p] for p in picks], epoch, chunk, emitted)
            emitted += 1

    def _accept(self, item: _Item) -> bool:
        if not item.reason:
            return True
        self._unreported[item.reason] += 1
        if item.uri not in self._logged:
            self._logged.add(item.uri)
            logger.warning("skipping video %s (%s): %s", item.uri, item.reason, item.detail)
        return False

    def _batch(self, items: list[_Item], epoch: int, chunk: int, index: int) -> ClipBatch:
        # The position a checkpoint taken after this batch should resume from.
        self._position = (epoch, chunk) if index + 1 < self.batches_per_chunk else self._next((epoch, chunk))
        skipped, self._unreported = self._unreported, Counter()
        clips = torch.from_numpy(np.stack([item.clip for item in items]))
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
        raise NoUsableVideosError(
            f"none of the {len(self.refs)} videos in data.paths could be decoded "
            f"({dict(self._unreported)} so far, e.g. {sorted(self._logged)[:3]}); "
            f"`python -m vjepa_ray.data check PATH` tells why")
