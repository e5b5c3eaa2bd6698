"""Scale: the tiny model pretrained by 2 to 32 Train workers on a simulated cluster, and what grows with them.

One ``ray.cluster_utils.Cluster`` on this machine (``bench._cluster``): a head with no CPUs (the drivers and
the Train controller), training nodes of ``--workers-per-node`` workers each that advertise them as simulated
GPUs (a custom resource ``sim_gpu``, asked for through ``ray.worker_resources``; CPUs per worker fractional,
``ray.cpus_per_worker``) and are picked by ``ray.worker_label_selector``, and CPU-only decode nodes that
``data.decode_label_selector`` picks. At each ``--workers`` count, ``python -m vjepa_ray.pretrain`` runs the
tiny model (fp32, ZeRO-2) on synthetic videos decoded by Ray Data, ``--clips-per-worker`` clips per worker and
step, and the bench reports:

- ``startup_s``: the driver process started -> the first step reported (Ray Train's worker group, DeepSpeed,
  the first decode); ``steps_per_s`` over the reports after the first, the last (its checkpoint) left out;
- ``cpu_share``: CPU seconds over the run's wall time of the driver process and of the Train controller actor
  (found by its process title), and ``cores_by_role``, the cores every process of the cluster used over the
  timed steps (``bench._processes``);
- ``worker_mb``: a Train worker's memory at its peak, resident (RSS) and its own (USS: RSS less the pages of
  libraries it shares with other workers), mean and max over workers, and
  ``memory_available_gb``: the machine's available memory at its lowest during the run;
- ``data_executions``: Ray Data executions the run started (as Ray Data's stats actor registered them) and
  ``per_epoch``: those over the epochs of the stream the run began (one per worker per epoch: each worker's
  ``ClipStream`` runs its own);
- ``decode_processes``: worker processes seen running a decode task (Ray titles them after it; sampled every
  second) and ``decode_off_decode_nodes``, those on a node other than a decode node;
  ``workers_off_train_nodes``: nodes other than training nodes that Train workers were seen on;
- ``clips_disjoint``: every rank's clips of every chunk of an epoch, as ``ClipStream.share`` assigns them at
  that world size, shared by no other rank.

A count whose run fails (workers killed by Ray's memory monitor, say) is reported with ``status`` "failed" and
its error. With ``--elastic`` (default) a last run, ``[W - workers per node, W]`` at the largest ``W``, loses a training
node and gets it back (``chaos.elastic_run``): its world sizes and global batch per start (``elastic``).

Memory bounds the largest count this machine holds: each worker is a process with torch and DeepSpeed
(~0.4-0.5 GB), each simulated node a raylet and an object store. ``free -g`` before running 16 or more.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import statistics
import tempfile
import threading
from pathlib import Path
from typing import Any

from vjepa_ray.bench._cluster import ROLE, SimulatedCluster, attempts, read_reports
from vjepa_ray.bench._processes import CpuSampler
from vjepa_ray.bench.chaos import Disturber, elastic_run
from vjepa_ray.config import Config, builtin_config_path, load_config

log = logging.getLogger(__name__)

SIM_GPU = "sim_gpu"  # the custom resource a training node advertises in place of GPUs
RUN_OVERRIDES = (
    "model.pred_depth=2", "deepspeed.precision=fp32", "deepspeed.zero_stage=2", "optimization.warmup_steps=2",
    "logging.every_steps=1", "ray.max_failures=3", "data.synthetic_videos=128", "data.chunk_size=64",
    f"ray.worker_label_selector={{{ROLE}: train}}", f"data.decode_label_selector={{{ROLE}: decode}}",
    f"ray.worker_resources={{{SIM_GPU}: 1}}",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 8, 16, 32], help="Train worker counts")
    parser.add_argument("--workers-per-node", type=int, default=8, help="simulated GPUs per training node")
    parser.add_argument("--cpus-per-worker", type=float, default=0.25, help="ray.cpus_per_worker")
    parser.add_argument("--decode-nodes", type=int, default=2, help="decode nodes of one CPU each")
    parser.add_argument("--clips-per-worker", type=int, default=2, help="clips per worker and step")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    parser.add_argument("--elastic-steps", type=int, default=24, help="optimizer steps of the elastic run")
    parser.add_argument("--no-elastic", dest="elastic", action="store_false", help="skip the elastic run")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")


class RunWatch:
    """Samples, every ``interval_s`` while a run goes on, from the process table: the CPU seconds of its driver
    process and of its Train controller actor, the memory of its Train workers, the nodes its decode task
    processes run on, and the machine's available memory."""

    def __init__(self, cluster: SimulatedCluster, driver_pid: int, interval_s: float = 1.0):
        self.cluster, self.interval_s = cluster, interval_s
        self.pids: dict[str, int | None] = {"driver": driver_pid, "controller": None}
        self.cpu_s = {"driver": 0.0, "controller": 0.0}
        self.worker_memory: dict[int, tuple[int, int]] = {}  # peak (RSS, USS) bytes per worker pid
        self.train_worker_nodes: set[str] = set()
        self.decode_nodes: dict[int, str] = {}  # decode task process -> its node
        self.lowest_available = math.inf
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="run-watch", daemon=True)

    def __enter__(self) -> "RunWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        import psutil

        while not self._stop.wait(self.interval_s):
            if self.pids["controller"] is None:
                self.pids["controller"] = next(iter(self.cluster.processes("ray::TrainController")), None)
            for role, pid in self.pids.items():
                try:  # the last reading before the process ends stands
                    times = psutil.Process(pid).cpu_times() if pid else None
                except psutil.Error:
                    continue
                if times is not None:
                    self.cpu_s[role] = times.user + times.system
            for pid, node in self.cluster.worker_pids().items():
                self.train_worker_nodes.add(node.node_id)
                try:  # USS: what the process alone holds (RSS also counts the libraries workers share)
                    memory = psutil.Process(pid).memory_full_info()
                except psutil.Error:
                    continue
                rss, uss = self.worker_memory.get(pid, (0, 0))
                self.worker_memory[pid] = (max(rss, memory.rss), max(uss, memory.uss))
            # Ray retitles a worker process after the task it runs: Ray Data names the decode op's tasks so.
            self.decode_nodes.update({pid: node.node_id for pid, node in self.cluster.processes("decode_rows").items()})
            self.lowest_available = min(self.lowest_available, psutil.virtual_memory().available)

    def placement(self) -> dict[str, int]:
        """Decode task processes seen, and those seen on a node other than a decode node; Train workers seen on
        a node other than a training node."""
        decode = {node.node_id for node in self.cluster.decode_nodes}
        train = {node.node_id for node in self.cluster.train_nodes}
        return {"decode_processes": len(self.decode_nodes),
                "decode_off_decode_nodes": sum(node not in decode for node in self.decode_nodes.values()),
                "workers_off_train_nodes": len(self.train_worker_nodes - train)}


def data_executions(since: float) -> int:
    """Ray Data executions registered since ``since`` (unix time) with Ray Data's stats actor (one per
    cluster)."""
    import ray
    from ray.data._internal.stats import STATS_ACTOR_NAME, STATS_ACTOR_NAMESPACE

    try:
        stats = ray.get_actor(STATS_ACTOR_NAME, namespace=STATS_ACTOR_NAMESPACE)
    except ValueError:  # no dataset ever ran
        return 0
    return sum(d["start_time"] >= since for d in ray.get(stats.get_datasets.remote()).values())


def epoch_shares(cfg: Config, world_size: int) -> tuple[int, bool, int]:
    """Steps per epoch of the stream at ``world_size``; whether every rank's clips of every chunk of an epoch
    are disjoint from every other rank's (as ``ClipStream.share`` assigns them); clips per rank per epoch."""
    from vjepa_ray.data.pipeline import ClipStream
    from vjepa_ray.data.sources import list_videos
    from vjepa_ray.train.elastic import global_batch_size, plan_batch

    plan = plan_batch(global_batch_size(cfg), cfg.data.batch_size, world_size)
    data = dataclasses.replace(cfg.data, batch_size=plan.micro_batch)
    refs = list_videos(data.paths, data.weights)
    streams = [ClipStream(data, cfg.meta.seed, rank, world_size, refs=refs) for rank in range(world_size)]
    disjoint = True
    for chunk in range(streams[0].num_chunks):
        slots = [slot for stream in streams for slot, _ in stream.share(0, chunk)]
        disjoint &= len(slots) == len(set(slots))
    per_rank = streams[0].num_chunks * streams[0].batches_per_chunk
    return per_rank // plan.grad_accum, disjoint, per_rank * plan.micro_batch


def measure(cluster: SimulatedCluster, storage: Path, overrides: list[str], workers: int) -> dict[str, Any]:
    """One run of ``workers`` Train workers: the figures of the module docstring."""
    run = Disturber(cluster, storage, f"scale_{workers}", [*overrides, f"ray.num_workers={workers}"], seed=0)
    with CpuSampler() as sampler:
        run.start()
        with RunWatch(cluster, run.driver.process.pid) as watch:
            summary = run.finish()
    wall = run.elapsed_s
    reports = attempts(read_reports(run.tensorboard))[-1]
    timed = reports[1:-1] if len(reports) > 2 else reports
    steps_per_s = (timed[-1].step - timed[0].step) / (timed[-1].wall - timed[0].wall) if len(timed) > 1 else None
    steps_per_epoch, disjoint, clips_per_rank = epoch_shares(run.cfg, workers)
    epochs = math.ceil(summary["steps"] / steps_per_epoch)
    executions = data_executions(run.started)
    rss, uss = ([m[i] / 2**20 for m in watch.worker_memory.values()] for i in (0, 1))
    return {
        "workers": workers,
        "status": summary["status"],
        "steps": summary["steps"],
        "startup_s": round(reports[0].wall - run.started, 1),
        "steps_per_s": round(steps_per_s, 3) if steps_per_s else None,
        "wall_s": round(wall, 1),
        "cpu_share": {role: round(seconds / wall, 3) for role, seconds in watch.cpu_s.items()},
        "cores_by_role": {role: round(cores, 2) for role, cores in
                          sampler.cores_between(timed[0].wall, timed[-1].wall).items()} if len(timed) > 1 else None,
        "worker_mb": {"rss_mean": round(statistics.mean(rss)), "rss_max": round(max(rss)),
                      "uss_mean": round(statistics.mean(uss)), "uss_max": round(max(uss))} if rss else None,
        "memory_available_gb": round(watch.lowest_available / 2**30, 1),
        "data_executions": {"started": executions, "epochs": epochs, "per_epoch": round(executions / epochs, 1)},
        **watch.placement(),
        "clips_disjoint": disjoint,
        "clips_per_worker_per_epoch": clips_per_rank,
        "global_batch": summary["global_batch"],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from vjepa_ray.data.demo import write_demo_videos

    storage = Path(tempfile.mkdtemp(prefix="vjepa_bench_scale_"))
    per_node = args.workers_per_node
    largest = max(args.workers)
    overrides = [*RUN_OVERRIDES, f"data.paths=[{storage / 'videos'}]", f"ray.cpus_per_worker={args.cpus_per_worker}",
                 f"data.batch_size={args.clips_per_worker}", *args.overrides]
    # A node's CPUs are whole; its simulated GPUs are what limit it to ``per_node`` workers.
    cluster = SimulatedCluster(math.ceil(largest / per_node), train_cpus=math.ceil(per_node * args.cpus_per_worker),
                               train_resources={SIM_GPU: per_node}, decode_nodes=args.decode_nodes, decode_cpus=1)
    try:
        ray.init(address=cluster.address, logging_level=logging.WARNING)  # to ask Ray Data's stats actor
        out: dict[str, Any] = {"workers_per_node": per_node, "cpus_per_worker": args.cpus_per_worker,
                               "decode_nodes": args.decode_nodes, "runs": []}
        for workers in sorted(args.workers):
            batch = [f"optimization.global_batch_size={workers * args.clips_per_worker}",
                     f"optimization.total_steps={args.steps}", f"checkpoint.every_steps={args.steps}"]
            if not out["runs"]:  # made before any run is timed
                cfg = load_config(builtin_config_path("local_demo"), [*overrides, *batch])
                write_demo_videos(storage / "videos", cfg)
            log.info("scale: %d workers", workers)
            try:
                out["runs"].append(measure(cluster, storage, [*overrides, *batch], workers))
            except RuntimeError as err:  # e.g. workers killed by Ray's memory monitor: the count did not fit
                out["runs"].append({"workers": workers, "status": "failed", "error": str(err)[:300]})
            # Each count's figures as they come: the next, larger count may take the machine down with it.
            log.info("scale: %s", json.dumps(out["runs"][-1]))
        if args.elastic and largest > per_node:
            elastic = [f"optimization.global_batch_size={largest * args.clips_per_worker}",
                       f"optimization.total_steps={args.elastic_steps}", "checkpoint.every_steps=3"]
            try:
                out["elastic"] = elastic_run(cluster, storage, [*overrides, *elastic], seed=0,
                                             workers=(largest - per_node, largest),
                                             train_nodes=math.ceil(largest / per_node))
            except (RuntimeError, TimeoutError) as err:
                out["elastic"] = {"status": "failed", "error": str(err)[:300]}
        return out
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(storage, ignore_errors=True)
