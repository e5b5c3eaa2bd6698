"""Credentials given in URIs and DeepSpeed overrides reach the stores they open and nothing that is written or
logged: one pretraining through Ray with its run folder and videos on S3 (moto) named ``s3://KEY:SECRET@...``,
an MLflow server named ``http://user:password@...`` and a DeepSpeed ``api_key``, and ``data prepare`` of the
same videos into the bucket. Every object in the bucket but the videos, every MLflow parameter and tag, the
commands' output (the workers' lines forwarded to the driver included) and every file of the Ray session's
logs are searched for each secret.

The videos include one whose resolution changes midway: it is skipped, with its reason, by training's clip
pipeline and by ``prepare``."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import mlflow_api
from test_decode_robustness import write_size_changing_video

from vjepa_ray.config import builtin_config_path, load_config, to_yaml
from vjepa_ray.data.sources import resolve
from vjepa_ray.redaction import install_log_redaction, redact
from vjepa_ray.video.synthetic import make_moving_pattern_videos

REPO = Path(__file__).resolve().parents[1]
KEY, SECRET = "AKIAVJEPARAYTESTKEY1", "vjepaS3cretInTheUri"
MLFLOW_PASSWORD = "vjepaMlflowPassw0rd"
API_KEY = "vjepaDeepSpeedApiKey"
SECRETS = (KEY, SECRET, MLFLOW_PASSWORD, API_KEY)


def _found(data: bytes) -> list[str]:
    return [secret for secret in SECRETS if secret.encode() in data]


def test_credentials_are_masked_in_uris_queries_and_secret_keys():
    assert redact(f"s3://{KEY}:{SECRET}@bucket/runs?endpoint_override=h:9000&scheme=http") == \
        "s3://***@bucket/runs?endpoint_override=h:9000&scheme=http"
    assert redact(f"failed: https://user:{MLFLOW_PASSWORD}@host:5000/api and s3://bucket/a@b.mp4") == \
        "failed: https://***@host:5000/api and s3://bucket/a@b.mp4"
    assert redact("https://h/x.mp4?X-Amz-Credential=A%2F1&X-Amz-Signature=ff&x-id=GetObject") == \
        "https://h/x.mp4?X-Amz-Credential=***&X-Amz-Signature=***&x-id=GetObject"
    overrides = {"comet": {"enabled": False, "api_key": API_KEY}, "sessionToken": "t", "mask_tokens": 4}
    assert redact(overrides) == {"comet": {"enabled": False, "api_key": "***"}, "sessionToken": "***",
                                 "mask_tokens": 4}
    cfg = load_config(builtin_config_path("local_demo"), [f"ray.storage_path=s3://{KEY}:{SECRET}@b/runs",
                                                          f"deepspeed.overrides={{comet: {{api_key: {API_KEY}}}}}"])
    text = to_yaml(redact(cfg))
    assert "storage_path: s3://***@b/runs" in text and _found(text.encode()) == []
    assert cfg.ray.storage_path.startswith(f"s3://{KEY}:{SECRET}@")  # the config itself keeps them


def test_every_log_record_is_redacted_whatever_its_handler(caplog):
    install_log_redaction()
    with caplog.at_level(logging.INFO):
        logging.getLogger("anything").info("reading %s", f"s3://{KEY}:{SECRET}@bucket/v.mp4")
        try:
            raise OSError(f"cannot open s3://{KEY}:{SECRET}@bucket/v.mp4")
        except OSError:
            logging.getLogger("anything").exception("failed")
    assert "reading s3://***@bucket/v.mp4" in caplog.text and _found(caplog.text.encode()) == []


def test_a_uri_with_credentials_resolves_to_its_bucket_path():
    from pyarrow.fs import S3FileSystem

    fs, path = resolve(f"s3://{KEY}:{SECRET}@bucket/videos?endpoint_override=127.0.0.1:1&scheme=http")
    assert isinstance(fs, S3FileSystem) and path == "bucket/videos"


@pytest.mark.slow
def test_no_secret_in_any_file_param_or_log_line(ray_local, s3_bucket, s3_endpoint, mlflow_server, tmp_path):
    boto3 = pytest.importorskip("boto3")
    bucket = s3_bucket.removeprefix("s3://")
    client = boto3.client("s3")
    local = tmp_path / "videos"
    make_moving_pattern_videos(local, 3, frames=32, size=80, seed=0)
    write_size_changing_video(local / "changing.ts")
    for video in local.iterdir():
        client.upload_file(str(video), bucket, f"videos/{video.name}")

    query = f"?endpoint_override={s3_endpoint}&scheme=http"
    secret_bucket = f"s3://{KEY}:{SECRET}@{bucket}"
    host, port = mlflow_server.removeprefix("http://").split(":")
    mlflow_uri = f"http://vjepa:{MLFLOW_PASSWORD}@{host}:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    address = f"ray.address={ray_local.get_runtime_context().gcs_address}"

    train = subprocess.run(
        [sys.executable, "-m", "vjepa_ray.pretrain", "meta.name=secret_run", address,
         f"ray.storage_path={secret_bucket}/runs{query}", f"data.paths=['{secret_bucket}/videos{query}']",
         "data.synthetic_videos=0", "data.batch_size=2", "model.pred_depth=1", "optimization.total_steps=2",
         "optimization.warmup_steps=1", "checkpoint.every_steps=2", "logging.every_steps=1",
         f"logging.mlflow_uri={mlflow_uri}", "logging.mlflow_experiment=secrets",
         f"deepspeed.overrides={{comet: {{enabled: false, api_key: {API_KEY}}}}}"],
        env=env, capture_output=True, timeout=600)
    output = train.stdout + train.stderr
    assert train.returncode == 0, output.decode()[-3000:]
    assert b"(size_changed)" in output  # the clip pipeline's skip line: the video, its reason

    prepare = subprocess.run(
        [sys.executable, "-m", "vjepa_ray.data", "prepare", f"{secret_bucket}/videos{query}", "--out",
         f"{secret_bucket}/prepared{query}", "--short-side", "64", "--videos-per-shard", "2", address,
         "data.frames_per_clip=8", "data.frame_step=2", "--json"], env=env, capture_output=True, timeout=300)
    output += prepare.stdout + prepare.stderr
    assert prepare.returncode == 0, prepare.stderr.decode()[-3000:]

    objects = {item["Key"]: client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
               for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
               for item in page.get("Contents", []) if not item["Key"].startswith("videos/")}
    # What was written: the run's config, summary and checkpoint, the preparation's manifest and shards.
    assert {"runs/secret_run/summary.json", "runs/secret_run/step_00000002/config.yaml",
            "prepared/manifest.json", "prepared/shard-000000.tar"} <= set(objects)
    summary = json.loads(objects["runs/secret_run/summary.json"])
    assert summary["status"] == "finished" and summary["skipped_videos"] >= 1  # at each visit of changing.ts
    assert summary["checkpoint"].startswith(f"s3://***@{bucket}/runs/secret_run/step_00000002?")
    assert b"api_key: '***'" in objects["runs/secret_run/step_00000002/config.yaml"]
    assert b'"reason": "size_changed"' in objects["prepared/manifest.json"]
    leaked = {key: _found(data) for key, data in objects.items() if _found(data)}
    # DeepSpeed pickles its whole config, the api_key it needs included, into its own state files.
    assert leaked == {key: [API_KEY] for key in objects if "/deepspeed/state/" in key and key.endswith(".pt")}

    (experiment,) = [e for e in mlflow_api(mlflow_server, "experiments/search", {"max_results": 100})["experiments"]
                     if e["name"] == "secrets"]
    (run,) = mlflow_api(mlflow_server, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["logging.mlflow_uri"] == f"http://***@{host}:{port}" and params["data.paths"].count("***@") == 1
    assert _found(repr(run).encode()) == []

    assert _found(output) == [], output.decode()[-3000:]
    session = Path(ray_local._private.worker._global_node.get_session_dir_path())
    logged = {str(path): _found(path.read_bytes()) for path in session.rglob("*") if path.is_file()}
    assert {path: found for path, found in logged.items() if found} == {}
