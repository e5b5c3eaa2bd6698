"""CPU seconds spent by this process and everything under it (a local Ray cluster's daemons and workers)."""

from __future__ import annotations

import threading
import time
from collections import Counter


def process_role(proc, me) -> str:
    """driver, train_workers (Ray Train's worker actors), ray_workers (other tasks and actors), raylet, gcs
    or other (the dashboard, its agents, the log monitor, ...)."""
    if proc.pid == me.pid:
        return "driver"
    name, cmdline = proc.name(), " ".join(proc.cmdline())
    if "raylet" in name:
        return "raylet"
    if "gcs_server" in name:
        return "gcs"
    if "RayTrainWorker" in cmdline:
        return "train_workers"
    if "ray::" in cmdline or "default_worker.py" in cmdline or name.startswith("ray::"):
        return "ray_workers"
    return "other"


def tree_cpu_seconds() -> Counter:
    """User+system CPU seconds of this process and all its live descendants, by ``process_role``."""
    import psutil

    me = psutil.Process()
    total: Counter = Counter()
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total[process_role(proc, me)] += times.user + times.system
        except psutil.Error:
            pass
    return total


class CpuSampler:
    """``tree_cpu_seconds`` every ``interval_s`` in a background thread, while used as a context manager;
    ``cores_between`` turns two samples into the cores each role used between them."""

    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self.samples: list[tuple[float, Counter]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="cpu-sampler", daemon=True)

    def _sample(self) -> None:
        while True:
            self.samples.append((time.time(), tree_cpu_seconds()))
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> "CpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def cores_between(self, start: float, end: float) -> dict[str, float]:
        """Cores used per role from the first sample at or after ``start`` to the last at or before ``end``
        (unix times). Raises ValueError when fewer than two samples fall in that span."""
        inside = [(t, cpu) for t, cpu in self.samples if start <= t <= end]
        if len(inside) < 2:
            raise ValueError(f"fewer than two CPU samples between {start:.1f} and {end:.1f}")
        (t0, first), (t1, last) = inside[0], inside[-1]
        return {role: (last[role] - first[role]) / (t1 - t0) for role in sorted(set(first) | set(last))}
