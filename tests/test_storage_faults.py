"""Storage faults and bad run folders: checkpoint manifests, upload retries, refused writes, a changed model,
and an S3 outage during a checkpoint upload (on Ray, slow). A damaged latest checkpoint on Ray is part of
the chaos test (test_chaos.py)."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest

from vjepa_ray import pretrain, runs
from vjepa_ray.config import ConfigError, load_config, to_yaml
from vjepa_ray.train import manifest, recovery
from vjepa_ray.train.upload import (
    IncompleteUploadError,
    StorageRefusedError,
    StorageUnreachableError,
    missing_files,
    retry_while_unreachable,
)


def _a_video(folder: Path) -> Path:
    """A file training would list (the driver lists data.paths before anything starts; nothing decodes it here)."""
    path = folder / "clip.mp4"
    path.write_bytes(b"")
    return path

def _fake_checkpoint(folder: Path) -> Path:
    """Two ranks' shares of a checkpoint, merged as Ray Train merges them."""
    for rank in range(2):
        share = folder.parent / f"rank{rank}"
        (share / "deepspeed").mkdir(parents=True)
        (share / "deepspeed" / f"shard_{rank}.pt").write_bytes(bytes(range(256)) * (rank + 1))
        (share / "deepspeed" / "latest").write_text("state")  # written by every rank
        if rank == 0:
            (share / runs.CHECKPOINT_MARKER).write_text('{"step": 4}')
        manifest.write(share, rank, world_size=2)
        runs.upload(share, str(folder))
    return folder


def test_manifest_finds_a_truncated_shard_a_missing_file_a_missing_share_and_a_foreign_folder(tmp_path):
    folder = _fake_checkpoint(tmp_path / "step_00000004")
    assert manifest.problems(folder) == []
    shard = folder / "deepspeed" / "shard_1.pt"
    shard.write_bytes(shard.read_bytes()[:100])
    (folder / runs.CHECKPOINT_MARKER).unlink()
    assert manifest.problems(folder) == ["deepspeed/shard_1.pt has 100 bytes, 512 when saved",
                                         "train_state.json is missing"]
    (folder / "manifest" / "rank_00001.json").unlink()
    assert "manifest/rank_00001.json is missing" in manifest.problems(folder)[0]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model.pt").write_bytes(b"weights")
    assert "not a vjepa_ray training checkpoint" in manifest.problems(foreign)[0]


class FakeClock:
    def __init__(self):
        self.now, self.sleeps = 0.0, []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_upload_retries_an_unreachable_store_with_bounded_backoff_and_gives_up_on_a_refusal_at_once():
    clock = FakeClock()
    outage_s = 30.0

    def upload():  # the store comes back after ``outage_s``
        if clock.now < outage_s:
            raise OSError("AWS Error NETWORK_CONNECTION during PutObject operation: curlCode: 7, Could not connect")
        return "persisted"

    assert retry_while_unreachable(upload, "upload", retry_s=300, sleep=clock.sleep, clock=lambda: clock.now) \
        == "persisted"
    assert clock.sleeps == [1, 2, 4, 8, 16]  # doubling waits, back after 31 s

    clock, outage_s = FakeClock(), float("inf")
    with pytest.raises(StorageUnreachableError, match="unreachable for 60 s") as err:
        retry_while_unreachable(upload, "upload", retry_s=60, sleep=clock.sleep, clock=lambda: clock.now)
    assert "NETWORK_CONNECTION" not in str(err.value)  # Ray Train would retry on it again
    assert clock.sleeps == [1, 2, 4, 8, 16] and max(clock.sleeps) <= 30

    calls = []

    def refused():
        calls.append(1)
        raise OSError("AWS Error ACCESS_DENIED during CreateMultipartUpload operation: Access Denied")

    with pytest.raises(StorageRefusedError, match="refused the write .*ACCESS_DENIED"):
        retry_while_unreachable(refused, "upload", retry_s=300, sleep=FakeClock().sleep)
    assert len(calls) == 1


def test_a_copy_that_lost_a_file_is_found_out_and_retried(tmp_path):
    """pyarrow can return from a copy whose multipart upload never completed (the store went away as it
    closed the stream): the rank's files are listed in the copy and a missing or partial one is retried."""
    from ray.train import Checkpoint

    source = tmp_path / "rank1"
    (source / "deepspeed").mkdir(parents=True)
    (source / "deepspeed" / "optim_states.pt").write_bytes(b"x" * 1000)
    (source / "rng.pt").write_bytes(b"r" * 10)
    copy = tmp_path / "step_00000004"
    (copy / "deepspeed").mkdir(parents=True)
    (copy / "rng.pt").write_bytes(b"r" * 10)
    (copy / "rank0_only.pt").write_bytes(b"0")  # another rank's file in the shared folder: not this rank's concern
    source_ckpt, copy_ckpt = Checkpoint.from_directory(str(source)), Checkpoint.from_directory(str(copy))
    assert missing_files(source_ckpt, copy_ckpt) == ["deepspeed/optim_states.pt"]
    (copy / "deepspeed" / "optim_states.pt").write_bytes(b"x" * 999)
    assert missing_files(source_ckpt, copy_ckpt) == ["deepspeed/optim_states.pt"]  # partial
    (copy / "deepspeed" / "optim_states.pt").write_bytes(b"x" * 1000)
    assert missing_files(source_ckpt, copy_ckpt) == []

    clock, attempts = FakeClock(), []

    def upload():  # the first copy comes back incomplete, the second whole
        attempts.append(1)
        if len(attempts) == 1:
            raise IncompleteUploadError("1 file(s) missing or partial after the copy: deepspeed/optim_states.pt")
        return "persisted"

    assert retry_while_unreachable(upload, "upload", retry_s=60, sleep=clock.sleep, clock=lambda: clock.now) \
        == "persisted"
    assert len(attempts) == 2 and clock.sleeps == [1]


def _config(storage, name: str, *overrides: str):
    return load_config(None, [f"ray.storage_path={storage}", f"meta.name={name}", "model.name=vit_tiny",
                              *overrides])


def test_a_run_folder_of_another_model_is_a_one_line_error_and_stays_untouched(tmp_path, capsys):
    checkpoint = tmp_path / "run" / "step_00000004"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.yaml").write_text(to_yaml(_config(tmp_path, "run", "model.name=vit_small")))
    before = sorted((p.name, p.stat().st_mtime_ns) for p in checkpoint.iterdir())
    recovery.check_run_folder(_config(tmp_path, "run", "model.name=vit_small", "model.activation_checkpointing=true"))
    with pytest.raises(ConfigError, match="model.name: .*step_00000004 holds a run trained with 'vit_small'"):
        recovery.check_run_folder(_config(tmp_path, "run"))
    with pytest.raises(SystemExit) as exit_:
        pretrain.main([f"ray.storage_path={tmp_path}", "meta.name=run", "model.name=vit_tiny",
                       f"data.paths=[{_a_video(tmp_path)}]", "data.synthetic_videos=0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config error: model.name:" in err[0]
    assert sorted((p.name, p.stat().st_mtime_ns) for p in checkpoint.iterdir()) == before


def test_a_store_that_refuses_writes_is_a_one_line_error_before_any_worker_starts(s3_server, s3_bucket, monkeypatch,
                                                                                   tmp_path, capsys):
    boto3 = pytest.importorskip("boto3")
    from moto import settings

    iam = boto3.client("iam", endpoint_url=f"http://{s3_server.endpoint}")
    iam.create_user(UserName="reader")
    iam.put_user_policy(UserName="reader", PolicyName="read-only", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}]}))
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto enforces IAM policies from now on
    started = time.monotonic()
    with pytest.raises(SystemExit) as exit_:
        pretrain.main([f"ray.storage_path={s3_bucket}/runs", "meta.name=denied",
                       f"data.paths=[{_a_video(tmp_path)}]", "data.synthetic_videos=0"])
    assert exit_.value.code == 2 and time.monotonic() - started < 10
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config error: ray.storage_path:" in err[0] and "refuses writes" in err[0]
    assert "ACCESS_DENIED" in err[0]


@pytest.mark.slow
def test_an_s3_outage_during_a_checkpoint_upload_is_ridden_out_and_the_run_folders_lease_holds_on_s3(
        ray_s3, s3_server, s3_bucket, caplog):
    boto3 = pytest.importorskip("boto3")
    from test_retention_lease_e2e import refuse_a_second_driver_until_the_holder_is_killed
    from test_train_e2e import tiny_config

    from vjepa_ray.train import driver
    from vjepa_ray.train.synthetic_stream import SyntheticClipStream

    # 15 s rather than 30: the code path (pyarrow's failed requests, then our retries) is the same.
    outage_s = 15
    cfg = tiny_config(s3_bucket, "outage", "checkpoint.every_steps=2", "optimization.total_steps=8")
    bucket, client = s3_bucket.removeprefix("s3://"), boto3.client("s3")
    out: list = []
    thread = threading.Thread(target=lambda: out.append(driver.run(cfg, stream_factory=SyntheticClipStream)))
    thread.start()
    deadline = time.time() + 600
    while "step_00000002" not in _registered(client, bucket, "outage/checkpoint_manager_snapshot.json"):
        assert thread.is_alive() and time.time() < deadline
        time.sleep(0.2)
    s3_server.stop()  # before the upload of step 4 begins
    time.sleep(outage_s)
    s3_server.start()
    back = time.time()
    thread.join(timeout=600)
    summary = out[0]
    assert summary["status"] == "finished" and summary["steps"] == 8 and summary["restarts"] == 0
    # Step 4's checkpoint reached the store after it came back, whole; so did every later one.
    uploaded = client.head_object(Bucket=bucket, Key="outage/step_00000004/train_state.json")["LastModified"]
    assert uploaded.timestamp() >= back - 1
    for name in ("step_00000004", "step_00000006", "step_00000008"):
        with runs.local_copy(runs.join(s3_bucket, "outage", name)) as local:
            assert manifest.problems(local) == [], name

    # One driver per run folder on S3: a second driver on a live run is refused; once that driver is killed, a
    # rerun takes its lease over and resumes.
    holder_pid = refuse_a_second_driver_until_the_holder_is_killed(s3_bucket, "outage")
    with caplog.at_level(logging.WARNING, logger="vjepa_ray.train.lease"):
        rerun = driver.run(tiny_config(s3_bucket, "outage", "checkpoint.every_steps=2", "optimization.total_steps=10"),
                           stream_factory=SyntheticClipStream)
    assert any(f"pid {holder_pid}" in r.getMessage() and "taking over" in r.getMessage() for r in caplog.records)
    assert rerun["status"] == "finished" and rerun["starts"] == [{"world_size": 2, "step": 8}]


def _registered(client, bucket: str, key: str) -> set[str]:
    try:
        snapshot = json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    except client.exceptions.NoSuchKey:
        return set()
    return {c["checkpoint_dir_name"] for c in snapshot["checkpoint_results"]}
