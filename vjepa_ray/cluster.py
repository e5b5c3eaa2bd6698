"""The Ray cluster a command runs on: the one it is told to join, or a fresh local one of its own."""

from __future__ import annotations

import math
import os

from vjepa_ray import console
from vjepa_ray.config import Config

# Logical CPUs a new local cluster reserves for Ray Data decoding beside the training workers.
LOCAL_DECODE_CPUS = 2


def connect(cfg: Config) -> None:
    """Joins ``ray.address`` or ``RAY_ADDRESS`` (which ``ray job submit`` sets for its entrypoint); with
    neither, starts a local cluster, never one that a ``ray start`` left running on this machine. The local
    one has logical CPUs for every worker plus decoding, even where the machine has fewer cores. What Ray
    prints from then on is filtered as ``vjepa_ray.console`` says."""
    import ray

    if ray.is_initialized():
        return
    console.quiet_driver_loggers(cfg.logging.verbose)
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address)
    else:
        workers = math.ceil(cfg.ray.worker_range()[1] * cfg.ray.cpus_per_worker)
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, workers + LOCAL_DECODE_CPUS))
    console.quiet_ray(cfg.logging.verbose)
