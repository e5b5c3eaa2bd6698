"""``python -m vjepa_ray.pretrain [--config FILE] [section.key=value ...]``: V-JEPA pretraining on Ray Train.

config -> (demo videos) -> TorchTrainer(train_func) with DeepSpeed on every worker -> summary.json.
With no arguments it runs the built-in local demo (a tiny model on generated videos, 2 CPU workers).
Under ``ray job submit``, or with RAY_ADDRESS / ``ray.address`` set, it joins that cluster. Re-running with
the same ``meta.name`` and ``ray.storage_path`` resumes the run from its latest checkpoint. The run folder
(``vjepa_ray.runs``) may be a URI such as ``s3://bucket/runs``. With ``logging.mlflow_uri`` (or
``MLFLOW_TRACKING_URI``) the run is also an MLflow run there (``vjepa_ray.tracking``).
"""

from __future__ import annotations

import posixpath
import shlex
from typing import Any

from vjepa_ray.cli import run_command
from vjepa_ray.config import Config
from vjepa_ray.redaction import redact

PROG = "python -m vjepa_ray.pretrain"
DESCRIPTION = ("V-JEPA pretraining on Ray Train. With no arguments: the built-in local demo (a tiny model on "
               "videos it generates, 2 CPU workers).")


def check(cfg: Config) -> None:
    """The config and ``data.paths`` (local paths listed; URIs are listed once the run starts)."""
    from vjepa_ray.train import driver

    driver.check_runnable(cfg)
    driver.check_data(cfg, remote=False)


def pretrain(cfg: Config) -> dict[str, Any]:
    """The run, tracked in MLflow when the command names a server (read here, once)."""
    from vjepa_ray import tracking
    from vjepa_ray.train import driver

    target = tracking.target_from_command(cfg)
    if target is None:
        return driver.run(cfg)
    mlflow = tracking.MlflowRun(target, cfg.meta.name)
    summary = driver.run(cfg, mlflow=mlflow)
    summary["mlflow"] = mlflow.finish("FINISHED" if summary["status"] == "finished" else "FAILED")
    return summary


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """What the command prints last: the outcome, where it is, and what to run next (or why it failed, last)."""
    from vjepa_ray.train.metrics import format_duration

    loss = summary["final_loss"]
    lines = [f"{summary['status']}: {summary['steps']} steps in {format_duration(summary['elapsed_s'])}, final loss "
             f"{'n/a' if loss is None else f'{loss:.4f}'}, {summary['restarts']} restart(s), world sizes "
             f"{summary['world_sizes']}"]
    if summary["status"] != "finished":
        return [*lines, f"summary: {summary['summary']}",
                f"{PROG}: {'config error' if summary['error_kind'] == 'input' else 'failed'}: {summary['error']}"]
    folder = summary["run_folder"]
    run, name = shlex.quote(folder), posixpath.basename(folder.rstrip("/"))
    checkpoint = posixpath.basename(summary["checkpoint"].rstrip("/")) if summary["checkpoint"] else "none"
    return [*lines, f"run folder: {folder} (summary.json, checkpoint {checkpoint}); next:",
            f"  python -m vjepa_ray.report {run}",
            f"  python -m vjepa_ray.evaluate probe.checkpoint={run} probe.train_manifest=TRAIN.txt "
            "probe.val_manifest=VAL.txt",
            f"  python -m vjepa_ray.export to-official --input {run} --output {shlex.quote(name)}.pt",
            f"  tensorboard --logdir {shlex.quote(summary['tensorboard'])}"]


def main(argv: list[str] | None = None) -> int:
    summary = run_command(PROG, DESCRIPTION, argv, check, pretrain)
    from vjepa_ray import console

    console.wait_for_workers()
    for line in summary_lines(summary):
        print(redact(line), flush=True)
    if summary["status"] == "finished":
        return 0
    return 2 if summary["error_kind"] == "input" else 1


if __name__ == "__main__":
    raise SystemExit(main())
