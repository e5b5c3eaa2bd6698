"""Ray metrics of pretraining: which report keys set which gauges, a broken metrics backend never stops a run,
and the Grafana dashboard charts exactly the exported metrics. (The export itself, read back from a node's
metrics agent during a run: ``test_train_e2e.py``.)"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from vjepa_ray.train import ray_metrics
from vjepa_ray.train.ray_metrics import METRIC_NAMES, REPORTED, RESTARTS, RayMetricsCallback, prometheus_name

DASHBOARD = Path(__file__).resolve().parents[1] / "cluster_configs" / "grafana" / "vjepa_train_dashboard.json"


class RecordingGauge:
    """Stands in for ``ray.util.metrics.Gauge``: keeps what was set."""

    made: dict[str, RecordingGauge] = {}

    def __init__(self, name: str, description: str = "", tag_keys: tuple[str, ...] = ()):
        self.name, self.tag_keys, self.values = name, tag_keys, []
        RecordingGauge.made[name] = self

    def set(self, value: float, tags: dict[str, str]) -> None:
        self.values.append((value, tags))


class BrokenGauge:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("no metrics agent")


def test_a_report_sets_one_gauge_per_figure_tagged_with_the_run(monkeypatch):
    monkeypatch.setattr("ray.util.metrics.Gauge", RecordingGauge)
    RecordingGauge.made = {}
    report = {"loss": 0.5, "clips_per_s": 12.0, "data_wait_share": 0.25, "target_feature_std": 0.8, "lr": 1e-4,
              "step": 6, "skipped_videos": 2, "wd": 0.04, "restored_state_digest": "abc"}
    callback = RayMetricsCallback("run_a")
    callback.after_report(None, [report], None)
    callback.after_report(None, [{**report, "loss": 0.4, "step": 8}], None)

    assert set(RecordingGauge.made) == set(REPORTED)  # made once, not per report
    for name, (key, _) in REPORTED.items():
        gauge = RecordingGauge.made[name]
        assert gauge.tag_keys == (ray_metrics.RUN_TAG,)
        assert gauge.values[0] == (float(report[key]), {"run": "run_a"})
    assert RecordingGauge.made["vjepa_train_loss"].values[1][0] == 0.4
    assert RecordingGauge.made["vjepa_train_step"].values[1][0] == 8.0


def test_restarts_gauge_counts_what_it_is_given(monkeypatch):
    monkeypatch.setattr("ray.util.metrics.Gauge", RecordingGauge)
    RecordingGauge.made = {}
    gauge = ray_metrics.restarts_gauge("run_b")
    gauge.set({RESTARTS: 0})
    gauge.set({RESTARTS: 1})
    assert RecordingGauge.made[RESTARTS].values == [(0, {"run": "run_b"}), (1, {"run": "run_b"})]


def test_unavailable_metrics_warn_once_and_training_goes_on(monkeypatch, caplog):
    monkeypatch.setattr("ray.util.metrics.Gauge", BrokenGauge)
    callback = RayMetricsCallback("run_c")
    with caplog.at_level(logging.WARNING, logger=ray_metrics.__name__):
        for step in range(3):
            callback.after_report(None, [{"loss": 1.0, "step": step}], None)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "run_c" in warnings[0] and "no metrics agent" in warnings[0]


def test_the_callback_travels_without_its_gauges(monkeypatch):
    import pickle

    monkeypatch.setattr("ray.util.metrics.Gauge", RecordingGauge)
    callback = RayMetricsCallback("run_d")
    callback.after_report(None, [{"loss": 1.0}], None)
    copy = pickle.loads(pickle.dumps(callback))
    assert copy.gauges.run_name == "run_d" and copy.gauges._gauges is None


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_the_grafana_dashboard_has_one_panel_per_metric_filtered_by_run(dashboard):
    exported = {prometheus_name(name) for name in METRIC_NAMES}
    charted = []
    for panel in dashboard["panels"]:
        (target,) = panel["targets"]
        names = set(re.findall(r"\bray_vjepa_\w+", target["expr"]))
        assert len(names) == 1, target["expr"]
        assert '{run=~"$run"}' in target["expr"]
        charted.extend(names)
    assert sorted(charted) == sorted(exported)  # each metric exactly once
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])

    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    run_values = re.fullmatch(r"label_values\((\w+), run\)", variables["run"]["query"]["query"])
    assert run_values and run_values.group(1) in exported
