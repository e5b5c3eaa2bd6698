"""One trial of a sweep, in its Tune trial actor: pretrain with the trial's settings, then probe the encoder.
A trial whose target collapses ends at that report, without a probe (``vjepa_ray.sweep.collapse``).

A trial's pretraining is a run of its own, ``<sweep folder>/pretrain/<trial id>`` (its checkpoints,
summary.json and probe_results.json); every start of a trial leaves a file in ``<sweep folder>/trial_starts``.
"""

from __future__ import annotations

import copy
import json
import time
from typing import Any

from vjepa_ray import runs, tracking
from vjepa_ray.config import Config, from_dict
from vjepa_ray.eval import driver as evaluation
from vjepa_ray.sweep.collapse import CollapseStop
from vjepa_ray.sweep.results import head_column
from vjepa_ray.sweep.space import trial_config
from vjepa_ray.train import driver as pretraining


def trial_run_config(base: Config, settings: dict[str, Any], trial_id: str) -> Config:
    """The config one trial pretrains with: its own run folder ``<sweep>/pretrain/<trial id>``."""
    cfg = trial_config(base, settings)
    cfg.ray.storage_path = runs.join(runs.run_dir(base), runs.TRIALS_DIR)
    cfg.meta.name = trial_id
    return cfg


def run_trial(config: dict[str, Any], base: dict[str, Any], mlflow: tracking.MlflowTarget | None = None) -> None:
    """A Tune function trainable: pretrain with the trial's settings, then probe the frozen encoder.

    ``config["settings"]`` is the trial's point of the grid; ``base`` the sweep's config (``to_dict``);
    ``mlflow`` the sweep's parent run, under which the trial logs its settings, curves, probe top-1s and
    whether it collapsed. Every trial ends by returning (a collapsed one too, with its last result saying
    so): Tune never has to stop one mid-run, which would leave its Train run's resources held.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    base_cfg = from_dict(base)
    settings = dict(config["settings"])
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_run_config(base_cfg, settings, trial_id)
    record_start(runs.run_dir(base_cfg), trial_id, settings)
    tracked = tracking.MlflowRun(mlflow, trial_id, params=settings) if mlflow is not None else None
    patience = cfg.tune.collapse_patience
    stops = [CollapseStop(cfg.logging.collapse_std_threshold, patience)] if patience else []
    # The sweep's driver holds the lease of the folder the trial's run folder lies in.
    summary = pretraining.run(cfg, callbacks=[TuneReportCallback(), *stops], mlflow=tracked, hold_lease=False)
    if summary["error_kind"] == "stopped":  # the collapse stop: the only stop a trial's run is given
        if tracked is not None:
            tracked.log_metrics({"collapsed": 1}, summary["steps"])
            tracked.finish("KILLED")
        ray.tune.report(collapsed_result(summary))
        return
    if summary["status"] != "finished":
        if tracked is not None:
            tracked.finish("FAILED")
        # Tune retries the trial (tune.max_failures); the retry resumes from the run's last checkpoint.
        raise RuntimeError(f"pretraining of trial {trial_id} failed: {summary['error']}")
    probes = evaluate_encoder(cfg, summary["checkpoint"])
    if tracked is not None:
        tracked.log_metrics({**tracking.probe_metrics(probes["probes"]), "collapsed": 0}, summary["steps"])
        tracked.finish("FINISHED")
    ray.tune.report(trial_result(summary, probes))


def trial_result(summary: dict[str, Any], probes: dict[str, Any]) -> dict[str, Any]:
    """A finished trial's last result: its best probe grid point, every point's top-1, and the pretraining's
    outcome."""
    best = max(probes["probes"], key=lambda head: head["top1"])
    return {
        **pretraining_outcome(summary), "collapsed": False,
        "probe_top1": best["top1"], "probe_lr": best["lr"], "probe_weight_decay": best["weight_decay"],
        # The best point's initialisations (probe.num_inits), whose mean probe_top1 is: a probe's own spread.
        "probe_top1_inits": best.get("top1_inits"),
        "probe_heads": {head_column(h["lr"], h["weight_decay"]): h["top1"] for h in probes["probes"]},
    }


def collapsed_result(summary: dict[str, Any]) -> dict[str, Any]:
    """The last result of a trial whose target collapsed: the pretraining's outcome at the report it ended at."""
    return {**pretraining_outcome(summary), "collapsed": True}


def pretraining_outcome(summary: dict[str, Any]) -> dict[str, Any]:
    """What a trial's last result says of its pretraining (``summary``): its steps, loss, the collapse monitor
    of its last report and its checkpoint."""
    return {
        # Tune wants ASHA's metric in every result: the last pretraining report's step and loss again,
        # which ASHA has already weighed.
        "step": summary["steps"], "loss": summary["final_loss"],
        "pretrain_steps": summary["steps"], "pretrain_loss": summary["final_loss"],
        "target_feature_std": summary["metrics"].get("target_feature_std"),
        "checkpoint": summary["checkpoint"],
    }


def evaluate_encoder(cfg: Config, checkpoint: str) -> dict[str, Any]:
    """The probe grid of ``cfg.probe`` on the EMA encoder of a training checkpoint (the evaluation's results:
    ``probes`` = ``[{lr, weight_decay, top1 (%)}, ...]``), on the workers the pretraining used."""
    cfg = copy.deepcopy(cfg)
    cfg.probe.checkpoint, cfg.probe.checkpoint_key = checkpoint, "target_encoder"
    return evaluation.run(cfg)


def record_start(folder: str, trial_id: str, settings: dict[str, Any]) -> None:
    """One file per start of a trial's driver: how often a trial ran is countable after the fact."""
    runs.write_bytes(runs.join(folder, runs.TRIAL_STARTS_DIR, f"{trial_id}_{time.time_ns()}.json"),
                     json.dumps({"trial_id": trial_id, "settings": settings, "time": time.time()}).encode())


def trial_starts(folder: str) -> dict[str, int]:
    """``{trial id: number of starts}`` recorded in a sweep's folder."""
    counts: dict[str, int] = {}
    for name in runs.list_names(runs.join(folder, runs.TRIAL_STARTS_DIR)):
        trial_id = name.rsplit("_", 1)[0]
        counts[trial_id] = counts.get(trial_id, 0) + 1
    return counts
