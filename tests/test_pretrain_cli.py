"""``python -m vjepa_ray.pretrain``: config errors, and a run submitted as a Ray job to a `ray start` cluster."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vjepa_ray.pretrain", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300, **kw)


def test_config_that_cannot_run_exits_2_naming_the_key():
    out = _cli("deepspeed.precision=fp16")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "python -m vjepa_ray.pretrain: config error: deepspeed.precision: fp16 needs GPUs (ray.use_gpu=true); "
        "use bf16 or fp32 on CPUs"]
    out = _cli("ray.num_workers=[2,3]", "optimization.global_batch_size=2")
    assert out.returncode == 2 and "optimization.global_batch_size" in out.stderr
    out = _cli("model.family=vjepa2_1")
    assert out.returncode == 2 and out.stderr.strip().splitlines()[0].startswith(
        "python -m vjepa_ray.pretrain: config error: model.family: vjepa2_1 pretraining")


def test_start_source_that_cannot_be_read_exits_2_before_ray_starts(tmp_path):
    out = _cli(f"ray.storage_path={tmp_path}", "optimization.schedule=cooldown", "optimization.warmup_steps=0",
               f"checkpoint.start_from={tmp_path / 'pretrain'}")
    assert out.returncode == 2
    source = tmp_path / "pretrain"
    assert out.stderr.strip().splitlines()[-1] == (
        f"python -m vjepa_ray.pretrain: config error: checkpoint.start_from: cannot start from {source}: {source} "
        "is neither a training checkpoint nor a run folder with one")
    assert not (tmp_path / "vjepa_local_demo").exists()


def test_dry_run_checks_a_cluster_recipe_without_starting_anything():
    # The README's example: an elastic ViT-L run whose global batch splits unevenly over most world sizes.
    out = _cli("--config", "jobs/vitl16_pretrain.yaml", "data.paths=[s3://bucket/k710.csv]",
               "deepspeed.zero_stage=3", "ray.num_workers=[64,128]", "--dry-run")
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    assert resolved["ray"]["num_workers"] == [64, 128] and resolved["deepspeed"]["zero_stage"] == 3
    assert resolved["model"]["name"] == "vit_large" and out.stderr.strip().endswith("config ok")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_cluster(temp_dir: str) -> None:
    """Ends the processes of the cluster that uses ``temp_dir`` (and their children), nobody else's."""
    owned = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if temp_dir in " ".join(proc.info["cmdline"] or []):
                owned.append(proc)
        except psutil.Error:
            continue
    everything = {p.pid: p for p in owned}
    for proc in owned:
        try:
            everything.update({c.pid: c for c in proc.children(recursive=True)})
        except psutil.Error:
            continue
    for proc in everything.values():
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.Error:
            continue
    psutil.wait_procs(list(everything.values()), timeout=20)


def _cluster_env(token: str) -> dict[str, str]:
    # Ray 2.59+ protects clusters with a token; this cluster gets its own, and clients must send it.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    return {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}


@pytest.fixture
def ray_head():
    """A `ray start --head` cluster of our own (own ports, temp dir and auth token), stopped by killing its
    processes (never a machine-wide `ray stop`). Yields (dashboard address, client environment)."""
    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")
    port, dashboard = _free_port(), _free_port()
    env = _cluster_env(secrets.token_hex(32))
    # Every port of our own: other clusters on this machine hold the defaults (e.g. the job agent's 52365).
    ports = [f"--{flag}={_free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port", "ray-client-server-port")]
    subprocess.run(["ray", "start", "--head", f"--port={port}", f"--temp-dir={temp_dir}", "--num-cpus=4",
                    "--include-dashboard=true", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
                    "--disable-usage-stats", *ports], check=True, capture_output=True, env=env, timeout=180)
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        _stop_cluster(temp_dir)


@pytest.mark.slow
def test_ray_job_submit_runs_pretraining_on_real_videos(ray_head, tmp_path):
    from vjepa_ray.video.synthetic import make_moving_pattern_videos

    videos = tmp_path / "videos"
    make_moving_pattern_videos(videos, count=8, frames=24, size=80, seed=1)
    config = tmp_path / "tiny.yaml"
    config.write_text(f"""
meta: {{name: job_run, seed: 1}}
ray: {{num_workers: 2, storage_path: {tmp_path / 'runs'}, max_failures: 0}}
data: {{paths: [{videos}], frames_per_clip: 8, frame_step: 2, crop_size: 64, batch_size: 2, chunk_size: 4}}
model: {{name: vit_tiny, pred_depth: 2, pred_embed_dim: 96}}
optimization: {{total_steps: 4, warmup_steps: 1}}
deepspeed: {{zero_stage: 2, precision: bf16}}
checkpoint: {{every_steps: 2}}
logging: {{every_steps: 2}}
""")
    address, env = ray_head
    started = time.time()
    for _ in range(10):
        out = subprocess.run(["ray", "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
                              "python", "-m", "vjepa_ray.pretrain", "--config", str(config)],
                             capture_output=True, text=True, env=env, timeout=600)
        # A just-started head takes a while before its job agent accepts submissions.
        if "No available agent to submit job" not in out.stderr + out.stdout:
            break
        time.sleep(5)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "job_run" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 4 and summary["restarts"] == 0
    assert summary["world_sizes"] == [2] and summary["checkpoint"].endswith("step_00000004")
    assert summary["skipped_videos"] == 0 and summary["final_loss"] > 0
    assert "finished: 4 steps" in out.stdout
    assert time.time() - started < 600
