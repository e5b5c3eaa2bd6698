"""``python -m vjepa_ray.tune [--config FILE] [section.key=value ...]``: a Ray Tune sweep of V-JEPA runs.

Each trial is a short pretraining run (``vjepa_ray.sweep.trial``: a TorchTrainer with DeepSpeed, inside
the Tune trial, its reports forwarded to Tune) followed by the attentive probe on its frozen encoder, whose
whole learning-rate x weight-decay grid trains in one pass over the features. The grid of trials comes from
the ``tune`` section: ``mask_ratio`` (sets every mask config's spatial scale, see
``vjepa_ray.sweep.mask_ratio``), ``lr``, ``ema``, ``num_samples`` (repeats with other seeds) and ``space``
(any other key, e.g. ``mask.0.num_blocks``); ``probe_lr`` / ``probe_weight_decay`` set the probe grid.

ASHA (``tune.grace_period`` > 0) stops trials whose pretraining loss lags at the same step; the collapse stop
(``tune.collapse_patience``, ``vjepa_ray.sweep.collapse``) ends trials whose target features collapsed. Trials in
flight follow the cluster's resources unless ``tune.max_concurrent_trials`` says otherwise; a failed trial
runs again (``tune.max_failures``) and its pretraining resumes from its last checkpoint. Running the same
command again after the driver died resumes the sweep in ``<ray.storage_path>/<meta.name>``: finished
trials are kept, the others run (again). The table, the best trial and the plots land in that folder.
With ``logging.mlflow_uri`` (or ``MLFLOW_TRACKING_URI``) the sweep is an MLflow run there with one child run
per trial (``vjepa_ray.tracking``).
"""

from __future__ import annotations

from typing import Any

from vjepa_ray.cli import run_command
from vjepa_ray.config import Config

PROG = "python -m vjepa_ray.tune"
DESCRIPTION = "A Ray Tune sweep of V-JEPA runs: short pretraining runs, each probed on its frozen encoder."


def check(cfg: Config) -> None:
    """The sweep's config and its trials' ``data.paths`` (local paths listed; URIs once the sweep starts)."""
    from vjepa_ray.sweep import driver as sweep
    from vjepa_ray.train import driver as pretraining

    sweep.check_runnable(cfg)
    pretraining.check_data(cfg, remote=False)


def tune(cfg: Config) -> dict[str, Any]:
    from vjepa_ray import tracking
    from vjepa_ray.sweep import driver as sweep

    # The tracking server is read here, once; the trials get it from the sweep.
    return sweep.run(cfg, mlflow=tracking.target_from_command(cfg))


def main(argv: list[str] | None = None) -> int:
    summary = run_command(PROG, DESCRIPTION, argv, check, tune)
    from vjepa_ray import console

    console.wait_for_workers()
    print(f"{summary['trials']} trials: {summary['finished']} finished, {summary['stopped_early']} stopped early, "
          f"{summary['collapsed']} collapsed, {summary['error']} failed")
    best = summary["best"]
    if best is not None:
        print(f"best: {best['trial_id']} probe top-1 {best['probe_top1']:.1f}% "
              f"(probe lr {best['probe_lr']:g}, wd {best['probe_weight_decay']:g})")
    print(f"results: {summary['files']['results.csv']}")
    return 0 if summary["error"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
