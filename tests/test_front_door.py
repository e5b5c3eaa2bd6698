"""What a new user meets first: a wrong data path, a folder of theirs, an undecodable corpus, what a run prints.

Wrong paths and the demo's data are checked in this process (nothing starts); one short run on Ray Train +
DeepSpeed checks that a corpus of broken files stops at once, with its cause, and that a user's folder of real
videos is left as it was.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest

from vjepa_ray import console, pretrain
from vjepa_ray.config import ConfigError, builtin_config_path, load_config
from vjepa_ray.data import demo
from vjepa_ray.train.metrics import Clock, format_duration
from vjepa_ray.video.synthetic import make_moving_pattern_videos


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) with a digest of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def pretrain_exit(argv: list[str], capsys) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as exited:
        pretrain.main(argv)
    return exited.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture
def user_folders(tmp_path):
    """A user's folder of 3 real videos, an empty folder, a manifest whose videos are gone, a folder of text."""
    videos = tmp_path / "mine"
    make_moving_pattern_videos(videos, 3, frames=16, size=64, seed=0)
    (tmp_path / "empty").mkdir()
    (tmp_path / "gone.txt").write_text(f"{tmp_path / 'gone' / 'a.mp4'} 0\n{tmp_path / 'gone' / 'b.mp4'} 1\n")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no videos here")
    return tmp_path


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry_run"])
@pytest.mark.parametrize("entry, found", [
    ("videoz", "'{}' does not exist"),
    ("empty", "'{}' holds no videos"),
    ("empty/**/*.mp4", "'{}' holds no videos"),
    ("gone.txt", "'{}' lists 2 videos and none of them exists"),
    ("notes", "'{}' holds no videos"),
], ids=["missing", "empty", "glob", "manifest", "no_media"])
def test_a_data_path_without_videos_is_one_line_and_exit_2_before_anything_starts(user_folders, capsys, entry, found,
                                                                                  dry_run):
    path = str(user_folders / entry)
    before = tree(user_folders)
    code, err = pretrain_exit([f"data.paths=[{path}]", f"ray.storage_path={user_folders / 'runs'}",
                               *(["--dry-run"] if dry_run else [])], capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("python -m vjepa_ray.pretrain: config error: data.paths: " + found.format(path))
    assert not (user_folders / "runs").exists() and tree(user_folders) == before
    found = {"empty": "an empty folder", "empty/**/*.mp4": "no files", "notes": "1 file: .txt 1"}
    if entry in found:
        assert err[0].endswith(f"; found {found[entry]}")


def test_the_demo_writes_only_into_its_own_cache_folder(user_folders, monkeypatch):
    monkeypatch.setenv("HOME", str(user_folders / "home"))
    for folder in ("mine", "empty"):
        cfg = load_config(builtin_config_path("local_demo"), [f"data.paths=[{user_folders / folder}]",
                                                              "data.synthetic_videos=4"])
        before = tree(user_folders)
        assert not demo.uses_demo_videos(cfg)
        demo.prepare_demo_videos(cfg)
        assert tree(user_folders) == before
    # The built-in default: the demo's videos are made once, in the demo's folder.
    cfg = load_config(builtin_config_path("local_demo"), ["data.synthetic_videos=4"])
    demo.prepare_demo_videos(cfg)
    made = tree(Path(demo.DEMO_VIDEOS).expanduser())
    assert len([name for name in made if name.endswith(".mp4")]) == 4 and demo.COMPLETE in made
    demo.prepare_demo_videos(cfg)
    assert tree(Path(demo.DEMO_VIDEOS).expanduser()) == made


def test_a_probe_manifest_the_user_named_is_never_rewritten(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    labelled = tmp_path / "labelled"
    labelled.mkdir()
    (labelled / "train.txt").write_text("/data/a.mp4 0\n")  # val.txt missing: the old code regenerated both
    before = tree(tmp_path)
    cfg = load_config(builtin_config_path("local_demo"), [
        f"probe.train_manifest={labelled / 'train.txt'}", f"probe.val_manifest={labelled / 'val.txt'}",
        "tune.synthetic_probe_videos=1"])
    demo.prepare_probe_videos(cfg)
    assert tree(tmp_path) == before


def test_a_yaml_error_names_its_line_and_column(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("meta:\n  name: x\ndata:\n  paths: [a, b\nray:\n  num_workers: 2\n")
    with pytest.raises(ConfigError, match=r"--config: .* is not valid YAML: .* at line \d+, column \d+"):
        load_config(path)


def test_export_to_hf_of_a_vjepa1_model_is_exit_2(tmp_path, capsys):
    from vjepa_ray import export

    weights = tmp_path / "ours.pt"
    weights.write_bytes(b"")
    with pytest.raises(SystemExit) as exited:
        export.main(["to-hf", "--input", str(weights), "--output", str(tmp_path / "hf")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(err) == 1 and "model.family" in err[0]
    assert not (tmp_path / "hf").exists()


def test_ray_noise_is_dropped_and_our_lines_kept():
    printed = []
    lines = ["DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
             "Progress bars disabled. To enable, set `ray.data.DataContext...` = True`.",
             "[2026-12-07 17:42:51,445 E 7348 7514] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
             "and ID: 'f7' has constructor arguments in the object store and max_restarts > 0. If the ...",
             "Failed to send resource request for train-eec3. If this only happens transiently during network "
             "partition or CPU being overloaded, it's safe to ignore this error. If this error persists, file ...",
             "Traceback (most recent call last):",
             '  File "ray/_private/worker.py", line 3009, in get',
             "    values, debugger_breakpoint = worker.get_objects(",
             "ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.",
             "Found multiple active Ray instances: {'192.0.2.2:34401', '192.0.2.2:32993'}. Connecting to latest "
             "cluster at 192.0.2.2:32993. You can override this by setting the `--address` flag or `RAY_ADDRESS` ...",
             "vjepa_ray.train.loop: step 10/300  loss 0.7767",
             "vjepa_ray.data.pipeline: skipping video /x.mp4 (corrupt): moov atom not found"]
    console._print_forwarded(printed.append, False, {"lines": lines, "pid": 1, "is_err": True})
    assert printed[0]["lines"] == lines[-2:]
    console._print_forwarded(printed.append, True, {"lines": lines, "pid": 1, "is_err": True})
    assert printed[1]["lines"] == lines


def test_step_lines_say_the_time_run_and_left():
    now = iter([100.0, 130.0, 160.0])
    clock = Clock(first_step=40, now=lambda: next(now))
    assert clock.times(50, 100) == (30.0, 150.0)  # 10 steps in 30 s: 50 steps left take 150 s
    elapsed, left = clock.times(40, 100)
    assert elapsed == 60.0 and format_duration(left) == "?"
    assert [format_duration(s) for s in (42, 185, 7620)] == ["42s", "3m05s", "2h07m"]


def test_a_failed_runs_last_line_is_its_cause():
    summary = {"status": "failed", "steps": 0, "final_loss": None, "restarts": 0, "world_sizes": [2],
               "elapsed_s": 41.0, "summary": "/runs/x/summary.json", "error_kind": "input",
               "error": "data.paths: none of the 3 videos could be decoded (corrupt 3); to see why: "
                        "python -m vjepa_ray.data check /data/broken"}
    lines = pretrain.summary_lines(summary)
    assert lines[0] == "failed: 0 steps in 41s, final loss n/a, 0 restart(s), world sizes [2]"
    assert lines[-1] == f"python -m vjepa_ray.pretrain: config error: {summary['error']}"


@pytest.mark.slow
def test_a_corpus_of_broken_files_stops_at_once_with_its_cause_and_a_users_folder_is_left_as_it_was(
        ray_local, tmp_path, capsys, caplog):
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(3):
        (broken / f"clip_{i}.mp4").write_bytes(b"not a video " * (i + 1))
    videos = tmp_path / "mine"
    make_moving_pattern_videos(videos, 3, frames=16, size=64, seed=0)
    folders = {folder: tree(folder) for folder in (broken, videos)}
    common = [f"ray.storage_path={tmp_path / 'runs'}", "model.pred_depth=1", "optimization.total_steps=2",
              "optimization.warmup_steps=1", "checkpoint.every_steps=2", "logging.every_steps=1",
              "data.batch_size=1", "data.chunk_size=2", "ray.num_workers=1", "ray.max_failures=3"]

    assert pretrain.main(["meta.name=broken", f"data.paths=[{broken}]", *common]) == 2
    captured = capsys.readouterr()
    out = captured.out.strip().splitlines()
    assert "Traceback" not in captured.out + captured.err
    assert out[-1] == (f"python -m vjepa_ray.pretrain: config error: data.paths: none of the 3 videos could be "
                       f"decoded (not_video 3); to see why: python -m vjepa_ray.data check {broken}")
    summary = json.loads((tmp_path / "runs" / "broken" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error_kind"] == "input" and summary["restarts"] == 0
    assert summary["error"] == out[-1].split("config error: ", 1)[1]

    with caplog.at_level(logging.INFO):
        assert pretrain.main(["meta.name=mine", f"data.paths=[{videos}]", *common]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("finished: 2 steps") and out[-1].startswith("  tensorboard --logdir")
    assert f"  python -m vjepa_ray.report {tmp_path / 'runs' / 'mine'}" in out
    assert {folder: tree(folder) for folder in (broken, videos)} == folders
