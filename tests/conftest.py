"""Shared fixtures. Ray tests share one local cluster per test session (starting one costs ~8 s)."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest
import torch

SHARED_VIDEOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "videos"


def _start_local_ray():
    import ray

    # address="local": always a cluster of our own, never one a `ray start` left running on the machine.
    # Metrics reach the node's Prometheus export every second (default 10 s), so a test run can read its own.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}},
             _system_config={"metrics_report_interval_ms": 1000})
    return ray


@pytest.fixture
def ray_local():
    """A local Ray cluster shared by the whole session; started on first use.

    Tests that need a multi-node ``ray.cluster_utils.Cluster`` use ``ray_multinode`` instead, and tests on
    S3 ``ray_s3``; both shut this one down first, and the next ``ray_local`` user starts it again.
    """
    import ray

    if not ray.is_initialized():
        _start_local_ray()
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoS3:
    """moto's S3 server on a loopback port, in this process: ``stop()`` then ``start()`` brings it back on the
    same port with its buckets (moto keeps them in this process), as an outage of the store would."""

    def __init__(self):
        self.endpoint = f"127.0.0.1:{_free_port()}"
        self._server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        host, port = self.endpoint.split(":")
        self._server = ThreadedMotoServer(ip_address=host, port=int(port), verbose=False)
        self._server.start()

    def stop(self) -> None:
        self._server.stop()


@pytest.fixture
def s3_server() -> MotoS3:
    pytest.importorskip("moto.server")
    server = MotoS3()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_endpoint(s3_server):
    """``host:port`` of moto's S3 server on loopback (access key and secret ``testing``)."""
    return s3_server.endpoint


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch) -> str:
    """A fresh bucket on moto's server, as ``s3://<bucket>``; the AWS environment variables point every
    client of this process (pyarrow, boto3) and of Ray clusters it starts from now on at that server."""
    boto3 = pytest.importorskip("boto3")
    for key, value in {"AWS_ENDPOINT_URL_S3": f"http://{s3_endpoint}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    bucket = f"vjepa-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}"


@pytest.fixture
def ray_s3(s3_bucket):
    """A local Ray cluster started with ``s3_bucket``'s environment (its workers reach the bucket), shut
    down after the test so that later tests get a cluster without it."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    try:
        yield _start_local_ray()
    finally:
        ray.shutdown()


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
