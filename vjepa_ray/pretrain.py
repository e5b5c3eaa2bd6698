"""``python -m vjepa_ray.pretrain [--config FILE] [section.key=value ...]``: V-JEPA pretraining on Ray Train.

config -> (demo videos) -> TorchTrainer(train_func) with DeepSpeed on every worker -> summary.json.
With no arguments it runs the built-in local demo (a tiny model on generated videos, 2 CPU workers).
Under ``ray job submit``, or with RAY_ADDRESS / ``ray.address`` set, it joins that cluster. Re-running with
the same ``meta.name`` and ``ray.storage_path`` resumes the run from its latest checkpoint. The run folder
(``vjepa_ray.runs``) may be a URI such as ``s3://bucket/runs``. With ``logging.mlflow_uri`` (or
``MLFLOW_TRACKING_URI``) the run is also an MLflow run there (``vjepa_ray.tracking``).
"""

from __future__ import annotations

from typing import Any

from vjepa_ray import tracking
from vjepa_ray.cli import run_command
from vjepa_ray.config import Config
from vjepa_ray.redaction import redact
from vjepa_ray.train import driver

PROG = "python -m vjepa_ray.pretrain"


def pretrain(cfg: Config) -> dict[str, Any]:
    """The run, tracked in MLflow when the command names a server (read here, once)."""
    target = tracking.target_from_command(cfg)
    if target is None:
        return driver.run(cfg)
    mlflow = tracking.MlflowRun(target, cfg.meta.name)
    summary = driver.run(cfg, mlflow=mlflow)
    summary["mlflow"] = mlflow.finish("FINISHED" if summary["status"] == "finished" else "FAILED")
    return summary


def main(argv: list[str] | None = None) -> int:
    summary = run_command(PROG, __doc__.splitlines()[0], argv, driver.check_runnable, pretrain)
    print(f"{summary['status']}: {summary['steps']} steps, final loss {summary['final_loss']}, "
          f"{summary['restarts']} restart(s), world sizes {summary['world_sizes']}")
    print(f"checkpoint: {redact(summary['checkpoint'])}")
    print(f"summary: {redact(summary['summary'])}")
    print(f"tensorboard --logdir {summary['tensorboard']}")
    return 0 if summary["status"] == "finished" else 1


if __name__ == "__main__":
    raise SystemExit(main())
