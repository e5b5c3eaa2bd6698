"""Data pipeline cost: CPU per clip from raw and prepared videos, through Ray Data and without it.

Inputs, generated once and cached. Raw sources: per resolution (360p, 720p, 1080p) ``--videos`` H.264
videos of ``--seconds`` s at 25 fps (libx264 "veryfast": B-frames, the encoder's default keyframe interval of
250 frames) showing a translating colour texture under per-frame grain, at ``--bits-per-pixel`` (0.1 bit per
pixel per frame, web video's usual rate: 2.3 Mbit/s at 720p; the shared sample clips run 0.1-0.4). Prepared
sources: the same videos as `python -m vjepa_ray.data prepare` writes them for the bench's clip (its
defaults: short side 256, a keyframe every clip span), in one tar shard read in place.

Figures, with one decoder thread per clip and the crop/flip of a decode task (``data.decode_cpus=1``):

- ``clip_cost_cpu_s``: CPU seconds per clip of a decode task's work (`decode_video`: read, decode, crop,
  flip), raw and prepared, per resolution, the sources alternated each round;
  ``prepared_vs_raw_clip_cost`` is prepared over raw at 720p;
- ``pipeline_vs_decode_only``: clips per CPU-second of `ClipStream` on a local Ray cluster (decode tasks
  in ``map_batches``, batches assembled into torch tensors in the driver) over the same per-file work in a
  plain loop in this process, alternated (ABBA), after a warm-up epoch; for raw (360p and 720p) and for
  prepared sources, whose epochs list each video more times so that an epoch holds about as much decode
  work as a raw one;
- ``decode_cores_per_gpu``: the cores that keep one GPU fed at ``--gpu-clips-per-s``: that rate times the
  CPU per clip, over the pipeline's ratio (so Ray's own cost counts), per source kind and resolution;
- ``clip_vs_full_decode_cost``: one clip's CPU time over decoding every frame of the same 720p video to
  RGB (what a decode-everything loader pays).

Cores are counted as CPU seconds actually spent: for the pipeline, the user+system time of this process
and every process under it (GCS, raylet, Ray workers) during the measured epochs, so Ray's own overhead
counts against it; otherwise, this process's CPU time. Clips per CPU-second is then clips/s per fully used
core, which holds on a shared machine where wall time does not.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import math
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

from vjepa_ray.bench._processes import tree_cpu_seconds
from vjepa_ray.config import DataConfig, load_config

# PyAV, numpy, torch and the data pipeline are imported by the functions that use them: ``bench data --help``
# reads the options without them.
if TYPE_CHECKING:
    from vjepa_ray.data.pipeline import DecodeJob
    from vjepa_ray.data.prepare import PrepareSettings
    from vjepa_ray.data.sources import VideoRef

logger = logging.getLogger(__name__)

RESOLUTIONS = {"360p": (360, 640), "720p": (720, 1280), "1080p": (1080, 1920)}
PIPELINE_RESOLUTIONS = ("360p", "720p")
SIZING_RESOLUTION = "720p"

# No GPU step rate of ours has been measured, so the default rate is derived from published figures:
GPU_CLIPS_PER_S = 156.0
GPU_CLIPS_PER_S_SOURCE = (
    "derived, not measured: 2.54 TFLOP per clip for the V-JEPA ViT-L/16 step on 16x224x224 clips (target "
    "encoder forward on all 1568 tokens; context encoder and predictor forward+backward for both mask configs "
    "at the reference's context/target token fractions 0.23/0.48 and 0.066/0.70; counted with "
    "torch.utils.flop_counter on vjepa_ray.models) at 40% MFU of one H100 SXM's 989 TFLOP/s dense BF16 peak "
    "(NVIDIA H100 datasheet; 38-43% BF16 MFU is what Llama 3 pretraining reports on H100s, Dubey et al. "
    "2024, 'The Llama 3 Herd of Models', Table 4): 0.40 x 989 / 2.54 = 156 clips/s per GPU")

_GRAIN_LEVELS = 12   # per-frame grain, +-levels of 8 bits: enough detail that the encoder spends its bitrate
_GRAIN_FIELDS = 7    # grain fields cycled: farther apart than any reference the encoder keeps
_IDLE_PROBE_S = 3.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--videos", type=int, default=2, help="videos per resolution (default 2)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each video (default 10)")
    parser.add_argument("--fps", type=float, default=25.0)
    parser.add_argument("--bits-per-pixel", type=float, default=0.1,
                        help="raw sources' bitrate in bits per pixel per frame (default 0.1)")
    parser.add_argument("--frames", type=int, default=16, help="frames per clip")
    parser.add_argument("--step", type=int, default=4, help="frame step")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--cost-clips", type=int, default=4, help="clips per video per cost round (default 4)")
    parser.add_argument("--cost-rounds", type=int, default=2, help="alternated rounds of the cost figure")
    parser.add_argument("--repeat", type=int, default=6,
                        help="times each raw video is listed in a pipeline epoch (default 6: 24 files)")
    parser.add_argument("--rounds", type=int, default=4, help="alternated pipeline / decode-only rounds")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--gpu-clips-per-s", type=float, default=GPU_CLIPS_PER_S,
                        help=f"one GPU's training rate, for decode_cores_per_gpu (default {GPU_CLIPS_PER_S:g}: "
                             "derived from published figures, see the JSON)")
    parser.add_argument("--cache", default="~/.cache/vjepa_ray/bench_data", help="where the videos are kept")


def write_texture_video(path: Path, seconds: float, height: int, width: int, fps: float, seed: int,
                        bits_per_pixel: float) -> Path:
    """A periodic colour texture translating at a constant velocity under per-frame grain, encoded frame by
    frame (a long video never sits in memory whole) at ``bits_per_pixel`` per frame."""
    import av
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    texture = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        for _ in range(4):  # whole periods across the frame, so shifting by np.roll is seamless
            ky, kx = rng.integers(1, 12, size=2)
            texture[..., c] += np.sin(2 * np.pi * (ky * y / height + kx * x / width) + rng.uniform(0, 6.3))
    texture = np.clip(127.5 + 50 * texture, 0, 255).astype(np.int16)
    grain = [rng.integers(-_GRAIN_LEVELS, _GRAIN_LEVELS + 1, (height, width, 1), dtype=np.int16)
             for _ in range(_GRAIN_FIELDS)]
    vy, vx = rng.integers(-3, 4, size=2)
    rate = Fraction(fps).limit_denominator(1001)
    tmp = path.with_suffix(".part.mp4")
    with av.open(str(tmp), "w") as container:
        bitrate = round(bits_per_pixel * height * width * fps)
        stream = container.add_stream("libx264", rate=rate, options={"preset": "veryfast", "b": str(bitrate)})
        stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
        for t in range(int(round(seconds * fps))):
            image = np.roll(texture, (vy * t, vx * t), axis=(0, 1)) + grain[t % _GRAIN_FIELDS]
            frame = av.VideoFrame.from_ndarray(np.clip(image, 0, 255).astype(np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    tmp.rename(path)
    return path


def _raw_videos(cache: Path, args: argparse.Namespace) -> dict[str, list[Path]]:
    videos: dict[str, list[Path]] = {}
    for name, (height, width) in RESOLUTIONS.items():
        videos[name] = []
        for i in range(args.videos):
            path = cache / f"{name}_{args.seconds:g}s_{args.bits_per_pixel:g}bpp_{i}.mp4"
            if not path.exists():
                write_texture_video(path, args.seconds, height, width, args.fps, i + height, args.bits_per_pixel)
            videos[name].append(path)
    return videos


def _prepared_videos(cache: Path, raw: dict[str, list[Path]], settings: PrepareSettings) -> dict[str, list[VideoRef]]:
    """The raw videos in one shard written by `data prepare`'s shard writer, by resolution."""
    from vjepa_ray.data.prepare import ShardJob, fingerprint, shard_name, write_shard
    from vjepa_ray.data.sources import VideoRef, list_videos

    ordered = [(name, VideoRef(str(path))) for name, paths in raw.items() for path in paths]
    dest = cache / f"prepared_{fingerprint(settings, [ref for _, ref in ordered])}"
    shard = dest / shard_name(0)
    if not shard.exists():  # the writer renames a shard into place once it is complete
        dest.mkdir(exist_ok=True)
        write_shard(0, list(enumerate(ref for _, ref in ordered)), ShardJob(settings, str(dest)))
    prepared: dict[str, list[VideoRef]] = {name: [] for name in raw}
    for ref in list_videos([str(shard)]):
        prepared[ordered[int(Path(ref.member).stem)][0]].append(ref)
    return prepared


def _clip_costs(sources: dict[str, list[VideoRef]], job: DecodeJob, clips: int, rounds: int) -> dict[str, float]:
    """CPU seconds per clip of a decode task's work for each named list of videos; the lists are taken in
    turn, in reverse order every other round, so that a shared machine's changing load weighs on all alike."""
    from vjepa_ray.data.pipeline import decode_video

    cpu: Counter = Counter()
    count: Counter = Counter()
    names = list(sources)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.process_time()
            for slot, ref in enumerate(sources[name]):
                for c in range(clips):
                    count[name] += len(decode_video(ref, job, job.rng(r, slot * clips + c)))
            cpu[name] += time.process_time() - start
    return {name: cpu[name] / count[name] for name in names}


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


def _compare(refs: list[VideoRef], data: DataConfig, rounds: int) -> dict:
    """Pipeline and decode-only on the same files (on the running local cluster), alternated (ABBA) so that
    a shared machine's changing load weighs on both sides alike."""
    totals = {"pipeline": [0, 0.0], "decode_only": [0, 0.0]}
    by_role: Counter = Counter()
    ratios = []
    for r in range(rounds):
        sides = ["pipeline", "decode_only"] if r % 2 == 0 else ["decode_only", "pipeline"]
        got = {side: (_pipeline_epoch if side == "pipeline" else _decode_only)(refs, data, r) for side in sides}
        by_role.update(got["pipeline"][1])
        got["pipeline"] = (got["pipeline"][0], sum(got["pipeline"][1].values()))
        for side, (clips, cpu) in got.items():
            totals[side][0] += clips
            totals[side][1] += cpu
        ratios.append((got["pipeline"][0] / got["pipeline"][1]) / (got["decode_only"][0] / got["decode_only"][1]))
    out = {side: {"clips": clips, "cpu_s": round(cpu, 3), "clips_per_cpu_s": round(clips / cpu, 3)}
           for side, (clips, cpu) in totals.items()}
    out["pipeline"]["cpu_s_by_process"] = {role: round(seconds, 3) for role, seconds in sorted(by_role.items())}
    out["pipeline_vs_decode_only"] = round(totals["pipeline"][0] / totals["pipeline"][1]
                                           / (totals["decode_only"][0] / totals["decode_only"][1]), 3)
    out["pipeline_vs_decode_only_per_round"] = [round(x, 3) for x in ratios]
    out["files_per_epoch"] = len(refs)
    return out


def _compare_sources(sources: dict[str, list[VideoRef]], data: DataConfig, rounds: int, cpus: int) -> dict:
    """`_compare` for each named list of files on one fresh local cluster; the first pipeline epoch (workers
    start, modules import) is not counted."""
    import ray

    # address="local": always a fresh cluster of this process's own children (whose CPU time is counted),
    # never one that `ray start` left running on the machine.
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        idle = tree_cpu_seconds()
        time.sleep(_IDLE_PROBE_S)
        idle = (sum(tree_cpu_seconds().values()) - sum(idle.values())) / _IDLE_PROBE_S
        first = next(iter(sources.values()))
        _pipeline_epoch(first[:len(first) // 3 or 1], data, round_index=rounds)
        compared = {name: _compare(refs, data, rounds) for name, refs in sources.items()}
    finally:
        ray.shutdown()
    return {"ray_cpus": cpus, "ray_idle_cpu_s_per_s": round(idle, 3), **compared}


def _full_vs_clip(path: Path, job: DecodeJob, clips: int = 4) -> dict:
    import av

    from vjepa_ray.video.decode import decode_clips

    start = time.process_time()
    for slot in range(clips):
        decode_clips(str(path), job.spec, job.rng(0, slot))
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
    return {"clip_cpu_s": round(clip_cpu, 4), "full_decode_cpu_s": round(full_cpu, 4), "frames": frames,
            "cost": round(clip_cpu / full_cpu, 4)}


def run(args: argparse.Namespace) -> dict:
    import torch

    from vjepa_ray.data.pipeline import DecodeJob
    from vjepa_ray.data.prepare import PrepareSettings
    from vjepa_ray.data.sources import VideoRef

    torch.set_num_threads(1)  # the crop's resize: one thread, like a decode task with decode_cpus=1
    cache = Path(args.cache).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    cfg = load_config(None, [f"data.frames_per_clip={args.frames}", f"data.frame_step={args.step}",
                             f"data.crop_size={args.crop}", "data.decode_cpus=1"])
    settings = PrepareSettings.from_config(cfg)
    start = time.perf_counter()
    raw_paths = _raw_videos(cache, args)
    prepared = _prepared_videos(cache, raw_paths, settings)
    logger.info("videos ready in %.1f s", time.perf_counter() - start)
    raw = {name: [VideoRef(str(p)) for p in paths] for name, paths in raw_paths.items()}

    job = DecodeJob.from_config(cfg.data, seed=0, epoch=0)
    cost = _clip_costs({f"{kind}/{name}": refs[name] for kind, refs in (("raw", raw), ("prepared", prepared))
                        for name in RESOLUTIONS}, job, args.cost_clips, args.cost_rounds)
    cost = {kind: {name: cost[f"{kind}/{name}"] for name in RESOLUTIONS} for kind in ("raw", "prepared")}
    logger.info("clip costs measured in %.1f s", time.perf_counter() - start)

    # Prepared epochs list each video more times: about as much decode work per epoch as a raw one.
    def pipeline_files(refs: dict[str, list[VideoRef]]) -> list[VideoRef]:
        return [ref for name in PIPELINE_RESOLUTIONS for ref in refs[name]]

    raw_files, prepared_files = pipeline_files(raw), pipeline_files(prepared)
    cheaper = sum(cost["raw"][n] for n in PIPELINE_RESOLUTIONS) / sum(cost["prepared"][n] for n in PIPELINE_RESOLUTIONS)
    prepared_repeat = max(args.repeat, math.ceil(args.repeat * cheaper))
    data = dataclasses.replace(cfg.data, paths=[str(cache)], batch_size=2, chunk_size=len(raw_files))
    compared = _compare_sources({"raw": raw_files * args.repeat, "prepared": prepared_files * prepared_repeat},
                                data, args.rounds, args.cpus)
    ratio = {kind: compared[kind]["pipeline_vs_decode_only"] for kind in ("raw", "prepared")}
    cores = {kind: {name: round(args.gpu_clips_per_s * seconds / ratio[kind], 2) for name, seconds in by_res.items()}
             for kind, by_res in cost.items()}
    full = _full_vs_clip(raw_paths["720p"][0], job)
    return {
        "figure": "data",
        "prepared_vs_raw_clip_cost": round(cost["prepared"]["720p"] / cost["raw"]["720p"], 4),
        "clip_cost_cpu_s": {kind: {name: round(s, 4) for name, s in by_res.items()} for kind, by_res in cost.items()},
        "pipeline_vs_decode_only": ratio,
        "decode_cores_per_gpu": {kind: cores[kind][SIZING_RESOLUTION] for kind in cores},
        "decode_cores_per_gpu_by_resolution": cores,
        "gpu_clips_per_s": args.gpu_clips_per_s,
        "gpu_clips_per_s_source": (GPU_CLIPS_PER_S_SOURCE if args.gpu_clips_per_s == GPU_CLIPS_PER_S
                                   else "given (--gpu-clips-per-s)"),
        "clip_vs_full_decode_cost": full["cost"],
        "pipeline": compared,
        "clip_vs_full": full,
        "videos": {"per_resolution": args.videos, "resolutions": list(RESOLUTIONS), "seconds": args.seconds,
                   "fps": args.fps, "raw": f"h264 (libx264 veryfast, default keyframe interval), "
                                           f"{args.bits_per_pixel:g} bits per pixel",
                   "prepared": {"short_side": settings.short_side, "keyframe_interval": settings.plan(args.fps)[0],
                                "videos_listed_per_epoch": f"{prepared_repeat} times (raw: {args.repeat})"}},
        "clip": {"frames": args.frames, "step": args.step, "crop": args.crop},
        "cores_counted_as": "CPU seconds spent (pipeline: this process + Ray daemons + workers)",
    }
