"""Run folders on S3 (moto's server on loopback): a sweep's trial pretrains, probes and tabulates into the
bucket; ``evaluate`` reads a run folder there; ``report`` and ``export`` read it back."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
from conftest import write_sweep_data

from vjepa_ray import evaluate, export, report, runs
from vjepa_ray.config import load_config
from vjepa_ray.sweep import driver as sweep
from vjepa_ray.sweep.trial import trial_starts

boto3 = pytest.importorskip("boto3")

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def overrides(tmp: Path, storage: str, name: str, *extra: str) -> list[str]:
    """jobs/tune_demo.yaml cut to one trial of 4 steps and a small probe grid, its run folders on ``storage``."""
    return [f"meta.name={name}", f"ray.storage_path={storage}", f"data.paths=[{tmp / 'videos'}]",
            "data.synthetic_videos=4", "data.batch_size=2", "model.pred_depth=1", "optimization.total_steps=4",
            "optimization.warmup_steps=1", "logging.every_steps=2", "checkpoint.every_steps=4",
            f"probe.train_manifest={tmp / 'labelled' / 'train.txt'}",
            f"probe.val_manifest={tmp / 'labelled' / 'val.txt'}", "tune.synthetic_probe_videos=2", "probe.epochs=1",
            "tune.mask_ratio=[0.5]", "tune.num_samples=1", "tune.lr=[1e-3]", "tune.ema=null",
            "tune.probe_lr=[1e-3,3e-4]", *extra]


def test_sweep_evaluate_report_and_export_keep_their_run_folders_on_s3(ray_s3, s3_bucket, tmp_path):
    bucket = s3_bucket.removeprefix("s3://")
    client = boto3.client("s3")
    storage = f"{s3_bucket}/runs"

    def objects(prefix: str) -> set[str]:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return {item["Key"].removeprefix(prefix) for page in pages for item in page.get("Contents", [])}

    def read(key: str) -> bytes:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()

    try:
        cfg = load_config(REPO / "jobs" / "tune_demo.yaml", overrides(tmp_path, storage, "sweep"))
        write_sweep_data(tmp_path, cfg)
        summary = sweep.run(cfg)
        assert (summary["trials"], summary["finished"]) == (1, 1) and summary["folder"] == f"{storage}/sweep"

        # The sweep's tables and its record of trial starts.
        swept = objects("runs/sweep/")
        assert {"results.csv", "results.json", "best.json", "top1_vs_mask_ratio.png",
                "top1_vs_probe_lr.png"} <= swept
        (row,) = list(csv.DictReader(io.StringIO(read("runs/sweep/results.csv").decode())))
        trial = row["trial_id"]
        assert trial_starts(f"{storage}/sweep") == {trial: 1}

        # The trial's pretraining: its checkpoint, summary.json and TensorBoard files, in its own run folder.
        prefix = f"runs/sweep/pretrain/{trial}/"
        files = objects(prefix)
        checkpoint = f"{storage}/sweep/pretrain/{trial}/step_00000004"
        assert {"summary.json", "step_00000004/train_state.json", "step_00000004/config.yaml"} <= files
        assert any(key.startswith("step_00000004/deepspeed/") for key in files)
        assert any(key.startswith("tensorboard/events.out.tfevents.") for key in files)
        trained = json.loads(read(prefix + "summary.json"))
        assert (trained["status"], trained["steps"], trained["checkpoint"]) == ("finished", 4, checkpoint)

        # The trial's probe read that checkpoint from the bucket and wrote its results beside it.
        probed = json.loads(read(prefix + runs.PROBE_RESULTS_FILE))
        assert probed["checkpoint"] == checkpoint and len(probed["probes"]) == 2
        assert float(row["probe_top1"]) == probed["top1"]

        # `evaluate` on the trial's run folder by its URI.
        run_folder = f"{storage}/sweep/pretrain/{trial}"
        argv = ["--config", str(REPO / "jobs" / "tune_demo.yaml"),
                *overrides(tmp_path, storage, "probe_again", f"probe.checkpoint={run_folder}", "probe.lr=[1e-3]")]
        assert evaluate.main(argv) == 0
        again = json.loads(read(f"runs/probe_again/{runs.PROBE_RESULTS_FILE}"))
        assert again["checkpoint"] == run_folder and [p["lr"] for p in again["probes"]] == [1e-3]

        # `report` reads the uploaded event files and writes its plots into the run folder; `export` converts
        # the run folder's checkpoint.
        assert report.main([run_folder]) == 0
        assert read(prefix + "plots/loss.png")[:8] == b"\x89PNG\r\n\x1a\n"
        exported = tmp_path / "official.pt"
        assert export.main(["to-official", "--input", run_folder, "--output", str(exported)]) == 0
        assert exported.stat().st_size > 100_000
    finally:
        # Event files of runs on S3 stay on this machine too (see vjepa_ray.runs).
        shutil.rmtree(Path(runs.LOCAL_ROOT).expanduser() / bucket, ignore_errors=True)
