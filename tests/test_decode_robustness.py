"""One bad file never fails the task that reads it: frames that change size midway or exceed ``max_pixels``
(the header's size is only a claim), and any error nobody foresaw while decoding, are counted skips with a
reason, in training's decode, ``data check`` and the transcode ``prepare`` runs; a tar shard's label member
is read only up to a label's size."""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest

from vjepa_ray.data import doctor
from vjepa_ray.data.sources import MAX_LABEL_BYTES, shard_members
from vjepa_ray.video.decode import ClipSpec, VideoSkip, decode_clips, read_video_info, verify_video
from vjepa_ray.video.synthetic import moving_pattern, write_video
from vjepa_ray.video.transcode import transcode_video

SPEC = ClipSpec(frames_per_clip=8, frame_step=2)


def write_size_changing_video(path: Path, segment_frames: int = 12) -> Path:
    """An MPEG-TS stream of three segments, 80x80, 96x96 and 80x80 pixels: every clip of 16 frames or more
    spans a change of size."""
    rng = np.random.default_rng(0)
    parts = []
    for index, size in enumerate((80, 96, 80)):
        part = write_video(path.with_name(f"{path.stem}_{index}.ts"), moving_pattern(segment_frames, size, size, rng),
                           fps=25)
        parts.append(part.read_bytes())
        part.unlink()
    path.write_bytes(b"".join(parts))
    return path


@pytest.fixture(scope="module")
def changing(tmp_path_factory):
    return write_size_changing_video(tmp_path_factory.mktemp("changing") / "changing.ts")


def test_a_video_that_changes_size_midway_is_skipped_by_every_reader(changing):
    assert read_video_info(changing).width == 80  # the header (and the first frame) say 80x80
    for seed in range(4):  # wherever its clip falls
        with pytest.raises(VideoSkip, match="96x96 frame after 80x80") as skip:
            decode_clips(changing, SPEC, np.random.default_rng(seed))
        assert skip.value.reason == "size_changed"
    with pytest.raises(VideoSkip) as skip:
        verify_video(changing)
    assert skip.value.reason == "size_changed"
    with pytest.raises(VideoSkip) as skip:
        transcode_video(changing, io.BytesIO(), short_side=64, keyframe_interval=16)
    assert skip.value.reason == "size_changed"

    report = doctor.check([str(changing)], SPEC)
    assert report["counts"] == {"size_changed": 1} and report["files"][0]["width"] == 80


def test_every_decoded_frame_is_held_to_max_pixels(changing):
    with pytest.raises(VideoSkip, match="96x96 > max_pixels 6400") as skip:
        decode_clips(changing, ClipSpec(frames_per_clip=8, frame_step=2, max_pixels=80 * 80),
                     np.random.default_rng(0))
    assert skip.value.reason == "too_large_pixels"


class _FailingFile(io.BytesIO):
    """A source whose reads fail past ``limit`` bytes with an error no reader expects."""

    def __init__(self, data: bytes, limit: int):
        super().__init__(data)
        self.limit = limit

    def read(self, size: int = -1) -> bytes:
        if self.tell() + (size if size >= 0 else 0) > self.limit:
            raise KeyError("the reader broke")
        return super().read(size)


def test_an_unexpected_error_while_decoding_is_a_corrupt_skip(tmp_path):
    path = write_video(tmp_path / "a.mp4", moving_pattern(48, 64, 64, np.random.default_rng(0)), fps=25)
    data = path.read_bytes()
    with pytest.raises(VideoSkip, match="unexpected KeyError") as skip:
        verify_video(_FailingFile(data, len(data) // 2))
    assert skip.value.reason == "corrupt"


def _shard(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_a_label_member_is_read_only_up_to_a_labels_size(tmp_path, caplog):
    shard = _shard(tmp_path / "s.tar", {"a.mp4": b"v", "a.cls": b"3", "b.mp4": b"v",
                                        "b.cls": b"7" * (MAX_LABEL_BYTES + 1)})
    with caplog.at_level(logging.WARNING):
        refs = shard_members(shard, 0, None)
    assert [(r.member, r.label) for r in refs] == [("a.mp4", 3), ("b.mp4", None)]
    assert "b.cls" in caplog.text and "goes unlabelled" in caplog.text


def test_training_and_prepare_count_it_as_a_skip_with_its_reason(ray_local, changing, tmp_path):
    from vjepa_ray.config import DataConfig
    from vjepa_ray.data.pipeline import DecodeJob, _row, decode_rows
    from vjepa_ray.data.prepare import PrepareSettings, ShardJob, write_shard
    from vjepa_ray.data.sources import VideoRef

    good = write_video(tmp_path / "good.mp4", moving_pattern(40, 80, 80, np.random.default_rng(1)), fps=25)
    refs = [VideoRef(str(changing)), VideoRef(str(good))]
    data = DataConfig(frames_per_clip=8, frame_step=2, crop_size=32, clips_per_video=1)
    rows = [_row(ref, 0, slot) for slot, ref in enumerate(refs)]
    batch = {key: np.asarray([row[key] for row in rows]) for key in rows[0]}
    out = decode_rows(batch, DecodeJob.from_config(data, seed=0, epoch=0))  # a decode task's work
    assert list(out["skip_reason"]) == ["size_changed", ""] and out["clip"].shape == (2, 8, 32, 32, 3)

    settings = PrepareSettings(32, 2, None, None, SPEC)
    (tmp_path / "prepared").mkdir()
    record = write_shard(0, list(enumerate(refs)), ShardJob(settings, str(tmp_path / "prepared")))
    assert record["members"] == ["000000001"]
    assert [(s["source"], s["reason"]) for s in record["skipped"]] == [(str(changing), "size_changed")]
