"""Training on Ray Train + DeepSpeed: step rate against the same step in one process, ZeRO-3 bytes per rank.

- ``ray_steps_per_s``: optimizer steps per second of ``python -m vjepa_ray.pretrain`` at the given config
  (default: the local demo's, 2 CPU workers, ZeRO-2, fp32), measured from its reports after the first
  interval; clips come from the in-memory synthetic stream so that video decoding stays out of it.
- ``local_steps_per_s``: the same step (same code, DeepSpeed engine, EMA, masks) in this process with no Ray
  and a world of one, on one worker's share of the machine: one worker's micro batch and
  ``ray.cpus_per_worker`` threads. Perfect scaling would give the Ray run this rate, so
  ``ray_overhead = 1 - ray_steps_per_s / local_steps_per_s`` is what Ray, the collectives, reporting and
  checkpointing cost. The shared machines this runs on drift by 10-20% in speed over minutes, so the
  baseline is timed right before and right after the Ray run and their mean is the one compared.
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
import tempfile
import time
from typing import Any

import torch

from vjepa_ray.config import Config, builtin_config_path, load_config

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config (default: the built-in local demo)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of the Ray run")
    parser.add_argument("--interval", type=int, default=None,
                        help="steps per report, the rate's resolution (default: the config's logging.every_steps)")
    parser.add_argument("--local-steps", type=int, default=30,
                        help="timed steps of each one-process run (one before the Ray run, one after)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")


def _config(args: argparse.Namespace, storage: str, name: str, *extra: str) -> Config:
    path = args.config or builtin_config_path("local_demo")
    return load_config(path, [*args.overrides, f"ray.storage_path={storage}", f"meta.name={name}",
                              "data.synthetic_videos=0", *extra])


def _time_local_steps(cfg: Config, steps: int, warmup: int = 3) -> float:
    """Steps/s of one worker's share of the step in this process (world of one, no Ray)."""
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
    torch.set_num_threads(cfg.ray.cpus_per_worker)
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
    from vjepa_ray import pretrain
    from vjepa_ray.train.synthetic_stream import SyntheticClipStream

    summary = pretrain.run(cfg, stream_factory=SyntheticClipStream)
    if summary["status"] != "finished":
        raise RuntimeError(f"benchmark run {cfg.meta.name} failed: {summary['error']}")
    return summary


def ray_steps_per_s(cfg: Config) -> float:
    """Mean steps/s over the reports of a Ray run, the first interval (start-up) left out."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vjepa_ray.train.elastic import global_batch_size

    summary = _ray_run(cfg)
    events = EventAccumulator(summary["tensorboard"])
    events.Reload()
    rates = [e.value for e in events.Scalars("train/clips_per_s")][1:]
    return sum(rates) / len(rates) / global_batch_size(cfg)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from vjepa_ray.train.elastic import global_batch_size

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    storage = tempfile.mkdtemp(prefix="vjepa_bench_train_")
    try:
        # The schedules' values do not change the step's cost; warmup only has to fit the short run.
        interval = [f"logging.every_steps={args.interval}"] if args.interval else []
        cfg = _config(args, storage, "throughput", f"optimization.total_steps={args.steps}",
                      f"optimization.warmup_steps={args.steps // 4}", f"checkpoint.every_steps={args.steps}",
                      *interval)
        local_runs = [local_steps_per_s(cfg, args.local_steps)]
        ray_rate = ray_steps_per_s(cfg)
        # A local cluster goes down here, so the second baseline runs beside no Ray processes, as the first did.
        ray.shutdown()
        local_runs.append(local_steps_per_s(cfg, args.local_steps))
        local = sum(local_runs) / len(local_runs)
        zero_bytes = {}
        for stage in (0, 3):
            summary = _ray_run(_config(args, storage, f"zero{stage}_bytes", f"deepspeed.zero_stage={stage}",
                                       "optimization.total_steps=1", "optimization.warmup_steps=0",
                                       "checkpoint.every_steps=1"))
            zero_bytes[stage] = summary["metrics"]["state_bytes_per_rank"]
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    return {
        "ray_steps_per_s": round(ray_rate, 4),
        "local_steps_per_s": round(local, 4),
        "local_steps_per_s_before_after": [round(rate, 4) for rate in local_runs],
        "ray_overhead": round(1 - ray_rate / local, 4),
        "workers": cfg.ray.num_workers,
        "threads_per_worker": cfg.ray.cpus_per_worker,
        "global_batch": global_batch_size(cfg),
        "zero0_bytes_per_rank": zero_bytes[0],
        "zero3_bytes_per_rank": zero_bytes[3],
        "zero3_vs_zero0_bytes_per_rank": round(zero_bytes[3] / zero_bytes[0], 4),
        "precision": cfg.deepspeed.precision,
        "model": cfg.model.name,
    }
