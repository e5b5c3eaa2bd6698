"""The Ray Train function: one V-JEPA run on one worker of the group, from (re)start to the last step.

Every start of the worker group runs ``train_func`` again (after a failure, a lost node, an elastic
resize or a driver restart). It rebuilds the models and the DeepSpeed engine for the current world size,
restores the latest checkpoint if Ray hands one over (resharding DeepSpeed state through a universal
checkpoint when the world size changed), and trains from the step it stopped at. All ranks follow the same
step-based schedule of collectives, ``ray.train.report`` calls and checkpoints, which Ray and DeepSpeed
need (both are barriers).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence

import torch
import torch.distributed as dist

from vjepa_ray import runs
from vjepa_ray.config import Config, DataConfig, from_dict, to_yaml
from vjepa_ray.train import checkpoint as ckpt
from vjepa_ray.train import recovery
from vjepa_ray.train.elastic import BatchPlan, global_batch_size, plan_batch
from vjepa_ray.train.engine import TrainStep, base_optimizer, state_bytes
from vjepa_ray.train.metrics import IntervalMeter, collapse_warning, format_progress
from vjepa_ray.train.nonfinite import NonFiniteSteps, check_finite_state
from vjepa_ray.train.upload import persist_checkpoint
from vjepa_ray.train.weights import read_initial_weights
from vjepa_ray.worker_env import configure_worker_logging

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
    optionally ``stream_factory`` (default ``clip_stream``), ``tracker`` (a ``RunTracker`` actor) and
    ``verify_restore`` (save a digest of weights and Adam moments with every checkpoint; fail a restore
    whose state differs from it)."""
    configure_worker_logging()
    cfg = from_dict(config["cfg"])
    run = Run(cfg, config.get("stream_factory") or clip_stream, config.get("tracker"),
              bool(config.get("verify_restore", False)))
    run.train()


class Run:
    """One start of the training function on one rank."""

    def __init__(self, cfg: Config, stream_factory: StreamFactory, tracker, verify_restore: bool):
        import ray.train

        self.cfg = cfg
        self.stream_factory = stream_factory
        self.tracker = tracker
        self.verify_restore = verify_restore
        self.restored_digest: str | None = None
        # Damaged checkpoints this start skipped: a new save must not take one's name (runs.checkpoint_dir_name).
        self.damaged: list[str] = []
        self.answered_notice = None  # the preemption notice (ray.train.PreemptionInfo) last checkpointed for
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.local_rank = context.get_local_rank()
        self.device = self._device()
        self.plan: BatchPlan = plan_batch(global_batch_size(cfg), cfg.data.batch_size, self.world_size)

    def _device(self) -> torch.device:
        if self.cfg.ray.use_gpu and torch.cuda.is_available():
            import ray.train.torch

            device = ray.train.torch.get_device()
            torch.cuda.set_device(device)
            return device
        return torch.device("cpu")

    def _start(self) -> ckpt.TrainState:
        """Builds the step and restores the latest checkpoint, if any; returns the state to go on from.

        A first start (Ray hands over no checkpoint) begins from ``checkpoint.start_from``'s state or
        ``model.init_from``'s weights when they are set, else from the seed's random initialisation.
        """
        import ray.train

        latest = ray.train.get_checkpoint()
        with ExitStack() as stack:
            if latest is not None:
                # Ray's latest, or the newest intact one before it when that one is damaged.
                folder, name, self.damaged = recovery.open_intact(stack, latest, runs.run_dir(self.cfg), self.rank)
                return self._resume(folder, name)
            if self.cfg.checkpoint.start_from:
                self._start_from(stack.enter_context(runs.local_copy(self.cfg.checkpoint.start_from)))
            else:
                weights = read_initial_weights(self.cfg) if self.cfg.model.init_from else None
                if weights is not None and self.rank == 0:
                    log.info("starting from the weights in %s", self.cfg.model.init_from)
                self.step = TrainStep(self.cfg, self.plan, self.rank, self.device, initial_weights=weights)
        return ckpt.TrainState(world_size=self.world_size, global_batch=self.plan.global_batch,
                               zero_stage=self.cfg.deepspeed.zero_stage)

    def _resume(self, folder: Path, name: str) -> ckpt.TrainState:
        """The run's own checkpoint: everything, the step and the data position included."""
        saved = ckpt.read_train_state(folder)
        universal = ckpt.needs_universal(saved, self.world_size, self.cfg)
        self.step = TrainStep(self.cfg, self.plan, self.rank, self.device, load_universal=universal)
        state = ckpt.restore(folder, self.step.engine, self.step.target, self.rank, self.local_rank,
                             resharded=universal)
        if state.global_batch != self.plan.global_batch:
            log.warning("global batch changed from %d (checkpoint) to %d (config)", state.global_batch,
                        self.plan.global_batch)
        if self.verify_restore:
            self.restored_digest = ckpt.state_digest(self.step.engine)
            if state.state_digest is not None and state.state_digest != self.restored_digest:
                raise RuntimeError(f"the state restored from {name} differs from the one saved there")
        if self.rank == 0:
            log.info("resumed from %s at step %d (saved on %d worker(s), now %d%s)", name, state.step,
                     saved.world_size, self.world_size, ", resharded via a universal checkpoint" if universal else "")
        state.world_size, state.global_batch = self.world_size, self.plan.global_batch
        state.zero_stage = self.cfg.deepspeed.zero_stage
        return state

    def _start_from(self, folder: Path) -> None:
        """Another run's checkpoint (``checkpoint.start_from``): its weights, EMA and optimizer state."""
        saved = ckpt.read_train_state(folder)
        universal = ckpt.needs_universal(saved, self.world_size, self.cfg)
        self.step = TrainStep(self.cfg, self.plan, self.rank, self.device, load_universal=universal)
        ckpt.start_from(folder, self.step.engine, self.step.target, self.rank, self.local_rank, resharded=universal)
        if saved.global_batch != self.plan.global_batch:
            log.warning("global batch %d differs from the %d of the run started from", self.plan.global_batch,
                        saved.global_batch)
        if self.rank == 0:
            log.info("started from %s (its step %d, saved on %d worker(s), now %d%s)", self.cfg.checkpoint.start_from,
                     saved.step, saved.world_size, self.world_size,
                     ", resharded via a universal checkpoint" if universal else "")

    def train(self) -> None:
        import ray

        state = self._start()
        resumed_step = state.step
        if not state.world_sizes or state.world_sizes[-1] != self.world_size:
            state.world_sizes.append(self.world_size)
        if self.tracker is not None and self.rank == 0:
            self.tracker.started.remote(self.world_size, resumed_step)
        if self.rank == 0:
            log.info("batch rule: %s", self.plan.describe())

        cfg, total = self.cfg, self.cfg.optimization.total_steps
        data = dataclasses.replace(cfg.data, batch_size=self.plan.micro_batch)
        stream = self.stream_factory(data, cfg.meta.seed, self.rank, self.world_size)
        if state.data_position is not None:
            stream.load_state_dict(state.data_position)
        batches = iter(stream)
        saves = ckpt.SaveSchedule(cfg.checkpoint.every_steps, total)
        meter = IntervalMeter(len(cfg.mask))
        nonfinite = NonFiniteSteps(cfg.optimization.max_nonfinite_steps, total=state.nonfinite_steps)
        deferred_save = False
        if state.step >= total:
            self._report(state, {"step": state.step, "resumed_from_step": resumed_step}, checkpoint=False)
            return
        while state.step < total:
            out = self.step(batches, state.step, meter)
            state.step += 1
            step = state.step
            stop = nonfinite.record(step, out.applied, out.loss, out.grad_norm, self.rank)
            state.nonfinite_steps = nonfinite.total
            preempted = self._new_preemption_notice(step)
            # No checkpoint from a step that was not applied: its save waits for the next step that is.
            due = saves.due(step, preempted) or deferred_save
            checkpoint, deferred_save = due and out.applied, due and not out.applied
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
            if self.restored_digest is not None:
                metrics["restored_state_digest"] = self.restored_digest
            if self.rank == 0:
                log.info(format_progress(metrics, total))
                warning = collapse_warning(metrics["target_feature_std"], cfg.logging.collapse_std_threshold)
                if warning:
                    log.warning(warning)
            self._report(state, metrics, checkpoint=checkpoint, stream=stream)
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

    def _report(self, state: ckpt.TrainState, metrics: dict[str, Any], checkpoint: bool,
                stream: Stream | None = None) -> None:
        import ray.train

        if not checkpoint:
            ray.train.report(metrics)
            return
        # Every rank's place in the stream: a restart on another world size splits what is left of the chunk.
        positions: list[Any] = [None] * self.world_size
        dist.all_gather_object(positions, stream.state_dict())
        state.data_position = positions
        check_finite_state(self.step.engine, base_optimizer(self.step.engine), self.step.target.fp32_shards(),
                           self.device)
        folder = ckpt.node_local_tempdir(f"vjepa_ckpt_{state.step}_")
        try:
            if self.verify_restore:
                state.state_digest = metrics["saved_state_digest"] = ckpt.state_digest(self.step.engine)
            ckpt.save(folder, self.step.engine, self.step.target, state, self.rank, to_yaml(self.cfg))
            dist.barrier()
            upload = functools.partial(persist_checkpoint, retry_s=self.cfg.checkpoint.upload_retry_s)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                             checkpoint_dir_name=runs.checkpoint_dir_name(state.step, self.damaged),
                             checkpoint_upload_fn=upload)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
