"""Object-store memory a clip stream holds: decoded clips queued ahead of a training worker.

Each Train worker's ``ClipStream`` runs one Ray Data execution per epoch (the rest of the epoch in one
dataset), whose decode tasks write their blocks of clips into the object store of the node they ran on,
where the blocks wait until the worker's iterator takes them. How far decoding runs ahead of training is
not set by the stream (no chunk or queue depth of ours bounds it): Ray Data's streaming executor stops
launching decode tasks when its execution's object-store usage reaches its budget,
``RAY_DATA_OBJECT_STORE_MEMORY_LIMIT_FRACTION`` (0.5) of the cluster's object store, as each execution
sees it alone.

Phases of ``--seconds`` on one local cluster (``--cpus`` CPUs, an object store of ``--object-store-mb``),
each with fresh streams over ``--videos`` small moving-pattern videos listed ``--repeat`` times, at the
recipe's clip (16 frames, step 4, 224 crop, uint8: 2.3 MiB a clip), consumed at ``--clips-per-s``, below the
decode rate (a GPU slower than its decoders, the state a cluster sized with spare decode CPUs settles in),
so that the queue grows until something stops it:

- ``quarter_budget``, the baseline: one stream, with Ray Data's fraction set to 0.25
  (``DataContext.override_object_store_memory_limit_fraction``, which the stream's datasets copy);
- ``default_budget``: one stream at the default 0.5: were the queue bounded by the stream (its chunk, a
  prefetch depth), its plateau would equal the baseline's; under Ray Data's budget it doubles;
- ``two_streams``: two streams at once (two Train workers) at the default: whether their budgets add up.

Figures per phase, from the aggregate plasma usage that ``ray memory --stats-only`` reports, sampled every
0.5 s: ``plateau_mib`` (the mean over its last 15 s), ``growth_over_plateau_mib`` (over those 15 s: near 0
when it is one), ``peak_mib``, ``spilled_mib`` (spilled to disk since the cluster started), and
``plateau_over_budget``, the budget being the fraction x the store per stream; ``plateau_ratio_default``
is ``default_budget``'s plateau over the baseline's.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RAY_DATA_OBJECT_STORE_FRACTION = 0.5  # Ray Data's default RAY_DATA_OBJECT_STORE_MEMORY_LIMIT_FRACTION (2.60)
_SAMPLE_S = 0.5
_PLATEAU_S = 15.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--object-store-mb", type=int, default=400, help="the local cluster's object store")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local cluster (decode tasks)")
    parser.add_argument("--videos", type=int, default=4, help="distinct 256x256 videos of 3 s")
    parser.add_argument("--repeat", type=int, default=200, help="times each video is listed in an epoch")
    parser.add_argument("--batch", type=int, default=4, help="clips per batch (data.batch_size)")
    parser.add_argument("--seconds", type=float, default=90.0, help="length of each phase")
    parser.add_argument("--clips-per-s", type=float, default=0.5, help="each consumer's rate, below the decode rate")
    parser.add_argument("--cache", default="~/.cache/vjepa_ray/bench_object_store", help="where the videos are kept")


def _store_stats(address: str):
    """Object-store stats over all nodes, as ``ray memory --stats-only`` reads them."""
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    return get_memory_info_reply(get_state_from_address(address)).store_stats


def _consume(stream, clips_per_s: float, stop: threading.Event, counted: list[int]) -> None:
    """Takes batches from ``stream`` at ``clips_per_s`` until ``stop``."""
    start, clips = time.perf_counter(), 0
    for batch in stream:
        clips += batch.clips.shape[0]
        if stop.is_set():
            break
        time.sleep(max(0.0, start + clips / clips_per_s - time.perf_counter()))
    counted.append(clips)


def _drained(address: str, timeout_s: float = 60.0) -> int:
    """Waits until the previous phase's blocks are freed (under 1 MiB in use), at most ``timeout_s``;
    returns the bytes still in use."""
    deadline = time.perf_counter() + timeout_s
    while (used := _store_stats(address).object_store_bytes_used) > 2**20 and time.perf_counter() < deadline:
        time.sleep(_SAMPLE_S)
    return used


def _phase(data, refs, streams: int, fraction: float, address: str, args: argparse.Namespace) -> dict[str, Any]:
    """``streams`` consumers with Ray Data's object-store fraction at ``fraction``."""
    import ray
    from ray.data import DataContext

    from vjepa_ray.data.pipeline import ClipStream

    start_bytes = _drained(address)
    DataContext.get_current().override_object_store_memory_limit_fraction = fraction
    store = ray.cluster_resources()["object_store_memory"]
    stop, counted = threading.Event(), []
    consumers = [threading.Thread(target=_consume, args=(ClipStream(data, seed=i, refs=refs), args.clips_per_s,
                                                         stop, counted), daemon=True) for i in range(streams)]
    samples = []
    start = time.perf_counter()
    for consumer in consumers:
        consumer.start()
    while time.perf_counter() - start < args.seconds:
        samples.append(_store_stats(address).object_store_bytes_used)
        time.sleep(_SAMPLE_S)
    stop.set()
    for consumer in consumers:
        consumer.join()
    elapsed = time.perf_counter() - start
    budget = fraction * store * streams
    # The plateau: the last _PLATEAU_S; how much it still grew over them says whether it is one.
    last = samples[-int(_PLATEAU_S / _SAMPLE_S):]
    plateau = statistics.fmean(last)
    log.info("%d stream(s), fraction %g: %.0f MiB after %.0f s (peak %.0f MiB)", streams, fraction,
             samples[-1] / 2**20, elapsed, max(samples) / 2**20)
    return {"streams": streams, "fraction": fraction, "budget_mib": round(budget / 2**20),
            "start_mib": round(start_bytes / 2**20, 1),
            "plateau_mib": round(plateau / 2**20, 1), "peak_mib": round(max(samples) / 2**20, 1),
            "growth_over_plateau_mib": round((last[-1] - last[0]) / 2**20, 1),
            "spilled_mib": round(_store_stats(address).spilled_bytes_total / 2**20, 1),
            "plateau_over_budget": round(plateau / budget, 3), "clips_per_s": round(sum(counted) / elapsed, 2),
            "samples_mib": [round(s / 2**20) for s in samples]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from vjepa_ray.config import load_config
    from vjepa_ray.data.sources import VideoRef
    from vjepa_ray.video.synthetic import make_moving_pattern_videos

    cache = Path(args.cache).expanduser()
    paths = make_moving_pattern_videos(cache, args.videos, frames=75, size=256, seed=0)
    refs = [VideoRef(str(p)) for p in paths] * args.repeat
    cfg = load_config(None, [f"data.batch_size={args.batch}", "data.decode_cpus=1"])
    data = dataclasses.replace(cfg.data, paths=[str(cache)])
    context = ray.init(address="local", num_cpus=args.cpus, object_store_memory=args.object_store_mb * 2**20,
                       include_dashboard=False, log_to_driver=False)
    try:
        address = context.address_info["address"]
        store_mib = ray.cluster_resources()["object_store_memory"] / 2**20
        phases = {"quarter_budget": _phase(data, refs, 1, RAY_DATA_OBJECT_STORE_FRACTION / 2, address, args),
                  "default_budget": _phase(data, refs, 1, RAY_DATA_OBJECT_STORE_FRACTION, address, args),
                  "two_streams": _phase(data, refs, 2, RAY_DATA_OBJECT_STORE_FRACTION, address, args)}
    finally:
        ray.shutdown()
    return {
        "figure": "object_store",
        "store_mib": round(store_mib),
        "budget": "Ray Data's fraction x the cluster's object store, per execution (stream)",
        "baseline": "quarter_budget: one stream with the fraction at 0.25",
        "plateau_ratio_default": round(phases["default_budget"]["plateau_mib"]
                                       / phases["quarter_budget"]["plateau_mib"], 3),
        "plateau_ratio_two_streams": round(phases["two_streams"]["plateau_mib"]
                                           / phases["default_budget"]["plateau_mib"], 3),
        "phases": phases,
        "clip_mib": round(data.frames_per_clip * data.crop_size**2 * 3 / 2**20, 3),
        "settings": {"cpus": args.cpus, "batch": args.batch, "files_per_epoch": len(refs),
                     "chunk_size": data.chunk_size, "seconds": args.seconds, "clips_per_s": args.clips_per_s,
                     "clip": [data.frames_per_clip, data.frame_step, data.crop_size]},
    }
