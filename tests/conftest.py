"""Shared fixtures. Ray tests share one local cluster per test session (starting one costs ~8 s)."""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_VIDEOS = REPO.parent / "shared" / "data" / "videos"


def _start_local_ray():
    import ray

    # address="local": always a cluster of our own, never one a `ray start` left running on the machine.
    # Metrics reach the node's Prometheus export every second (default 10 s), so a test run can read its own.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}},
             _system_config={"metrics_report_interval_ms": 1000})
    return ray


@pytest.fixture(autouse=True, scope="session")
def _ray_down_before_exit():
    """Shuts down the session's Ray cluster while the interpreter is whole. A CI run once crashed (exit 139)
    after every test had passed, in Python's shutdown. Two things run there otherwise: Ray's atexit shutdown,
    and the finalizers of Ray Data iterators that tests left unfinished in reference cycles: ending one after
    Ray is down calls Ray again, which starts a new cluster from inside the shutdown (seen hanging a script).
    Collecting them first ends their executors on the live cluster."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        gc.collect()
        ray.shutdown()


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


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """``mlflow server`` on a loopback port (sqlite backend, one worker) for the whole session; its URL."""
    pytest.importorskip("mlflow")
    folder = tmp_path_factory.mktemp("mlflow")
    url = f"http://127.0.0.1:{_free_port()}"
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1],
               "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
               "--artifacts-destination", str(folder / "artifacts")]
    # Without its job runner: MLflow 3 otherwise starts seven more processes (GenAI jobs) the tests never use.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(folder / "server.log", "w") as log:
        server = subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 300  # its first start creates the database (~20 s on an idle 2-core machine)
        while True:
            assert server.poll() is None, f"mlflow server exited: see {folder / 'server.log'}"
            assert time.monotonic() < deadline, f"mlflow server did not answer: see {folder / 'server.log'}"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5):
                    break
            except OSError:
                time.sleep(1)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # its own session: the server and the workers it started
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def mlflow_api(uri: str, endpoint: str, body: dict | None = None, **query) -> dict:
    """One call of an MLflow server's REST API (POST with a JSON ``body``, else GET with ``query``)."""
    url = f"{uri}/api/2.0/mlflow/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def sweep_overrides(tmp: Path, name: str, *extra: str) -> list[str]:
    """jobs/tune_demo.yaml cut down to a few steps per trial and a tiny probe set, in ``tmp``."""
    return [f"meta.name={name}", f"ray.storage_path={tmp / 'runs'}", f"data.paths=[{tmp / 'videos'}]",
            "data.synthetic_videos=8", "data.batch_size=2", "model.pred_depth=1",
            "optimization.total_steps=6", "optimization.warmup_steps=2", "logging.every_steps=3",
            "checkpoint.every_steps=6", f"probe.train_manifest={tmp / 'labelled' / 'train.txt'}",
            f"probe.val_manifest={tmp / 'labelled' / 'val.txt'}", "tune.synthetic_probe_videos=2",
            "probe.epochs=2", "tune.grace_period=0", "tune.mask_ratio=[0.5,0.8]", "tune.lr=null", "tune.ema=null",
            "tune.num_samples=1", "tune.probe_lr=[1e-2,3e-3]", "ray.cpus_per_worker=1", "data.decode_cpus=0.5",
            *extra]


def write_sweep_data(tmp: Path, cfg) -> None:
    """The videos and the labelled set that ``sweep_overrides`` name, made in ``tmp`` (the demo generates its data
    only into its own cache folders)."""
    from vjepa_ray.data.demo import write_demo_videos, write_probe_videos

    write_demo_videos(tmp / "videos", cfg)
    write_probe_videos(tmp / "labelled", cfg)


# Learning rates 1e-3 and 3 with a target that follows the encoder at once (EMA momentum 0). Measured in this
# sweep: at lr 3 the loss explodes (170+) and the target feature spread of the reports falls to 0.24-0.25 at
# step 2 and 0.02-0.09 at step 4; at 1e-3 it goes from 0.46 (step 2) to 0.28 (step 6). Reports every 2 steps;
# the collapse stop ends a trial at its first report below 0.2, so the lr-3 trials end at step 4 of 6, without
# a probe.
COLLAPSING_GRID = ("tune.lr=[1e-3,3.0]", "optimization.ema=[0.0,0.0]", "logging.every_steps=2",
                   "logging.collapse_std_threshold=0.2", "tune.collapse_patience=1")


@pytest.fixture(scope="session")
def tracked_sweep(mlflow_server, tmp_path_factory) -> SimpleNamespace:
    """The 4-trial demo sweep (2 mask ratios x 2 learning rates, one of which collapses the target), run once
    per session on the shared cluster and tracked on ``mlflow_server`` as experiment ``sweep4``: ``cfg``,
    ``summary``, ``folder``, ``mlflow_uri``, ``experiment`` (the experiment's ``name`` and ``experiment_id``),
    and ``placement_groups``, the state of every placement group the sweep made, read when it returned."""
    import ray

    from vjepa_ray import tracking
    from vjepa_ray.config import load_config
    from vjepa_ray.sweep import driver as sweep

    tmp = tmp_path_factory.mktemp("tracked_sweep")
    cfg = load_config(REPO / "jobs" / "tune_demo.yaml",
                      sweep_overrides(tmp, "sweep4", f"logging.mlflow_uri={mlflow_server}", *COLLAPSING_GRID))
    write_sweep_data(tmp, cfg)
    if not ray.is_initialized():
        _start_local_ray()
    before = set(ray.util.placement_group_table())
    summary = sweep.run(cfg, mlflow=tracking.target_from_command(cfg))
    made = {pg_id: pg["state"] for pg_id, pg in ray.util.placement_group_table().items() if pg_id not in before}
    experiment = mlflow_api(mlflow_server, "experiments/get-by-name", experiment_name="sweep4")["experiment"]
    return SimpleNamespace(cfg=cfg, summary=summary, folder=tmp / "runs" / "sweep4", mlflow_uri=mlflow_server,
                           experiment=experiment, placement_groups=made)


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
