"""The elastic batch rule: the global batch stays fixed whatever the number of workers.

Ray Train restarts an elastic run (``ray.num_workers: [min, max]``) with a different world size after a
failure or when nodes come back. DeepSpeed asserts ``train_batch_size == micro_batch x accumulation x
world_size``, and the recipe's schedules assume one global batch, so on every start the per-worker micro
batch and the gradient accumulation are recomputed from the world size.
"""

from __future__ import annotations

from dataclasses import dataclass

from vjepa_ray.config import Config, ConfigError


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's clips are split over workers and accumulation steps."""

    world_size: int
    micro_batch: int
    grad_accum: int
    global_batch: int

    def describe(self) -> str:
        return (f"global batch {self.global_batch} = micro-batch {self.micro_batch} x {self.world_size} "
                f"worker(s) x {self.grad_accum} accumulation step(s)")


def worker_range(cfg: Config) -> tuple[int, int]:
    """(min, max) workers; equal for a fixed-size run."""
    workers = cfg.ray.num_workers
    if isinstance(workers, (list, tuple)):
        return int(workers[0]), int(workers[1])
    return int(workers), int(workers)


def global_batch_size(cfg: Config) -> int:
    """``optimization.global_batch_size``, or ``data.batch_size`` times the most workers the run may have."""
    return cfg.optimization.global_batch_size or cfg.data.batch_size * worker_range(cfg)[1]


def plan_batch(global_batch: int, max_micro_batch: int, world_size: int) -> BatchPlan:
    """The fewest accumulation steps whose micro batch fits ``max_micro_batch`` (= ``data.batch_size``).

    Each worker's share ``global_batch / world_size`` must be whole, and it is split into equal micro
    batches: accumulation is the smallest divisor of the share that brings the micro batch under the limit.
    """
    if world_size < 1 or max_micro_batch < 1:
        raise ValueError(f"need world_size >= 1 and max_micro_batch >= 1, got {world_size}, {max_micro_batch}")
    if global_batch % world_size:
        raise ConfigError("optimization.global_batch_size",
                          f"global batch {global_batch} does not split evenly over {world_size} workers; "
                          "choose a multiple of every world size the run may have")
    share = global_batch // world_size
    accum = -(-share // max_micro_batch)
    while share % accum:
        accum += 1
    return BatchPlan(world_size=world_size, micro_batch=share // accum, grad_accum=accum,
                     global_batch=global_batch)


def check_elastic_batch(cfg: Config) -> None:
    """Fails at start (not mid-run) when some allowed world size cannot hold the global batch."""
    low, high = worker_range(cfg)
    for world_size in range(low, high + 1):
        plan_batch(global_batch_size(cfg), cfg.data.batch_size, world_size)
