"""How ``bench train`` accounts for the cores Ray's own processes take from the workers' machine."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter

import pytest

from vjepa_ray.bench import train
from vjepa_ray.bench._processes import CpuSampler


def test_sampler_measures_the_cores_a_busy_child_process_uses():
    spin = "import time\nend = time.time() + 3\nwhile time.time() < end: pass"
    with CpuSampler(interval_s=0.2) as sampler:
        start = time.time()
        subprocess.run([sys.executable, "-c", spin], check=True)
        end = time.time()
    # The child is gone by the last sample, so measure up to the last sample taken while it ran.
    cores = sampler.cores_between(start, end - 0.3)
    assert 0.6 < cores["other"] <= 1.05


def test_cores_between_uses_the_samples_inside_the_span():
    sampler = CpuSampler()
    sampler.samples = [(0.0, Counter(raylet=0.0)), (1.0, Counter(raylet=0.5)),
                       (3.0, Counter(raylet=1.5, train_workers=1.0)), (4.0, Counter(raylet=9.0))]
    assert sampler.cores_between(0.5, 3.5) == {"raylet": 0.5, "train_workers": 0.5}
    with pytest.raises(ValueError, match="fewer than two"):
        sampler.cores_between(1.5, 3.5)


def test_per_worker_share_leaves_out_what_rays_processes_used(monkeypatch):
    monkeypatch.setattr(train.os, "sched_getaffinity", lambda pid: {0, 1})
    cores = {"driver": 0.05, "gcs": 0.03, "raylet": 0.04, "other": 0.08, "train_workers": 1.7}
    # The driver's CPU (the sampler's) stays charged to the Ray run.
    assert train.per_worker_share(cores, workers=2, cpus_per_worker=1) == pytest.approx((2 - 0.15) / 2)
    # Never more than a worker asked for; unknown when the daemons are not under this process.
    assert train.per_worker_share({"raylet": 0.0, "train_workers": 1.0}, workers=2, cpus_per_worker=1) == 1
    assert train.per_worker_share({"driver": 0.01, "train_workers": 1.9}, workers=2, cpus_per_worker=1) is None
