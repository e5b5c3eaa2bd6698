"""The data-set doctor: per-file status and reason, counts, exit status, config overrides."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vjepa_ray.data.doctor import main
from vjepa_ray.video.synthetic import moving_pattern, write_video

# The clip these tests' 24-frame videos must hold, independent of the built-in demo's settings.
CLIP = ["data.frames_per_clip=8", "data.frame_step=2", "data.clips_per_video=1"]


def run_json(capsys, argv: list[str]) -> tuple[int, dict]:
    code = main(argv + CLIP + ["--json", "--workers", "1"])
    return code, json.loads(capsys.readouterr().out)


@pytest.fixture
def mixed_folder(tmp_path):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    frames = moving_pattern(24, 48, 64, np.random.default_rng(0))
    write_video(folder / "good.mp4", frames, fps=25, codec="h264", gop=8)
    write_video(folder / "sub" / "good.webm", frames, fps=25, codec="vp9", audio=True)
    write_video(folder / "short.mkv", frames[:3], fps=25, codec="h264")
    data = (folder / "good.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (folder / "empty.avi").write_bytes(b"")
    (folder / "text.mov").write_text("hello\n" * 100)
    (folder / "readme.txt").write_text("not scanned: not a video extension")
    return folder


def test_mixed_folder_statuses_and_counts(capsys, mixed_folder):
    code, report = run_json(capsys, [str(mixed_folder), "data.pad_short_videos=false"])
    rows = {row["path"].split("/data/")[1]: row for row in report["files"]}
    assert {name: (row["status"], row["reason"]) for name, row in rows.items()} == {
        "empty.avi": ("skipped", "empty"),
        "good.mp4": ("ok", None),
        "short.mkv": ("skipped", "too_short"),
        "text.mov": ("skipped", "not_video"),
        "truncated.mp4": ("skipped", "corrupt"),
        "sub/good.webm": ("ok", None),
    }
    assert report["counts"] == {"corrupt": 1, "empty": 1, "not_video": 1, "ok": 2, "too_short": 1}
    good = rows["sub/good.webm"]
    assert (good["frames"], good["fps"], good["width"], good["height"], good["codec"]) == (24, 25.0, 64, 48, "vp9")
    assert rows["short.mkv"]["frames"] == 3  # known before the skip
    assert code == 1


def test_padding_on_makes_the_short_video_ok(capsys, mixed_folder):
    code, report = run_json(capsys, [str(mixed_folder / "short.mkv"), str(mixed_folder / "good.mp4")])
    assert report["counts"] == {"ok": 2} and code == 0


def test_an_explicit_file_is_checked_whatever_its_extension(capsys, mixed_folder, tmp_path):
    renamed = tmp_path / "clip.bin"
    renamed.write_bytes((mixed_folder / "good.mp4").read_bytes())
    code, report = run_json(capsys, [str(renamed), str(mixed_folder / "readme.txt"), str(tmp_path / "gone.mp4")])
    assert [(r["status"], r["reason"]) for r in report["files"]] == [
        ("ok", None), ("skipped", "not_video"), ("skipped", "missing")]
    assert code == 1


def test_table_output_and_empty_folder(capsys, mixed_folder, tmp_path):
    assert main([str(mixed_folder / "good.mp4")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok ") and "24 frames, 25 fps, 64x48, h264" in out and out.rstrip().endswith("ok 1")
    (tmp_path / "nothing").mkdir()
    assert main([str(tmp_path / "nothing")]) == 1


def test_bad_override_exits_2(capsys, mixed_folder):
    with pytest.raises(SystemExit) as exit_info:
        main([str(mixed_folder), "data.frame_step=0"])
    assert exit_info.value.code == 2
    assert "data.frame_step" in capsys.readouterr().err


def test_shared_clips(capsys, shared_videos):
    """decord__corrupted.mp4 is corrupt: training draws windows all over its 50 listed frames and decoding
    fails after frame 28, so part of its clips would be skipped; the full decode check reports it."""
    code, report = run_json(capsys, [str(shared_videos)])
    rows = {row["path"].rsplit("/", 1)[1]: row for row in report["files"]}
    assert {name: row["reason"] for name, row in rows.items()} == {
        "decord__corrupted.mp4": "corrupt",
        "decord__flipping_a_pancake.mkv": None,
        "decord__video_0.mov": None,
        "mmaction2__demo.mp4": None,
        "mmaction2__test.avi": None,
        "mmaction2__test.mp4": None,
    }
    corrupted = rows["decord__corrupted.mp4"]
    assert (corrupted["frames"], corrupted["width"], corrupted["height"], corrupted["codec"]) == (50, 1280, 720, "h264")
    assert report["counts"] == {"corrupt": 1, "ok": 5} and code == 1


def test_images_are_checked_as_images(capsys, tmp_path):
    from PIL import Image

    folder = tmp_path / "data"
    folder.mkdir()
    Image.fromarray(np.full((30, 40, 3), 200, np.uint8)).save(folder / "still.png")
    Image.fromarray(np.full((30, 40, 3), 90, np.uint8)).save(folder / "photo.jpg")
    (folder / "broken.jpg").write_bytes((folder / "photo.jpg").read_bytes()[:20])
    code, report = run_json(capsys, [str(folder)])
    rows = {row["path"].rsplit("/", 1)[1]: row for row in report["files"]}
    assert rows["still.png"]["status"] == rows["photo.jpg"]["status"] == "ok"
    assert (rows["still.png"]["codec"], rows["still.png"]["width"], rows["still.png"]["height"]) == ("image", 40, 30)
    assert rows["broken.jpg"]["reason"] == "corrupt"
    assert report["counts"] == {"corrupt": 1, "ok": 2} and code == 1
