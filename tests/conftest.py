"""Shared fixtures. Ray tests share one local cluster per test session (starting one costs ~8 s)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_VIDEOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "videos"


@pytest.fixture
def ray_local():
    """A local Ray cluster shared by the whole session; started on first use.

    Tests that need a multi-node ``ray.cluster_utils.Cluster`` use ``ray_multinode`` instead, which
    shuts this one down first; the next ``ray_local`` user starts it again.
    """
    import ray

    if not ray.is_initialized():
        # address="local": always a cluster of our own, never one a `ray start` left running on the machine.
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    yield ray


@pytest.fixture
def ray_multinode():
    """A fresh ``ray.cluster_utils.Cluster`` (head with no CPUs); the caller adds nodes."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread; on a busy machine a second one mostly waits at barriers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def shared_videos() -> Path:
    """The real clips in ../shared/data/videos; tests that use them skip when the folder is absent."""
    if not SHARED_VIDEOS.is_dir():
        pytest.skip(f"{SHARED_VIDEOS} is not here")
    return SHARED_VIDEOS


@pytest.fixture(autouse=True, scope="session")
def _cpu_only_deepspeed():
    # DeepSpeed picks its accelerator from the environment at import; tests run on CPUs.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    yield
