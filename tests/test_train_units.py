"""The Ray/DeepSpeed layer's pure parts, in one process: batch rule, engine config, EMA target, save schedule,
synthetic stream, metrics."""

from __future__ import annotations

import copy
import itertools
import random

import numpy as np
import pytest
import torch
from torch import nn

from vjepa_ray.config import ConfigError, load_config
from vjepa_ray.recipe.optimizer import apply_schedules
from vjepa_ray.train import engine as eng
from vjepa_ray.train.checkpoint import SaveSchedule, TrainState, restore_rng, rng_state, set_rng_state
from vjepa_ray.train.elastic import check_elastic_batch, plan_batch
from vjepa_ray.train.metrics import IntervalMeter, TensorBoardCallback, collapse_warning
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


def test_train_state_keeps_every_ranks_position_and_reads_the_older_single_one():
    state = TrainState(step=6, data_position=[{"epoch": 0, "chunk": 1, "batch": 1}] * 2)
    assert TrainState.from_json(state.to_json()) == state
    older = TrainState.from_json('{"step": 4, "data_position": {"epoch": 0, "chunk": 2}}')
    assert older.data_position == [{"epoch": 0, "chunk": 2}]


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
    torch.save(rng_state(), path)
    first = _draws()
    set_rng_state(torch.load(path, map_location="cpu", weights_only=True))
    assert _draws() == first
    assert _draws() != first


def test_rng_file_of_the_older_format_is_not_unpickled_and_the_rank_keeps_its_rng(tmp_path, caplog):
    # Before RNG files held only tensors and plain values, numpy's state went in as an array.
    (tmp_path / "rng").mkdir()
    legacy = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    torch.save(legacy, tmp_path / "rng" / "rank_00000.pt")
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    restore_rng(tmp_path, 0)
    assert torch.equal(torch.rand(3), expected)
    assert "older checkpoint format" in caplog.text
    # A file in today's format restores; a rank with no file keeps its RNG.
    torch.save(rng_state(), tmp_path / "rng" / "rank_00000.pt")
    drawn = torch.rand(3)
    restore_rng(tmp_path, 0)
    assert torch.equal(torch.rand(3), drawn)
    restore_rng(tmp_path, 1)


def test_workers_take_their_node_labels_resources_resize_interval_and_fault_hook_from_the_driver(monkeypatch):
    from vjepa_ray.train.checkpoint import EXIT_IN_SAVE_ENV
    from vjepa_ray.train.trainer import scaling_config, worker_env

    cfg = load_config(None, ["ray.num_workers=[1,2]", "ray.worker_label_selector={vjepa-role: train}",
                             "ray.worker_resources={sim_gpu: 1}", "ray.elastic_resize_interval_s=5",
                             "ray.cpus_per_worker=0.25"])
    scaling = scaling_config(cfg)
    assert scaling.label_selector == {"vjepa-role": "train"} and scaling.elastic_resize_monitor_interval_s == 5
    assert scaling.resources_per_worker == {"CPU": 0.25, "sim_gpu": 1}
    assert cfg.ray.worker_threads() == 1  # what Ray gives a worker of under one CPU
    assert EXIT_IN_SAVE_ENV not in worker_env(cfg)
    monkeypatch.setenv(EXIT_IN_SAVE_ENV, "/tmp/marker")
    assert worker_env(cfg)[EXIT_IN_SAVE_ENV] == "/tmp/marker"
