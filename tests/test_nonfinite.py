"""Non-finite steps never reach the weights: the recipe's step and the DeepSpeed engine (ZeRO 0-3, fp32 and bf16)
in one process, a non-finite step injected by the test; the counter that stops a run; the save's refusal. And,
on the same one-rank group (DeepSpeed keeps the groups of the first one): the DeepSpeed step against the recipe's
for V-JEPA 1 and 2.1, unused parameters, and loss regulation held back through the same gate.

A step made non-finite must leave weights, Adam's state and the EMA target bit for bit as a run that never
took that step's update (same seeds, the step's batch drawn and dropped).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math

import pytest
import torch
from conftest import _free_port
from test_step import CONSTANT, random_clips, tiny_step, weights

from vjepa_ray.config import ConfigError, builtin_config_path, load_config
from vjepa_ray.recipe.step import JepaStep, MicroBatch
from vjepa_ray.train.nonfinite import NonFiniteStateError, NonFiniteSteps, check_finite_state, stop_message
from vjepa_ray.train.synthetic_stream import SyntheticClipStream, synthetic_clips

POISONED = 2  # the 0-based step whose loss the test makes non-finite
STEPS = 4


def poison(step, kind: str, at: set[int]):
    """Makes the loss of ``step``'s steps in ``at`` (0-based, counted by the wrapper) non-finite: ``nan``
    multiplies it by NaN (every gradient NaN too), ``inf`` adds an infinite constant (the loss is infinite,
    its gradient finite: only a check of the loss catches it)."""
    forward, calls = step.forward, [0]

    def poisoned(groups):
        out = forward(groups)
        if calls[0] in at:
            bad = out.loss * math.nan if kind == "nan" else out.loss + math.inf
            out = dataclasses.replace(out, loss=bad)
        calls[0] += 1
        return out

    step.forward = poisoned


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_the_recipe_step_drops_a_nonfinite_step_whole(one_thread, kind):
    clips = random_clips(4)
    poisoned, clean = tiny_step(), tiny_step()
    poison(poisoned, kind, {POISONED})
    for step in range(STEPS):
        out = poisoned([MicroBatch(clips)], step)
        assert out.applied == (step != POISONED)
        if step != POISONED:  # the clean run never takes the poisoned step's update
            clean([MicroBatch(clips)], step)
    for name, value in weights(clean).items():
        assert torch.equal(weights(poisoned)[name], value), name
    assert all(p.grad is None for p in poisoned.module.parameters())
    assert str(poisoned.optimizer.state_dict()) == str(clean.optimizer.state_dict())


@pytest.fixture(scope="module")
def one_rank_group():
    """A torch.distributed group of one process (gloo), as a Ray Train worker has, for DeepSpeed in this process;
    one per module: DeepSpeed keeps the groups it derives from the first one."""
    import torch.distributed as dist

    with pytest.MonkeyPatch.context() as env:
        for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
                           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
            env.setenv(key, value)
        dist.init_process_group("gloo", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def _engine_run(cfg, kind: str | None, skip: set[int]):
    """``STEPS`` steps of a one-rank ``TrainStep``; steps in ``skip`` are poisoned with ``kind``, or (``kind``
    None) not run at all, their batch drawn and dropped. Returns the applied flags, the state digest (fp32
    masters and Adam moments) and the EMA target."""
    from vjepa_ray.train.deepspeed_state import state_digest
    from vjepa_ray.train.elastic import global_batch_size, plan_batch
    from vjepa_ray.train.engine import TrainStep
    from vjepa_ray.train.synthetic_stream import SyntheticClipStream

    plan = plan_batch(global_batch_size(cfg), cfg.data.batch_size, 1)
    train_step = TrainStep(cfg, plan, 0, torch.device("cpu"))
    if kind is not None:
        poison(train_step.jepa_step, kind, skip)
    batches = iter(SyntheticClipStream(dataclasses.replace(cfg.data, batch_size=plan.micro_batch), cfg.meta.seed))
    applied = []
    for step in range(STEPS):
        if kind is None and step in skip:
            next(batches)
            continue
        applied.append(train_step(batches, step).applied)
    return applied, state_digest(train_step.engine), train_step.target.fp32_shards()


# ZeRO-1 runs ZeRO-2's optimizer; "inf" is the case DeepSpeed's own overflow check misses.
@pytest.mark.parametrize("stage,precision,kind", [(0, "fp32", "nan"), (0, "bf16", "inf"), (2, "bf16", "nan"),
                                                  (2, "fp32", "inf"), (3, "bf16", "inf")])
def test_the_deepspeed_step_drops_a_nonfinite_step_whole(one_rank_group, one_thread, stage, precision, kind):
    cfg = load_config(builtin_config_path("local_demo"), [
        "data.synthetic_videos=0", "model.pred_depth=1", "ray.num_workers=1", "data.batch_size=2",
        f"deepspeed.zero_stage={stage}", f"deepspeed.precision={precision}", "optimization.warmup_steps=0"])
    applied, digest, target = _engine_run(cfg, kind, {POISONED})
    assert applied == [step != POISONED for step in range(STEPS)]
    want_applied, want_digest, want_target = _engine_run(cfg, None, {POISONED})
    assert want_applied == [True] * (STEPS - 1)
    assert digest == want_digest
    assert target.keys() == want_target.keys()
    for name, value in want_target.items():
        assert torch.equal(target[name], value), name


ENGINE_STEPS = 4
# Three sources: 2.1 then holds six mask tokens, as its release does, and trains token 0 only.
TINY_ENGINE = ["data.synthetic_videos=0", "ray.num_workers=1", "data.batch_size=2", "data.frames_per_clip=4",
               "data.crop_size=32", "data.paths=[a,b,c]", "model.pred_depth=1", "model.pred_embed_dim=48",
               "deepspeed.zero_stage=2", "deepspeed.precision=fp32", "optimization.schedule=constant",
               "optimization.warmup_steps=0", "optimization.start_lr=1e-3", "optimization.lr=1e-3",
               # A large weight decay: a parameter it wrongly reached would move visibly.
               "optimization.weight_decay=0.5", "optimization.final_weight_decay=0.5", "optimization.ema=[0.9,0.9]",
               "optimization.clip_grad_rule=none",
               # Regulation from step 2 on, on a window of 2, at mean + 0 std: 2.1's loss rises with lambda and is held.
               "optimization.loss_reg_std_mult=0", "optimization.loss_reg_window=2",
               "optimization.loss_reg_start_step=2"]
FAMILIES = {"vjepa1": ["model.family=vjepa1"],
            "vjepa2_1": ["model.family=vjepa2_1", "model.pred_num_heads=4", "loss.context_warmup=[0,3]"]}
# What no video step of 2.1 reaches: the image path and the mask tokens its rule never picks.
UNUSED_2_1 = {"encoder.patch_embed_img.proj.weight", "encoder.patch_embed_img.proj.bias", "encoder.img_mod_embed",
              "predictor.img_mod_embed", *(f"predictor.mask_tokens.{k}" for k in range(1, 6))}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_one_rank_deepspeed_step_is_the_recipe_step(one_rank_group, one_thread, tmp_path, family):
    from vjepa_ray.train.checkpoint import Checkpointer
    from vjepa_ray.train.elastic import global_batch_size, plan_batch
    from vjepa_ray.train.engine import TrainStep
    from vjepa_ray.train.loop import register_run_state
    from vjepa_ray.train.state import TrainState
    from vjepa_ray.train.weights import read_model_weights

    cfg = load_config(builtin_config_path("local_demo"),
                      [*TINY_ENGINE, *FAMILIES[family], f"ray.storage_path={tmp_path}"])
    plan = plan_batch(global_batch_size(cfg), cfg.data.batch_size, 1)
    data = dataclasses.replace(cfg.data, batch_size=plan.micro_batch)
    train_step, reference = TrainStep(cfg, plan, 0, torch.device("cpu")), JepaStep.from_config(cfg)
    engine = train_step.engine
    initial = {k: p.detach().clone() for k, p in engine.module.named_parameters()}
    batches = iter(SyntheticClipStream(data, cfg.meta.seed))
    outs, want = [], []
    for step in range(ENGINE_STEPS):
        outs.append(train_step(batches, step))
        want.append(reference([MicroBatch(synthetic_clips(data, cfg.meta.seed, 0, step), 0, 0)], step))

    assert [out.loss for out in outs] == [out.loss for out in want]
    assert [(o.applied, o.loss_regulated) for o in outs] == [(o.applied, o.loss_regulated) for o in want]
    assert list(train_step.jepa_step.regulation.history) == list(reference.regulation.history)
    online = dict(engine.module.named_parameters())
    for name, value in reference.module.named_parameters():
        assert torch.equal(online[name], value), name
    target = dict(train_step.target.module.named_parameters())
    for name, value in reference.target_encoder.named_parameters():
        assert torch.equal(target[name], value), name
    frozen = {name for name, p in engine.module.named_parameters() if not p.requires_grad}
    trained = {id(p) for group in engine.optimizer.params_in_partition for p in group}
    assert not {id(online[name]) for name in frozen} & trained  # out of ZeRO's flat buffers
    assert all(torch.equal(online[name], initial[name]) for name in frozen)
    if family == "vjepa2_1":
        assert frozen == UNUSED_2_1
        assert [o.loss_regulated for o in outs] == [False, False, True, True]  # held, the EMA still moved
        assert engine.global_steps == ENGINE_STEPS  # DeepSpeed stepped through the held steps
    else:
        assert not frozen

    # The regulation's state is run state: a checkpoint holds it (and the frozen parameters) and restores it.
    checkpointer = Checkpointer(cfg, rank=0, world_size=1)
    stream = SyntheticClipStream(data, cfg.meta.seed)
    register_run_state(checkpointer, train_step, stream, TrainState(step=ENGINE_STEPS), 0)
    folder = tmp_path / "step_00000004"
    folder.mkdir()
    checkpointer.write(folder)
    saved = train_step.jepa_step.regulation.state_dict()
    train_step.jepa_step.regulation.load_state_dict({"history": [], "skips": 0})
    checkpointer.restore(folder, folder.name)
    assert train_step.jepa_step.regulation.state_dict() == saved and saved["history"]
    exported = read_model_weights(folder)
    for name, value in reference.module.encoder.named_parameters():
        assert torch.equal(exported["encoder"][name], value), name
    for name, value in reference.module.predictor.named_parameters():
        assert torch.equal(exported["predictor"][name], value), name



def _run_state(cfg, checkpointer, train_step) -> None:
    """``train_step`` and the rest of a one-rank run's state, registered with ``checkpointer``."""
    from vjepa_ray.train.loop import register_run_state
    from vjepa_ray.train.state import TrainState

    data = dataclasses.replace(cfg.data, batch_size=train_step.plan.micro_batch)
    register_run_state(checkpointer, train_step, SyntheticClipStream(data, cfg.meta.seed),
                       TrainState(step=2, zero_stage=cfg.deepspeed.zero_stage), 0)


def _saved_before_freezing(cfg, folder, monkeypatch):
    """Two steps of V-JEPA 2.0 as the code before ``freeze_unused_`` took them, every parameter trained, saved in
    ``folder``; returns the step. Token 1 starts off its zero initialisation, so that weight decay moves it and a
    restore must bring its value back."""
    from vjepa_ray.recipe.step import init_networks
    from vjepa_ray.train import engine as engine_module
    from vjepa_ray.train.checkpoint import Checkpointer
    from vjepa_ray.train.elastic import global_batch_size, plan_batch
    from vjepa_ray.train.engine import TrainStep

    def every_parameter_trained(cfg):
        module, target = init_networks(cfg)
        with torch.no_grad():
            module.predictor.mask_tokens[1].fill_(0.25)
        return module.requires_grad_(True), target

    plan = plan_batch(global_batch_size(cfg), cfg.data.batch_size, 1)
    with monkeypatch.context() as patch:
        patch.setattr(engine_module, "init_networks", every_parameter_trained)
        old = TrainStep(cfg, plan, 0, torch.device("cpu"))
    batches = iter(SyntheticClipStream(dataclasses.replace(cfg.data, batch_size=plan.micro_batch), cfg.meta.seed))
    for step in range(2):
        old(batches, step)
    folder.mkdir()
    saver = Checkpointer(cfg, rank=0, world_size=1)
    _run_state(cfg, saver, old)
    saver.write(folder, saver.digest())  # the digest checkpoint.verify_restore writes
    return old


def _trained_names(module) -> set[str]:
    return {name for name, param in module.named_parameters() if param.requires_grad}


def test_a_checkpoint_saved_before_unused_parameters_were_frozen_resumes(one_rank_group, one_thread, tmp_path,
                                                                         monkeypatch, caplog):
    """V-JEPA 2.0's checkpoints from before ``freeze_unused_`` trained its mask token 1 too: their ZeRO buffers
    hold one parameter more than today's engine. The restore goes through the universal conversion and brings
    back every trained parameter's weights and Adam moments, and the frozen token's value, bit for bit; the
    digest saved over the old parameters is not held against it."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from vjepa_ray.recipe.step import init_networks
    from vjepa_ray.train.checkpoint import Checkpointer
    from vjepa_ray.train.engine import TrainStep

    cfg = load_config(builtin_config_path("local_demo"), [*TINY_ENGINE, "model.family=vjepa2",
                                                          "checkpoint.verify_restore=true",
                                                          f"ray.storage_path={tmp_path}"])
    folder = tmp_path / "step_00000002"
    old = _saved_before_freezing(cfg, folder, monkeypatch)

    # Today's restore, as ``TrainLoop._build`` makes it.
    checkpointer = Checkpointer(cfg, rank=0, world_size=1)
    networks = init_networks(cfg)
    trained = _trained_names(networks[0])
    assert trained == {name for name, _ in networks[0].named_parameters()} - {"predictor.mask_tokens.1"}
    universal = checkpointer.needs_resharding(folder, trained)
    assert universal
    new = TrainStep(cfg, old.plan, 0, torch.device("cpu"), load_universal=universal, networks=networks)
    _run_state(cfg, checkpointer, new)
    with caplog.at_level(logging.WARNING, logger="vjepa_ray.train.checkpoint"):
        checkpointer.restore(folder, folder.name)
    assert "its state digest cannot be compared" in caplog.text

    for engine in (old.engine, new.engine):  # Adam moments linked to the parameters (as ``state_digest`` does)
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    saved = dict(old.engine.module.named_parameters())
    for name, param in new.engine.module.named_parameters():
        if name not in trained:
            assert torch.equal(param, saved[name]) and 0 < param.abs().max() < 0.25, name  # decayed
            continue
        assert torch.equal(safe_get_full_fp32_param(param), safe_get_full_fp32_param(saved[name])), name
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(safe_get_full_optimizer_state(param, moment),
                               safe_get_full_optimizer_state(saved[name], moment)), (name, moment)
    assert new.engine.global_steps == old.engine.global_steps == 2
    # A checkpoint of today's engine holds the same parameters: it loads directly.
    today = tmp_path / "step_00000003"
    today.mkdir()
    checkpointer.write(today)
    assert not checkpointer.needs_resharding(today, trained) and checkpointer.same_parameters


def test_a_zero0_checkpoint_saved_before_unused_parameters_were_frozen_stops_with_what_to_do(
        one_rank_group, one_thread, tmp_path, monkeypatch):
    """ZeRO-0 keeps torch's optimizer state, which names no parameters and which no conversion reads: resuming
    one saved before ``freeze_unused_`` is an input error (not retried), a checkpoint of today's code resumes."""
    from vjepa_ray.recipe.step import init_networks
    from vjepa_ray.train.checkpoint import Checkpointer
    from vjepa_ray.train.engine import TrainStep

    cfg = load_config(builtin_config_path("local_demo"), [*TINY_ENGINE, "model.family=vjepa2",
                                                          "deepspeed.zero_stage=0", f"ray.storage_path={tmp_path}"])
    old = _saved_before_freezing(cfg, tmp_path / "step_00000002", monkeypatch)
    networks = init_networks(cfg)
    checkpointer = Checkpointer(cfg, rank=0, world_size=1)
    with pytest.raises(ConfigError, match=r"step_00000002: its ZeRO-0 optimizer state holds \d+ parameters, this "
                                          r"version trains \d+ .* model\.init_from="):
        checkpointer.needs_resharding(tmp_path / "step_00000002", _trained_names(networks[0]))
    _run_state(cfg, checkpointer, TrainStep(cfg, old.plan, 0, torch.device("cpu"), networks=networks))
    today = tmp_path / "step_00000003"
    today.mkdir()
    checkpointer.write(today)
    assert not checkpointer.needs_resharding(today, _trained_names(networks[0]))


def test_max_nonfinite_steps_in_a_row_stop_the_run_and_applied_steps_reset_the_streak(caplog):
    steps = NonFiniteSteps(limit=3, total=5)
    with caplog.at_level(logging.WARNING, logger="vjepa_ray.train.nonfinite"):
        flags = [steps.record(step, applied, math.nan, math.inf, rank=0)
                 for step, applied in [(1, False), (2, False), (3, True), (4, False), (5, False), (6, False)]]
    assert flags == [False, False, False, False, False, True]
    assert steps.total == 10 and steps.streak == [4, 5, 6]
    assert steps.metrics(True) == {"nonfinite_steps": 10, "nonfinite_streak": 3, "nonfinite_first_step": 4,
                                   "nonfinite_stop": 1}
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [f"step {s} not applied" for s in (1, 2, 4, 5, 6)]
    line = stop_message({"step": 6, **steps.metrics(True)}, "/runs/x/step_00000002", 1e30, "bf16")
    assert "steps 4-6" in line and "/runs/x/step_00000002" in line and "optimization.lr (peak 1e+30)" in line
    assert "deepspeed.precision (bf16)" in line and "\n" not in line
    assert "no checkpoint was saved" in stop_message({"step": 6, **steps.metrics(True)}, None, 1.0, "fp32")


def test_max_nonfinite_steps_must_be_at_least_one():
    with pytest.raises(ConfigError, match="optimization.max_nonfinite_steps"):
        load_config(builtin_config_path("local_demo"), ["optimization.max_nonfinite_steps=0"])


def test_a_save_refuses_nonfinite_weights_optimizer_state_or_target():
    step = tiny_step(CONSTANT)
    step([MicroBatch(random_clips(2))], 0)
    engine = type("Engine", (), {"module": step.module})()
    target = {n: p.detach() for n, p in step.target_encoder.named_parameters()}
    check_finite_state(engine, step.optimizer, target, torch.device("cpu"))
    moment = next(iter(step.optimizer.state.values()))["exp_avg"]
    moment.view(-1)[0] = math.inf
    with pytest.raises(NonFiniteStateError, match="refusing to save"):
        check_finite_state(engine, step.optimizer, target, torch.device("cpu"))
    moment.view(-1)[0] = 0.0
    next(iter(target.values())).view(-1)[0] = math.nan
    with pytest.raises(NonFiniteStateError):
        check_finite_state(engine, step.optimizer, target, torch.device("cpu"))


def _tensors(value):
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def assert_every_checkpoint_finite(run_folder) -> list[str]:
    """Every tensor of every file of every checkpoint in the run folder is finite; returns the checkpoints."""
    names = sorted(p.name for p in run_folder.glob("step_*") if (p / "train_state.json").is_file())
    for name in names:
        for file in sorted((run_folder / name).rglob("*.pt")):
            for tensor in _tensors(torch.load(file, map_location="cpu", weights_only=False)):
                if tensor.is_floating_point():
                    assert torch.isfinite(tensor).all(), f"{file} holds a non-finite value"
    return names


# Step 0 runs at start_lr, step 1 (0-based) at ~1e29: its update is finite but wrecks the weights, so that the
# losses soon stop being finite.
DIVERGING = ["optimization.start_lr=1e-4", "optimization.lr=1e30", "optimization.warmup_steps=4",
             "optimization.total_steps=30", "optimization.max_nonfinite_steps=3", "checkpoint.every_steps=1",
             "checkpoint.num_to_keep=30", "logging.every_steps=5"]


def assert_stopped_after_three_nonfinite_steps(summary: dict, run_folder, precision: str) -> None:
    first = summary["metrics"]["nonfinite_first_step"]
    assert first >= 2  # step 1 ran at start_lr
    assert summary["status"] == "failed" and summary["restarts"] == 0
    assert summary["steps"] == first + 2 and summary["nonfinite_steps"] == 3
    # Every applied step saved; none of the non-finite ones did, and nothing saved holds a non-finite value.
    assert assert_every_checkpoint_finite(run_folder) == [f"step_{s:08d}" for s in range(1, first)]
    assert summary["checkpoint"].endswith(f"step_{first - 1:08d}")
    line = summary["error"]
    assert line.startswith(f"stopped: steps {first}-{first + 2} had a non-finite loss or gradient")
    assert summary["checkpoint"] in line and "\n" not in line
    assert "optimization.lr (peak 1e+30)" in line and f"deepspeed.precision ({precision})" in line


@pytest.mark.slow
def test_a_far_too_large_learning_rate_stops_the_run_from_the_command_line_under_zero2(ray_local, tmp_path, capsys,
                                                                                      caplog):
    from vjepa_ray import pretrain
    from vjepa_ray.data.demo import write_demo_videos

    args = ["meta.name=diverged", f"ray.storage_path={tmp_path}", "data.synthetic_videos=4",
            f"data.paths=[{tmp_path / 'videos'}]", "model.pred_depth=1", "deepspeed.zero_stage=2",
            "deepspeed.precision=bf16", *DIVERGING]
    write_demo_videos(tmp_path / "videos", load_config(builtin_config_path("local_demo"), args))
    with caplog.at_level(logging.ERROR, logger="vjepa_ray.train.driver"):
        code = pretrain.main(args)
    summary = json.loads((tmp_path / "diverged" / "summary.json").read_text())
    assert code == 1 and capsys.readouterr().out.startswith(f"failed: {summary['steps']} steps")
    assert_stopped_after_three_nonfinite_steps(summary, tmp_path / "diverged", "bf16")
    assert [r.getMessage() for r in caplog.records] == [summary["error"]]


@pytest.mark.slow
def test_a_far_too_large_learning_rate_stops_the_run_under_zero3(ray_local, tmp_path):
    from test_train_e2e import tiny_config

    from vjepa_ray.train import driver
    from vjepa_ray.train.synthetic_stream import SyntheticClipStream

    cfg = tiny_config(tmp_path, "diverged3", "deepspeed.zero_stage=3", *DIVERGING)
    summary = driver.run(cfg, stream_factory=SyntheticClipStream)
    assert summary["metrics"]["nonfinite_stop"] == 1
    assert_stopped_after_three_nonfinite_steps(summary, tmp_path / "diverged3", "fp32")
