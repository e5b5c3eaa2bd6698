"""The same clips come out of an S3 bucket (moto's server on loopback) as out of a local folder."""

from __future__ import annotations

import io
import itertools
import tarfile

import pytest
import torch

from vjepa_ray.config import DataConfig
from vjepa_ray.data.pipeline import ClipStream
from vjepa_ray.data.sources import list_videos
from vjepa_ray.video.synthetic import make_moving_pattern_videos

pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")
pafs = pytest.importorskip("pyarrow.fs")

KEYS = {"access_key": "testing", "secret_key": "testing"}


def test_clips_from_s3_equal_clips_from_a_local_folder(ray_local, s3_endpoint, tmp_path):
    local = tmp_path / "videos"
    paths = make_moving_pattern_videos(local, count=4, frames=16, size=(48, 64), seed=5)
    client = boto3.client("s3", endpoint_url=f"http://{s3_endpoint}", region_name="us-east-1",
                          aws_access_key_id=KEYS["access_key"], aws_secret_access_key=KEYS["secret_key"])
    client.create_bucket(Bucket="clips")
    for p in paths:
        client.upload_file(str(p), "clips", f"train/{p.name}")
    # The same videos as one WebDataset shard in the bucket.
    shard = io.BytesIO()
    with tarfile.open(fileobj=shard, mode="w") as tar:
        for p in paths:
            tar.add(str(p), arcname=p.name)
    client.put_object(Bucket="clips", Key="shards/train-000.tar", Body=shard.getvalue())
    fs = pafs.S3FileSystem(endpoint_override=s3_endpoint, scheme="http", region="us-east-1", **KEYS)

    def clips(entry: str, filesystem=None) -> list[torch.Tensor]:
        data = DataConfig(paths=[entry], frames_per_clip=4, frame_step=2, crop_size=32, batch_size=2, chunk_size=4)
        stream = ClipStream(data, seed=7, filesystem=filesystem)
        return [b.clips for b in itertools.islice(iter(stream), 4)]  # one epoch and a bit

    assert [r.uri for r in list_videos(["s3://clips/train"], filesystem=fs)] == [
        f"s3://clips/train/{p.name}" for p in paths]
    expected = clips(str(local))
    for got in (clips("s3://clips/train", fs), clips("s3://clips/shards/train-000.tar", fs)):
        assert len(got) == len(expected)
        assert all(torch.equal(a, b) for a, b in zip(expected, got))
