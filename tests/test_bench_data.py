"""``bench data``'s inputs at a toy size: raw videos at the bitrate asked for, their prepared copies in a shard
as `data prepare` writes it, and the per-clip cost measured for each list of videos."""

from __future__ import annotations

import argparse

import av
import pytest

from vjepa_ray.bench import data as bench
from vjepa_ray.config import load_config
from vjepa_ray.data.pipeline import DecodeJob
from vjepa_ray.data.prepare import PrepareSettings
from vjepa_ray.data.sources import VideoRef, open_video
from vjepa_ray.video.decode import read_video_info


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench_data")
    args = argparse.Namespace(videos=1, seconds=2.0, fps=25.0, bits_per_pixel=0.1)
    cfg = load_config(None, ["data.frames_per_clip=8", "data.frame_step=2", "data.crop_size=64"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench, "RESOLUTIONS", {"small": (96, 128), "large": (288, 384)})
        raw = bench._raw_videos(folder, args)
    settings = PrepareSettings.from_config(cfg, short_side=64)
    return cfg, raw, bench._prepared_videos(folder, raw, settings)


def test_raw_videos_have_the_bitrate_and_the_encoders_keyframe_interval(toy):
    _, raw, _ = toy
    (path,) = raw["large"]
    with av.open(str(path)) as container:
        packets = [p for p in container.demux(video=0) if p.size]
    bits_per_pixel = 8 * sum(p.size for p in packets) / (len(packets) * 288 * 384)
    assert len(packets) == 50 and 0.05 < bits_per_pixel < 0.2
    assert [p.is_keyframe for p in packets].count(True) == 1  # default interval: 250 frames


def test_prepared_shard_holds_every_raw_video_by_resolution_scaled_down(toy):
    _, raw, prepared = toy
    assert {name: len(refs) for name, refs in prepared.items()} == {"small": 1, "large": 1}
    assert prepared["small"][0].uri == prepared["large"][0].uri and prepared["large"][0].member
    with open_video(prepared["large"][0]) as member:
        info = read_video_info(member)
    assert (info.frames, info.height, info.width) == (50, 64, 84)  # short side 288 -> 64, never upscaled
    job = DecodeJob.from_config(toy[0].data, seed=0, epoch=0)
    costs = bench._clip_costs({"raw": [VideoRef(str(raw["large"][0]))], "prepared": prepared["large"]},
                              job, clips=2, rounds=2)
    assert set(costs) == {"raw", "prepared"} and all(cost > 0 for cost in costs.values())
