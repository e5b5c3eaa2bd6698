"""The V-JEPA 2 recipe end to end on Ray Train + DeepSpeed, on the tiny model and in-memory synthetic clips:
pretraining from exported weights with the constant schedule on 2 workers, then the cooldown started from its
run folder on 1 worker at more frames and a larger crop."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_train_e2e import assert_target_matches_reference, reference_weights, tiny_config

from vjepa_ray.config import Config
from vjepa_ray.recipe.masks import MaskCollator
from vjepa_ray.recipe.optimizer import adamw
from vjepa_ray.recipe.step import JepaStep, init_networks
from vjepa_ray.train import driver
from vjepa_ray.train.curves import read_scalars
from vjepa_ray.train.synthetic_stream import SyntheticClipStream
from vjepa_ray.train.weights import read_initial_weights, write_training_weights

pytestmark = pytest.mark.slow


def replay_from_init_weights(cfg: Config, world_size: int, steps: int) -> dict[str, torch.Tensor]:
    """The EMA target of the run, recomputed in this process from ``model.init_from``'s weights."""
    module, target = init_networks(cfg, read_initial_weights(cfg))
    step = JepaStep(module, target, adamw(module.named_parameters(), cfg.optimization),
                    MaskCollator(cfg.mask, module.encoder.grid), cfg.optimization, cfg.meta.seed)
    return reference_weights(cfg, world_size, steps, step)["target_encoder"]


def adam_steps(checkpoint: str) -> set[int]:
    """Adam's step counts in a ZeRO checkpoint's optimizer state."""
    steps = set()
    for path in Path(checkpoint, "deepspeed", "state").glob("*optim_states.pt"):
        state = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        for param_state in state["base_optimizer_state"]["state"].values():
            steps.add(int(param_state["step"]))
    return steps


# The recipe code is family-agnostic; the run uses V-JEPA 2's rotary model, whose recipe this is (V-JEPA 1's
# models go through the same start and resume paths in test_train_e2e).
@pytest.mark.parametrize("family", ["vjepa2"])
def test_pretrain_from_exported_weights_then_cooldown_from_its_folder(ray_local, tmp_path, family):
    # Pretraining starts from an exported file: another seed's weights, its target apart from its encoder.
    exported, _ = init_networks(tiny_config(tmp_path, "export", "meta.seed=11", f"model.family={family}"))
    target = {k: v + 0.01 for k, v in exported.encoder.state_dict().items()}
    write_training_weights(tmp_path / "init.pt", {"encoder": exported.encoder.state_dict(),
                                                   "predictor": exported.predictor.state_dict(),
                                                   "target_encoder": target})
    pretrain = tiny_config(tmp_path, "pretrain", f"model.family={family}", "optimization.schedule=constant",
                           f"model.init_from={tmp_path / 'init.pt'}", "optimization.ema=[0.9,0.9]",
                           "checkpoint.every_steps=8", "logging.every_steps=1")
    first = driver.run(pretrain, stream_factory=SyntheticClipStream)
    assert first["status"] == "finished" and first["steps"] == 8 and first["world_sizes"] == [2]
    series = read_scalars(Path(first["tensorboard"]))
    assert series["loss"][-1][1] < series["loss"][0][1]
    # Warmup over 2 steps, then held: the metric at step s is the LR step s - 1 ran with, the schedule's value at
    # index s (the releases advance their schedulers before a step uses them).
    assert [lr for _, lr in series["lr"]] == pytest.approx([5.5e-4] + [1e-3] * 7, rel=1e-6)
    assert [m for _, m in series["momentum"]] == pytest.approx([0.9] * 8)
    # The workers started from the file: their EMA target is the one-process replay's from the file's weights.
    assert_target_matches_reference(first["checkpoint"], replay_from_init_weights(pretrain, 2, 8), target)

    # The cooldown: a new run from the pretraining folder, on 1 worker, 16 frames of 80 px instead of 8 of 64,
    # the global batch held at 8 (2 micro batches of 4).
    cooldown_overrides = [
        f"model.family={family}", "optimization.schedule=cooldown", "optimization.warmup_steps=0",
        "optimization.total_steps=6", "optimization.schedule_scale=1.0", "optimization.lr=1e-3",
        "optimization.final_lr=1e-5", "optimization.ema=[0.9,0.9]", "ray.num_workers=1",
        "optimization.global_batch_size=8", "data.frames_per_clip=16", "data.crop_size=80",
        f"checkpoint.start_from={tmp_path / 'pretrain'}", "checkpoint.every_steps=6", "logging.every_steps=1"]
    cooldown = tiny_config(tmp_path, "cooldown", *cooldown_overrides)
    second = driver.run(cooldown, stream_factory=SyntheticClipStream)
    assert second["status"] == "finished" and second["steps"] == 6
    assert second["starts"] == [{"world_size": 1, "step": 0}]
    series = read_scalars(Path(second["tensorboard"]))
    assert series["loss"][-1][1] < series["loss"][0][1]
    # Linear from 1e-3 toward 1e-5 over 6 steps, no warmup, reaching it at the last (indices 1 to 6).
    assert [lr for _, lr in series["lr"]] == pytest.approx([1e-3 - (1e-3 - 1e-5) * s / 6 for s in range(1, 7)],
                                                           rel=1e-6)
    metrics = json.loads((tmp_path / "cooldown" / "summary.json").read_text())["metrics"]
    assert (metrics["global_batch"], metrics["micro_batch"], metrics["grad_accum"]) == (8, 4, 2)
    # Adam's state came along (resharded from 2 workers to 1): its step counts go on from pretraining's 8.
    assert adam_steps(first["checkpoint"]) == {8} and adam_steps(second["checkpoint"]) == {14}

    # A restart resumes the cooldown's own checkpoint, even with the run it started from gone.
    shutil.rmtree(tmp_path / "pretrain")
    third = driver.run(cooldown, stream_factory=SyntheticClipStream)
    assert third["status"] == "finished" and third["starts"] == [{"world_size": 1, "step": 6}]
