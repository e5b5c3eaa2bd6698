"""The Ray/DeepSpeed layer's pure parts, in one process: batch rule, engine config, EMA target, save schedule,
checkpointer, synthetic stream, metrics."""

from __future__ import annotations

import copy
import itertools
import json
import pickle
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from vjepa_ray.config import ConfigError, load_config
from vjepa_ray.recipe.optimizer import apply_schedules
from vjepa_ray.train import engine as eng
from vjepa_ray.train.checkpoint import CONFIG_FILE, TRAIN_STATE, Checkpointer, SaveSchedule
from vjepa_ray.train.elastic import check_elastic_batch, plan_batch
from vjepa_ray.train.manifest import problems
from vjepa_ray.train.metrics import IntervalMeter, TensorBoardCallback, collapse_warning
from vjepa_ray.train.state import RngState, TrainState
from vjepa_ray.train.synthetic_stream import SyntheticClipStream
from vjepa_ray.train.target_encoder import SHARD_DIR, TargetEncoder


def test_batch_plan_keeps_the_global_batch_for_every_world_size():
    assert (plan_batch(8, 4, 2).micro_batch, plan_batch(8, 4, 2).grad_accum) == (4, 1)
    assert (plan_batch(8, 4, 1).micro_batch, plan_batch(8, 4, 1).grad_accum) == (4, 2)
    # A share of 6 with micro batches of at most 4: 2 steps of 3.
    assert plan_batch(12, 4, 2).micro_batches(0) == [3, 3]
    for world in range(1, 25):
        plan = plan_batch(24, 5, world)
        sizes = [plan.micro_batches(rank) for rank in range(world)]
        assert sum(map(sum, sizes)) == 24 and all(len(s) == plan.grad_accum for s in sizes)
        assert max(map(max, sizes)) == plan.micro_batch <= 5 and min(map(min, sizes)) >= 1
        assert max(map(sum, sizes)) - min(map(sum, sizes)) <= 1
    assert "global batch 8 = micro-batch 4 x 1 worker(s) x 2 accumulation step(s)" == plan_batch(8, 4, 1).describe()
    assert "3-4 clips per worker" in plan_batch(24, 5, 7).describe()


def test_uneven_split_weights_give_the_gradient_of_the_mean_over_the_global_batch():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(11, 3), torch.randn(11, 1)
    full = torch.autograd.grad(torch.nn.functional.mse_loss(model(x), y), model.weight)[0]
    for world in (1, 2, 3, 4):
        plan = plan_batch(11, 2, world)
        # What DeepSpeed does with each rank's micro losses: divide by the accumulation steps, sum the
        # micro steps, average over ranks.
        grads, start = [], 0
        for rank in range(world):
            total = torch.zeros_like(model.weight)
            for size in plan.micro_batches(rank):
                part = slice(start, start + size)
                start += size
                loss = torch.nn.functional.mse_loss(model(x[part]), y[part]) * plan.loss_weight(size)
                total += torch.autograd.grad(loss / plan.grad_accum, model.weight)[0]
            grads.append(total)
        torch.testing.assert_close(torch.stack(grads).mean(0), full)
    assert plan_batch(8, 4, 2).loss_weight(4) == 1.0


def test_elastic_range_that_cannot_hold_the_global_batch_is_a_config_error():
    cfg = load_config(None, ["ray.num_workers=[2,3]", "optimization.global_batch_size=8", "data.batch_size=4"])
    check_elastic_batch(cfg)  # 3 workers: shares of 3, 3 and 2
    cfg = load_config(None, ["ray.num_workers=[2,3]", "optimization.global_batch_size=2"])
    with pytest.raises(ConfigError, match="optimization.global_batch_size"):
        check_elastic_batch(cfg)
    cfg = load_config(None, ["ray.num_workers=3", "optimization.global_batch_size=8", "data.batch_size=1"])
    with pytest.raises(ConfigError, match="data.batch_size"):
        check_elastic_batch(cfg)


def test_deepspeed_config_follows_plan_and_merges_overrides_key_by_key():
    cfg = load_config(None, ["deepspeed.zero_stage=3", "deepspeed.precision=bf16", "optimization.clip_grad=1.5",
                             "optimization.clip_grad_rule=global", "deepspeed.offload_optimizer=true",
                             "deepspeed.overrides={zero_optimization: {reduce_bucket_size: 123}, steps_per_print: 5}"])
    ds = eng.deepspeed_config(cfg, plan_batch(8, 4, 1), load_universal=True)
    batch = (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"])
    assert batch == (8, 4, 2)
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False},
                                       "reduce_bucket_size": 123}
    assert ds["bf16"] == {"enabled": True} and ds["fp16"]["enabled"] is False
    assert ds["gradient_clipping"] == 1.5 and ds["steps_per_print"] == 5
    assert ds["checkpoint"] == {"load_universal": True}
    target = eng.target_engine_config(ds)
    assert target["zero_optimization"]["stage"] == 3
    assert target["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert "offload_optimizer" not in target["zero_optimization"] and "gradient_clipping" not in target


def test_deepspeed_clips_one_global_norm_itself_and_leaves_other_rules_to_the_step():
    # V-JEPA 1's rule (per module, past the warmup) clips in DeepSpeedStep, 2.0's never clips.
    for overrides in ([], ["model.family=vjepa2"],
                      ["optimization.clip_grad_rule=global", "optimization.clip_grad_start=5"]):
        assert eng.deepspeed_config(load_config(None, overrides), plan_batch(8, 4, 1))["gradient_clipping"] == 0.0
    eng.check_clipping(load_config(None, []))  # ZeRO-2 keeps its partitions in memory
    eng.check_clipping(load_config(None, ["deepspeed.zero_stage=3"]))
    eng.check_clipping(load_config(None, ["deepspeed.offload_optimizer=true", "model.family=vjepa2"]))
    for overrides in (["deepspeed.offload_optimizer=true"], ["deepspeed.zero_stage=0", "deepspeed.precision=bf16"]):
        with pytest.raises(ConfigError) as info:
            eng.check_clipping(load_config(None, overrides))
        assert info.value.key == "optimization.clip_grad_rule" and "clip_grad_rule=global" in str(info.value)
    eng.check_clipping(load_config(None, ["deepspeed.offload_optimizer=true", "optimization.clip_grad_rule=global"]))


def test_schedules_set_weight_decay_only_on_decaying_groups():
    model = nn.Linear(3, 2)
    cfg = load_config(None, ["deepspeed.precision=fp32"])
    optimizer = eng.build_optimizer(model, cfg)
    apply_schedules(optimizer, lr=0.5, weight_decay=0.3)
    by_decay = {g["apply_wd"]: g for g in optimizer.param_groups}
    assert by_decay[True]["lr"] == by_decay[False]["lr"] == 0.5
    assert by_decay[True]["weight_decay"] == 0.3 and by_decay[False]["weight_decay"] == 0.0


def _pair(dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3)).to(dtype)
    return online, copy.deepcopy(online)


def test_replicated_target_ema_keeps_an_fp32_master_under_bf16():
    online, target_module = _pair(torch.bfloat16)
    target = TargetEncoder.replicated(target_module, online)
    master = [p.detach().float().clone() for p in target_module.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    for _ in range(3):
        target.update(0.99)
        master = [0.99 * m + 0.01 * p.float() for m, p in zip(master, online.parameters())]
    for got, want, p in zip(target.fp32_shards().values(), master, target_module.parameters()):
        # The bf16 weights alone could not move by 0.01 per step; the fp32 master does.
        torch.testing.assert_close(got, want.view(-1), rtol=0, atol=1e-6)
        torch.testing.assert_close(p.float(), want.to(torch.bfloat16).float())
    assert not any(p.requires_grad for p in target_module.parameters())


def test_target_saved_as_partitions_loads_into_a_full_copy(tmp_path):
    online, target_module = _pair(torch.float32)
    target = TargetEncoder.replicated(target_module, online)
    want = {name: torch.randn_like(p) for name, p in target_module.named_parameters()}
    # Two ZeRO-3 style shards: each parameter cut into ceil(n/2) pieces, the last one zero-padded.
    folder = tmp_path / SHARD_DIR
    folder.mkdir()
    for index in range(2):
        tensors = {}
        for name, full in want.items():
            flat = full.flatten()
            size = -(-flat.numel() // 2)
            piece = torch.zeros(size)
            part = flat[index * size:(index + 1) * size]
            piece[:part.numel()] = part
            tensors[name] = piece
        torch.save({"tensors": tensors, "numels": {n: t.numel() for n, t in want.items()}},
                   folder / f"shard_{index:05d}_of_00002.pt")
    target.load(tmp_path)
    for name, p in target_module.named_parameters():
        torch.testing.assert_close(p, want[name], rtol=0, atol=0)
    # And its own save round-trips through a fresh target.
    target.save(tmp_path / "again", rank=0)
    other = TargetEncoder.replicated(copy.deepcopy(online), online)
    other.load(tmp_path / "again")
    for a, b in zip(other.module.parameters(), target_module.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_incomplete_target_shards_are_refused(tmp_path):
    online, target_module = _pair(torch.float32)
    target = TargetEncoder.replicated(target_module, online)
    (tmp_path / SHARD_DIR).mkdir()
    torch.save({"tensors": {}, "numels": {}}, tmp_path / SHARD_DIR / "shard_00001_of_00002.pt")
    with pytest.raises(FileNotFoundError, match="incomplete"):
        target.load(tmp_path)


def test_save_schedule_saves_every_n_steps_at_the_last_step_and_on_preemption():
    saves = SaveSchedule(every_steps=4, total_steps=10)
    assert [step for step in range(1, 11) if saves.due(step)] == [4, 8, 10]
    assert saves.due(5, preempted=True) and not saves.due(5)


def test_synthetic_stream_resumes_from_its_state_dict():
    data = load_config(None, ["data.batch_size=2", "data.frames_per_clip=2", "data.crop_size=16"]).data
    stream = SyntheticClipStream(data, seed=3, rank=1, world_size=2)
    batches = list(itertools.islice(stream, 5))
    assert stream.state_dict() == {"epoch": 0, "chunk": 5}

    resumed = SyntheticClipStream(data, seed=3, rank=1, world_size=2)
    resumed.load_state_dict([{"epoch": 0, "chunk": 2}] * 2)
    assert all(torch.equal(a.clips, b.clips) for a, b in zip(batches[2:], itertools.islice(resumed, 3)))
    assert not torch.equal(batches[0].clips, batches[1].clips)


@pytest.fixture
def one_rank(tmp_path):
    """A gloo process group of one: the checkpointer's collectives, in this process."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class Counter:
    """A piece of run state the loop does not know about: registering it is all it takes."""

    def __init__(self):
        self.seen = 0

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]


class Blob:
    """A component that writes its own files (as DeepSpeed's engine and the EMA target do)."""

    def __init__(self, value: torch.Tensor):
        self.value = value

    def save(self, folder, rank):
        (folder / "blob").mkdir()
        torch.save(self.value, folder / "blob" / f"{rank}.pt")

    def load(self, folder):
        self.value = torch.load(folder / "blob" / "0.pt", weights_only=True)


def checkpointed(cfg, state, stream, counter, blob) -> Checkpointer:
    checkpointer = Checkpointer(cfg, rank=0, world_size=1)
    checkpointer.register("blob", blob, "files")
    checkpointer.register("rng", RngState(), "per_rank")
    checkpointer.register("train_state", state, "shared")
    checkpointer.register("data_position", stream, "all_ranks")
    checkpointer.register("counter", counter)
    return checkpointer


def test_checkpointer_saves_and_restores_every_registered_component(one_rank, tmp_path):
    cfg = load_config(None, ["data.batch_size=2", "data.chunk_size=4"])
    stream = SyntheticClipStream(cfg.data, seed=3, rank=0, world_size=1)
    batches = iter(stream)
    next(batches), next(batches), next(batches)
    state, counter = TrainState(step=3, world_sizes=[2, 1], last_loss=0.5), Counter()
    counter.seen = 7
    folder = tmp_path / "step_00000003"
    folder.mkdir()
    torch.manual_seed(1)
    checkpointed(cfg, state, stream, counter, Blob(torch.arange(4.0))).write(folder)
    drawn, following = torch.rand(3), next(batches)
    assert sorted(p.name for p in folder.iterdir()) == [
        "blob", CONFIG_FILE, "counter.json", "data_position.json", "manifest", "rng", TRAIN_STATE]
    assert json.loads((folder / "counter.json").read_text()) == {"seen": 7}
    assert problems(folder) == []

    fresh_stream = SyntheticClipStream(cfg.data, seed=3, rank=0, world_size=1)
    fresh = (TrainState(), Counter(), Blob(torch.zeros(4)))
    checkpointed(cfg, fresh[0], fresh_stream, fresh[1], fresh[2]).restore(folder, folder.name)
    assert fresh[0] == state and fresh[1].seen == 7 and torch.equal(fresh[2].value, torch.arange(4.0))
    assert torch.equal(torch.rand(3), drawn)
    assert torch.equal(next(iter(fresh_stream)).clips, following.clips)

    # start_from loads only the components it names.
    other = (TrainState(), Counter(), Blob(torch.zeros(4)))
    checkpointed(cfg, other[0], SyntheticClipStream(cfg.data, 3, 0, 1), other[1], other[2]).start_from(
        folder, ("blob",))
    assert other[0] == TrainState() and other[1].seen == 0 and torch.equal(other[2].value, torch.arange(4.0))


def test_checkpointer_restores_checkpoints_of_the_older_layouts(one_rank, tmp_path, caplog):
    """Before the data position had a file of its own, train_state.json held every rank's (and before that rank
    0's alone); RNG files were pickled with numpy arrays; a component registered since has no state there."""
    cfg = load_config(None, ["data.batch_size=2", "data.chunk_size=4"])
    folder = tmp_path / "old"
    (folder / "rng").mkdir(parents=True)
    (folder / "blob").mkdir()
    torch.save(torch.ones(2), folder / "blob" / "0.pt")
    (folder / TRAIN_STATE).write_text(json.dumps({"step": 4, "world_size": 1, "skipped_videos": 2,
                                                  "data_position": [{"epoch": 0, "chunk": 2}],
                                                  "state_digest": None}))
    legacy = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    torch.save(legacy, folder / "rng" / "rank_00000.pt")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(folder / "rng" / "rank_00000.pt", weights_only=True)
    state, stream, counter = TrainState(), SyntheticClipStream(cfg.data, seed=3, rank=0, world_size=1), Counter()
    counter.seen = 3
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    checkpointed(cfg, state, stream, counter, Blob(torch.zeros(2))).restore(folder, "old")
    assert (state.step, state.skipped_videos) == (4, 2)
    assert counter.seen == 3 and "holds no counter (saved before it was registered)" in caplog.text
    assert stream.state_dict() == {"epoch": 0, "chunk": 2}
    assert torch.equal(torch.rand(3), expected)  # the rank kept its own RNG
    assert "older checkpoint format" in caplog.text
    (folder / TRAIN_STATE).write_text('{"step": 4, "data_position": {"epoch": 0, "chunk": 1}}')
    checkpointed(cfg, state, stream, Counter(), Blob(torch.zeros(2))).restore(folder, "old")
    assert stream.state_dict() == {"epoch": 0, "chunk": 1}


def test_interval_meter_means_and_collapse_warning():
    meter = IntervalMeter(num_masks=2)
    meter.add_micro_step(torch.tensor(1.0), [torch.tensor(0.5), torch.tensor(1.5)], torch.tensor(0.2), 4, 1)
    meter.add_micro_step(torch.tensor(3.0), [torch.tensor(2.5), torch.tensor(3.5)], torch.tensor(0.4), 4, 0)
    meter.add_step(2.0)
    out = meter.reduce()
    assert out["loss"] == pytest.approx(2.0) and out["loss_mask_1"] == pytest.approx(2.5)
    assert out["target_feature_std"] == pytest.approx(0.3) and out["skipped_videos"] == 1
    assert out["grad_norm"] == pytest.approx(2.0) and 0.0 <= out["data_wait_share"] <= 1.0
    assert collapse_warning(0.001, 0.01) is not None and collapse_warning(0.5, 0.01) is None


def test_tensorboard_callback_writes_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    callback = TensorBoardCallback(tmp_path)
    callback = copy.deepcopy(callback)
    for step, loss in ((1, 0.9), (2, 0.7)):
        callback.after_report(None, [{"step": step, "loss": loss, "note": "text"}], None)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, round(e.value, 3)) for e in events.Scalars("train/loss")] == [(1, 0.9), (2, 0.7)]


def _draws() -> tuple[list[float], list[float], list[float]]:
    return torch.rand(4).tolist(), np.random.standard_normal(3).tolist(), [random.gauss(0, 1) for _ in range(3)]


def test_rng_file_loads_weights_only_and_restores_every_generator_exactly(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    _draws()  # leaves a cached Gaussian in numpy and in python, which the state must carry too
    path = tmp_path / "rank_00000.pt"
    torch.save(RngState().state_dict(), path)
    first = _draws()
    RngState().load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    assert _draws() == first
    assert _draws() != first


def test_workers_take_their_node_labels_resources_and_resize_interval_from_the_config():
    from vjepa_ray.train.trainer import scaling_config

    cfg = load_config(None, ["ray.num_workers=[1,2]", "ray.worker_label_selector={vjepa-role: train}",
                             "ray.worker_resources={sim_gpu: 1}", "ray.elastic_resize_interval_s=5",
                             "ray.cpus_per_worker=0.25"])
    scaling = scaling_config(cfg)
    assert scaling.label_selector == {"vjepa-role": "train"} and scaling.elastic_resize_monitor_interval_s == 5
    assert scaling.resources_per_worker == {"CPU": 0.25, "sim_gpu": 1}
    assert cfg.ray.worker_threads() == 1  # what Ray gives a worker of under one CPU


def test_a_callbacks_stop_reaches_the_driver_as_a_stop_with_its_report_not_a_fault():
    import ray.train

    from vjepa_ray.train.failures import RunStopped, failure

    report = {"step": 4, "loss": 170.3, "target_feature_std": 0.05}
    # What fit() raises after a callback raised: the controller's error, pickled from the controller's process.
    raised = pickle.loads(pickle.dumps(ray.train.ControllerError(RunStopped("target collapsed", report))))
    assert failure(raised) == failure(RunStopped("target collapsed", report))
    assert (failure(raised).kind, failure(raised).cause, failure(raised).report) == ("stopped", "target collapsed",
                                                                                     report)
    assert failure(ray.train.ControllerError(ConfigError("data.paths", "no videos"))).kind == "input"
    fault = failure(ray.train.ControllerError(RuntimeError("lost\nmore")))
    assert (fault.kind, fault.cause, fault.report) == ("fault", "RuntimeError: lost", None)


def test_loss_regulation_past_its_limit_stops_the_run_without_retries():
    import ray.train

    from vjepa_ray.recipe.regulation import LossRegulationError
    from vjepa_ray.train.failures import StopOnInputError, failure

    error = LossRegulationError("step 40: loss regulation skipped 11 steps, more than "
                                "optimization.loss_reg_max_skips=10")
    # A worker's error ends the run through the callback: the controller's error, which Ray Train never retries.
    with pytest.raises(LossRegulationError):
        StopOnInputError(verbose=True).after_exception(None, {1: RuntimeError("lost"), 0: error})
    StopOnInputError(verbose=True).after_exception(None, {0: RuntimeError("lost")})  # a fault: retried
    raised = pickle.loads(pickle.dumps(ray.train.ControllerError(error)))
    assert failure(raised) == failure(error)
    assert (failure(raised).kind, failure(raised).cause) == ("regulation", f"LossRegulationError: {error}")
