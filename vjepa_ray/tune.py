"""``python -m vjepa_ray.tune [--config FILE] [section.key=value ...]``: a Ray Tune sweep of V-JEPA runs.

Each trial is a short pretraining run (``vjepa_ray.pretrain.run``: a TorchTrainer with DeepSpeed, inside
the Tune trial, its reports forwarded to Tune) followed by the attentive probe on its frozen encoder, whose
whole learning-rate x weight-decay grid trains in one pass over the features. The grid of trials comes from
the ``tune`` section: ``mask_ratio`` (sets every mask config's spatial scale, see
``vjepa_ray.sweep.mask_ratio``), ``lr``, ``ema``, ``num_samples`` (repeats with other seeds) and ``space``
(any other key, e.g. ``mask.0.num_blocks``); ``probe_lr`` / ``probe_weight_decay`` set the probe grid.

ASHA (``tune.grace_period`` > 0) stops trials whose pretraining loss lags at the same step. Trials in
flight follow the cluster's resources unless ``tune.max_concurrent_trials`` says otherwise; a failed trial
runs again (``tune.max_failures``) and its pretraining resumes from its last checkpoint. Running the same
command again after the driver died resumes the sweep in ``<ray.storage_path>/<meta.name>``: finished
trials are kept, the others run (again). The table, the best trial and the plots land in that folder.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
from ray.tune import Callback

from vjepa_ray import cluster, pretrain
from vjepa_ray.cli import run_command
from vjepa_ray.config import Config, ConfigError, from_dict, to_dict
from vjepa_ray.sweep import results as tables
from vjepa_ray.sweep.mask_ratio import masked_fraction
from vjepa_ray.sweep.space import check_axes, sweep_axes, token_grid, trial_config

log = logging.getLogger("vjepa_ray.tune")

PROG = "python -m vjepa_ray.tune"
# Sub-folders of the sweep's folder (next to Tune's own files).
PRETRAIN_DIR = "pretrain"
STARTS_DIR = "trial_starts"


def sweep_dir(cfg: Config) -> str:
    """``<ray.storage_path>/<meta.name>``: Tune's experiment folder, which also holds the results."""
    return pretrain.run_dir(cfg)


def trial_run_config(base: Config, settings: dict[str, Any], trial_id: str) -> Config:
    """The config one trial pretrains with: its own run folder ``<sweep>/pretrain/<trial id>``."""
    cfg = trial_config(base, settings)
    cfg.ray.storage_path = f"{sweep_dir(base)}/{PRETRAIN_DIR}"
    cfg.meta.name = trial_id
    return cfg


# -- one trial (runs in a Tune trial actor) ------------------------------------------------------------------


def run_trial(config: dict[str, Any], base: dict[str, Any]) -> None:
    """A Tune function trainable: pretrain with the trial's settings, then probe the frozen encoder.

    ``config["settings"]`` is the trial's point of the grid; ``base`` the sweep's config (``to_dict``).
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    base_cfg = from_dict(base)
    settings = dict(config["settings"])
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_run_config(base_cfg, settings, trial_id)
    _record_start(sweep_dir(base_cfg), trial_id, settings)
    summary = pretrain.run(cfg, callbacks=[TuneReportCallback()])
    if summary["status"] != "finished":
        # Tune retries the trial (tune.max_failures); the retry resumes from the run's last checkpoint.
        raise RuntimeError(f"pretraining of trial {trial_id} failed: {summary['error']}")
    ray.tune.report(trial_result(summary, probe(cfg, summary["checkpoint"])))


def trial_result(summary: dict[str, Any], probes: dict[str, Any]) -> dict[str, Any]:
    """A trial's last result: its best probe, every probe's top-1, and the pretraining's outcome."""
    best = max(probes["probes"], key=lambda head: head["top1"])
    return {
        # Tune wants ASHA's metric in every result: the last pretraining report's step and loss again,
        # which ASHA has already weighed.
        "step": summary["steps"], "loss": summary["final_loss"],
        "probe_top1": best["top1"], "probe_lr": best["lr"], "probe_weight_decay": best["weight_decay"],
        "probe_heads": {tables.head_column(h["lr"], h["weight_decay"]): h["top1"] for h in probes["probes"]},
        "pretrain_steps": summary["steps"], "pretrain_loss": summary["final_loss"],
        "checkpoint": summary["checkpoint"],
    }


def probe(cfg: Config, checkpoint: str) -> dict[str, Any]:
    """The probe grid of ``cfg.probe`` on the EMA encoder of a training checkpoint (``evaluate.run``'s results:
    ``probes`` = ``[{lr, weight_decay, top1 (%)}, ...]``), on the workers the pretraining used."""
    from vjepa_ray import evaluate

    cfg = copy.deepcopy(cfg)
    cfg.probe.checkpoint, cfg.probe.checkpoint_key = checkpoint, "target_encoder"
    return evaluate.run(cfg)


def prepare_probe_videos(cfg: Config) -> None:
    """The demo's labelled set, written once where ``probe.train_manifest`` / ``val_manifest`` point."""
    count = cfg.tune.synthetic_probe_videos
    train, val = Path(cfg.probe.train_manifest).expanduser(), Path(cfg.probe.val_manifest).expanduser()
    if not count or (train.is_file() and val.is_file()):
        return
    if train.parent != val.parent or (train.name, val.name) != ("train.txt", "val.txt"):
        raise ConfigError("tune.synthetic_probe_videos", "needs probe.train_manifest and probe.val_manifest "
                          "to be train.txt and val.txt in one folder")
    from vjepa_ray.video.labelled_synthetic import make_labelled_motion_videos

    frames = cfg.data.frames_per_clip * cfg.data.frame_step
    made = make_labelled_motion_videos(train.parent, count, max(2, count // 4), frames=frames,
                                       size=cfg.data.crop_size, seed=cfg.meta.seed)
    print(f"generated {made.train_videos} + {made.val_videos} labelled demo videos in {train.parent}", flush=True)


def _record_start(folder: str, trial_id: str, settings: dict[str, Any]) -> None:
    """One file per start of a trial's driver: how often a trial ran is countable after the fact."""
    fs, base = _filesystem(f"{folder}/{STARTS_DIR}")
    fs.create_dir(base, recursive=True)
    with fs.open_output_stream(f"{base}/{trial_id}_{time.time_ns()}.json") as out:
        out.write(json.dumps({"trial_id": trial_id, "settings": settings, "time": time.time()}).encode())


def trial_starts(folder: str) -> dict[str, int]:
    """``{trial id: number of starts}`` recorded in a sweep's folder."""
    fs, base = _filesystem(f"{folder}/{STARTS_DIR}")
    counts: dict[str, int] = {}
    for info in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)):
        trial_id = info.base_name.rsplit("_", 1)[0]
        counts[trial_id] = counts.get(trial_id, 0) + 1
    return counts


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


# -- progress in the driver's output (the job logs under `ray job submit`) -----------------------------------


class ProgressLines(Callback):
    """One line per trial result, so the sweep's progress reads in the job logs."""

    def __init__(self):
        self.done = 0

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "probe_top1" in result:
            print(f"[tune] {trial.trial_id} probe top-1 {result['probe_top1']:.1f}% "
                  f"(probe lr {result['probe_lr']:g}, wd {result['probe_weight_decay']:g})", flush=True)
        elif "step" in result and "loss" in result:
            print(f"[tune] {trial.trial_id} step {result['step']} loss {result['loss']:.4f}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        top1 = trial.last_result.get("probe_top1")
        outcome = f"probe top-1 {top1:.1f}%" if top1 is not None else "stopped early (ASHA)"
        print(f"[tune] {trial.trial_id} done: {outcome}; {self.done} trial(s) done", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"[tune] {trial.trial_id} failed: {trial.error_file}", flush=True)


# -- the sweep (the driver) ----------------------------------------------------------------------------------


def max_concurrent_trials(cfg: Config, cluster: dict[str, float]) -> int:
    """``tune.max_concurrent_trials``, or as many trials as ``cluster``'s CPUs and GPUs hold at once.

    A trial holds its driver's CPUs, its workers' and, so that its video stream never starves, one decode
    task's (a trial whose workers took every CPU would wait forever for its data).
    """
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    workers = max(cfg.ray.num_workers) if isinstance(cfg.ray.num_workers, (list, tuple)) else cfg.ray.num_workers
    per_trial = cfg.tune.driver_cpus + workers * cfg.ray.cpus_per_worker + cfg.data.decode_cpus
    fits = [cluster.get("CPU", 0.0) // per_trial]
    if cfg.ray.use_gpu:
        fits.append(cluster.get("GPU", 0.0) // workers)
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


def _tuner(cfg: Config, axes: dict[str, list[Any]]):
    import ray
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(run_trial, base=to_dict(cfg)),
                                    {"CPU": cfg.tune.driver_cpus})
    path = sweep_dir(cfg)
    if tune.Tuner.can_restore(path):
        print(f"resuming the sweep in {path}", flush=True)
        # Finished trials keep their results; unfinished and errored ones run again.
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    concurrency = max_concurrent_trials(cfg, ray.cluster_resources())
    print(f"sweep {cfg.meta.name}: {math.prod(len(v) for v in axes.values())} trials over "
          f"{', '.join(axes) or 'no axes'}; up to {concurrency} at a time; results in {path}", flush=True)
    return tune.Tuner(
        trainable,
        param_space={"settings": {key: tune.grid_search(values) for key, values in axes.items()}},
        tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=concurrency, scheduler=_scheduler(cfg)),
        run_config=tune.RunConfig(name=cfg.meta.name, storage_path=pretrain.storage_path(cfg),
                                  failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures),
                                  callbacks=[ProgressLines()], verbose=0),
    )


def _row(cfg: Config, result, axes: dict[str, list[Any]]) -> dict[str, Any]:
    metrics = result.metrics or {}
    settings = (result.config or {}).get("settings", {})
    trial_id = metrics.get("trial_id") or Path(result.path).name
    if result.error is not None:
        status = "error"
    elif "probe_top1" in metrics:
        status = "finished"
    else:
        status = "stopped_early"
    trial_cfg = trial_config(cfg, settings)
    grid = token_grid(trial_cfg)
    fractions = [masked_fraction(m, grid) for m in trial_cfg.mask]
    row: dict[str, Any] = {"trial_id": trial_id, "status": status}
    row.update({key: settings.get(key) for key in axes})
    row.update({f"mask.{i}.spatial_scale": m.spatial_scale for i, m in enumerate(trial_cfg.mask)})
    row["masked_fraction"] = round(sum(fractions) / len(fractions), 4)
    row["pretrain_steps"] = metrics.get("pretrain_steps", metrics.get("step"))
    row["loss"] = metrics.get("pretrain_loss", metrics.get("loss"))
    for key in ("probe_top1", "probe_lr", "probe_weight_decay"):
        row[key] = metrics.get(key)
    row.update(metrics.get("probe_heads") or {})
    if result.error is not None:
        row["error"] = str(result.error).splitlines()[0][:300]
    return row


def check_runnable(cfg: Config) -> dict[str, list]:
    """What a sweep needs beyond the schema; raises ConfigError naming the key. Returns the sweep's axes."""
    axes = sweep_axes(cfg)
    check_axes(cfg, axes)
    pretrain.check_runnable(trial_config(cfg, {k: v[0] for k, v in axes.items()}))
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


def run(cfg: Config) -> dict[str, Any]:
    """Runs (or resumes) the sweep; writes and returns its results (paths, best trial, counts)."""
    axes = check_runnable(cfg)
    # Made here, once, rather than by trials racing each other to write them.
    pretrain.prepare_demo_videos(cfg)
    prepare_probe_videos(cfg)
    cluster.connect(cfg)
    grid = _tuner(cfg, axes).fit()
    rows = sorted((_row(cfg, result, axes) for result in grid), key=lambda r: r["trial_id"])
    best = tables.best_row(rows)
    best_cfg = None
    if best is not None:
        settings = {key: best[key] for key in axes}
        best_cfg = to_dict(trial_run_config(cfg, settings, best["trial_id"]))
    paths = tables.write_results(sweep_dir(cfg), rows, list(axes), best_cfg)
    counts = {status: sum(r["status"] == status for r in rows) for status in ("finished", "stopped_early", "error")}
    return {"trials": len(rows), **counts, "best": best, "files": paths, "folder": sweep_dir(cfg)}


def main(argv: list[str] | None = None) -> int:
    summary = run_command(PROG, __doc__.splitlines()[0], argv, check_runnable, run)
    print(f"{summary['trials']} trials: {summary['finished']} finished, {summary['stopped_early']} stopped early, "
          f"{summary['error']} failed")
    best = summary["best"]
    if best is not None:
        print(f"best: {best['trial_id']} probe top-1 {best['probe_top1']:.1f}% "
              f"(probe lr {best['probe_lr']:g}, wd {best['probe_weight_decay']:g})")
    print(f"results: {summary['files']['results.csv']}")
    return 0 if summary["error"] == 0 else 1


if __name__ == "__main__":
    # Run through the package module so pickled functions and callbacks name `vjepa_ray.tune`, not
    # `__main__` (Tune stores them with the experiment and a resumed sweep loads them back).
    from vjepa_ray.tune import main as _main

    raise SystemExit(_main())
