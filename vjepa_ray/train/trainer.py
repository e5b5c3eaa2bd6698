"""The one place a ``TorchTrainer`` is assembled: pretraining, evaluation and every Tune trial's pretraining.

All of them take their workers, per-worker resources, worker environment, failure and checkpoint
settings and storage from the same config keys (``ray.*``, ``checkpoint.num_to_keep``), so they cannot
disagree. What a worker may ask of the cluster is decided in ``resources_per_worker``; node selection
(``ray.worker_label_selector``) in ``scaling_config``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from vjepa_ray import runs
from vjepa_ray.config import Config
from vjepa_ray.worker_env import MALLOC_ENV


def resources_per_worker(cfg: Config) -> dict[str, float]:
    """One worker's share of a node: ``ray.cpus_per_worker`` CPUs, a GPU if used, and ``ray.worker_resources``."""
    return {"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1} if cfg.ray.use_gpu else {}), **cfg.ray.worker_resources}


def worker_env(cfg: Config) -> dict[str, str]:
    """The environment of every worker process: DeepSpeed's accelerator and the allocator settings.

    Thread counts are left to Ray, which sets ``OMP_NUM_THREADS`` to a worker's whole CPUs. Variables of the
    job's runtime environment (``ray.init(runtime_env=...)``) join these.
    """
    return {"DS_ACCELERATOR": "cuda" if cfg.ray.use_gpu else "cpu", **MALLOC_ENV}


def scaling_config(cfg: Config, elastic: bool = True):
    """``ray.num_workers`` workers: a ``[min, max]`` range stays elastic unless ``elastic`` is False, which
    takes the maximum as a fixed size."""
    import ray.train

    low, high = cfg.ray.worker_range()
    workers = (low, high) if elastic and low != high else high
    return ray.train.ScalingConfig(num_workers=workers, use_gpu=cfg.ray.use_gpu,
                                   resources_per_worker=resources_per_worker(cfg),
                                   label_selector=dict(cfg.ray.worker_label_selector) or None,
                                   elastic_resize_monitor_interval_s=cfg.ray.elastic_resize_interval_s)


def build_trainer(cfg: Config, train_func: Callable[[dict[str, Any]], None], train_loop_config: dict[str, Any], *,
                  name: str, elastic: bool = True, callbacks: Sequence[Any] = (), ray_rotates_checkpoints: bool = True):
    """A ``TorchTrainer`` running ``train_func(train_loop_config)`` on every worker, its run ``name`` under
    ``ray.storage_path``; a ``ConfigError`` on a worker ends it without retries (``vjepa_ray.train.failures``).
    ``callbacks`` are ``ray.train.UserCallback`` instances. ``ray_rotates_checkpoints``: Ray Train keeps
    ``checkpoint.num_to_keep`` checkpoints; False leaves that to a callback (``vjepa_ray.train.retention``)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from vjepa_ray.train.failures import StopOnInputError

    return TorchTrainer(
        train_func,
        train_loop_config=train_loop_config,
        scaling_config=scaling_config(cfg, elastic),
        run_config=ray.train.RunConfig(
            name=name, storage_path=runs.storage_path(cfg),
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.checkpoint.num_to_keep if ray_rotates_checkpoints else None),
            callbacks=[StopOnInputError(cfg.logging.verbose), *callbacks],
            # Ray Train's own INFO lines (resources requested, the worker group started, every report) only
            # when asked for.
            logging_config=ray.train.LoggingConfig(log_level="INFO" if cfg.logging.verbose else "WARNING"),
            worker_runtime_env={"env_vars": worker_env(cfg)}),
    )
