"""Pretraining's driver side: one run's TorchTrainer, its starts counted, and its ``summary.json``.

``run`` is what ``python -m vjepa_ray.pretrain`` and every Tune trial call; the workers run
``vjepa_ray.train.loop.train_func``. Re-running with the same ``meta.name`` and ``ray.storage_path``
resumes the run from its latest checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vjepa_ray import cluster, runs
from vjepa_ray.config import Config, ConfigError, to_dict
from vjepa_ray.data.demo import generated_paths, prepare_demo_videos
from vjepa_ray.data.sources import check_sources
from vjepa_ray.train.elastic import check_elastic_batch, global_batch_size
from vjepa_ray.train.engine import check_clipping
from vjepa_ray.train.failures import failure
from vjepa_ray.train.lease import RunLease
from vjepa_ray.train.loop import StreamFactory, train_func
from vjepa_ray.train.nonfinite import stop_message
from vjepa_ray.train.ray_metrics import RESTARTS, RayMetricsCallback, restarts_gauge
from vjepa_ray.train.recovery import check_run_folder
from vjepa_ray.train.retention import CheckpointRetention
from vjepa_ray.train.trainer import build_trainer
from vjepa_ray.train.weights import check_start_from, read_initial_weights

if TYPE_CHECKING:
    from vjepa_ray.tracking import MlflowRun

log = logging.getLogger(__name__)


def check_runnable(cfg: Config) -> None:
    """What the schema cannot see but would fail a run after minutes of start-up."""
    cfg.validate_pretraining()
    if cfg.deepspeed.precision == "fp16" and not cfg.ray.use_gpu:
        raise ConfigError("deepspeed.precision", "fp16 needs GPUs (ray.use_gpu=true); use bf16 or fp32 on CPUs")
    if cfg.deepspeed.offload_params and cfg.deepspeed.zero_stage != 3:
        raise ConfigError("deepspeed.offload_params", "parameter offload needs deepspeed.zero_stage=3")
    if cfg.deepspeed.offload_optimizer and cfg.deepspeed.zero_stage == 0:
        raise ConfigError("deepspeed.offload_optimizer", "optimizer offload needs deepspeed.zero_stage >= 1")
    if not cfg.data.paths:
        raise ConfigError("data.paths", "no video source given")
    if cfg.optimization.schedule == "cooldown" and not (cfg.checkpoint.start_from or cfg.model.init_from):
        raise ConfigError("optimization.schedule", "the cooldown continues a pretraining run: set "
                          "checkpoint.start_from (or model.init_from) to it")
    check_elastic_batch(cfg)
    check_clipping(cfg)


def check_data(cfg: Config, remote: bool = True) -> None:
    """``data.paths`` names videos, listed (not decoded) here: a wrong path stops before Ray starts. What the demo
    generates is not there yet; URIs are listed only when ``remote`` (a dry run checks no store)."""
    generated = {p for p in cfg.data.paths if Path(p).expanduser().absolute() in generated_paths(cfg)}
    check_sources(cfg.data.paths, cfg.data.weights, skip=generated, remote=remote)


def is_first_start(cfg: Config) -> bool:
    """Whether the run has no checkpoint of its own yet: ``checkpoint.start_from`` and ``model.init_from``
    apply only then (a restart resumes the run's own checkpoint, even when they are gone)."""
    try:
        runs.find_checkpoint(runs.run_dir(cfg))
    except FileNotFoundError:
        return True
    return False


def check_start_sources(cfg: Config) -> Config:
    """What a first start reads, checked on the driver before any worker starts: the checkpoint
    ``checkpoint.start_from`` names holds this run's model, and ``model.init_from``'s weights fit it.

    Returns ``cfg`` with ``checkpoint.start_from`` resolved to that checkpoint's folder (the workers and the
    run's ``config.yaml`` then name the exact checkpoint). Raises ConfigError.
    """
    if cfg.checkpoint.start_from:
        cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint,
                                                                      start_from=check_start_from(cfg)))
    if cfg.model.init_from:
        try:
            read_initial_weights(cfg)
        except (OSError, ValueError) as err:
            # The loaders list every key that does not fit, one per line: one line here.
            raise ConfigError("model.init_from", "; ".join(line.strip() for line in str(err).splitlines()
                                                           if line.strip())) from None
    return cfg


def _resolved_paths(cfg: Config) -> Config:
    """Absolute local paths: workers may run under another working directory (ray job submit)."""
    cfg = copy.deepcopy(cfg)
    cfg.data.paths = [_absolute(p) for p in cfg.data.paths]
    if cfg.model.init_from:
        cfg.model.init_from = _absolute(cfg.model.init_from)
    return cfg


def _absolute(path: str) -> str:
    return path if runs.is_uri(path) else str(Path(path).expanduser().resolve())


def _tracker(run_name: str):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    class RunTracker:
        """Counts the starts of the worker group (restarts, world sizes, the step each resumed from); exports
        the restarts as a Ray metric."""

        def __init__(self, run_name: str):
            self.starts: list[dict[str, int]] = []
            self.restarts = restarts_gauge(run_name)
            # The report that stopped the run for non-finite steps: Ray's result holds the last checkpoint's.
            self.stop: dict[str, Any] | None = None

        def started(self, world_size: int, step: int) -> None:
            self.starts.append({"world_size": world_size, "step": step})
            self.restarts.set({RESTARTS: len(self.starts) - 1})

        def get(self) -> list[dict[str, int]]:
            return self.starts

        def stopped(self, metrics: dict[str, Any]) -> None:
            self.stop = metrics

        def get_stop(self) -> dict[str, Any] | None:
            return self.stop

    # On the driver's node: it must outlive any worker node.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return RunTracker.options(scheduling_strategy=here).remote(run_name)


def _last_result(folder: str):
    """The failed run's last reported metrics and checkpoint, or None when it never reported one."""
    import ray.train

    try:
        return ray.train.Result.from_path(folder)
    except RuntimeError:
        return None


def run(cfg: Config, *, stream_factory: StreamFactory | None = None, callbacks: list | None = None,
        mlflow: MlflowRun | None = None, hold_lease: bool = True) -> dict[str, Any]:
    """Trains as ``cfg`` says; returns the summary (also written to ``<run folder>/summary.json``).

    ``stream_factory`` replaces the Ray Data clip stream (see ``vjepa_ray.train.loop``).
    ``callbacks`` (``ray.train.UserCallback``) join the run's own, after them, e.g. a ``TuneReportCallback``
    when a Tune trial runs this; one that raises ``RunStopped`` at a report ends the run there (``error_kind``
    "stopped"), after the run's own callbacks logged that report. ``mlflow`` logs the run's parameters, every
    report and summary.json to MLflow; its owner ends it (a sweep's trial adds its probe's results first).
    ``hold_lease``: take the run folder's lease (``vjepa_ray.train.lease``) for the run; a sweep's driver holds
    the sweep folder's for its trials.
    """
    check_runnable(cfg)
    check_data(cfg)
    cfg = _resolved_paths(cfg)
    if (cfg.checkpoint.start_from or cfg.model.init_from) and is_first_start(cfg):
        cfg = check_start_sources(cfg)
    # After the start sources: a run that cannot start leaves no run folder behind.
    check_run_folder(cfg)
    if not hold_lease:
        return _train(cfg, stream_factory, callbacks, mlflow)
    # Before any worker starts: a second driver on this folder stops here.
    with RunLease(runs.run_dir(cfg)):
        return _train(cfg, stream_factory, callbacks, mlflow)


def _train(cfg: Config, stream_factory: StreamFactory | None, callbacks: list | None,
           mlflow: MlflowRun | None) -> dict[str, Any]:
    import ray
    import ray.exceptions
    import ray.train

    from vjepa_ray.train.metrics import TensorBoardCallback

    prepare_demo_videos(cfg)
    cluster.connect(cfg)
    tracker = _tracker(cfg.meta.name)
    folder, tensorboard = runs.run_dir(cfg), runs.tensorboard_dir(cfg)
    own = [TensorBoardCallback(tensorboard), RayMetricsCallback(cfg.meta.name),
           CheckpointRetention(folder, cfg.checkpoint.num_to_keep)]
    if mlflow is not None:
        mlflow.start(cfg, folder)
        own.append(mlflow.callback())
    # The caller's last: Ray calls them in order, and one that ends the run skips the ones after it.
    callbacks = [*own, *(callbacks or [])]
    trainer = build_trainer(
        cfg, train_func,
        {"cfg": to_dict(cfg), "stream_factory": stream_factory, "tracker": tracker},
        name=cfg.meta.name, callbacks=callbacks, ray_rotates_checkpoints=False)
    low, high = cfg.ray.worker_range()
    log.info("run %s: %s workers, global batch %d, results in %s", cfg.meta.name,
             low if low == high else f"{low}-{high}", global_batch_size(cfg), folder)
    started = time.time()
    error = ended = None
    try:
        result = trainer.fit()
    except (ray.train.TrainingFailedError, ray.exceptions.RayError) as err:  # the latter: the controller lost
        error, ended = err, failure(err)
        result = _last_result(folder)
    try:
        starts, stop = ray.get([tracker.get.remote(), tracker.get_stop.remote()])
    except ray.exceptions.RayError:  # killed with the controller (e.g. the node out of memory)
        starts, stop = [], None
    if runs.is_uri(folder) and Path(tensorboard).is_dir():
        runs.upload(tensorboard, runs.join(folder, runs.TENSORBOARD_DIR))
    # The report a stop came at (non-finite steps, or a callback's), else the last checkpoint's.
    stopped_at = stop or (ended.report if ended is not None else None)
    metrics = stopped_at or (result.metrics if result is not None else None) or {}
    checkpoint = result.checkpoint if result is not None else None
    checkpoint_path = runs.checkpoint_path(folder, checkpoint.path) if checkpoint is not None else None
    stopped = stop_message(metrics, checkpoint_path, cfg.optimization.lr, cfg.deepspeed.precision) if stop else None
    if stopped:
        log.error(stopped)
    summary = {
        "status": "failed" if error is not None or stopped else "finished",
        "steps": int(metrics.get("step", 0)),
        "final_loss": metrics.get("loss"),
        "restarts": max(len(starts) - 1, 0),
        "skipped_videos": int(metrics.get("skipped_videos", 0)),
        "nonfinite_steps": int(metrics.get("nonfinite_steps", 0)),
        "checkpoint": checkpoint_path,
        "world_sizes": [s["world_size"] for s in starts],
        "starts": starts,
        "global_batch": global_batch_size(cfg),
        "elapsed_s": round(time.time() - started, 1),
        "tensorboard": tensorboard,
        "run_folder": folder,
        "error": stopped or (ended.cause if ended is not None else None),
        # Bad input (a config or data error, not retried), a fault that outlasted ray.max_failures, a run
        # stopped by non-finite steps or by loss regulation (not retried), or one a callback stopped on purpose
        # (RunStopped).
        "error_kind": "nonfinite" if stopped else None if ended is None else ended.kind,
        "error_detail": None if error is None else str(error)[-2000:],
        "metrics": metrics,
    }
    summary["summary"] = runs.write_summary(folder, summary)
    if mlflow is not None:
        mlflow.log_artifact(runs.SUMMARY_FILE, runs.read_bytes(summary["summary"]))
    return summary
