"""Chaos: a run that loses workers, a node, a preempted node, its driver and a checkpoint, against the same
run undisturbed; then an elastic run shrunk and grown.

Everything runs on a ``ray.cluster_utils.Cluster`` on this machine: a head with no CPUs (drivers, Train
controllers), training nodes of one CPU (one worker each) and a decode node, with the tiny model in fp32 on
real video files (generated with PyAV, decoded by Ray Data). Every run is ``python -m vjepa_ray.pretrain`` in a
process of its own, so that its driver can be killed and the same command run again. The faults, in order,
each injected at a random step after the first checkpoint of the worker group then running:

- ``kill_worker``: SIGKILL of a Train worker.
- ``kill_in_save``: a worker dies in the middle of writing a checkpoint (injected by ``vjepa_ray.bench._faults``,
  through which every driver starts).
- ``remove_node``: a training node disappears (a fresh one joins, as an autoscaler would replace it).
- ``preempt``: a training node is drained for preemption (``DRAIN_NODE_REASON_PREEMPTION``, 60 s deadline),
  and removed once the checkpoint the notice brought forward is registered.
- ``kill_driver``: SIGKILL of the driver process, then the same command again.
- ``damage_checkpoint``: after the run finished, its last checkpoint loses a shard's tail and its
  ``train_state.json``, and the same command runs again (it resumes from the checkpoint before).

JSON: ``undisturbed_s`` and ``chaos_s`` (wall time of the undisturbed run and of the disturbed one, all its
drivers), ``wall_s_lost`` (the difference), ``restarts`` (worker-group starts after the first), ``faults`` (per
fault: ``step``, the last step reported before the next start; ``resumed_from``; ``steps_recomputed``;
``wall_s_lost``, from that last report to the first report past its step), ``preemption`` (the step at the notice and
the step of the checkpoint it brought forward), ``weights_equal`` (final encoder, predictor and EMA target
bitwise equal to the undisturbed run's: the fixed-size run promises it) and ``elastic`` (world sizes and
restarts of a ``[1, 2]`` run that loses a node and gets one back; its promise is weaker, see README).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vjepa_ray import runs
from vjepa_ray.bench._cluster import (
    ROLE,
    TRAIN_SLOT,
    Driver,
    Report,
    SimulatedCluster,
    attempts,
    read_reports,
    registered_checkpoints,
)
from vjepa_ray.bench._faults import EXIT_IN_SAVE_ENV
from vjepa_ray.config import Config, builtin_config_path, load_config

# Ray, torch and the training modules are imported by the functions that use them: ``bench chaos --help``
# reads the options without them.

log = logging.getLogger(__name__)

FAULTS = ("kill_worker", "kill_in_save", "kill_worker", "remove_node", "preempt", "kill_worker", "kill_driver",
          "damage_checkpoint")
# The run every fault plan disturbs: 16 videos of 2 clips per chunk, 4 steps per chunk on 2 workers, so that
# saves every 3 steps fall in the middle of chunks. Every step is reported (the faults watch the steps).
RUN_OVERRIDES = (
    "data.synthetic_videos=16", "data.chunk_size=16", "model.pred_depth=2", "deepspeed.precision=fp32",
    "deepspeed.zero_stage=2", "optimization.warmup_steps=2", "checkpoint.every_steps=3",
    "checkpoint.num_to_keep=3", "logging.every_steps=1", "ray.num_workers=2", "ray.max_failures=20",
    f"ray.worker_label_selector={{{ROLE}: train}}", f"data.decode_label_selector={{{ROLE}: decode}}",
    # Ray 2.60's elastic policy counts every node's CPUs as room for workers, label selector or not: a resource
    # only training nodes have keeps it from planning workers onto the decode node.
    f"ray.worker_resources={{{TRAIN_SLOT}: 1}}",
)
PREEMPTION_DEADLINE_S = 60
# How often Ray Train looks for drained nodes (default 5 s): the notice should reach the run within a step.
PREEMPTION_POLL_S = "0.2"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=42, help="optimizer steps of the disturbed run")
    parser.add_argument("--faults", nargs="+", default=list(FAULTS), choices=sorted(set(FAULTS)),
                        help="faults of the fixed-size run, in order (default: all)")
    parser.add_argument("--no-elastic", dest="elastic", action="store_false", help="skip the elastic run")
    parser.add_argument("--seed", type=int, default=0, help="chooses the steps and workers the faults hit")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")


@dataclasses.dataclass
class Fault:
    kind: str
    at: float  # when it took effect (unix time)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ChaosRun:
    """A run under a fault plan, as ``Disturber.run`` leaves it."""

    cfg: Config
    faults: list[Fault]
    elapsed_s: float
    summary: dict[str, Any]  # the last driver's summary.json

    @property
    def run_dir(self) -> Path:
        return Path(runs.run_dir(self.cfg))

    def reports(self) -> list[Report]:
        return read_reports(runs.tensorboard_dir(self.cfg))

    def fault_costs(self) -> list[dict[str, Any]]:
        """Per fault: the last step reported before the next start, the step that start resumed from, steps done
        twice, and the seconds from that last report to the first report of that step again (or past it)."""
        groups = attempts(self.reports())
        costs = []
        for fault in self.faults:
            before = max((g for g in groups if g[0].wall < fault.at), key=lambda g: g[0].wall)
            after = min((g for g in groups if g[0].wall > fault.at), key=lambda g: g[0].wall)
            # The last step reached before the next start: a preempted run goes on until its node is gone, and
            # the report of the step whose checkpoint answered the notice may land after the fault is recorded.
            last = max((r for r in before if r.wall < after[0].wall), key=lambda r: r.wall)
            regained = [r for g in groups if g[0].wall >= after[0].wall for r in g if r.step >= last.step]
            costs.append({"kind": fault.kind, "step": last.step, "resumed_from": after[0].resumed_from,
                          "steps_recomputed": last.step - after[0].resumed_from,
                          "wall_s_lost": round(min(r.wall for r in regained) - last.wall, 1),
                          **fault.details})
        return costs


class Disturber:
    """Runs a config's ``python -m vjepa_ray.pretrain`` on the cluster and injects faults into it."""

    def __init__(self, cluster: SimulatedCluster, storage: Path, name: str, overrides: list[str], seed: int):
        self.cluster, self.storage = cluster, storage
        self.command = [*overrides, f"ray.storage_path={storage}", f"meta.name={name}"]
        self.cfg = load_config(builtin_config_path("local_demo"), self.command)
        self.tensorboard, self.run_dir = runs.tensorboard_dir(self.cfg), Path(runs.run_dir(self.cfg))
        self.rng = random.Random(seed)
        self.log_file = storage / f"{name}.log"
        # While this file exists, the next rank to save a checkpoint dies in the middle (EXIT_IN_SAVE_ENV).
        self.exit_in_save = storage / f"{name}.exit_in_save"
        self.driver: Driver | None = None
        self.faults: list[Fault] = []
        self.started = self.elapsed_s = 0.0

    def start(self) -> None:
        self.started = time.time()
        self.driver = Driver(self.cluster, self.command, self.log_file, {
            "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": PREEMPTION_POLL_S, EXIT_IN_SAVE_ENV: str(self.exit_in_save)},
            module="vjepa_ray.bench._faults")

    def finish(self, timeout_s: float = 1800) -> dict[str, Any]:
        rc = self.driver.wait(timeout_s)
        self.elapsed_s += time.time() - self.started
        summary_file = self.run_dir / "summary.json"
        # A driver killed from outside (the machine out of memory, say) ends without writing a summary.
        summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
        if rc != 0:
            last_lines = self.log_file.read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"run {self.cfg.meta.name} ended with {rc}: "
                               f"{summary.get('error') or ' | '.join(last_lines)}; see {self.log_file}")
        return summary

    def run(self, faults: list[str]) -> ChaosRun:
        self.start()
        for kind in faults:
            if kind == "damage_checkpoint":
                self.finish()
                self._damage_latest_checkpoint()
                self.start()
                continue
            self.wait_for_random_step()
            getattr(self, kind)()
            self.wait_for_next_start()
        summary = self.finish()
        return ChaosRun(self.cfg, self.faults, round(self.elapsed_s, 1), summary)

    # What the faults wait for: the running start's progress, from the run's TensorBoard files.

    def current(self) -> list[Report]:
        groups = attempts(read_reports(self.tensorboard))
        return groups[-1] if groups else []

    def wait_for(self, condition, what: str, timeout_s: float = 900) -> Any:
        deadline = time.time() + timeout_s
        while not (value := condition()):
            if self.driver.process.poll() is not None:
                raise RuntimeError(f"the run ended while waiting for {what}; see {self.log_file}")
            if time.time() > deadline:
                raise TimeoutError(f"no {what} after {timeout_s} s; see {self.log_file}")
            time.sleep(0.2)
        return value

    def wait_for_random_step(self) -> None:
        """Until the running start has registered a checkpoint of its own (so that every start makes progress),
        then a random 1 to ``checkpoint.every_steps - 1`` steps more."""
        def saved() -> int | None:
            current = self.current()
            steps = [m["step"] for m in registered_checkpoints(self.run_dir).values()
                     if current and m["step"] > current[0].resumed_from]
            return max(steps, default=None)

        target = self.wait_for(saved, "a checkpoint of this start") + self.rng.randint(
            1, self.cfg.checkpoint.every_steps - 1)
        self.wait_for(lambda: self.current()[-1].step >= target, f"step {target}")

    def wait_for_next_start(self) -> None:
        fault = self.faults[-1]
        self.wait_for(lambda: any(g[0].wall > fault.at for g in attempts(read_reports(self.tensorboard))),
                   f"a start after {fault.kind}")

    def _worker(self) -> tuple[int, Any]:
        workers = self.cluster.worker_pids()
        pid = self.rng.choice(sorted(workers))
        return pid, workers[pid]

    # The faults.

    def kill_worker(self) -> None:
        pid, _ = self._worker()
        os.kill(pid, signal.SIGKILL)
        self.faults.append(Fault("kill_worker", time.time()))

    def kill_in_save(self) -> None:
        self.exit_in_save.touch()
        self.wait_for(lambda: not self.exit_in_save.exists(), "a save to die in")
        self.faults.append(Fault("kill_in_save", time.time()))

    def remove_node(self, replace: bool = True) -> None:
        _, node = self._worker()
        self.cluster.remove(node)
        self.faults.append(Fault("remove_node", time.time()))
        if replace:
            self.cluster.add_train_node()

    def preempt(self) -> None:
        _, node = self._worker()
        self.cluster.drain_for_preemption(node, PREEMPTION_DEADLINE_S)
        notice_step = self.current()[-1].step

        def answered() -> int | None:
            steps = [m["step"] for m in registered_checkpoints(self.run_dir).values()
                     if m.get("preemption_checkpoint") and m["step"] > notice_step]
            return min(steps, default=None)

        saved_step = self.wait_for(answered, "the checkpoint of the preemption notice")
        self.cluster.remove(node)
        self.faults.append(Fault("preempt", time.time(), {"notice_step": notice_step, "checkpoint_step": saved_step}))
        self.cluster.add_train_node()

    def kill_driver(self) -> None:
        self.driver.kill()
        self.elapsed_s += time.time() - self.started
        self.faults.append(Fault("kill_driver", time.time()))
        self.start()  # the same command again

    def _damage_latest_checkpoint(self) -> None:
        """A truncated optimizer shard and no ``train_state.json`` in the run's last checkpoint."""
        from vjepa_ray.train.checkpoint import TRAIN_STATE
        from vjepa_ray.train.deepspeed_state import DEEPSPEED_DIR, DEEPSPEED_TAG

        latest = self.run_dir / list(registered_checkpoints(self.run_dir))[-1]
        shard = next((latest / DEEPSPEED_DIR / DEEPSPEED_TAG).glob("*optim_states.pt"))
        shard.write_bytes(shard.read_bytes()[:1000])
        (latest / TRAIN_STATE).unlink()
        self.faults.append(Fault("damage_checkpoint", time.time(), {"damaged": latest.name}))


def undisturbed(cluster: SimulatedCluster, storage: Path, overrides: list[str]) -> tuple[dict[str, Any], float]:
    """The run with no faults: its summary and wall time (training alone: the videos are made before)."""
    from vjepa_ray.data.demo import write_demo_videos

    run = Disturber(cluster, storage, "undisturbed", overrides, seed=0)
    write_demo_videos(Path(run.cfg.data.paths[0]), run.cfg)
    run.start()
    summary = run.finish()
    return summary, round(run.elapsed_s, 1)


def weights_equal(want_checkpoint: str, got_checkpoint: str) -> dict[str, bool]:
    """Per model of two training checkpoints: every tensor bitwise equal."""
    import torch

    from vjepa_ray.train.weights import read_model_weights

    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's checkpoint reader prints; stdout is the JSON
        want, got = read_model_weights(want_checkpoint), read_model_weights(got_checkpoint)
    return {key: want[key].keys() == got[key].keys() and all(torch.equal(want[key][n], got[key][n]) for n in want[key])
            for key in want}


def elastic_run(cluster: SimulatedCluster, storage: Path, overrides: list[str], seed: int, *,
                workers: tuple[int, int] = (1, 2), train_nodes: int = 2) -> dict[str, Any]:
    """A ``[low, high]`` run (``workers``) on ``train_nodes`` training nodes that hold ``high`` workers: a node
    is removed (the run shrinks to the ``low`` workers the others hold), a new one joins (it grows back within
    ``ray.elastic_resize_interval_s``)."""
    low, high = workers
    while len(cluster.train_nodes) > train_nodes:
        cluster.remove(cluster.train_nodes[-1])
    while cluster.worker_pids():  # the last run's workers, on their way out
        time.sleep(0.5)
    run = Disturber(cluster, storage, "elastic", [*overrides, f"ray.num_workers=[{low},{high}]",
                                                  "ray.elastic_resize_interval_s=5"], seed)
    run.start()
    run.wait_for(lambda: run.current() and run.current()[-1].world_size == high, f"a start on {high} workers")
    run.wait_for_random_step()
    run.remove_node(replace=False)
    run.wait_for_next_start()
    run.wait_for_random_step()
    cluster.add_train_node()
    summary = run.finish()
    groups = attempts(read_reports(run.tensorboard))
    return {"status": summary["status"], "steps": summary["steps"], "wall_s": round(run.elapsed_s, 1),
            "world_sizes": [g[0].world_size for g in groups], "resumed_from": [g[0].resumed_from for g in groups],
            "global_batches": [g[0].global_batch for g in groups], "restarts": len(groups) - 1,
            "global_batch": summary["global_batch"]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    storage = Path(tempfile.mkdtemp(prefix="vjepa_bench_chaos_"))
    overrides = [*RUN_OVERRIDES, f"data.paths=[{storage / 'videos'}]", f"optimization.total_steps={args.steps}",
                 *args.overrides]
    cluster = SimulatedCluster(train_nodes=3)
    try:
        want, undisturbed_s = undisturbed(cluster, storage, overrides)
        chaos = Disturber(cluster, storage, "chaos", overrides, args.seed).run(args.faults)
        out = {
            "undisturbed_s": undisturbed_s,
            "chaos_s": chaos.elapsed_s,
            "wall_s_lost": round(chaos.elapsed_s - undisturbed_s, 1),
            "restarts": len(attempts(chaos.reports())) - 1,
            "faults": chaos.fault_costs(),
            "weights_equal": weights_equal(want["checkpoint"], chaos.summary["checkpoint"]),
            "steps": chaos.summary["steps"],
        }
        if args.elastic:
            out["elastic"] = elastic_run(cluster, storage, overrides, args.seed)
    except BaseException:
        # The drivers' logs and run folders are what explain a failed bench: kept, and named.
        log.error("chaos bench failed; its drivers' logs and run folders are kept in %s", storage)
        raise
    else:
        shutil.rmtree(storage, ignore_errors=True)
        return out
    finally:
        cluster.shutdown()
