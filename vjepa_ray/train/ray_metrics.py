"""Pretraining's key figures as Ray metrics (``ray.util.metrics``), for a cluster's Prometheus and Grafana.

Every ``ray.train.report`` of rank 0 (group-wide values: the loop all-reduces them) sets one gauge per
figure, from the Train controller: it outlives the worker groups of a run, so the last values stay exported
across a restart. The run's ``RunTracker`` (``vjepa_ray.train.driver``), which counts the starts of the
worker group, sets the restarts gauge. Each gauge carries the run's name (``meta.name``) as tag ``run``;
Prometheus sees a metric ``name`` as ``ray_<name>``, and ``cluster_configs/grafana/vjepa_train_dashboard.json``
has one panel per metric. Exporting never fails a run: when Ray's metrics do not work, one warning and no more.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.train import UserCallback

log = logging.getLogger(__name__)

RUN_TAG = "run"

# Ray metric name -> (key of rank 0's report, description).
REPORTED: dict[str, tuple[str, str]] = {
    "vjepa_train_loss": ("loss", "Pretraining loss, mean over the last logging interval"),
    "vjepa_train_clips_per_s": ("clips_per_s", "Clips trained per second by the whole worker group"),
    "vjepa_train_data_wait_share": ("data_wait_share", "Share of the last interval the workers waited for data"),
    "vjepa_train_target_feature_std": (
        "target_feature_std", "Spread of the target features, the collapse monitor (low: collapse)"),
    "vjepa_train_lr": ("lr", "Learning rate"),
    "vjepa_train_step": ("step", "Optimizer steps done"),
    "vjepa_train_skipped_videos": ("skipped_videos", "Unreadable videos skipped so far"),
}
RESTARTS = "vjepa_train_restarts"
RESTARTS_DESCRIPTION = "Restarts of the worker group in this run (failures, lost nodes, elastic resizes)"
METRIC_NAMES: tuple[str, ...] = (*REPORTED, RESTARTS)


def prometheus_name(name: str) -> str:
    """The name Prometheus (and so Grafana) sees for Ray metric ``name``."""
    return f"ray_{name}"


class RunGauges:
    """Gauges tagged with one run's name, created on first use in the process that sets them.

    A failure (Ray's metrics unavailable, a bad value) logs one warning and turns them off: a run never stops
    for its metrics.
    """

    def __init__(self, run_name: str, descriptions: dict[str, str]):
        self.run_name = run_name
        self.descriptions = descriptions
        self._gauges: dict[str, Any] | None = None
        self._off = False

    def set(self, values: dict[str, float]) -> None:
        if self._off:
            return
        try:
            if self._gauges is None:
                from ray.util.metrics import Gauge

                self._gauges = {name: Gauge(name, description, tag_keys=(RUN_TAG,))
                                for name, description in self.descriptions.items()}
            for name, value in values.items():
                self._gauges[name].set(value, tags={RUN_TAG: self.run_name})
        except Exception as err:  # noqa: BLE001 - whatever breaks in the metrics, training goes on
            self._off = True
            log.warning("Ray metrics of run %s are off: %s", self.run_name, err)

    def __getstate__(self) -> dict[str, Any]:
        # Travels to the process that sets them (the Train controller, the tracker actor): gauges are made there.
        return {**self.__dict__, "_gauges": None}


def restarts_gauge(run_name: str) -> RunGauges:
    """The gauge of ``RESTARTS``, set by whoever counts the starts of the run's worker group."""
    return RunGauges(run_name, {RESTARTS: RESTARTS_DESCRIPTION})


class RayMetricsCallback(UserCallback):
    """Sets the reported gauges from rank 0's metrics of every ``ray.train.report`` (on the Train controller)."""

    def __init__(self, run_name: str):
        self.gauges = RunGauges(run_name, {name: description for name, (_, description) in REPORTED.items()})

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if not metrics:
            return
        values = {name: float(metrics[0][key]) for name, (key, _) in REPORTED.items()
                  if isinstance(metrics[0].get(key), (int, float))}
        if values:
            self.gauges.set(values)
