"""End to end on Ray Train + DeepSpeed: 2 CPU workers, the tiny model, in-memory synthetic clips.

The synthetic stream makes every batch a function of (seed, rank, index), so a distributed run can be
replayed in one process: the EMA target after k steps must equal that reference, also across a killed
worker (the restart resumes the exact state). Runs share assertions to stay few; each takes ~1 min here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable

import psutil
import pytest
import torch
from conftest import _free_port

from vjepa_ray import export, tracking
from vjepa_ray.bench.checkpoint import ModelSizes, zero3_checkpoint_bytes
from vjepa_ray.config import Config, builtin_config_path, load_config
from vjepa_ray.models.pretrained import strip_prefixes
from vjepa_ray.recipe.step import JepaStep, MicroBatch, init_networks
from vjepa_ray.train import driver
from vjepa_ray.train.checkpoint import DIGEST_FILE, TRAIN_STATE
from vjepa_ray.train.curves import read_scalars
from vjepa_ray.train.elastic import global_batch_size, plan_batch
from vjepa_ray.train.ray_metrics import METRIC_NAMES, prometheus_name
from vjepa_ray.train.synthetic_stream import SyntheticClipStream, synthetic_clips

pytestmark = pytest.mark.slow


def tiny_config(storage: Path, name: str, *overrides: str) -> Config:
    return load_config(builtin_config_path("local_demo"), [
        f"meta.name={name}", f"ray.storage_path={storage}", "data.synthetic_videos=0", "model.pred_depth=2",
        # A fast-moving EMA, so that matching the reference after a few steps means something.
        "deepspeed.precision=fp32", "optimization.clip_grad=0", "optimization.warmup_steps=2",
        "optimization.ema=[0.9,0.95]",
        "optimization.total_steps=8", "checkpoint.every_steps=4", "checkpoint.num_to_keep=5", "logging.every_steps=2",
        "ray.max_failures=1", "checkpoint.verify_restore=true",
        *overrides])


# V-JEPA 1's rule from step 1 at a norm every step exceeds: the reference step clips the same way.
PER_MODULE_CLIPPING = ("optimization.clip_grad=0.01", "optimization.clip_grad_rule=per_module",
                       "optimization.clip_grad_start=1")


def assert_clipped(run_dir: Path, steps: tuple[int, ...]) -> None:
    """The logged gradient norms of ``steps`` are well above the clip: clipping changed those updates."""
    norms = dict(read_scalars(run_dir)["grad_norm"])
    assert min(norms[step] for step in steps) > 0.05, norms


def reference_weights(cfg: Config, world_size: int, steps: int,
                      train_step: JepaStep | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """The run's ``encoder`` and EMA ``target_encoder``, recomputed in this process by the recipe's step
    (``train_step``, default the config's from its seed) over every rank's micro batches of the same synthetic
    stream."""
    train_step = train_step or JepaStep.from_config(cfg)
    plan = plan_batch(global_batch_size(cfg), cfg.data.batch_size, world_size)
    data = dataclasses.replace(cfg.data, batch_size=plan.micro_batch)
    for step in range(steps):
        train_step([MicroBatch(synthetic_clips(data, cfg.meta.seed, rank, step * plan.grad_accum + micro)[:size],
                               rank, micro, plan.loss_weight(size))
                    for rank in range(world_size) for micro, size in enumerate(plan.micro_batches(rank))], step)
    return {key: {name: p.detach().clone() for name, p in model.named_parameters()}
            for key, model in (("encoder", train_step.module.encoder), ("target_encoder", train_step.target_encoder))}


def saved_target(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The EMA target of a checkpoint, reassembled from its shards."""
    files = sorted(Path(checkpoint, "target_encoder").glob("shard_*.pt"))
    shards = [torch.load(f, weights_only=True) for f in files]
    return {name: torch.cat([s["tensors"][name] for s in shards])[:numel]
            for name, numel in shards[0]["numels"].items()}


def assert_target_matches_reference(checkpoint: str | Path, reference: dict[str, torch.Tensor],
                                    initial: dict[str, torch.Tensor]) -> None:
    got = saved_target(checkpoint)
    assert got.keys() == reference.keys()
    moved = max((reference[n] - initial[n]).abs().max().item() for n in reference)
    assert moved > 1e-4  # the EMA really moved, 50 times the tolerance below
    for name, want in reference.items():
        torch.testing.assert_close(got[name].view_as(want), want, rtol=1e-5, atol=2e-6, msg=name)


def initial_target(cfg: Config) -> dict[str, torch.Tensor]:
    _, target = init_networks(cfg)
    return {name: p.detach().clone() for name, p in target.named_parameters()}


def losses_from_tensorboard(folder: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(folder)
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("train/loss")]


def run_in_background(cfg: Config) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(
        driver.run(cfg, stream_factory=SyntheticClipStream)), daemon=True)
    thread.start()
    return thread, out


def wait_for_checkpoint(run_dir: Path, name: str, thread: threading.Thread, timeout_s: float = 900) -> None:
    """Until Ray has registered checkpoint ``name`` (all ranks' files in place), not merely created its folder."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    deadline = time.time() + timeout_s
    while True:
        try:
            if name in {c["checkpoint_dir_name"] for c in json.loads(snapshot.read_text())["checkpoint_results"]}:
                return
        except (OSError, ValueError, KeyError):
            pass
        assert thread.is_alive(), f"the run ended before checkpoint {name} was registered"
        assert time.time() < deadline, f"checkpoint {name} was not registered in time"
        time.sleep(0.2)


def train_worker_pids() -> list[int]:
    """Ray Train worker processes of the clusters this test process started (never anyone else's)."""
    pids = []
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return pids


def exported_ray_metrics(run: str) -> dict[str, float]:
    """Our Ray metrics of run ``run`` as the local node's metrics agent exports them to Prometheus right now."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    node = ray._private.worker.global_worker.node
    url = f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    wanted = {prometheus_name(name) for name in METRIC_NAMES}
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name in wanted and sample.labels.get("run") == run}


def watch_ray_metrics(run: str, thread: threading.Thread, ready: Callable[[dict[str, float]], bool],
                      timeout_s: float = 600) -> dict:
    """The last export of run ``run``'s metrics, taken while the run lasts, that is ``ready``; {} if none was.

    Read during the run: the gauges of a process vanish from the export soon after it ends.
    """
    last: dict[str, float] = {}
    deadline = time.time() + timeout_s
    while thread.is_alive() and time.time() < deadline:
        time.sleep(0.5)
        try:
            export = exported_ray_metrics(run)
        except OSError:  # a busy agent: the next read
            continue
        if ready(export):
            last = export
    return last


def resumed_digest_matches_saved(summary: dict, storage: Path, name: str) -> None:
    resumed = summary["starts"][-1]["step"]
    saved = json.loads((storage / name / f"step_{resumed:08d}" / DIGEST_FILE).read_text())
    metrics = json.loads((storage / name / "summary.json").read_text())["metrics"]
    assert metrics["restored_state_digest"] == saved["sha256"] is not None


def test_zero2_killed_worker_resumes_from_checkpoint_and_ema_matches_reference(ray_local, tmp_path):
    cfg = tiny_config(tmp_path, "zero2_kill", "deepspeed.zero_stage=2", "optimization.total_steps=12")
    thread, out = run_in_background(cfg)
    wait_for_checkpoint(tmp_path / "zero2_kill", "step_00000004", thread)
    pids = train_worker_pids()
    assert len(pids) == 2
    os.kill(pids[-1], signal.SIGKILL)
    exported = watch_ray_metrics(
        "zero2_kill", thread, lambda export: len(export) == len(METRIC_NAMES) and export["ray_vjepa_train_restarts"])
    thread.join(timeout=600)
    summary = out[0]

    assert summary["status"] == "finished" and summary["steps"] == 12
    assert summary["restarts"] == 1
    assert summary["starts"][0]["step"] == 0 and summary["starts"][1]["step"] in (4, 8)
    assert summary["world_sizes"] == [2, 2]
    losses = losses_from_tensorboard(summary["tensorboard"])
    assert losses[-1][0] == 12 and losses[-1][1] < losses[0][1]
    # Ray metrics, exported while the run lasted after its restart: the figures of a report it made.
    assert exported, "no export of the run's Ray metrics after its restart"
    assert exported["ray_vjepa_train_restarts"] == 1
    step = int(exported["ray_vjepa_train_step"])
    assert exported["ray_vjepa_train_loss"] == pytest.approx(dict(losses)[step], rel=1e-6)
    assert exported["ray_vjepa_train_clips_per_s"] > 0 and 0 <= exported["ray_vjepa_train_data_wait_share"] <= 1
    assert exported["ray_vjepa_train_target_feature_std"] > cfg.logging.collapse_std_threshold
    assert exported["ray_vjepa_train_lr"] > 0 and exported["ray_vjepa_train_skipped_videos"] == 0
    # Resumed exactly: the EMA after all 12 steps is the uninterrupted one-process reference's.
    assert_target_matches_reference(summary["checkpoint"], reference_weights(cfg, 2, 12)["target_encoder"],
                                    initial_target(cfg))
    assert json.loads((tmp_path / "zero2_kill" / "summary.json").read_text())["status"] == "finished"

    # The run report plots this real run's series.
    from test_report import check_plots

    from vjepa_ray import report

    assert report.main([str(tmp_path / "zero2_kill")]) == 0
    check_plots(tmp_path / "zero2_kill" / "plots", read_scalars(Path(summary["tensorboard"])))


def test_uneven_global_batch_split_over_3_workers_and_per_module_clipping_match_reference(ray_local, tmp_path):
    # 10 clips over 3 workers: shares 4, 3, 3, each as 2 micro batches ([2, 2], [2, 1], [2, 1]). From step 1 each
    # rank clips its ZeRO-2 partitions by the encoder's and the predictor's norms over all ranks.
    cfg = tiny_config(tmp_path, "uneven", "ray.num_workers=3", "optimization.global_batch_size=10",
                      "data.batch_size=2", "optimization.total_steps=3", "checkpoint.every_steps=3",
                      *PER_MODULE_CLIPPING)
    # Tracked on a server that cannot be reached (a closed loopback port): the run goes on regardless.
    mlflow = tracking.MlflowRun(tracking.MlflowTarget(f"http://127.0.0.1:{_free_port()}", "uneven"), "uneven")
    summary = driver.run(cfg, stream_factory=SyntheticClipStream, mlflow=mlflow)
    assert summary["status"] == "finished" and summary["world_sizes"] == [3]
    outcome = mlflow.finish("FINISHED")
    # The driver waited for the tracking at most ~10 s; the two reports (steps 2, 3) and summary.json were
    # counted as not logged.
    assert outcome["wait_s"] <= 10 and outcome["run_id"] is None
    assert outcome["not_logged"]["metric_reports"] == 2 and outcome["not_logged"]["artifacts"] == 1
    metrics = json.loads((tmp_path / "uneven" / "summary.json").read_text())["metrics"]
    assert (metrics["global_batch"], metrics["micro_batch"], metrics["grad_accum"]) == (10, 2, 2)
    assert_clipped(tmp_path / "uneven", steps=(2, 3))
    assert_target_matches_reference(summary["checkpoint"], reference_weights(cfg, 3, 3)["target_encoder"],
                                    initial_target(cfg))


def test_zero3_partitioned_ema_per_module_clipping_and_resharding_2_to_1_to_2(ray_local, tmp_path):
    name = "zero3"
    cfg = tiny_config(tmp_path, name, "deepspeed.zero_stage=3", "optimization.total_steps=4",
                      "logging.every_steps=1", *PER_MODULE_CLIPPING)
    first = driver.run(cfg, stream_factory=SyntheticClipStream)
    assert first["status"] == "finished" and first["steps"] == 4
    # ZeRO-3: each rank saved its own partition of the target.
    assert len(list(Path(first["checkpoint"], "target_encoder").glob("shard_*_of_00002.pt"))) == 2
    # Each rank's files are the size the sizing formula gives (README "Sizing a cluster"): its partition of the
    # fp32 masters and Adam moments, of the EMA target, and the buffers and metadata every rank writes whole.
    expected = zero3_checkpoint_bytes(ModelSizes.of(cfg), world_size=2)
    state_dir = Path(first["checkpoint"], "deepspeed", "state")
    for rank in range(2):
        written = {"optimizer": state_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
                   "module": state_dir / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt",
                   "ema_target": Path(first["checkpoint"], "target_encoder", f"shard_{rank:05d}_of_00002.pt")}
        for kind, path in written.items():
            assert path.stat().st_size == pytest.approx(expected[kind], rel=0.1 if kind == "module" else 0.01), kind
    losses = losses_from_tensorboard(first["tensorboard"])
    assert losses[-1][1] < losses[0][1]
    assert_clipped(tmp_path / name, steps=(2, 3, 4))
    reference = reference_weights(cfg, 2, 4)
    assert_target_matches_reference(first["checkpoint"], reference["target_encoder"], initial_target(cfg))
    # The run folder exports to Meta's layout: the online encoder gathered from both ranks' ZeRO-3
    # partitions, the EMA target from its shards.
    exported = tmp_path / "zero3_official.pt"
    assert export.main(["to-official", "--input", str(tmp_path / name), "--output", str(exported)]) == 0
    official = torch.load(exported, weights_only=True)
    for key, want in reference.items():
        got = strip_prefixes(official[key])
        for param, value in want.items():
            torch.testing.assert_close(got[param], value, rtol=1e-5, atol=2e-6, msg=f"{key}.{param}")

    # The same run continues on one worker (ZeRO-3 state resharded through a universal checkpoint) ...
    second = driver.run(tiny_config(tmp_path, name, "deepspeed.zero_stage=3", "ray.num_workers=1",
                                      "optimization.global_batch_size=8", "optimization.total_steps=6"),
                          stream_factory=SyntheticClipStream)
    assert second["status"] == "finished" and second["steps"] == 6
    assert second["starts"] == [{"world_size": 1, "step": 4}]
    resumed_digest_matches_saved(second, tmp_path, name)
    metrics = json.loads((tmp_path / name / "summary.json").read_text())["metrics"]
    assert (metrics["global_batch"], metrics["micro_batch"], metrics["grad_accum"]) == (8, 4, 2)

    # ... and back on two.
    third = driver.run(tiny_config(tmp_path, name, "deepspeed.zero_stage=3", "optimization.total_steps=8"),
                         stream_factory=SyntheticClipStream)
    assert third["status"] == "finished" and third["starts"] == [{"world_size": 2, "step": 6}]
    resumed_digest_matches_saved(third, tmp_path, name)
    metrics = json.loads((tmp_path / name / "summary.json").read_text())["metrics"]
    assert (metrics["global_batch"], metrics["micro_batch"], metrics["grad_accum"]) == (8, 4, 1)


def test_lost_node_shrinks_elastic_run_and_resumes_resharded(ray_multinode, tmp_path):
    import ray

    cluster = ray_multinode
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    name = "lost_node"
    cfg = tiny_config(tmp_path, name, "deepspeed.zero_stage=2", "ray.num_workers=[1,2]",
                      "optimization.total_steps=12")
    thread, out = run_in_background(cfg)
    wait_for_checkpoint(tmp_path / name, "step_00000004", thread)
    cluster.remove_node(nodes[1])
    thread.join(timeout=600)
    summary = out[0]

    assert summary["status"] == "finished" and summary["steps"] == 12
    assert summary["restarts"] >= 1 and summary["world_sizes"][0] == 2 and summary["world_sizes"][-1] == 1
    assert summary["starts"][-1]["step"] in (4, 8)
    resumed_digest_matches_saved(summary, tmp_path, name)
    metrics = json.loads((tmp_path / name / "summary.json").read_text())["metrics"]
    assert (metrics["global_batch"], metrics["micro_batch"], metrics["grad_accum"]) == (8, 4, 2)


class FailingStream(SyntheticClipStream):
    """Raises on rank 1 at batch 6, on every attempt: the run restarts from step 4, fails again, gives up."""

    def __iter__(self):
        for batch in super().__iter__():
            if self.rank == 1 and self._index == 7:
                raise RuntimeError("injected failure in a training step")
            yield batch


def test_exception_in_step_restarts_then_fails_past_max_failures_with_checkpoint_intact(ray_local, tmp_path):
    from ray import cloudpickle

    # Ray workers cannot import this test module: ship FailingStream by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = tiny_config(tmp_path, "failing", "deepspeed.zero_stage=2", "ray.max_failures=1")
    summary = driver.run(cfg, stream_factory=FailingStream)
    assert summary["status"] == "failed" and "injected failure" in summary["error"]
    assert summary["restarts"] == 1 and [s["step"] for s in summary["starts"]] == [0, 4]
    assert summary["steps"] == 4 and summary["checkpoint"].endswith("step_00000004")
    on_disk = json.loads((tmp_path / "failing" / "summary.json").read_text())
    assert on_disk["status"] == "failed"
    checkpoint = Path(summary["checkpoint"])
    assert json.loads((checkpoint / TRAIN_STATE).read_text())["step"] == 4
    assert sorted(p.name for p in (checkpoint / "target_encoder").iterdir()) == ["shard_00000_of_00001.pt"]
    assert len(list((checkpoint / "deepspeed" / "state").glob("*optim_states.pt"))) == 2
