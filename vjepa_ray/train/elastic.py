"""The elastic batch rule: the global batch stays fixed whatever the number of workers.

Ray Train restarts an elastic run (``ray.num_workers: [min, max]``) with a different world size after a
failure or when nodes come back, and the recipe's schedules assume one global batch. On every start the
global batch ``G`` is split over the ``W`` workers as evenly as it goes (shares differ by at most one clip,
so any world size from 1 to ``G`` works), and each share into the same number ``A`` of micro batches of at
most ``data.batch_size`` clips (DeepSpeed's collectives need the same number of micro steps on every rank).

Uneven micro batches would weigh their clips unevenly in DeepSpeed's gradient (a mean over ranks and
micro steps), so each micro batch's mean loss is scaled by ``W * A * size / G`` (``BatchPlan.loss_weight``):
the gradient is then exactly the mean over all ``G`` clips, and the weight is 1 when the split is even.
"""

from __future__ import annotations

from dataclasses import dataclass

from vjepa_ray.config import Config, ConfigError


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


def plan_batch(global_batch: int, max_micro_batch: int, world_size: int) -> BatchPlan:
    """The fewest accumulation steps whose micro batches fit ``max_micro_batch`` (= ``data.batch_size``)."""
    if world_size < 1 or max_micro_batch < 1:
        raise ValueError(f"need world_size >= 1 and max_micro_batch >= 1, got {world_size}, {max_micro_batch}")
    if global_batch < world_size:
        raise ConfigError("optimization.global_batch_size",
                          f"global batch {global_batch} gives {world_size} workers less than one clip each")
    largest_share = -(-global_batch // world_size)
    accum = -(-largest_share // max_micro_batch)
    if global_batch // world_size < accum:
        raise ConfigError("data.batch_size", f"{max_micro_batch} clips per micro batch would leave some of "
                          f"{world_size} workers an empty micro batch of a global batch of {global_batch}")
    return BatchPlan(world_size=world_size, micro_batch=-(-largest_share // accum), grad_accum=accum,
                     global_batch=global_batch)


def check_elastic_batch(cfg: Config) -> None:
    """Fails at start (not mid-run) when some allowed world size cannot hold the global batch."""
    low, high = cfg.ray.worker_range()
    for world_size in range(low, high + 1):
        plan_batch(global_batch_size(cfg), cfg.data.batch_size, world_size)
