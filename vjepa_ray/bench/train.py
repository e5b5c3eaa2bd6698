"""Training on Ray Train + DeepSpeed: step rate against the same step in one process, ZeRO-3 bytes per rank.

- ``ray_steps_per_s``: optimizer steps per second of ``python -m vjepa_ray.pretrain`` at the given config
  (default: the local demo's, 2 CPU workers, ZeRO-2, fp32), measured from its reports after the first
  interval; clips come from the in-memory synthetic stream so that video decoding stays out of it.
- ``local_steps_per_s``: the same step (same code, DeepSpeed engine, EMA, masks) in this process with no Ray
  and a world of one, on one worker's share of the machine: one worker's micro batch and
  ``ray.cpus_per_worker`` threads (at least one). Perfect scaling would give the Ray run this rate, so
  ``ray_overhead`` = 1 - (Ray rate / this rate) is what Ray, the collectives, reporting and checkpointing
  cost. A shared machine's speed drifts over minutes, so each of ``--repeats`` Ray runs is compared with the
  mean of the one-process runs timed right before and right after it; the figures reported are the medians
  over the repeats, and ``runs`` holds each one.
- ``ray_overhead_per_worker_share``: the same, with the baseline scaled to the cores a worker actually had.
  Over the reports the rate is taken from, a sampler in this process reads the CPU time of every process
  under it (``runs.cores_used_by_role``: the local cluster's GCS, raylet, dashboard and agents, the Train
  controller and other actors, this driver, and the training workers). Ray's own processes (all but the
  driver and the workers) take their cores from the machine the workers share, so each worker had
  ``runs.per_worker_share_cores`` = (machine cores - those) / workers, at most ``ray.cpus_per_worker``, and
  perfect scaling would give the baseline rate times that share over the baseline's threads. What remains
  is what Ray costs inside the workers and through the collectives (a rank that loses its core for a moment
  stalls its peers).
- ``zero3_vs_zero0_bytes_per_rank``: bytes rank 0 holds for weights + optimizer state (fp32 masters and Adam
  moments) + EMA target under ZeRO-3 over the same under ZeRO-0, both on the config's worker count.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import logging
import multiprocessing
import os
import shutil
import socket
import statistics
import tempfile
import time
from typing import Any

from vjepa_ray.bench._processes import CpuSampler
from vjepa_ray.config import Config, builtin_config_path, load_config

# Ray, torch and the training modules are imported by the functions that use them: ``bench train --help``
# reads the options without them.

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config (default: the built-in local demo)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of each Ray run")
    parser.add_argument("--interval", type=int, default=None,
                        help="steps per report, the rate's resolution (default: the config's logging.every_steps)")
    parser.add_argument("--local-steps", type=int, default=30,
                        help="timed steps of each one-process run (one before each Ray run, one after the last)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="Ray runs, each compared with the one-process runs on either side of it")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")


def _config(args: argparse.Namespace, storage: str, name: str, *extra: str) -> Config:
    path = args.config or builtin_config_path("local_demo")
    return load_config(path, [*args.overrides, f"ray.storage_path={storage}", f"meta.name={name}",
                              "data.synthetic_videos=0", *extra])


def _time_local_steps(cfg: Config, steps: int, warmup: int = 3) -> float:
    """Steps/s of one worker's share of the step in this process (world of one, no Ray)."""
    import torch
    import torch.distributed as dist

    from vjepa_ray.train.elastic import plan_batch
    from vjepa_ray.train.engine import TrainStep
    from vjepa_ray.train.synthetic_stream import SyntheticClipStream

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # What a launcher would set; DeepSpeed reads LOCAL_RANK.
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.set_num_threads(cfg.ray.worker_threads())
    try:
        plan = plan_batch(cfg.data.batch_size, cfg.data.batch_size, 1)
        step = TrainStep(cfg, plan, rank=0, device=torch.device("cpu"))
        data = dataclasses.replace(cfg.data, batch_size=plan.micro_batch)
        # Clips are made inside the step, as a Ray worker makes them (a few ms of a step's ~0.5 s here).
        batches = iter(SyntheticClipStream(data, cfg.meta.seed))
        for i in range(warmup):
            step(batches, i)
        start = time.perf_counter()
        for i in range(warmup, warmup + steps):
            step(batches, i)
        return steps / (time.perf_counter() - start)
    finally:
        dist.destroy_process_group()


def local_steps_per_s(cfg: Config, steps: int) -> float:
    """The one-process rate, timed in a new process: no Ray in it, and a fresh DeepSpeed (which keeps its
    process groups in module globals, so one process cannot build a second world after the first)."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(_time_local_steps, cfg, steps).result()


def _ray_run(cfg: Config) -> dict[str, Any]:
    from vjepa_ray.train import driver
    from vjepa_ray.train.synthetic_stream import SyntheticClipStream

    summary = driver.run(cfg, stream_factory=SyntheticClipStream)
    if summary["status"] != "finished":
        raise RuntimeError(f"benchmark run {cfg.meta.name} failed: {summary['error']}")
    return summary


@dataclasses.dataclass
class RayRate:
    steps_per_s: float  # mean over the reports, the first interval (start-up) left out
    span: tuple[float, float]  # unix times of the first and the last report: the intervals averaged
    workers: int


def ray_steps_per_s(cfg: Config) -> RayRate:
    """The step rate of a Ray run, from its TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vjepa_ray.train.elastic import global_batch_size

    summary = _ray_run(cfg)
    events = EventAccumulator(summary["tensorboard"])
    events.Reload()
    reports = events.Scalars("train/clips_per_s")
    rates = [e.value for e in reports[1:]]
    return RayRate(sum(rates) / len(rates) / global_batch_size(cfg), (reports[0].wall_time, reports[-1].wall_time),
                   summary["world_sizes"][-1])


def per_worker_share(cores: dict[str, float], workers: int, cpus_per_worker: float) -> float | None:
    """Cores each training worker had: the machine's, less what Ray's other processes used, split evenly
    (at most ``cpus_per_worker``). None when the cluster was not started by this process (its daemons
    are then not ours to count).

    The driver is not counted as Ray's: here its only work is the CPU sampler, which a real run does
    not have, so its cost stays charged to the Ray run.
    """
    if "raylet" not in cores:
        return None
    others = sum(used for role, used in cores.items() if role not in ("train_workers", "driver"))
    return min(cpus_per_worker, (len(os.sched_getaffinity(0)) - others) / workers)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from vjepa_ray.train.elastic import global_batch_size

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    storage = tempfile.mkdtemp(prefix="vjepa_bench_train_")
    try:
        # The schedules' values do not change the step's cost; warmup only has to fit the short run.
        interval = [f"logging.every_steps={args.interval}"] if args.interval else []
        runs = [_config(args, storage, f"throughput_{i}", f"optimization.total_steps={args.steps}",
                        f"optimization.warmup_steps={args.steps // 4}", f"checkpoint.every_steps={args.steps}",
                        *interval) for i in range(args.repeats)]
        local_runs = [local_steps_per_s(runs[0], args.local_steps)]
        measured, cores, shares, overheads, overheads_in_share = [], [], [], [], []
        for cfg in runs:
            with CpuSampler() as sampler:
                rate = ray_steps_per_s(cfg)
            measured.append(rate)
            cores.append(sampler.cores_between(*rate.span))
            # A local cluster goes down here, so the next baseline runs beside no Ray processes, as the first did.
            ray.shutdown()
            local_runs.append(local_steps_per_s(cfg, args.local_steps))
            local = (local_runs[-2] + local_runs[-1]) / 2
            shares.append(per_worker_share(cores[-1], rate.workers, cfg.ray.cpus_per_worker))
            overheads.append(1 - rate.steps_per_s / local)
            overheads_in_share.append(None if shares[-1] is None else
                                      1 - rate.steps_per_s / (local * shares[-1] / cfg.ray.worker_threads()))
        zero_bytes = {}
        for stage in (0, 3):
            summary = _ray_run(_config(args, storage, f"zero{stage}_bytes", f"deepspeed.zero_stage={stage}",
                                       "optimization.total_steps=1", "optimization.warmup_steps=0",
                                       "checkpoint.every_steps=1"))
            zero_bytes[stage] = summary["metrics"]["state_bytes_per_rank"]
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    return {
        "ray_steps_per_s": round(statistics.median(m.steps_per_s for m in measured), 4),
        "local_steps_per_s": round(statistics.median(local_runs), 4),
        "ray_overhead": round(statistics.median(overheads), 4),
        "ray_overhead_per_worker_share": (None if None in overheads_in_share else
                                          round(statistics.median(overheads_in_share), 4)),
        "runs": {"ray_steps_per_s": [round(m.steps_per_s, 4) for m in measured],
                 "local_steps_per_s": [round(rate, 4) for rate in local_runs],
                 "ray_overhead": [round(o, 4) for o in overheads],
                 "ray_overhead_per_worker_share": [None if o is None else round(o, 4) for o in overheads_in_share],
                 "per_worker_share_cores": [None if c is None else round(c, 3) for c in shares],
                 "cores_used_by_role": [{role: round(used, 3) for role, used in c.items()} for c in cores]},
        "workers": cfg.ray.num_workers,
        "threads_per_worker": cfg.ray.worker_threads(),
        "global_batch": global_batch_size(cfg),
        "zero0_bytes_per_rank": zero_bytes[0],
        "zero3_bytes_per_rank": zero_bytes[3],
        "zero3_vs_zero0_bytes_per_rank": round(zero_bytes[3] / zero_bytes[0], 4),
        "precision": cfg.deepspeed.precision,
        "model": cfg.model.name,
    }
