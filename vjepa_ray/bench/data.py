"""Data pipeline throughput: clips per CPU-second through Ray Data vs. the same decode without Ray.

Three measurements on generated H.264 videos (moving textures, libx264 "veryfast", the encoder's
default keyframe interval), all with one decoder thread per clip:

- ``pipeline``: `ClipStream` on a local Ray cluster (decode + crop/flip in ``map_batches`` tasks,
  batches assembled into torch tensors in the driver), one fresh stream per round, after a warm-up;
- ``decode_only``: the same per-file work (`decode_clips` + `random_resized_crop_clip`) in a plain
  loop in this process;
- ``clip_vs_full_decode_cost``: CPU time of one clip (16 frames, step 4) from a 60 s 720p video over
  the CPU time of decoding every frame of it to RGB (what a decode-everything loader pays).

Cores are counted as CPU seconds actually spent: for the pipeline, the user+system time of this
process and every process under it (GCS, raylet, Ray workers) during the measured epochs, so Ray's
own overhead counts against it; for decode-only, this process's CPU time. Clips per CPU-second is
then clips/s per fully used core, which holds on a shared machine where wall time does not.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from vjepa_ray.bench._processes import tree_cpu_seconds
from vjepa_ray.config import DataConfig
from vjepa_ray.data.sources import VideoRef

logger = logging.getLogger(__name__)

RESOLUTIONS = {"360p": (360, 640), "720p": (720, 1280)}
_IDLE_PROBE_S = 3.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--videos", type=int, default=4, help="videos per resolution (default 4)")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each video (default 8)")
    parser.add_argument("--long-seconds", type=float, default=60.0, help="the 720p video for the clip-vs-full figure")
    parser.add_argument("--fps", type=float, default=25.0)
    parser.add_argument("--frames", type=int, default=16, help="frames per clip")
    parser.add_argument("--step", type=int, default=4, help="frame step")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=3,
                        help="times each video is listed: a round's epoch is videos x 2 x repeat files (default 3)")
    parser.add_argument("--rounds", type=int, default=4, help="alternated pipeline / decode-only rounds")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--cache", default="~/.cache/vjepa_ray/bench_data", help="where the videos are kept")


def write_texture_video(path: Path, seconds: float, height: int, width: int, fps: float, seed: int) -> Path:
    """A periodic colour texture translating at a constant velocity, encoded frame by frame (a 60 s 720p
    video never sits in memory whole)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    texture = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        for _ in range(4):  # whole periods across the frame, so shifting by np.roll is seamless
            ky, kx = rng.integers(1, 12, size=2)
            texture[..., c] += np.sin(2 * np.pi * (ky * y / height + kx * x / width) + rng.uniform(0, 6.3))
    texture = np.clip(127.5 + 50 * texture, 0, 255).astype(np.uint8)
    vy, vx = rng.integers(-3, 4, size=2)
    rate = Fraction(fps).limit_denominator(1001)
    tmp = path.with_suffix(".part.mp4")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=rate, options={"preset": "veryfast"})
        stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
        for t in range(int(round(seconds * fps))):
            frame = av.VideoFrame.from_ndarray(np.roll(texture, (vy * t, vx * t), axis=(0, 1)), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    tmp.rename(path)
    return path


def _videos(cache: Path, count: int, seconds: float, fps: float) -> list[Path]:
    paths = []
    for name, (height, width) in RESOLUTIONS.items():
        for i in range(count):
            path = cache / f"{name}_{seconds:g}s_{i}.mp4"
            if not path.exists():
                write_texture_video(path, seconds, height, width, fps, seed=i + height)
            paths.append(path)
    return paths


def _decode_only(refs: list[VideoRef], data: DataConfig, round_index: int) -> tuple[int, float]:
    """(clips, CPU seconds) of the decode tasks' work done in a plain loop in this process."""
    from vjepa_ray.data.pipeline import DecodeJob, decode_video

    job = DecodeJob.from_config(data, seed=0, epoch=round_index)
    clips, cpu = 0, time.process_time()
    for slot, ref in enumerate(refs):
        clips += len(decode_video(ref, job, job.rng(0, slot)))
    return clips, time.process_time() - cpu


def _pipeline_epoch(refs: list[VideoRef], data: DataConfig, round_index: int) -> tuple[int, Counter]:
    """(clips, CPU seconds by process role) for one epoch of a fresh `ClipStream`."""
    from vjepa_ray.data.pipeline import ClipStream

    cpu = tree_cpu_seconds()
    stream = ClipStream(data, seed=round_index, refs=refs)
    per_epoch = stream.num_chunks * stream.batches_per_chunk
    clips = sum(b.clips.shape[0] for b in itertools.islice(iter(stream), per_epoch))
    spent = tree_cpu_seconds()
    spent.subtract(cpu)
    return clips, spent


def _compare(refs: list[VideoRef], data: DataConfig, rounds: int, cpus: int) -> dict:
    """Pipeline and decode-only on the same files, alternated (ABBA) so that a shared machine's changing
    load weighs on both sides alike. The first pipeline epoch (workers start, modules import) is not
    counted."""
    import ray

    totals = {"pipeline": [0, 0.0], "decode_only": [0, 0.0]}
    by_role: Counter = Counter()
    ratios = []
    # address="local": always a fresh cluster of this process's own children (whose CPU time is counted),
    # never one that `ray start` left running on the machine.
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        idle = tree_cpu_seconds()
        time.sleep(_IDLE_PROBE_S)
        idle = (sum(tree_cpu_seconds().values()) - sum(idle.values())) / _IDLE_PROBE_S
        _pipeline_epoch(refs[:len(refs) // 3 or 1], data, round_index=rounds)
        for r in range(rounds):
            sides = ["pipeline", "decode_only"] if r % 2 == 0 else ["decode_only", "pipeline"]
            got = {side: (_pipeline_epoch if side == "pipeline" else _decode_only)(refs, data, r) for side in sides}
            by_role.update(got["pipeline"][1])
            got["pipeline"] = (got["pipeline"][0], sum(got["pipeline"][1].values()))
            for side, (clips, cpu) in got.items():
                totals[side][0] += clips
                totals[side][1] += cpu
            ratios.append((got["pipeline"][0] / got["pipeline"][1]) / (got["decode_only"][0] / got["decode_only"][1]))
    finally:
        ray.shutdown()
    out = {side: {"clips": clips, "cpu_s": round(cpu, 3), "clips_per_cpu_s": clips / cpu}
           for side, (clips, cpu) in totals.items()}
    out["pipeline"].update(ray_cpus=cpus, ray_idle_cpu_s_per_s=round(idle, 3),
                           cpu_s_by_process={role: round(seconds, 3) for role, seconds in sorted(by_role.items())})
    out["ratio_per_round"] = [round(x, 3) for x in ratios]
    return out


def _full_vs_clip(path: Path, data: DataConfig, clips: int = 6) -> dict:
    from vjepa_ray.video.decode import ClipSpec, decode_clips

    spec = ClipSpec.from_config(data)
    start = time.process_time()
    for seed in range(clips):
        decode_clips(str(path), spec, np.random.default_rng(seed))
    clip_cpu = (time.process_time() - start) / clips
    start = time.process_time()
    frames = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        for frame in container.decode(stream):
            frame.to_ndarray(format="rgb24")
            frames += 1
    full_cpu = time.process_time() - start
    return {"clip_cpu_s": clip_cpu, "full_decode_cpu_s": full_cpu, "frames": frames, "cost": clip_cpu / full_cpu}


def run(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(1)  # the crop's resize: one thread, like a decode task with decode_cpus=1
    cache = Path(args.cache).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    paths = _videos(cache, args.videos, args.seconds, args.fps)
    long_path = cache / f"720p_{args.long_seconds:g}s_long.mp4"
    if not long_path.exists():
        write_texture_video(long_path, args.long_seconds, *RESOLUTIONS["720p"], args.fps, seed=7)
    logger.info("videos ready in %.1f s", time.perf_counter() - start)

    refs = [VideoRef(str(p)) for p in paths] * args.repeat
    data = DataConfig(paths=[str(cache)], frames_per_clip=args.frames, frame_step=args.step,
                      crop_size=args.crop, batch_size=2, chunk_size=len(paths), decode_cpus=1.0)
    compared = _compare(refs, data, args.rounds, args.cpus)
    pipeline, decode_only = compared["pipeline"], compared["decode_only"]
    full = _full_vs_clip(long_path, data)
    return {
        "figure": "data",
        "pipeline_clips_per_s_per_core": round(pipeline["clips_per_cpu_s"], 3),
        "decode_only_clips_per_s_per_core": round(decode_only["clips_per_cpu_s"], 3),
        "pipeline_vs_decode_only": round(pipeline["clips_per_cpu_s"] / decode_only["clips_per_cpu_s"], 3),
        "clip_vs_full_decode_cost": round(full["cost"], 4),
        "pipeline_vs_decode_only_per_round": compared["ratio_per_round"],
        "pipeline": {k: round(v, 3) if isinstance(v, float) else v for k, v in pipeline.items()},
        "decode_only": {k: round(v, 3) if isinstance(v, float) else v for k, v in decode_only.items()},
        "clip_vs_full": {k: round(v, 4) if isinstance(v, float) else v for k, v in full.items()},
        "videos": {"per_resolution": args.videos, "repeat": args.repeat, "resolutions": list(RESOLUTIONS),
                   "seconds": args.seconds,
                   "fps": args.fps, "codec": "h264 (libx264 veryfast, default GOP)"},
        "clip": {"frames": args.frames, "step": args.step, "crop": args.crop},
        "cores_counted_as": "CPU seconds spent (pipeline: this process + Ray daemons + workers)",
    }
