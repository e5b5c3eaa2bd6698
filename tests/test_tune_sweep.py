"""Ray Tune sweeps end to end: short pretraining trials on Ray Train, then the probe, on this machine.

Both tests use jobs/tune_demo.yaml cut down to a few steps and one seed per grid point (conftest's
``sweep_overrides``); every trial pretrains the demo's encoder on one CPU worker (DeepSpeed, a Ray Data video
stream) and trains a probe grid on a tiny labelled synthetic set. The 4-trial sweep (conftest's
``tracked_sweep``) is also tracked on an MLflow server, checked here over its REST API.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from conftest import mlflow_api, sweep_overrides, write_sweep_data

from vjepa_ray.config import load_config
from vjepa_ray.sweep.trial import trial_starts

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_four_trial_sweep_writes_table_best_and_plots_and_ends_collapsed_trials(tracked_sweep):
    cfg, summary, folder = tracked_sweep.cfg, tracked_sweep.summary, tracked_sweep.folder
    assert summary["folder"] == str(folder)
    with open(folder / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == summary["trials"] == 4
    # The grid: 2 mask ratios x 2 learning rates, each trial once. At lr 1e-3 each pretrained to the end and
    # probed; at lr 3 the target collapsed and the collapse stop ended the trial at its first report under the
    # threshold (step 4 of 6), before its probe.
    settings = {(float(r["mask_ratio"]), float(r["optimization.lr"])) for r in rows}
    assert settings == {(0.5, 1e-3), (0.5, 3.0), (0.8, 1e-3), (0.8, 3.0)}
    finished = [r for r in rows if float(r["optimization.lr"]) == 1e-3]
    collapsed = [r for r in rows if float(r["optimization.lr"]) == 3.0]
    assert (summary["finished"], summary["collapsed"], summary["stopped_early"], summary["error"]) == (2, 2, 0, 0)
    assert all(r["status"] == "finished" and int(r["pretrain_steps"]) == 6 for r in finished)
    threshold = cfg.logging.collapse_std_threshold
    for row in collapsed:
        assert row["status"] == "collapsed" and int(row["pretrain_steps"]) == 4 and row["probe_top1"] == ""
        assert float(row["target_feature_std"]) < threshold
    assert all(float(r["target_feature_std"]) > threshold for r in finished)
    # A higher ratio masks more: its mask configs got larger spatial scales.
    for lr in (1e-3, 3.0):
        low, high = (next(r for r in rows if float(r["mask_ratio"]) == m and float(r["optimization.lr"]) == lr)
                     for m in (0.5, 0.8))
        assert float(high["masked_fraction"]) > float(low["masked_fraction"])
        assert json.loads(high["mask.1.spatial_scale"])[0] > json.loads(low["mask.1.spatial_scale"])[0]
    # Every finished trial trained the whole probe grid in its one probe pass; top-1 is a percentage.
    heads = [c for c in rows[0] if c.startswith("top1[")]
    assert len(heads) == len(cfg.tune.probe_lr) * len(cfg.tune.probe_weight_decay) > 1
    for row in finished:
        top1 = [float(row[h]) for h in heads]
        assert all(0.0 <= t <= 100.0 for t in top1) and float(row["probe_top1"]) == max(top1)
        # The demo's grid points each average several probe initialisations; the row keeps each one's top-1.
        inits = json.loads(row["probe_top1_inits"])
        assert len(inits) == cfg.probe.num_inits > 1
        assert float(row["probe_top1"]) == pytest.approx(sum(inits) / len(inits), abs=1e-3)
    # Four distinct results: distinct (settings, pretraining loss) per trial; each with its seed.
    assert len({(r["mask_ratio"], r["optimization.lr"], r["loss"]) for r in rows}) == 4
    assert len({r["loss"] for r in rows}) == 4
    assert all(int(r["seed"]) == cfg.meta.seed for r in rows)
    # One seed per grid point: the summary has a row per trial, its mean the trial's top-1 and no std; a
    # collapsed point keeps its row, with no top-1 and its trial counted as collapsed.
    with open(folder / "summary.csv") as f:
        summary_rows = list(csv.DictReader(f))
    assert list(summary_rows[0]) == ["mask_ratio", "optimization.lr", "top1_mean", "top1_std", "n", "collapsed"]
    by_point = {(float(r["mask_ratio"]), float(r["optimization.lr"])): r for r in summary_rows}
    assert set(by_point) == settings
    for row in rows:
        point = by_point[float(row["mask_ratio"]), float(row["optimization.lr"])]
        expected = (row["probe_top1"], "", "1", "0") if row in finished else ("", "", "0", "1")
        assert (point["top1_mean"], point["top1_std"], point["n"], point["collapsed"]) == expected

    table = json.loads((folder / "results.json").read_text())
    assert sorted(r["trial_id"] for r in table) == sorted(r["trial_id"] for r in rows)
    best = json.loads((folder / "best.json").read_text())
    assert best["trial"]["probe_top1"] == max(float(r["probe_top1"]) for r in finished)
    assert best["config"]["meta"]["name"] == best["trial"]["trial_id"]
    for name in ("top1_vs_mask_ratio.png", "top1_vs_probe_lr.png"):
        data = (folder / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE and 10_000 < len(data) < 2_000_000
    # Every trial ran once: a collapsed trial ends like a finished one, not as a failure Tune retries.
    assert trial_starts(str(folder)) == {r["trial_id"]: 1 for r in rows}
    check_mlflow_runs(tracked_sweep.mlflow_uri, tracked_sweep.experiment, finished, collapsed, summary, len(heads))


def test_sweep_returns_with_every_placement_group_it_made_removed_and_the_cpus_free(tracked_sweep, ray_local):
    # A trial stopped mid-run by Tune left its Train workers' placement group holding the shared cluster's CPUs
    # for the rest of the session, and the next Ray Train test waited for them. The sweep made the Tune trials'
    # groups and, inside them, their Train runs' (one per trial here, collapsed ones included).
    made = tracked_sweep.placement_groups
    assert len(made) >= 2 * tracked_sweep.summary["trials"]
    assert set(made.values()) == {"REMOVED"}
    assert [pg for pg in ray_local.util.placement_group_table().values() if pg["state"] != "REMOVED"] == []
    assert ray_local.available_resources().get("CPU") == ray_local.cluster_resources()["CPU"]


def check_mlflow_runs(uri: str, experiment: dict, finished: list[dict], collapsed: list[dict], summary: dict,
                      probes: int) -> None:
    """The sweep as the server holds it: a finished parent run with the results, one child per trial with its
    settings, its loss curve and its collapse flag; the finished trials' children finished, with their probe
    top-1s; the collapsed trials' children ended as killed at the report that stopped them."""
    found = mlflow_api(uri, "runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                            "max_results": 100})["runs"]
    parent_of = {run["info"]["run_id"]: {t["key"]: t["value"] for t in run["data"].get("tags", [])}
                 .get("mlflow.parentRunId") for run in found}
    (parent,) = [run for run in found if parent_of[run["info"]["run_id"]] is None]
    children = [run for run in found if parent_of[run["info"]["run_id"]] == parent["info"]["run_id"]]
    assert len(found) == 5 and len(children) == 4
    assert summary["mlflow"]["run_id"] == parent["info"]["run_id"] and summary["mlflow"]["not_logged"] == {}
    assert parent["info"]["run_name"] == experiment["name"] and parent["info"]["status"] == "FINISHED"
    parent_metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    assert parent_metrics["probe_top1"] == max(float(r["probe_top1"]) for r in finished)
    assert (parent_metrics["trials"], parent_metrics["finished"], parent_metrics["collapsed"]) == (4, 2, 2)
    parent_files = {f["path"] for f in mlflow_api(uri, "artifacts/list", run_id=parent["info"]["run_id"])["files"]}
    assert {"results.csv", "best.json", "top1_vs_mask_ratio.png"} <= parent_files

    by_trial = {r["trial_id"]: r for r in finished + collapsed}
    assert {run["info"]["run_name"] for run in children} == set(by_trial)
    for run in children:
        row, run_id = by_trial[run["info"]["run_name"]], run["info"]["run_id"]
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        # The trial's settings, and its resolved config with them applied.
        assert float(params["mask_ratio"]) == float(row["mask_ratio"])
        assert float(params["optimization.lr"]) == float(row["optimization.lr"])
        assert params["meta.name"] == row["trial_id"] and params["mask.1.spatial_scale"] == row["mask.1.spatial_scale"]
        # The pretraining curve: a loss at every report (every 2 steps), up to the one the trial ended at.
        history = mlflow_api(uri, "metrics/get-history", run_id=run_id, metric_key="loss")["metrics"]
        assert sorted(m["step"] for m in history) == list(range(2, int(row["pretrain_steps"]) + 1, 2))
        assert max(history, key=lambda m: m["step"])["value"] == pytest.approx(float(row["loss"]))
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert {"lr", "clips_per_s", "target_feature_std"} <= set(metrics)
        files = {f["path"] for f in mlflow_api(uri, "artifacts/list", run_id=run_id)["files"]}
        assert files == {"summary.json"}
        heads = {key: value for key, value in metrics.items() if key.startswith("probe_top1")}
        if row in collapsed:
            assert (run["info"]["status"], metrics["collapsed"], heads) == ("KILLED", 1.0, {})
            continue
        assert (run["info"]["status"], metrics["collapsed"]) == ("FINISHED", 0.0)
        assert heads.pop("probe_top1") == float(row["probe_top1"])
        assert sorted(heads.values()) == sorted(float(v) for k, v in row.items() if k.startswith("top1["))
        assert len(heads) == probes


def _ray_processes(temp_root: str) -> list[psutil.Process]:
    """This test's Ray processes: every one names the cluster's temp dir on its command line."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_root in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _finished_trials(folder: Path) -> set[str]:
    """Trials the experiment state on disk records as terminated (what a restore will not run again)."""
    done = set()
    for state in folder.glob("experiment_state-*.json"):
        try:
            trials = json.loads(state.read_text())["trial_data"]
        except (ValueError, KeyError, OSError):
            continue  # being rewritten
        for trial_json, _ in trials:
            trial = json.loads(trial_json)
            if trial.get("status") == "TERMINATED":
                done.add(trial["trial_id"])
    return done


def test_killed_sweep_driver_resumes_without_rerunning_finished_trials(tmp_path):
    # Its own cluster, started by the CLI (ray.address=local) under a temp dir of its own, so the test can
    # find and end exactly its processes.
    temp_root = tempfile.mkdtemp(prefix="vjt", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=temp_root, PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "vjepa_ray.tune", "--config", str(REPO / "jobs" / "tune_demo.yaml"),
               *sweep_overrides(tmp_path, "resumed", "ray.address=local", "tune.lr=[1e-3]",
                                "tune.max_concurrent_trials=1")]
    write_sweep_data(tmp_path, load_config(REPO / "jobs" / "tune_demo.yaml", command[5:]))
    folder = tmp_path / "runs" / "resumed"
    first = None
    try:
        with open(tmp_path / "first.log", "w") as log:
            first = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
            deadline = time.monotonic() + 1500  # a hang guard: a trial takes ~1 min on an idle 2-core machine
            while not _finished_trials(folder) and first.poll() is None and time.monotonic() < deadline:
                time.sleep(2)
            assert first.poll() is None, "the sweep ended before it could be killed: see first.log"
            finished_before = _finished_trials(folder)
            assert len(finished_before) == 1, f"no trial finished in time: see {tmp_path / 'first.log'}"
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        # The driver's cluster went down with its process group; a straggler that left the group is ended by id.
        psutil.wait_procs(_ray_processes(temp_root), timeout=30)
        for straggler in _ray_processes(temp_root):
            straggler.kill()
        assert not psutil.wait_procs(_ray_processes(temp_root), timeout=30)[1]

        second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
                                start_new_session=True)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        assert "resuming the sweep" in second.stderr  # logged by the sweep's driver
    finally:
        if first is not None and first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        for leftover in _ray_processes(temp_root):
            leftover.kill()

    with open(folder / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["status"] == "finished" for r in rows)
    starts = trial_starts(str(folder))
    assert set(starts) == {r["trial_id"] for r in rows}
    # The trial that had finished ran once; the other started once or twice (killed mid-run, then rerun).
    (done,) = finished_before
    assert starts[done] == 1
    (other,) = set(starts) - {done}
    assert 1 <= starts[other] <= 2
