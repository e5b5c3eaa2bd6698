"""MLflow tracking without Ray: what a run logs, where the server comes from, and an unreachable server.

The logger runs in this process here (in a run it is a Ray actor); ``test_tune_sweep.py`` checks the runs
a sweep leaves on a real server, ``test_mlflow_ui.py`` the same in the MLflow UI.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time

import pytest
from conftest import _free_port, mlflow_api

from vjepa_ray import pretrain, tracking
from vjepa_ray.config import builtin_config_path, load_config, to_dict


def test_config_flattens_into_dot_key_params():
    cfg = load_config(builtin_config_path("local_demo"), ["optimization.lr=0.002", "mask.1.num_blocks=3"])
    params = tracking.flatten(to_dict(cfg))
    assert params["optimization.lr"] == "0.002" and params["mask.1.num_blocks"] == "3"
    assert params["mask.0.spatial_scale"] == str(cfg.mask[0].spatial_scale)
    assert params["data.paths"] == f'["{cfg.data.paths[0]}"]' and params["ray.worker_resources"] == "{}"
    assert all(isinstance(v, str) for v in params.values())


def test_only_finite_numbers_become_metrics():
    report = {"loss": 0.5, "step": 10, "restored_state_digest": "ab12", "flag": True, "grad_norm": math.nan}
    assert tracking.scalars(report) == {"loss": 0.5, "step": 10.0}


def test_probe_grid_becomes_the_best_top1_and_one_metric_per_head():
    probes = [{"lr": 3e-3, "weight_decay": 0.01, "top1": 40.0}, {"lr": 1e-3, "weight_decay": 0.01, "top1": 55.0}]
    assert tracking.probe_metrics(probes) == {"probe_top1": 55.0, "probe_top1/lr_0.003_wd_0.01": 40.0,
                                              "probe_top1/lr_0.001_wd_0.01": 55.0}


def test_server_comes_from_the_key_then_the_environment(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.target_from_command(load_config(builtin_config_path("local_demo"))) is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    cfg = load_config(builtin_config_path("local_demo"))
    assert tracking.target_from_command(cfg) == tracking.MlflowTarget("http://env:5000", "vjepa_local_demo")
    cfg = load_config(builtin_config_path("local_demo"),
                      ["logging.mlflow_uri=http://key:5000", "logging.mlflow_experiment=demo"])
    assert tracking.target_from_command(cfg) == tracking.MlflowTarget("http://key:5000", "demo")


def test_server_without_mlflow_installed_exits_2_naming_the_key(monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else
                        real_find_spec(name, *a))
    with pytest.raises(SystemExit) as exited:
        pretrain.main(["logging.mlflow_uri=http://127.0.0.1:5000"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "config error: logging.mlflow_uri: http://127.0.0.1:5000 needs the mlflow package" in err[0]


@pytest.fixture
def bounded_http(monkeypatch):
    """The logger's own request limits, set here as its actor's process sets them (without leaking)."""
    for key, value in tracking.HTTP_ENV.items():
        monkeypatch.setenv(key, value)


def test_unreachable_server_warns_once_counts_what_was_not_logged_and_costs_little(bounded_http, tmp_path,
                                                                                   caplog):
    pytest.importorskip("mlflow")
    target = tracking.MlflowTarget(f"http://127.0.0.1:{_free_port()}", "nowhere")  # a closed loopback port
    started = time.monotonic()
    logger = tracking.RunLogger(target, str(tmp_path / "run"), "run", {"a": "1", "b": "2"})
    with caplog.at_level(logging.WARNING, logger="vjepa_ray.tracking"):
        for step in range(20):
            logger.log_metrics({"loss": 1.0 / (step + 1)}, step)
        logger.log_artifact("summary.json", b"{}")
        outcome = logger.finish("FINISHED")
    assert time.monotonic() - started < 10
    assert outcome["run_id"] is None and "127.0.0.1" in outcome["error"]
    assert outcome["not_logged"] == {"metric_reports": 20, "artifacts": 1, "run": 1, "params": 2}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot be reached" in warnings[0].getMessage()
    assert not (tmp_path / "run" / tracking.RUN_ID_FILE).exists()


@pytest.mark.slow
def test_restart_in_the_same_run_folder_continues_the_same_mlflow_run(mlflow_server, bounded_http, tmp_path):
    target = tracking.MlflowTarget(mlflow_server, "restarts")
    first = tracking.RunLogger(target, str(tmp_path), "run", {"optimization.lr": "0.001", "meta.seed": "0"})
    first.log_metrics({"loss": 2.0}, 10)
    assert first.finish("FAILED")["not_logged"] == {}
    second = tracking.RunLogger(target, str(tmp_path), "run",
                                {"optimization.lr": "0.001", "meta.seed": "1", "ray.num_workers": "2"})
    second.log_metrics({"loss": 1.0}, 20)
    outcome = second.finish("FINISHED")
    assert outcome["run_id"] == first.run_id == (tmp_path / tracking.RUN_ID_FILE).read_text()
    # A parameter keeps its first value; one new at the restart is added.
    assert outcome["not_logged"] == {"params": 1}
    run = mlflow_api(mlflow_server, "runs/get", run_id=first.run_id)["run"]
    assert run["info"]["status"] == "FINISHED"
    assert {p["key"]: p["value"] for p in run["data"]["params"]} == {
        "optimization.lr": "0.001", "meta.seed": "0", "ray.num_workers": "2"}
    history = mlflow_api(mlflow_server, "metrics/get-history", run_id=first.run_id, metric_key="loss")["metrics"]
    assert sorted((m["step"], m["value"]) for m in history) == [(10, 2.0), (20, 1.0)]
    experiments = mlflow_api(mlflow_server, "experiments/search", {"max_results": 100})["experiments"]
    assert [e["name"] for e in experiments].count("restarts") == 1
