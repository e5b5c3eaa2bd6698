"""The sweep's driver: a Ray Tune experiment of trials (``vjepa_ray.sweep.trial``), its progress lines, and
its results table once the trials are done.

The experiment's folder is the run folder ``<ray.storage_path>/<meta.name>`` (``vjepa_ray.runs``): Tune's
own files, each trial's run folder under ``pretrain/``, the table, the best trial and the plots. Running
the same sweep again after its driver died resumes the experiment there.
"""

from __future__ import annotations

import logging
import math
from pathlib import PurePosixPath
from typing import Any

from ray.tune import Callback

from vjepa_ray import cluster, runs, tracking
from vjepa_ray.config import Config, ConfigError, to_dict
from vjepa_ray.data.demo import prepare_demo_videos, prepare_probe_videos
from vjepa_ray.sweep import results as tables
from vjepa_ray.sweep.mask_ratio import masked_fraction
from vjepa_ray.sweep.space import SEED, check_axes, grid_point_keys, sweep_axes, token_grid, trial_config
from vjepa_ray.sweep.trial import run_trial, trial_run_config
from vjepa_ray.train import driver as pretraining
from vjepa_ray.train.lease import RunLease

log = logging.getLogger(__name__)


class ProgressLines(Callback):
    """One line per trial result, so the sweep's progress reads in the job logs."""

    def __init__(self):
        self.done = 0

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "probe_top1" in result:
            log.info("[tune] %s probe top-1 %.1f%% (probe lr %g, wd %g)", trial.trial_id, result["probe_top1"],
                     result["probe_lr"], result["probe_weight_decay"])
        elif result.get("collapsed"):
            log.info("[tune] %s target collapsed at step %s (feature std %.3g)", trial.trial_id, result["step"],
                     result["target_feature_std"])
        elif "step" in result and "loss" in result:
            log.info("[tune] %s step %s loss %.4f", trial.trial_id, result["step"], result["loss"])

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        top1 = trial.last_result.get("probe_top1")
        if top1 is not None:
            outcome = f"probe top-1 {top1:.1f}%"
        elif trial.last_result.get("collapsed"):
            outcome = "collapsed (target feature std below the threshold), stopped early"
        else:
            outcome = "stopped early (ASHA)"
        log.info("[tune] %s done: %s; %d trial(s) done", trial.trial_id, outcome, self.done)

    def on_trial_error(self, iteration, trials, trial, **info):
        log.warning("[tune] %s failed: %s", trial.trial_id, trial.error_file)


def max_concurrent_trials(cfg: Config, resources: dict[str, float]) -> int:
    """``tune.max_concurrent_trials``, or as many trials as the cluster's ``resources`` (CPUs, GPUs) hold at once.

    A trial holds its driver's CPUs, its workers' and, so that its video stream never starves, one decode
    task's (a trial whose workers took every CPU would wait forever for its data).
    """
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    workers = cfg.ray.worker_range()[1]
    per_trial = cfg.tune.driver_cpus + workers * cfg.ray.cpus_per_worker + cfg.data.decode_cpus
    fits = [resources.get("CPU", 0.0) // per_trial]
    if cfg.ray.use_gpu:
        fits.append(resources.get("GPU", 0.0) // workers)
    return max(1, int(min(fits)))


def asha_rungs(cfg: Config) -> list[float]:
    """The steps at which ASHA compares trials (none without early stopping)."""
    t, rungs = cfg.tune, []
    while t.grace_period and t.grace_period * t.reduction_factor ** len(rungs) < _asha_max_t(cfg):
        rungs.append(t.grace_period * t.reduction_factor ** len(rungs))
    return rungs


def _asha_max_t(cfg: Config) -> int:
    # Past the last step: ASHA stops any trial that reaches max_t, and a finished trial still has its probe.
    return cfg.optimization.total_steps + 1


def _scheduler(cfg: Config):
    if cfg.tune.grace_period == 0:
        return None
    from ray.tune.schedulers import ASHAScheduler

    # Time in pretraining steps (check_runnable keeps every rung before the last report).
    return ASHAScheduler(time_attr="step", metric="loss", mode="min", max_t=_asha_max_t(cfg),
                         grace_period=cfg.tune.grace_period, reduction_factor=cfg.tune.reduction_factor)


def _tuner(cfg: Config, axes: dict[str, list[Any]], mlflow: tracking.MlflowTarget | None):
    import ray
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(run_trial, base=to_dict(cfg), mlflow=mlflow),
                                    {"CPU": cfg.tune.driver_cpus})
    path = runs.run_dir(cfg)
    if tune.Tuner.can_restore(path):
        log.info("resuming the sweep in %s", path)
        # Finished trials keep their results; unfinished and errored ones run again.
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    concurrency = max_concurrent_trials(cfg, ray.cluster_resources())
    log.info("sweep %s: %d trials over %s; up to %d at a time; results in %s", cfg.meta.name,
             math.prod(len(v) for v in axes.values()), ", ".join(axes) or "no axes", concurrency, path)
    return tune.Tuner(
        trainable,
        param_space={"settings": {key: tune.grid_search(values) for key, values in axes.items()}},
        tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=concurrency, scheduler=_scheduler(cfg)),
        run_config=tune.RunConfig(name=cfg.meta.name, storage_path=runs.storage_path(cfg),
                                  failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures),
                                  callbacks=[ProgressLines()], verbose=0),
    )


def _row(cfg: Config, result, keys: list[str]) -> dict[str, Any]:
    metrics = result.metrics or {}
    settings = (result.config or {}).get("settings", {})
    trial_id = metrics.get("trial_id") or PurePosixPath(result.path).name
    if result.error is not None:
        status = "error"
    elif "probe_top1" in metrics:
        status = "finished"
    elif metrics.get("collapsed"):  # the trial's own last result (vjepa_ray.sweep.collapse)
        status = "collapsed"
    else:
        status = "stopped_early"
    trial_cfg = trial_config(cfg, settings)
    grid = token_grid(trial_cfg)
    fractions = [masked_fraction(m, grid) for m in trial_cfg.mask]
    row: dict[str, Any] = {"trial_id": trial_id, "status": status}
    row.update({key: settings.get(key) for key in keys})
    row["seed"] = trial_cfg.meta.seed
    row.update({f"mask.{i}.spatial_scale": m.spatial_scale for i, m in enumerate(trial_cfg.mask)})
    row["masked_fraction"] = round(sum(fractions) / len(fractions), 4)
    row["pretrain_steps"] = metrics.get("pretrain_steps", metrics.get("step"))
    row["loss"] = metrics.get("pretrain_loss", metrics.get("loss"))
    # The collapse monitor (train.metrics), so that a grid point's top-1 is not read off a collapsed encoder.
    row["target_feature_std"] = metrics.get("target_feature_std")
    for key in ("probe_top1", "probe_top1_inits", "probe_lr", "probe_weight_decay"):
        row[key] = metrics.get(key)
    row.update(metrics.get("probe_heads") or {})
    if result.error is not None:
        row["error"] = str(result.error).splitlines()[0][:300]
    return row


def check_runnable(cfg: Config) -> dict[str, list]:
    """What a sweep needs beyond the schema; raises ConfigError naming the key. Returns the sweep's axes."""
    axes = sweep_axes(cfg)
    check_axes(cfg, axes)
    pretraining.check_runnable(trial_config(cfg, {k: v[0] for k, v in axes.items()}))
    last_step, every = cfg.optimization.total_steps, cfg.logging.every_steps
    for rung in asha_rungs(cfg):
        # ASHA judges a rung at the first report at or past it; at the last report it would stop a trial
        # after all its pretraining and before its probe.
        if -(-rung // every) * every >= last_step:
            raise ConfigError("tune.grace_period", f"ASHA would compare trials at step {rung:g}, judged at the "
                              f"last report (step {last_step}); choose tune.grace_period and "
                              "tune.reduction_factor so that every rung (grace x factor^k) comes earlier")
    for key in ("train_manifest", "val_manifest"):
        if not getattr(cfg.probe, key):
            raise ConfigError(f"probe.{key}", "is empty: every trial ends with the probe, which needs labelled videos")
    return axes


def run(cfg: Config, mlflow: tracking.MlflowTarget | None = None) -> dict[str, Any]:
    """Runs (or resumes) the sweep; writes and returns its results (paths, best trial, counts).

    With ``mlflow`` the sweep is a parent run there and every trial a child run.
    """
    axes = check_runnable(cfg)
    # One driver per sweep folder (its trials' run folders lie in it).
    with RunLease(runs.run_dir(cfg)):
        return _sweep(cfg, axes, mlflow)


def _sweep(cfg: Config, axes, mlflow: tracking.MlflowTarget | None) -> dict[str, Any]:
    # Made here, once, rather than by trials racing each other to write them.
    prepare_demo_videos(cfg)
    prepare_probe_videos(cfg)
    cluster.connect(cfg)
    parent, trials_target = tracking.start_sweep(mlflow, cfg, runs.run_dir(cfg))
    grid = _tuner(cfg, axes, trials_target).fit()
    keys = grid_point_keys(axes)
    rows = sorted((_row(cfg, result, keys) for result in grid), key=lambda r: r["trial_id"])
    best = tables.best_row(rows)
    best_cfg = None
    if best is not None:
        settings = {key: best[key] for key in keys} | {SEED: best["seed"]}
        best_cfg = to_dict(trial_run_config(cfg, settings, best["trial_id"]))
    paths = tables.write_results(runs.run_dir(cfg), rows, keys, best_cfg)
    counts = {status: sum(r["status"] == status for r in rows)
              for status in ("finished", "stopped_early", "collapsed", "error")}
    summary = {"trials": len(rows), **counts, "best": best, "files": paths, "folder": runs.run_dir(cfg)}
    if parent is not None:
        summary["mlflow"] = tracking.finish_sweep(parent, {"trials": len(rows), **counts}, best, paths)
    return summary
