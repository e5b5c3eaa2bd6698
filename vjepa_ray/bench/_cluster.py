"""A simulated multi-node Ray cluster on this machine, and ``python -m vjepa_ray.pretrain`` runs on it, as the
chaos and scale benches use them.

The cluster is a ``ray.cluster_utils.Cluster``: a head with no CPUs (drivers, Train controllers), training
nodes labelled ``vjepa-role=train`` that advertise a custom resource (a ``train_slot`` per node, or simulated
GPUs) for ``ray.worker_resources`` to ask for, and CPU-only decode nodes labelled ``vjepa-role=decode``. Ray
2.60's elastic policy counts room for workers by resources alone, label selector or not: the custom resource is
what keeps it from planning workers onto decode nodes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROLE = "vjepa-role"  # node label: train or decode
TRAIN_SLOT = "train_slot"  # the chaos bench's custom resource: one per training node


@dataclasses.dataclass(frozen=True)
class Report:
    """One ``ray.train.report`` of a run, as its TensorBoard files hold it."""

    wall: float
    step: int
    resumed_from: int
    world_size: int
    global_batch: int = 0


def read_reports(tensorboard_dir: str | Path) -> list[Report]:
    """Every report of a run, in the order written (all drivers' event files)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reports = []
    for events in Path(tensorboard_dir).glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if "train/resumed_from_step" not in acc.Tags()["scalars"]:
            continue
        sizes = {e.step: int(e.value) for e in acc.Scalars("train/world_size")}
        batches = {e.step: int(e.value) for e in acc.Scalars("train/global_batch")}
        reports += [Report(e.wall_time, e.step, int(e.value), sizes.get(e.step, 0), batches.get(e.step, 0))
                    for e in acc.Scalars("train/resumed_from_step")]
    return sorted(reports, key=lambda r: r.wall)


def attempts(reports: list[Report]) -> list[list[Report]]:
    """Reports grouped by start of the worker group: a start resumes from another step than the one before,
    or repeats a step. (A start that failed before its first report leaves no trace here.)"""
    groups: list[list[Report]] = []
    for report in reports:
        last = groups[-1][-1] if groups else None
        if last is None or report.resumed_from != last.resumed_from or report.step <= last.step:
            groups.append([])
        groups[-1].append(report)
    return groups


def registered_checkpoints(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The checkpoints Ray Train has registered (all ranks' files in place), oldest first: name -> the metrics
    reported with it."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return {}
    return {c["checkpoint_dir_name"]: c["metrics"] for c in snapshot.get("checkpoint_results", [])}


class SimulatedCluster:
    """A ``ray.cluster_utils.Cluster``: a head with no CPUs, ``train_nodes`` training nodes of ``train_cpus``
    CPUs and ``train_resources`` each, and ``decode_nodes`` decode nodes of ``decode_cpus`` CPUs each. The
    defaults are the chaos bench's: one-CPU training nodes with a ``train_slot`` (one worker each) and a decode
    node of two CPUs."""

    def __init__(self, train_nodes: int, *, train_cpus: int = 1, train_resources: Mapping[str, float] | None = None,
                 decode_nodes: int = 1, decode_cpus: int = 2, object_store_bytes: int = 200 << 20):
        from ray.cluster_utils import Cluster

        self.node_args = {"num_cpus": train_cpus, "resources": dict(train_resources or {TRAIN_SLOT: 1}),
                          "object_store_memory": object_store_bytes, "labels": {ROLE: "train"}}
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "object_store_memory": object_store_bytes, "include_dashboard": False})
        self.train_nodes = [self.cluster.add_node(**self.node_args) for _ in range(train_nodes)]
        self.decode_nodes = [self.cluster.add_node(num_cpus=decode_cpus, object_store_memory=object_store_bytes,
                                                   labels={ROLE: "decode"}) for _ in range(decode_nodes)]
        self.cluster.wait_for_nodes()

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_train_node(self) -> None:
        self.train_nodes.append(self.cluster.add_node(**self.node_args))
        self.cluster.wait_for_nodes()

    def remove(self, node) -> None:
        self.train_nodes.remove(node)
        self.cluster.remove_node(node, allow_graceful=False)

    def processes(self, title: str) -> dict[int, Any]:
        """Processes whose command line holds ``title`` (Ray retitles a worker ``ray::<actor or task>``), by
        pid, with the node whose raylet started them. Read from the process table: no dashboard needed."""
        import psutil

        out = {}
        for node in [self.cluster.head_node, *self.train_nodes, *self.decode_nodes]:
            raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
            for proc in raylet.children(recursive=True):
                try:
                    if title in " ".join(proc.cmdline()):
                        out[proc.pid] = node
                except psutil.Error:
                    continue
        return out

    def worker_pids(self) -> dict[int, Any]:
        """Train worker processes by pid, with the node each runs on."""
        return self.processes("RayTrainWorker")

    def drain_for_preemption(self, node, deadline_s: float) -> None:
        """What ``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --reason-message spot
        --deadline-remaining-seconds N`` asks of the GCS (the call autoscaler v2 makes on a spot reclaim)."""
        import ray._raylet
        from ray.core.generated import autoscaler_pb2

        gcs = ray._raylet.GcsClient(address=self.address)
        accepted, why = gcs.drain_node(node.node_id,
                                       autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                       "spot", int((time.time() + deadline_s) * 1000))
        if not accepted:
            raise RuntimeError(f"the drain of node {node.node_id} was refused: {why}")

    def shutdown(self) -> None:
        self.cluster.shutdown()


class Driver:
    """``python -m MODULE OVERRIDES`` on the cluster, in a process of its own (``env`` joins its environment), its
    output appended to ``log_file``. ``module``: ``vjepa_ray.pretrain``, or a wrapper of it that takes the same
    arguments (``vjepa_ray.bench._faults``)."""

    def __init__(self, cluster: SimulatedCluster, overrides: list[str], log_file: Path,
                 env: Mapping[str, str] | None = None, module: str = "vjepa_ray.pretrain"):
        with log_file.open("a") as out:
            self.process = subprocess.Popen([sys.executable, "-m", module, *overrides],
                                            env={**os.environ, "RAY_ADDRESS": cluster.address, **(env or {})},
                                            stdout=out, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def wait(self, timeout_s: float) -> int:
        return self.process.wait(timeout=timeout_s)
