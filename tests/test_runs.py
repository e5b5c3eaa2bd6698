"""The run folder (``vjepa_ray.runs``): paths and URIs, summary.json, finding a run's checkpoint, local copies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vjepa_ray import runs
from vjepa_ray.config import load_config


def make_checkpoint(folder: Path, step: int) -> Path:
    """A stand-in for a training checkpoint: its marker file and one payload file."""
    checkpoint = folder / f"step_{step:08d}"
    (checkpoint / "rng").mkdir(parents=True)
    (checkpoint / runs.CHECKPOINT_MARKER).write_text(json.dumps({"step": step}))
    (checkpoint / "rng" / "rank_00000.pt").write_bytes(bytes([step]) * 8)
    return checkpoint


def test_paths_under_a_uri_keep_its_query_at_the_end():
    assert runs.join("s3://b/runs?endpoint_override=h:1&scheme=http", "demo", "summary.json") == \
        "s3://b/runs/demo/summary.json?endpoint_override=h:1&scheme=http"
    assert runs.join("/data/runs/", "demo") == "/data/runs/demo"
    assert runs.checkpoint_path("s3://b/runs/demo?region=x", "b/runs/demo/step_00000004") == \
        "s3://b/runs/demo/step_00000004?region=x"


def test_run_folder_and_tensorboard_folder_of_a_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = load_config(None, ["ray.storage_path=relative/runs", "meta.name=demo"])
    assert runs.run_dir(local) == str(tmp_path / "relative" / "runs" / "demo")
    assert runs.tensorboard_dir(local) == str(tmp_path / "relative" / "runs" / "demo" / "tensorboard")
    remote = load_config(None, ["ray.storage_path=s3://key:secret@bucket/runs?region=x", "meta.name=demo"])
    assert runs.run_dir(remote) == "s3://key:secret@bucket/runs/demo?region=x"
    # Event files of a remote run stay on this machine, under a folder named after the URI, without credentials.
    assert runs.tensorboard_dir(remote) == str(Path("~/vjepa_runs/bucket/runs/demo/tensorboard").expanduser())


def test_summary_round_trips_and_is_none_before_the_run_wrote_one(tmp_path):
    assert runs.read_summary(str(tmp_path)) is None
    path = runs.write_summary(str(tmp_path / "run"), {"status": "finished", "steps": 3})
    assert path == str(tmp_path / "run" / "summary.json")
    assert runs.read_summary(str(tmp_path / "run")) == {"status": "finished", "steps": 3}


def test_find_checkpoint_resolves_checkpoints_run_folders_and_moved_run_folders(tmp_path):
    run = tmp_path / "run"
    older, newer = make_checkpoint(run, 4), make_checkpoint(run, 12)
    (run / "step_00000020").mkdir()  # an upload that never completed: no marker
    assert runs.find_checkpoint(str(older)) == str(older)
    # No summary yet (a running or failed run): the latest complete checkpoint.
    assert runs.find_checkpoint(str(run)) == str(newer)
    runs.write_summary(str(run), {"checkpoint": str(older)})
    assert runs.find_checkpoint(str(run)) == str(older)
    # The run folder moved: the summary names a path that is gone; the folder's own copy is found.
    moved = tmp_path / "moved"
    run.rename(moved)
    assert runs.find_checkpoint(str(moved)) == str(moved / older.name)
    runs.write_summary(str(moved), {"checkpoint": str(tmp_path / "elsewhere" / "step_00000099")})
    with pytest.raises(FileNotFoundError, match="names no checkpoint"):
        runs.find_checkpoint(str(moved))
    with pytest.raises(FileNotFoundError, match="neither a training checkpoint nor a run folder"):
        runs.find_checkpoint(str(tmp_path / "empty"))


def test_a_run_folder_on_s3_reads_back_like_a_local_one(s3_bucket, tmp_path):
    local = tmp_path / "run"
    make_checkpoint(local, 4)
    make_checkpoint(local, 8)
    folder = runs.join(s3_bucket, "runs", "demo")
    runs.upload(local, folder)
    runs.write_summary(folder, {"checkpoint": "vanished/step_00000008"})
    assert runs.list_names(folder) == ["step_00000004", "step_00000008", "summary.json"]
    checkpoint = runs.find_checkpoint(folder)
    assert checkpoint == f"{s3_bucket}/runs/demo/step_00000008"
    with runs.local_copy(checkpoint) as copy:
        files = sorted(str(p.relative_to(copy)) for p in copy.rglob("*") if p.is_file())
        assert files == ["rng/rank_00000.pt", runs.CHECKPOINT_MARKER]
        assert (copy / "rng" / "rank_00000.pt").read_bytes() == bytes([8]) * 8
    assert not copy.exists()
    assert runs.read_summary(folder) == {"checkpoint": "vanished/step_00000008"}
