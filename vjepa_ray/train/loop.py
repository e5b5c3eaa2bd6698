"""The Ray Train function: one V-JEPA run on one worker of the group, from (re)start to the last step.

Every start of the worker group runs ``train_func`` again (after a failure, a lost node, an elastic
resize or a driver restart). It rebuilds the models and the DeepSpeed engine for the current world size,
registers every piece of run state with the checkpointer (``vjepa_ray.train.checkpoint``), restores the latest
checkpoint if Ray hands one over (resharding DeepSpeed state through a universal checkpoint when the world size
changed), and trains from the step it stopped at. All ranks follow the same
step-based schedule of collectives, ``ray.train.report`` calls and checkpoints, which Ray and DeepSpeed
need (both are barriers).
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence

import torch

from vjepa_ray import runs
from vjepa_ray.config import Config, DataConfig, from_dict
from vjepa_ray.recipe.step import init_networks
from vjepa_ray.train import checkpoint as ckpt
from vjepa_ray.train import recovery
from vjepa_ray.train.deepspeed_state import DeepSpeedState
from vjepa_ray.train.elastic import BatchPlan, global_batch_size, plan_batch
from vjepa_ray.train.engine import TrainStep, base_optimizer, state_bytes
from vjepa_ray.train.metrics import Clock, IntervalMeter, collapse_warning, format_progress
from vjepa_ray.train.nonfinite import NonFiniteSteps, check_finite_state
from vjepa_ray.train.state import RngState, TrainState
from vjepa_ray.train.weights import read_initial_weights
from vjepa_ray.worker_env import configure_worker_logging, import_deepspeed

if TYPE_CHECKING:
    from vjepa_ray.data.pipeline import ClipBatch

log = logging.getLogger(__name__)


class Stream(Protocol):
    """An endless stream of micro batches that can say, and be told, where it stands: ``state_dict`` is this
    rank's place, ``load_state_dict`` takes every rank's (by rank) as a checkpoint saved them, so that a
    stream restarted on another number of workers can split what the old ones left."""

    def __iter__(self) -> Iterator[ClipBatch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, states: Sequence[dict[str, Any]]) -> None: ...


# (data config with the micro batch as batch_size, meta.seed, rank, world size) -> a stream at its start
StreamFactory = Callable[[DataConfig, int, int, int], Stream]


def clip_stream(data: DataConfig, seed: int, rank: int, world_size: int) -> Stream:
    """The default stream: ``vjepa_ray.data.pipeline.ClipStream`` (Ray Data decoding of ``data.paths``)."""
    from vjepa_ray.data.pipeline import ClipStream

    return ClipStream(data, seed, rank, world_size)


def train_func(config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker. ``config``: ``cfg`` (``to_dict`` of the Config) and
    optionally ``stream_factory`` (default ``clip_stream``) and ``tracker`` (a ``RunTracker`` actor)."""
    configure_worker_logging(config["cfg"]["logging"]["verbose"])
    import_deepspeed()
    cfg = from_dict(config["cfg"])
    Run(cfg, config.get("stream_factory") or clip_stream, config.get("tracker")).train()


def register_run_state(checkpointer: ckpt.Checkpointer, step: TrainStep, stream: Stream, state: TrainState,
                       local_rank: int) -> None:
    """Everything a checkpoint of the run holds, in the order it is saved and restored. A new piece of run
    state is one more line here."""
    register = checkpointer.register
    register("deepspeed", DeepSpeedState(step.engine, checkpointer.rank, local_rank), "files")
    register("target_encoder", step.target, "files")
    register("rng", RngState(), "per_rank")
    register("train_state", state, "shared")
    register("data_position", stream, "all_ranks")
    if step.jepa_step.regulation is not None:
        register("loss_regulation", step.jepa_step.regulation, "shared")


# What ``checkpoint.start_from`` carries over from another run: its weights, optimizer state and EMA target.
CARRIED_BY_START_FROM = ("deepspeed", "target_encoder")


class Run:
    """One start of the training function on one rank."""

    def __init__(self, cfg: Config, stream_factory: StreamFactory, tracker):
        import ray.train

        self.cfg = cfg
        self.stream_factory = stream_factory
        self.tracker = tracker
        self.answered_notice = None  # the preemption notice (ray.train.PreemptionInfo) last checkpointed for
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.local_rank = context.get_local_rank()
        self.device = self._device()
        self.plan: BatchPlan = plan_batch(global_batch_size(cfg), cfg.data.batch_size, self.world_size)
        self.state = TrainState(world_size=self.world_size, global_batch=self.plan.global_batch,
                                zero_stage=cfg.deepspeed.zero_stage)
        self.checkpointer = ckpt.Checkpointer(cfg, self.rank, self.world_size)

    def _device(self) -> torch.device:
        if self.cfg.ray.use_gpu and torch.cuda.is_available():
            import ray.train.torch

            device = ray.train.torch.get_device()
            torch.cuda.set_device(device)
            return device
        return torch.device("cpu")

    def _build(self, restore_from: Path | None = None, initial_weights=None) -> bool:
        """The step (engine and EMA target) and this rank's data stream, registered with the checkpointer.
        Returns whether the engine loads checkpoint ``restore_from`` through a universal conversion
        (``Checkpointer.needs_resharding``, which asks which parameters the networks train)."""
        networks = init_networks(self.cfg, initial_weights)
        trained = {name for name, param in networks[0].named_parameters() if param.requires_grad}
        universal = restore_from is not None and self.checkpointer.needs_resharding(restore_from, trained)
        self.step = TrainStep(self.cfg, self.plan, self.rank, self.device, load_universal=universal,
                              networks=networks)
        data = dataclasses.replace(self.cfg.data, batch_size=self.plan.micro_batch)
        self.stream = self.stream_factory(data, self.cfg.meta.seed, self.rank, self.world_size)
        register_run_state(self.checkpointer, self.step, self.stream, self.state, self.local_rank)
        return universal

    def _start(self) -> None:
        """Builds the step and the stream and restores the latest checkpoint, if any.

        A first start (Ray hands over no checkpoint) begins from ``checkpoint.start_from``'s state or
        ``model.init_from``'s weights when they are set, else from the seed's random initialisation.
        """
        import ray.train

        latest = ray.train.get_checkpoint()
        with ExitStack() as stack:
            if latest is not None:
                # Ray's latest, or the newest intact one before it when that one is damaged.
                folder, name, self.checkpointer.damaged = recovery.open_intact(stack, latest, runs.run_dir(self.cfg),
                                                                               self.rank)
                self._resume(folder, name)
            elif self.cfg.checkpoint.start_from:
                self._start_from(stack.enter_context(runs.local_copy(self.cfg.checkpoint.start_from)))
            else:
                weights = read_initial_weights(self.cfg) if self.cfg.model.init_from else None
                if weights is not None and self.rank == 0:
                    log.info("starting from the weights in %s", self.cfg.model.init_from)
                self._build(initial_weights=weights)

    def _resume(self, folder: Path, name: str) -> None:
        """The run's own checkpoint: everything, the step and the data position included."""
        universal = self._build(restore_from=folder)
        self.checkpointer.restore(folder, name)
        saved, state = dataclasses.replace(self.state), self.state
        if saved.global_batch != self.plan.global_batch:
            log.warning("global batch changed from %d (checkpoint) to %d (config)", saved.global_batch,
                        self.plan.global_batch)
        if self.rank == 0:
            log.info("resumed from %s at step %d (saved on %d worker(s), now %d%s)", name, saved.step,
                     saved.world_size, self.world_size, ", resharded via a universal checkpoint" if universal else "")
        state.world_size, state.global_batch = self.world_size, self.plan.global_batch
        state.zero_stage = self.cfg.deepspeed.zero_stage

    def _start_from(self, folder: Path) -> None:
        """Another run's checkpoint (``checkpoint.start_from``): its weights, EMA and optimizer state."""
        saved = ckpt.read_train_state(folder)
        universal = self._build(restore_from=folder)
        self.checkpointer.start_from(folder, CARRIED_BY_START_FROM)
        if saved.global_batch != self.plan.global_batch:
            log.warning("global batch %d differs from the %d of the run started from", self.plan.global_batch,
                        saved.global_batch)
        if self.rank == 0:
            log.info("started from %s (its step %d, saved on %d worker(s), now %d%s)", self.cfg.checkpoint.start_from,
                     saved.step, saved.world_size, self.world_size,
                     ", resharded via a universal checkpoint" if universal else "")

    def train(self) -> None:
        import ray

        self._start()
        state = self.state
        resumed_step = state.step
        if not state.world_sizes or state.world_sizes[-1] != self.world_size:
            state.world_sizes.append(self.world_size)
        if self.tracker is not None and self.rank == 0:
            self.tracker.started.remote(self.world_size, resumed_step)
        if self.rank == 0:
            log.info("batch rule: %s", self.plan.describe())

        cfg, total = self.cfg, self.cfg.optimization.total_steps
        batches = iter(self.stream)
        meter = IntervalMeter(len(cfg.mask))
        clock = Clock(state.step)
        nonfinite = NonFiniteSteps(cfg.optimization.max_nonfinite_steps, total=state.nonfinite_steps)
        deferred_save = False
        if state.step >= total:
            self._report({"step": state.step, "resumed_from_step": resumed_step}, checkpoint=False)
            return
        while state.step < total:
            out = self.step(batches, state.step, meter)
            state.step += 1
            step = state.step
            # A step loss regulation held back was finite: it counts as applied here.
            kept = out.applied or out.loss_regulated
            stop = nonfinite.record(step, kept, out.loss, out.grad_norm, self.rank)
            state.nonfinite_steps = nonfinite.total
            preempted = self._new_preemption_notice(step)
            # No checkpoint from a step that was not applied: its save waits for the next step that is.
            due = self.checkpointer.due(step, preempted) or deferred_save
            checkpoint, deferred_save = due and kept, due and not kept
            if step % cfg.logging.every_steps and not checkpoint and not stop:
                continue
            metrics = meter.reduce(self.device)
            meter.reset()
            state.skipped_videos += metrics.pop("skipped_videos")
            state.last_loss = metrics["loss"]
            memory = state_bytes(self.step.engine, self.step.target)
            metrics.update(lr=out.lr, wd=out.weight_decay, momentum=out.momentum, step=step,
                           skipped_videos=state.skipped_videos, world_size=self.world_size,
                           global_batch=self.plan.global_batch, micro_batch=self.plan.micro_batch,
                           grad_accum=self.plan.grad_accum, resumed_from_step=resumed_step,
                           state_bytes_per_rank=memory["total"], preemption_checkpoint=int(preempted),
                           **nonfinite.metrics(stop))
            if self.checkpointer.restored_digest is not None:
                metrics["restored_state_digest"] = self.checkpointer.restored_digest
            if self.rank == 0:
                log.info(format_progress(metrics, total, clock))
                warning = collapse_warning(metrics["target_feature_std"], cfg.logging.collapse_std_threshold)
                if warning:
                    log.warning(warning)
            self._report(metrics, checkpoint=checkpoint)
            if stop:
                # Every rank returns: the driver ends the run as failed (a restart would only repeat the steps).
                if self.rank == 0 and self.tracker is not None:
                    ray.get(self.tracker.stopped.remote(metrics))
                return

    def _new_preemption_notice(self, step: int) -> bool:
        """Whether a node of this worker group was drained for preemption since the last step and no checkpoint
        answered that notice yet: the run then checkpoints now, not at the next scheduled save, and trains on
        until the node goes (Ray Train restarts the group from that checkpoint).

        Asked after every step, the notice's deadline may be under a minute; a barrier (Ray agrees on rank 0's
        answer), so every rank asks at every step. A notice stays set until the group restarts: one save per
        notice.
        """
        import ray.train

        notice = ray.train.get_preemption_info()
        if notice is None or notice == self.answered_notice:
            return False
        self.answered_notice = notice
        if self.rank == 0:
            log.warning("preemption notice at step %d (nodes %s, deadline %s ms): checkpointing now", step,
                        notice.preempted_node_ids, notice.deadline_ms)
        return True

    def _report(self, metrics: dict[str, Any], checkpoint: bool) -> None:
        import ray.train

        if checkpoint:
            check_finite_state(self.step.engine, base_optimizer(self.step.engine), self.step.target.fp32_shards(),
                               self.device)
            self.checkpointer.save(self.state.step, metrics)
        else:
            ray.train.report(metrics)
