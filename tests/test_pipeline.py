"""The Ray Data clip pipeline: shapes, determinism, resume, bad input, Train workers, node placement."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from vjepa_ray.config import ConfigError, DataConfig
from vjepa_ray.data.pipeline import ClipStream, NoUsableVideosError, resplit_chunk
from vjepa_ray.video.synthetic import make_moving_pattern_videos

FRAMES, CROP, BATCH = 4, 32, 2


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("videos")
    make_moving_pattern_videos(folder, count=8, frames=20, size=(48, 64), fps=25, seed=3)
    return folder


def _data(paths, **kw) -> DataConfig:
    base = dict(paths=[str(p) for p in paths], frames_per_clip=FRAMES, frame_step=2, crop_size=CROP,
                batch_size=BATCH, chunk_size=4)
    return DataConfig(**{**base, **kw})


def _take(stream: ClipStream, count: int) -> list:
    return list(itertools.islice(iter(stream), count))


def test_clips_are_seeded_and_resume_from_a_chunk(ray_local, video_dir):
    data = _data([video_dir])  # 8 videos, chunks of 4 -> 2 chunks per epoch, 2 batches per chunk
    stream = ClipStream(data, seed=0)
    batches = _take(stream, 6)
    for b in batches:
        assert b.clips.dtype == torch.uint8 and b.clips.shape == (BATCH, FRAMES, CROP, CROP, 3)
        assert b.clips.float().std() > 10  # real pictures, not placeholders
        assert sum(b.skipped.values()) == 0
    assert [b.position for b in batches] == [(0, 0), (0, 0), (0, 1), (0, 1), (1, 0), (1, 0)]
    assert stream.position == (1, 1)
    assert {k: stream.state_dict()[k] for k in ("epoch", "chunk", "batch")} == {"epoch": 1, "chunk": 1, "batch": 0}
    first_epoch = [v for b in batches[:4] for v in b.videos]
    assert sorted(first_epoch) == sorted(str(p) for p in video_dir.glob("*.mp4"))  # each video once

    # Same seed, same clips; another seed, another order and other crops.
    again = _take(ClipStream(data, seed=0), 6)
    assert all(torch.equal(a.clips, b.clips) and a.videos == b.videos for a, b in zip(batches, again))
    other = _take(ClipStream(data, seed=1), 2)
    assert not torch.equal(other[0].clips, batches[0].clips)

    # Resume at (epoch 0, chunk 1): exactly the rest of the stream.
    resumed = ClipStream(data, seed=0)
    resumed.load_state_dict([{"epoch": 0, "chunk": 1}])  # a checkpoint's of the older form
    resumed = _take(resumed, 4)
    assert all(torch.equal(a.clips, b.clips) and a.position == b.position for a, b in zip(batches[2:], resumed))


def _bad_files(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "text.mp4").write_text("not a video at all\n" * 20)
    return [folder / "empty.mp4", folder / "text.mp4", folder / "missing.mp4"]


def test_bad_videos_are_skipped_counted_and_logged_once(ray_local, video_dir, tmp_path, caplog):
    good = sorted(video_dir.glob("*.mp4"))[:4]
    manifest = tmp_path / "list.txt"
    manifest.write_text("".join(f"{p} 0\n" for p in good + _bad_files(tmp_path)))
    # One chunk of 7 files: 7 clips wanted -> 3 batches, though only 4 videos decode.
    stream = ClipStream(_data([manifest], chunk_size=7), seed=0)
    caplog.set_level(logging.WARNING, logger="vjepa_ray.data.pipeline")
    batches = _take(stream, 6)  # two epochs
    assert [b.position for b in batches] == [(0, 0)] * 3 + [(1, 0)] * 3
    for epoch in (batches[:3], batches[3:]):
        skipped = sum((b.skipped for b in epoch), Counter())
        assert sum(skipped.values()) == 3 and skipped["empty"] == 1 and skipped["missing"] == 1
        # Refilled from the 4 good videos: every rank still yields its 3 batches.
        assert set(v for b in epoch for v in b.videos) == {str(p) for p in good}
    logged = [r.getMessage() for r in caplog.records if "skipping video" in r.getMessage()]
    assert len(logged) == 3 and any("missing.mp4" in m for m in logged)


def _same(a, b) -> bool:
    return torch.equal(a.clips, b.clips) and a.videos == b.videos and a.position == b.position \
        and a.skipped == b.skipped


def test_a_restart_mid_chunk_yields_the_rest_bit_for_bit(ray_local, video_dir, tmp_path):
    good = sorted(video_dir.glob("*.mp4"))[:5]
    manifest = tmp_path / "list.txt"
    manifest.write_text("".join(f"{p}\n" for p in good + _bad_files(tmp_path)))
    # Chunks of 4 files among 8 (3 bad): 2 batches of 2 per chunk, with skips and refills in some.
    stream = ClipStream(_data([manifest], chunk_size=4), seed=0)
    batches, states = [], []
    for batch in itertools.islice(iter(stream), 5):
        batches.append(batch)
        states.append(stream.state_dict())
    assert states[0]["batch"] == 1 and states[1]["batch"] == 0  # mid-chunk, then at the next chunk's start
    assert sum(sum(b.skipped.values()) for b in batches) >= 2
    for k in (0, 2):  # interrupted after batch k: mid-chunk, in both chunks
        resumed = ClipStream(_data([manifest], chunk_size=4), seed=0)
        resumed.load_state_dict([json.loads(json.dumps(states[k]))])  # as train_state.json keeps it
        rest = _take(resumed, 4 - k)
        assert all(_same(a, b) for a, b in zip(batches[k + 1:], rest)), k


def test_resplit_keeps_every_untrained_clip_once_in_whole_micro_batches():
    # Two old ranks with 4 clips each; rank 0 trained 2, rank 1 trained 3; 2 clips no rank had.
    shares = [[(0, 0), (2, 0), (4, 0), (6, 0)], [(1, 0), (3, 0), (5, 0), (7, 0)]]
    states = [{"done": [2, 0]}, {"done": [5, 0]}]
    split = resplit_chunk(states, shares, [(8, 0), (9, 0)], world_size=2, batch_size=2)
    assert split == [[(4, 0), (6, 0)], [(7, 0), (8, 0)]]  # 5 untrained, 4 kept, 1 (< 2 x 2) dropped
    assert resplit_chunk([{"done": None}] * 2, shares, [], world_size=3, batch_size=1) == [
        [(0, 0), (1, 0)], [(2, 0), (3, 0)], [(4, 0), (5, 0)]]  # nothing trained yet: 8 -> 3 x 2


def _run(data: DataConfig, world: int, states: list | None, batches: int) -> tuple[list, list]:
    """``batches`` batches of every rank of a ``world``-rank run resumed from ``states``; their videos
    and the ranks' states after."""
    streams = [ClipStream(data, seed=0, rank=r, world_size=world) for r in range(world)]
    videos = []
    for stream in streams:
        if states is not None:
            stream.load_state_dict(states)
        videos += [v for b in _take(stream, batches) for v in b.videos]
    return videos, [s.state_dict() for s in streams]


def test_an_elastic_restart_mid_chunk_trains_no_clip_twice(ray_local, video_dir):
    # One chunk of 8 videos, 1 clip each. Two ranks with micro batches of 2 train 1 batch each ...
    data = _data([video_dir], chunk_size=8)
    trained, states = _run(data, 2, None, 1)
    # ... then one rank with micro batches of 4 takes the 4 clips they left: one batch, the chunk is done.
    after, states = _run(dataclasses.replace(data, batch_size=4), 1, states, 1)
    chunk = trained + after
    assert len(chunk) == len(set(chunk)) == 8
    assert states[0]["epoch"] == 1 and states[0]["batch"] == 0
    # Two ranks of 2 train 4 clips; two ranks of 1 split the 4 left and train one each; then either the same
    # layout or one rank goes on: every clip of the chunk once.
    first, states = _run(data, 2, None, 1)
    second, split = _run(dataclasses.replace(data, batch_size=1), 2, states, 1)
    assert [len(s["share"]) for s in split] == [2, 2] and [s["batch"] for s in split] == [1, 1]
    for world, batches in ((2, 1), (1, 2)):
        rest, after = _run(dataclasses.replace(data, batch_size=1), world, split, batches)
        chunk = first + second + rest
        assert len(chunk) == len(set(chunk)) == 8, world
        assert after[0]["epoch"] == 1 and after[0]["share"] is None


def test_a_source_of_only_bad_videos_is_a_clear_error(ray_local, tmp_path):
    _bad_files(tmp_path / "bad")
    manifest = tmp_path / "bad.txt"
    manifest.write_text("".join(f"{p}\n" for p in _bad_files(tmp_path / "bad")))
    stream = ClipStream(_data([manifest], chunk_size=2, batch_size=1), seed=0)
    with pytest.raises(NoUsableVideosError, match="none of the 3 videos"):
        next(iter(stream))


def test_chunks_too_small_for_a_batch_per_worker_are_a_config_error(video_dir):
    with pytest.raises(ConfigError, match="data.chunk_size"):
        ClipStream(_data([video_dir], chunk_size=4, batch_size=3), seed=0, rank=0, world_size=2)


@pytest.mark.slow
def test_train_workers_get_disjoint_shares_and_equal_batch_counts(ray_local, video_dir, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def _record_shares(config: dict) -> None:  # nested: pickled by value (tests/ is not importable)
        import ray.train

        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        stream = ClipStream(DataConfig(**config["data"]), seed=0, rank=rank, world_size=world)
        got = [{"position": list(b.position), "videos": list(b.videos), "shape": list(b.clips.shape)}
               for b in itertools.islice(iter(stream), config["batches"])]
        Path(config["out"], f"rank{rank}.json").write_text(json.dumps(got))

    # A bad file among 8 good ones: rank shares differ in size, batch counts must not.
    bad = _bad_files(tmp_path / "bad")[1]
    manifest = tmp_path / "all.txt"
    manifest.write_text("".join(f"{p}\n" for p in sorted(video_dir.glob("*.mp4")) + [bad]))
    data = dataclasses.asdict(_data([manifest], chunk_size=4, batch_size=1))
    TorchTrainer(_record_shares, train_loop_config={"data": data, "batches": 6, "out": str(tmp_path)},
                 scaling_config=ScalingConfig(num_workers=2),
                 run_config=RunConfig(storage_path=str(tmp_path / "runs"))).fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for got in ranks:
        assert len(got) == 6 and all(b["shape"] == [1, FRAMES, CROP, CROP, 3] for b in got)
        assert [tuple(b["position"]) for b in got] == [(0, 0), (0, 0), (0, 1), (0, 1), (0, 2), (0, 2)]
    for chunk in range(3):
        mine = [{v for b in got if b["position"] == [0, chunk] for v in b["videos"]} for got in ranks]
        assert mine[0] and mine[1] and not mine[0] & mine[1]
    seen = {v for got in ranks for b in got for v in b["videos"]}
    assert seen == {str(p) for p in video_dir.glob("*.mp4")}  # an epoch covers every good video


@pytest.mark.slow
def test_fractional_train_workers_and_their_decoding_stay_on_their_labelled_nodes(ray_multinode, video_dir, tmp_path):
    import ray

    from vjepa_ray.config import load_config
    from vjepa_ray.train.trainer import build_trainer

    def decoded_clips(data: DataConfig, seed: int) -> list[dict]:
        """One epoch's clip rows as the stream's decode tasks give them, skip rows dropped."""
        from vjepa_ray.data.pipeline import DecodeJob, _row, decode_dataset
        from vjepa_ray.data.sources import epoch_order, list_videos

        refs = list_videos(data.paths, data.weights)
        order = epoch_order(refs, data.weights, seed, 0)
        rows = [_row(refs[i], slot // data.chunk_size, slot) for slot, i in enumerate(order)]
        return [row for row in decode_dataset(rows, DecodeJob.from_config(data, seed, 0), data).iter_rows()
                if not row["skip_reason"]]

    def _record_nodes(config: dict) -> None:  # nested: pickled by value (tests/ is not importable)
        import ray.train

        rank = ray.train.get_context().get_world_rank()
        rows = decoded_clips(DataConfig(**config["data"]), seed=rank)
        nodes = {"worker": ray.get_runtime_context().get_node_id(), "decode": sorted({r["decode_node"] for r in rows})}
        Path(config["out"], f"rank{rank}.json").write_text(json.dumps(nodes))

    cpu_node = ray_multinode.add_node(num_cpus=2, labels={"node-type": "cpu"})
    # A GPU node in all but its GPUs: one CPU and two simulated ones, for two workers of half a CPU each.
    gpu_node = ray_multinode.add_node(num_cpus=1, resources={"sim_gpu": 2}, labels={"node-type": "gpu"})
    ray_multinode.wait_for_nodes()
    ray.init(address=ray_multinode.address, include_dashboard=False, log_to_driver=False)
    data = _data([video_dir], decode_label_selector={"node-type": "cpu"}, chunk_size=8)
    rows = decoded_clips(data, seed=0)
    assert len(rows) == 8 and all(r["clip"].shape == (FRAMES, CROP, CROP, 3) for r in rows)
    assert {r["decode_node"] for r in rows} == {cpu_node.node_id}

    cfg = load_config(None, ["ray.num_workers=2", "ray.cpus_per_worker=0.5", "ray.worker_resources={sim_gpu: 1}",
                             "ray.worker_label_selector={node-type: gpu}", f"ray.storage_path={tmp_path / 'runs'}"])
    build_trainer(cfg, _record_nodes, {"data": dataclasses.asdict(data), "out": str(tmp_path)}, name="nodes").fit()
    placed = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert placed == [{"worker": gpu_node.node_id, "decode": [cpu_node.node_id]}] * 2


def _clips_in_order(batch) -> list[torch.Tensor]:
    groups = (batch.clips,) if isinstance(batch.clips, torch.Tensor) else batch.clips
    return [clip for group in groups for clip in group]


def test_sources_of_several_clip_lengths_and_images_batch_by_length_and_resume(ray_local, tmp_path):
    from PIL import Image

    short, long, images = tmp_path / "short", tmp_path / "long", tmp_path / "images"
    make_moving_pattern_videos(short, count=3, frames=20, size=(48, 64), fps=25, seed=4)
    make_moving_pattern_videos(long, count=3, frames=20, size=(48, 64), fps=25, seed=5)
    images.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(images / "a.png")
    Image.fromarray(pixels[::-1]).save(images / "b.jpg", quality=95)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    data = _data([short, long, images], frames_per_clip_per_source=[4, 6, 2], chunk_size=9, batch_size=4)
    stream = ClipStream(data, seed=0)
    batches, states = [], []
    for batch in itertools.islice(iter(stream), 2):  # one chunk of 9 files: 8 good -> 2 batches of 4
        batches.append(batch)
        states.append(stream.state_dict())
    frames_of = {str(short): 4, str(long): 6, str(images): 2}
    seen = set()
    for batch in batches:
        clips = _clips_in_order(batch)
        lengths = [len(clip) for clip in clips]
        assert lengths == sorted(lengths) and len(clips) == BATCH * 2
        if len(set(lengths)) > 1:  # one tensor per length, ascending
            assert [g.shape[1] for g in batch.clips] == sorted(set(lengths))
        for clip, video in zip(clips, batch.videos):
            assert len(clip) == frames_of[str(Path(video).parent)] and clip.shape[1:] == (CROP, CROP, 3)
            if video.endswith((".png", ".jpg")):  # a static clip: its frame repeated
                assert all(torch.equal(frame, clip[0]) for frame in clip) and clip.float().std() > 10
            else:
                assert not torch.equal(clip[0], clip[-1])  # the pattern moves
        seen.update(batch.videos)
    assert seen == {str(p) for folder in (short, long) for p in folder.glob("*.mp4")} | {
        str(images / "a.png"), str(images / "b.jpg")}
    assert sum((b.skipped for b in batches), Counter()) == Counter(corrupt=1)
    assert any(isinstance(b.clips, tuple) for b in batches)  # a batch of mixed lengths came as groups

    resumed = ClipStream(data, seed=0)
    resumed.load_state_dict([json.loads(json.dumps(states[0]))])
    rest = _take(resumed, 1)[0]
    assert rest.videos == batches[1].videos and all(
        torch.equal(a, b) for a, b in zip(_clips_in_order(rest), _clips_in_order(batches[1])))
