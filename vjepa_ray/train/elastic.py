"""The elastic batch rule: the global batch stays fixed whatever the number of workers.

Ray Train restarts an elastic run (``ray.num_workers: [min, max]``) with a different world size after a
failure or when nodes come back, and the recipe's schedules assume one global batch. On every start the
global batch ``G`` is split over the ``W`` workers as evenly as it goes (shares differ by at most one clip,
so any world size from 1 to ``G`` works), and each share into the same number ``A`` of micro batches of at
most ``data.batch_size`` clips (DeepSpeed's collectives need the same number of micro steps on every rank).

Uneven micro batches would weigh their clips unevenly in DeepSpeed's gradient (a mean over ranks and
micro steps), so each micro batch's mean loss is scaled by ``W * A * size / G`` (``BatchPlan.loss_weight``):
the gradient is then exactly the mean over all ``G`` clips, and the weight is 1 when the split is even.

V-JEPA 2.1's image workers (``images.paths``): ``split_ranks`` makes the lowest ranks image ranks, and
``plan_mixed_batch`` plans each modality's own global batch over its own ranks, both held across resizes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from vjepa_ray.config import Config, ConfigError, DataConfig


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's clips are split over workers and accumulation steps."""

    world_size: int
    # The largest micro batch of any rank (what the data stream yields; DeepSpeed's micro batch).
    micro_batch: int
    grad_accum: int
    global_batch: int

    def share(self, rank: int) -> int:
        """Clips rank ``rank`` contributes to one optimizer step."""
        base, extra = divmod(self.global_batch, self.world_size)
        return base + (rank < extra)

    def micro_batches(self, rank: int) -> list[int]:
        """The sizes of rank ``rank``'s ``grad_accum`` micro batches (they sum to its share)."""
        size, extra = divmod(self.share(rank), self.grad_accum)
        return [size + (k < extra) for k in range(self.grad_accum)]

    def loss_weight(self, size: int) -> float:
        """The factor on a micro batch's mean loss that makes the step's gradient the mean over all clips."""
        return self.world_size * self.grad_accum * size / self.global_batch

    def weighted_micro_batches(self, rank: int) -> list[tuple[int, float]]:
        """Rank ``rank``'s micro batches: (size, loss weight) of each."""
        return [(size, self.loss_weight(size)) for size in self.micro_batches(rank)]

    @property
    def even(self) -> bool:
        return self.global_batch == self.micro_batch * self.grad_accum * self.world_size

    def describe(self) -> str:
        if self.even:
            return (f"global batch {self.global_batch} = micro-batch {self.micro_batch} x {self.world_size} "
                    f"worker(s) x {self.grad_accum} accumulation step(s)")
        return (f"global batch {self.global_batch} over {self.world_size} worker(s) x {self.grad_accum} "
                f"accumulation step(s): {self.share(self.world_size - 1)}-{self.share(0)} clips per worker, "
                f"micro batches of at most {self.micro_batch} (losses weighted by micro-batch size)")


def global_batch_size(cfg: Config) -> int:
    """``optimization.global_batch_size``, or ``data.batch_size`` times the most workers the run may have."""
    return cfg.optimization.global_batch_size or cfg.data.batch_size * cfg.ray.worker_range()[1]


def plan_batch(global_batch: int, max_micro_batch: int, world_size: int, min_grad_accum: int = 1, *,
               key: str = "data.batch_size") -> BatchPlan:
    """The fewest accumulation steps (at least ``min_grad_accum``) whose micro batches fit ``max_micro_batch``
    (= ``data.batch_size``, named by ``key`` in errors)."""
    if world_size < 1 or max_micro_batch < 1:
        raise ValueError(f"need world_size >= 1 and max_micro_batch >= 1, got {world_size}, {max_micro_batch}")
    if global_batch < world_size:
        raise ConfigError("optimization.global_batch_size",
                          f"global batch {global_batch} gives {world_size} workers less than one clip each")
    largest_share = -(-global_batch // world_size)
    accum = max(-(-largest_share // max_micro_batch), min_grad_accum)
    if global_batch // world_size < accum:
        raise ConfigError(key, f"{max_micro_batch} clips per micro batch would leave some of "
                          f"{world_size} workers an empty micro batch of a global batch of {global_batch}")
    return BatchPlan(world_size=world_size, micro_batch=-(-largest_share // accum), grad_accum=accum,
                     global_batch=global_batch)


@dataclass(frozen=True)
class RankSplit:
    """Which ranks of a world read images (V-JEPA 2.1's image ranks): the ranks below ``image_ranks``."""

    world_size: int
    image_ranks: int

    @property
    def video_ranks(self) -> int:
        return self.world_size - self.image_ranks

    def is_image(self, rank: int) -> bool:
        return rank < self.image_ranks

    def modality_rank(self, rank: int) -> int:
        """``rank``'s place among the ranks of its modality: which share of that modality's data it reads."""
        return rank if self.is_image(rank) else rank - self.image_ranks


def split_ranks(world_size: int, rank_ratio: float) -> RankSplit:
    """The release's split, ``int(world_size * rank_ratio)`` image ranks, moved into [1, world_size - 1].

    The release's rule alone leaves no image rank when ``world_size * rank_ratio < 1`` (or no video rank
    near a ratio of 1), which an elastic run that shrinks would hit; kept to at least one of each, every
    world size from 2 up has both modalities, and it equals the release's wherever that has both. A world of
    one worker cannot be both, and the config refuses such runs (``Config.validate``): ValueError here.
    """
    if world_size < 2 or not 0.0 < rank_ratio < 1.0:
        raise ValueError(f"need world_size >= 2 and 0 < rank_ratio < 1, got {world_size}, {rank_ratio}")
    return RankSplit(world_size, min(max(int(world_size * rank_ratio), 1), world_size - 1))


@dataclass(frozen=True)
class MixedBatchPlan:
    """One optimizer step of a run with image ranks: the split, and each modality's ``BatchPlan`` over its
    own ranks (``world_size`` = that modality's rank count), with equal ``grad_accum``: DeepSpeed's
    collectives need the same number of micro steps on every rank.

    The loss weights: DeepSpeed (as the release's DDP) averages the gradient over all W ranks and A micro
    steps. Each modality's ``BatchPlan.loss_weight`` makes the sum over its R ranks and A micro steps
    ``R * A`` times the gradient of the mean loss over its global batch, so the all-rank average is
    ``(I / W) * grad(mean image loss) + (V / W) * grad(mean video loss)`` for I image and V video ranks:
    what the release's DDP average of per-rank mean losses gives (its ranks of one modality hold equally
    many clips), ½ and ½ at its rank_ratio 0.5 on an even world. The weights follow the realised split,
    not ``rank_ratio``, as the release's do.
    """

    split: RankSplit
    image: BatchPlan
    video: BatchPlan

    def plan(self, rank: int) -> BatchPlan:
        """The plan of ``rank``'s modality."""
        return self.image if self.split.is_image(rank) else self.video

    def micro_batches(self, rank: int) -> list[int]:
        """The sizes of ``rank``'s micro batches of its modality."""
        return self.plan(rank).micro_batches(self.split.modality_rank(rank))

    def loss_weight(self, rank: int, size: int) -> float:
        """The factor on the mean loss of a micro batch of ``size`` clips of ``rank``."""
        return self.plan(rank).loss_weight(size)

    def weighted_micro_batches(self, rank: int) -> list[tuple[int, float]]:
        """Rank ``rank``'s micro batches: (size, loss weight) of each."""
        return [(size, self.loss_weight(rank, size)) for size in self.micro_batches(rank)]

    @property
    def grad_accum(self) -> int:
        return self.video.grad_accum

    @property
    def world_size(self) -> int:
        return self.split.world_size

    @property
    def micro_batch(self) -> int:
        """The larger modality's micro batch (DeepSpeed's ``train_micro_batch_size_per_gpu``, bookkeeping only)."""
        return max(self.image.micro_batch, self.video.micro_batch)

    @property
    def global_batch(self) -> int:
        """Images and clips of one optimizer step."""
        return self.image.global_batch + self.video.global_batch

    def describe(self) -> str:
        return (f"{self.split.image_ranks} image worker(s): {self.image.describe()}; "
                f"{self.split.video_ranks} video worker(s): {self.video.describe()}")


def plan_mixed_batch(cfg: Config, world_size: int) -> MixedBatchPlan:
    """Each modality's global batch over its ranks at ``world_size``, both held across elastic resizes.

    Video: ``global_batch_size(cfg)`` (``data.batch_size`` x the most workers: the release's
    ``batch_size * world_size``, all of it on video ranks), in micro batches of at most its share per video
    rank at the most workers (the release's ``batch_size * world_size / num_video_ranks``). Images:
    ``images.batch_size`` per image rank at the most workers, in micro batches of at most that. At the
    largest world size each rank takes its release batch in one micro step; a smaller one accumulates.
    """
    ratio, high = cfg.images.rank_ratio, cfg.ray.worker_range()[1]
    full, split = split_ranks(high, ratio), split_ranks(world_size, ratio)
    video_global = global_batch_size(cfg)
    video_micro = -(-video_global // full.video_ranks)
    image_global = cfg.images.batch_size * full.image_ranks
    video = plan_batch(video_global, video_micro, split.video_ranks)
    image = plan_batch(image_global, cfg.images.batch_size, split.image_ranks, video.grad_accum,
                       key="images.batch_size")
    if image.grad_accum > video.grad_accum:
        video = plan_batch(video_global, video_micro, split.video_ranks, image.grad_accum)
    return MixedBatchPlan(split, image, video)


@dataclass(frozen=True)
class RankData:
    """What one rank's clip stream reads (``data``, with the micro batch as its batch size) and the rank's
    place among the ranks that share that stream (``rank`` of ``world_size``): the arguments of a stream
    factory (``train.loop.StreamFactory``)."""

    data: DataConfig
    rank: int
    world_size: int


def rank_data(cfg: Config, plan: MixedBatchPlan, rank: int) -> RankData:
    """The stream of ``rank`` in a run with image ranks: video ranks share ``data``'s sources; image ranks
    share ``images.paths``, each image a clip of one frame at ``images.crop_size`` (so the encoder takes its
    image path), with ``data``'s augmentation. Each modality's ranks split that modality's stream among
    themselves as a run of that many workers would."""
    split = plan.split
    data = cfg.data
    if split.is_image(rank):
        data = dataclasses.replace(data, paths=list(cfg.images.paths), weights=[], frames_per_clip=1,
                                   frames_per_clip_per_source=[], crop_size=cfg.images.crop_size,
                                   clips_per_video=1)
    modality_ranks = split.image_ranks if split.is_image(rank) else split.video_ranks
    return RankData(dataclasses.replace(data, batch_size=plan.plan(rank).micro_batch), split.modality_rank(rank),
                    modality_ranks)


def modality_states(states: Sequence[dict[str, Any]], rank_ratio: float, image: bool) -> list[dict[str, Any]]:
    """The stream states of one modality's ranks among a checkpoint's (every rank's, by rank), for that
    modality's stream to resume from (``ClipStream.load_state_dict``), whatever the world size now.

    The checkpoint's split follows from its world size (``len(states)``) and ``rank_ratio``; each state
    records the size of the group of ranks that shared its stream, which must match (ValueError: the run's
    ``images.rank_ratio`` changed since the checkpoint, and the states cannot be told apart).
    """
    split = split_ranks(len(states), rank_ratio)
    chosen = list(states[:split.image_ranks] if image else states[split.image_ranks:])
    expected = len(chosen)
    if any(int(state["world_size"]) != expected for state in chosen):
        raise ValueError(f"states: the checkpoint's {len(states)} ranks did not split into {split.image_ranks} "
                         f"image and {split.video_ranks} video ranks at rank_ratio {rank_ratio}")
    return chosen


class ModalityStream:
    """A rank's stream in a run with image ranks (``rank_data``'s): it saves its own place, and resumes from
    the places of its modality's ranks among a checkpoint's (``modality_states``), so that each modality's
    stream goes on where that modality's ranks stood, whatever the world size then and now."""

    def __init__(self, stream, rank_ratio: float, image: bool):
        self.stream, self.rank_ratio, self.image = stream, rank_ratio, image

    def __iter__(self):
        return iter(self.stream)

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, states: Sequence[dict[str, Any]]) -> None:
        self.stream.load_state_dict(modality_states(states, self.rank_ratio, self.image))


def plan_step(cfg: Config, world_size: int) -> BatchPlan | MixedBatchPlan:
    """The batch plan of a run at ``world_size``: ``plan_mixed_batch`` with image ranks, else ``plan_batch``."""
    if cfg.images.enabled:
        return plan_mixed_batch(cfg, world_size)
    return plan_batch(global_batch_size(cfg), cfg.data.batch_size, world_size)


def check_elastic_batch(cfg: Config) -> None:
    """Fails at start (not mid-run) when some allowed world size cannot hold the global batch."""
    low, high = cfg.ray.worker_range()
    for world_size in range(low, high + 1):
        plan_step(cfg, world_size)
