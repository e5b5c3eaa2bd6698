"""``python -m vjepa_ray.pretrain [--config FILE] [section.key=value ...]``: V-JEPA pretraining on Ray Train.

config -> (demo videos) -> TorchTrainer(train_func) with DeepSpeed on every worker -> summary.json.
With no arguments it runs the built-in local demo (a tiny model on generated videos, 2 CPU workers).
Under ``ray job submit``, or with RAY_ADDRESS / ``ray.address`` set, it joins that cluster. Re-running with
the same ``meta.name`` and ``ray.storage_path`` resumes the run from its latest checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from vjepa_ray import cluster
from vjepa_ray.cli import run_command
from vjepa_ray.config import Config, ConfigError, to_dict
from vjepa_ray.train.elastic import check_elastic_batch, global_batch_size, worker_range
from vjepa_ray.train.loop import StreamFactory, train_func
from vjepa_ray.worker_env import MALLOC_ENV

log = logging.getLogger("vjepa_ray.pretrain")

PROG = "python -m vjepa_ray.pretrain"


def run_dir(cfg: Config) -> str:
    """``<ray.storage_path>/<meta.name>`` (a local path, or a URI)."""
    return f"{storage_path(cfg).rstrip('/')}/{cfg.meta.name}"


def storage_path(cfg: Config) -> str:
    path = cfg.ray.storage_path
    return path if "://" in path else str(Path(path).expanduser().resolve())


def check_runnable(cfg: Config) -> None:
    """What the schema cannot see but would fail a run after minutes of start-up."""
    if cfg.deepspeed.precision == "fp16" and not cfg.ray.use_gpu:
        raise ConfigError("deepspeed.precision", "fp16 needs GPUs (ray.use_gpu=true); use bf16 or fp32 on CPUs")
    if cfg.deepspeed.offload_params and cfg.deepspeed.zero_stage != 3:
        raise ConfigError("deepspeed.offload_params", "parameter offload needs deepspeed.zero_stage=3")
    if (cfg.deepspeed.offload_optimizer) and cfg.deepspeed.zero_stage == 0:
        raise ConfigError("deepspeed.offload_optimizer", "optimizer offload needs deepspeed.zero_stage >= 1")
    if not cfg.data.paths:
        raise ConfigError("data.paths", "no video source given")
    check_elastic_batch(cfg)


def prepare_demo_videos(cfg: Config) -> None:
    """The demo's videos: generated once into ``data.paths[0]`` when ``data.synthetic_videos`` asks for them."""
    if not cfg.data.synthetic_videos:
        return
    folder = Path(cfg.data.paths[0]).expanduser()
    if len(list(folder.glob("*.mp4"))) >= cfg.data.synthetic_videos:
        return
    from vjepa_ray.video.synthetic import make_moving_pattern_videos

    # Longer than a clip's span so that clip starts vary; a little larger than the crop.
    frames = max(32, 2 * cfg.data.frames_per_clip * cfg.data.frame_step)
    size = max(cfg.data.crop_size + cfg.data.crop_size // 2, 64)
    make_moving_pattern_videos(folder, cfg.data.synthetic_videos, frames=frames, size=size, seed=cfg.meta.seed)
    print(f"generated {cfg.data.synthetic_videos} demo videos in {folder}", flush=True)


def _resolved_data_paths(cfg: Config) -> Config:
    # Workers may run under another working directory (ray job submit): pass absolute local paths.
    cfg = copy.deepcopy(cfg)
    cfg.data.paths = [p if "://" in p else str(Path(p).expanduser().resolve()) for p in cfg.data.paths]
    return cfg


def _tracker():
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    class RunTracker:
        """Counts the starts of the worker group (restarts, world sizes, the step each resumed from)."""

        def __init__(self):
            self.starts: list[dict[str, int]] = []

        def started(self, world_size: int, step: int) -> None:
            self.starts.append({"world_size": world_size, "step": step})

        def get(self) -> list[dict[str, int]]:
            return self.starts

    # On the driver's node: it must outlive any worker node.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return RunTracker.options(scheduling_strategy=here).remote()


def _write_summary(cfg: Config, summary: dict[str, Any]) -> str:
    fs, base = pafs.FileSystem.from_uri(run_dir(cfg)) if "://" in run_dir(cfg) else (pafs.LocalFileSystem(),
                                                                                       run_dir(cfg))
    fs.create_dir(base, recursive=True)
    path = f"{base}/summary.json"
    with fs.open_output_stream(path) as out:
        out.write(json.dumps(summary, indent=1).encode())
    return path


def _last_result(cfg: Config):
    """The failed run's last reported metrics and checkpoint, or None when it never reported one."""
    import ray.train

    try:
        return ray.train.Result.from_path(run_dir(cfg))
    except RuntimeError:
        return None


def tensorboard_dir(cfg: Config) -> str:
    """Event files go to the run folder when it is local (the controller runs on the driver's node)."""
    if "://" in cfg.ray.storage_path:
        return str(Path("~/vjepa_runs").expanduser() / cfg.meta.name / "tensorboard")
    return f"{run_dir(cfg)}/tensorboard"


def run(cfg: Config, *, stream_factory: StreamFactory | None = None, verify_restore: bool = False,
        extra_env: dict[str, str] | None = None, callbacks: list | None = None) -> dict[str, Any]:
    """Trains as ``cfg`` says; returns the summary (also written to ``<run dir>/summary.json``).

    ``stream_factory`` replaces the Ray Data clip stream (see ``vjepa_ray.train.loop``); ``verify_restore``
    makes every restore check a digest of weights and Adam moments against the checkpoint's.
    ``callbacks`` (``ray.train.UserCallback``) join the run's own, e.g. a ``TuneReportCallback`` when a
    Tune trial runs this.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from vjepa_ray.train.metrics import TensorBoardCallback

    check_runnable(cfg)
    cfg = _resolved_data_paths(cfg)
    prepare_demo_videos(cfg)
    cluster.connect(cfg)
    tracker = _tracker()
    low, high = worker_range(cfg)
    env = {"DS_ACCELERATOR": "cuda" if cfg.ray.use_gpu else "cpu", **MALLOC_ENV, **(extra_env or {})}
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"cfg": to_dict(cfg), "stream_factory": stream_factory, "tracker": tracker,
                           "verify_restore": verify_restore},
        scaling_config=ray.train.ScalingConfig(
            num_workers=(low, high) if low != high else low, use_gpu=cfg.ray.use_gpu,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1} if cfg.ray.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=cfg.meta.name, storage_path=storage_path(cfg),
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            callbacks=[TensorBoardCallback(tensorboard_dir(cfg)), *(callbacks or [])],
            worker_runtime_env={"env_vars": env}),
    )
    log.info("run %s: %s workers, global batch %d, results in %s", cfg.meta.name,
             low if low == high else f"{low}-{high}", global_batch_size(cfg), run_dir(cfg))
    started = time.time()
    error = None
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        error = err
        result = _last_result(cfg)
    starts = ray.get(tracker.get.remote())
    metrics = (result.metrics if result is not None else None) or {}
    summary = {
        "status": "failed" if error is not None else "finished",
        "steps": int(metrics.get("step", 0)),
        "final_loss": metrics.get("loss"),
        "restarts": max(len(starts) - 1, 0),
        "skipped_videos": int(metrics.get("skipped_videos", 0)),
        "checkpoint": result.checkpoint.path if result is not None and result.checkpoint is not None else None,
        "world_sizes": [s["world_size"] for s in starts],
        "starts": starts,
        "global_batch": global_batch_size(cfg),
        "elapsed_s": round(time.time() - started, 1),
        "tensorboard": tensorboard_dir(cfg),
        "error": None if error is None else str(error)[-2000:],
        "metrics": metrics,
    }
    summary["summary"] = _write_summary(cfg, summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    summary = run_command(PROG, __doc__.splitlines()[0], argv, check_runnable, run)
    print(f"{summary['status']}: {summary['steps']} steps, final loss {summary['final_loss']}, "
          f"{summary['restarts']} restart(s), world sizes {summary['world_sizes']}")
    print(f"checkpoint: {summary['checkpoint']}")
    print(f"summary: {summary['summary']}")
    print(f"tensorboard --logdir {summary['tensorboard']}")
    return 0 if summary["status"] == "finished" else 1


if __name__ == "__main__":
    raise SystemExit(main())
