"""``python -m vjepa_ray.data prepare``: every good video in a shard that checks ok, every bad one reported with
its reason, labels carried, a killed preparation resumed to the same bytes, another configuration refused."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_video_decode import VARIANTS  # every codec and container the decoder is tested on

from vjepa_ray.data import doctor
from vjepa_ray.data.prepare import DestinationError, PrepareSettings, ShardJob, main, write_shard
from vjepa_ray.data.sources import VideoRef, list_videos
from vjepa_ray.video.decode import ClipSpec
from vjepa_ray.video.synthetic import moving_pattern, write_video

REPO = Path(__file__).resolve().parents[1]
CLIP = ["data.frames_per_clip=8", "data.frame_step=2", "data.clips_per_video=1", "data.crop_size=32"]
BAD = {"truncated.mp4": "corrupt", "empty.avi": "empty", "text.mov": "not_video", "short.mkv": "too_short",
       "gone.mp4": "missing"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A labelled manifest over every decoder test variant, a rotated video and bad files; -> (manifest,
    {file name: expected skip reason or "ok"})."""
    folder = tmp_path_factory.mktemp("corpus")
    frames = moving_pattern(24, 48, 64, np.random.default_rng(0))
    expected = {}
    for file, kwargs in VARIANTS.values():
        write_video(folder / file, frames, fps=25, **kwargs)
        expected[file] = "ok"
    write_video(folder / "rotated.mp4", frames, fps=25, rotation=90)
    expected["rotated.mp4"] = "ok"
    write_video(folder / "short.mkv", frames[:3], fps=25)
    data = (folder / "a.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(data[:len(data) // 2])
    (folder / "empty.avi").write_bytes(b"")
    (folder / "text.mov").write_text("hello\n" * 100)
    expected.update(BAD)
    manifest = folder / "train.csv"
    manifest.write_text("".join(f"{name} {label}\n" for label, name in enumerate(sorted(expected))))
    return manifest, expected


def prepare(capsys, *argv: str, pad: bool = False) -> tuple[int, dict]:
    code = main([*argv, *CLIP, f"data.pad_short_videos={str(pad).lower()}", "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out) if out else {}


def shard_bytes(dest: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(dest.glob("shard-*")) if p.is_file()}


def test_every_good_video_lands_in_a_shard_with_its_label_and_bad_ones_are_reported(ray_local, capsys, tmp_path,
                                                                                  corpus):
    manifest, expected = corpus
    dest = tmp_path / "prepared"
    code, report = prepare(capsys, str(manifest), "--out", str(dest), "--videos-per-shard", "4", "--short-side", "32")
    assert code == 0 and report["complete"]
    assert {s["source"].rsplit("/", 1)[1]: s["reason"] for s in report["skipped"]} == BAD
    good = sorted(name for name, reason in expected.items() if reason == "ok")
    assert report["counts"] == {"ok": len(good), "corrupt": 1, "empty": 1, "missing": 1, "not_video": 1,
                                "too_short": 1}
    assert len(report["shards"]) == math.ceil(len(expected) / 4)
    assert sum(len(s["members"]) for s in report["shards"]) == len(good)

    refs = list_videos([str(dest)])  # how training reads it
    labels = {name: label for label, name in enumerate(sorted(expected))}
    assert [(r.member, r.label) for r in refs] == [(f"{labels[name]:09d}.mp4", labels[name]) for name in good]
    checked = doctor.check([str(dest)], ClipSpec(frames_per_clip=8, frame_step=2))
    assert checked["counts"] == {"ok": len(good)}
    assert all(row["height"] == 32 or row["width"] == 32 for row in checked["files"])  # the short side
    assert [row["path"] for row in checked["files"]] == [str(r) for r in refs]


def test_killed_prepare_resumes_to_the_same_shards_and_other_settings_are_refused(ray_local, capsys, tmp_path,
                                                                                 corpus):
    manifest, _ = corpus
    options = ["--videos-per-shard", "1", "--short-side", "32"]
    whole = tmp_path / "whole"
    assert prepare(capsys, str(manifest), "--out", str(whole), *options)[0] == 0

    resumed = tmp_path / "resumed"
    address = ray_local.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = subprocess.Popen([sys.executable, "-m", "vjepa_ray.data", "prepare", str(manifest), "--out", str(resumed),
                               *options, *CLIP, "data.pad_short_videos=false", "data.decode_concurrency=1",
                               f"ray.address={address}"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(resumed.glob("shard-*.json")) and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    killed.kill()
    killed.wait()
    finished = len(list(resumed.glob("shard-*.json")))
    assert 1 <= finished < 15  # killed mid-way

    code, report = prepare(capsys, str(manifest), "--out", str(resumed), *options)
    assert code == 0 and report["resumed_shards"] >= finished
    assert shard_bytes(resumed) == shard_bytes(whole)
    assert json.loads((resumed / "manifest.json").read_text()) == {
        **json.loads((whole / "manifest.json").read_text()), "resumed_shards": report["resumed_shards"]}

    code = main([str(manifest), "--out", str(resumed), "--videos-per-shard", "2", *CLIP])
    err = capsys.readouterr().err
    assert code == 2 and "another preparation" in err and "--overwrite" in err and err.count("\n") == 1
    assert shard_bytes(resumed) == shard_bytes(whole)  # untouched


def test_a_refused_write_stops_with_a_clear_error_and_leaves_complete_shards(tmp_path, corpus):
    manifest, _ = corpus
    refs = [VideoRef(str(manifest.parent / "a.mp4"))]
    dest = tmp_path / "dest"
    dest.mkdir()
    settings = PrepareSettings(32, 1, None, None, ClipSpec(frames_per_clip=8, frame_step=2))
    first = write_shard(0, list(enumerate(refs)), ShardJob(settings, str(dest)))
    assert first["members"] == ["000000000"] and first["skipped"] == []
    complete = shard_bytes(dest)
    (dest / "shard-000001.tar.partial").mkdir()  # where the next shard's bytes go: refused
    with pytest.raises(DestinationError, match="cannot write shard shard-000001.tar at"):
        write_shard(1, list(enumerate(refs)), ShardJob(settings, str(dest)))
    assert {k: v for k, v in shard_bytes(dest).items() if k.startswith("shard-000000")} == complete


def test_settings_that_would_change_a_clip_exit_2(capsys, corpus, tmp_path):
    manifest, _ = corpus
    for argv, key in ((["--fps", "10"], "--fps"), (["--short-side", "16", "data.crop_size=64"], "--short-side")):
        with pytest.raises(SystemExit) as exit_info:
            main([str(manifest), "--out", str(tmp_path / "x"), *argv])
        assert exit_info.value.code == 2 and key in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_shared_clips(ray_local, capsys, tmp_path, shared_videos):
    dest = tmp_path / "shared"
    code, report = prepare(capsys, str(shared_videos), "--out", str(dest), "--videos-per-shard", "3", pad=True)
    assert code == 0
    assert [(s["source"].rsplit("/", 1)[1], s["reason"]) for s in report["skipped"]] == [
        ("decord__corrupted.mp4", "corrupt")]
    checked = doctor.check([str(dest)], ClipSpec(frames_per_clip=8, frame_step=2))
    assert checked["counts"] == {"ok": 5}
    sources = [json.loads(m)["source"].rsplit("/", 1)[1] for m in _json_members(dest)]
    assert sources == ["decord__flipping_a_pancake.mkv", "decord__video_0.mov", "mmaction2__demo.mp4",
                       "mmaction2__test.avi", "mmaction2__test.mp4"]


def _json_members(dest: Path) -> list[bytes]:
    import tarfile

    out = []
    for shard in sorted(dest.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            out.extend(tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".json"))
    return out


@pytest.mark.slow
def test_training_reads_the_prepared_shards_end_to_end(ray_local, capsys, tmp_path, one_thread):
    from vjepa_ray.config import builtin_config_path, load_config
    from vjepa_ray.train import driver
    from vjepa_ray.video.synthetic import make_moving_pattern_videos

    make_moving_pattern_videos(tmp_path / "raw", count=8, frames=24, size=(72, 96), seed=1)
    dest = tmp_path / "prepared"
    assert main([str(tmp_path / "raw"), "--out", str(dest), "--videos-per-shard", "4", "--json"]) == 0
    capsys.readouterr()
    cfg = load_config(builtin_config_path("local_demo"), [
        "meta.name=from_shards", f"ray.storage_path={tmp_path / 'runs'}", f"data.paths=[{dest}]",
        "data.synthetic_videos=0", "data.chunk_size=4", "data.batch_size=2", "model.pred_depth=2",
        "optimization.total_steps=2", "optimization.warmup_steps=1", "checkpoint.every_steps=2",
        "logging.every_steps=1", "ray.max_failures=0"])
    assert [r.member for r in list_videos(cfg.data.paths)] == [f"{i:09d}.mp4" for i in range(8)]
    summary = driver.run(cfg)
    assert summary["status"] == "finished" and summary["steps"] == 2
    assert summary["skipped_videos"] == 0 and summary["final_loss"] > 0

