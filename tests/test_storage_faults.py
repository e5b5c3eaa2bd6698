"""Storage faults and bad run folders: checkpoint manifests, upload retries, refused writes, a changed model,
an S3 outage during a checkpoint upload and a damaged latest checkpoint (the last two on Ray, slow)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vjepa_ray import pretrain, runs
from vjepa_ray.config import ConfigError, load_config, to_yaml
from vjepa_ray.train import manifest, recovery
from vjepa_ray.train.upload import StorageRefusedError, StorageUnreachableError, retry_while_unreachable


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
                       f"data.paths=[{tmp_path}]", "data.synthetic_videos=0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config error: model.name:" in err[0]
    assert sorted((p.name, p.stat().st_mtime_ns) for p in checkpoint.iterdir()) == before
