"""LR / weight-decay / EMA-momentum schedules (the V-JEPA 1 and 2 ViT-L recipes' numbers) and the optimizer's
param groups."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

from vjepa_ray.config import ConfigError, OptimizationConfig
from vjepa_ray.models import Predictor, VisionTransformer
from vjepa_ray.recipe import optimizer, schedules

RECIPE = OptimizationConfig()  # defaults = the ViT-L/16 recipe: 90k steps, warmup 12k, schedules over 1.25x


def test_learning_rate_warmup_then_cosine():
    assert schedules.lr_at(0, RECIPE) == pytest.approx(2e-4)
    assert schedules.lr_at(6_000, RECIPE) == pytest.approx((2e-4 + 6.25e-4) / 2)
    assert schedules.lr_at(12_000, RECIPE) == pytest.approx(6.25e-4)
    assert schedules.lr_at(89_999, RECIPE) == pytest.approx(7.5e-5, rel=0.01)
    assert schedules.lr_at(112_500, RECIPE) == pytest.approx(1e-6)
    assert schedules.lr_at(200_000, RECIPE) == pytest.approx(1e-6)  # held at the end
    lrs = [schedules.lr_at(s, RECIPE) for s in range(12_000, 90_000, 1000)]
    assert lrs == sorted(lrs, reverse=True)


def test_weight_decay_and_ema_momentum():
    assert schedules.weight_decay_at(0, RECIPE) == pytest.approx(0.04)
    assert schedules.weight_decay_at(89_999, RECIPE) == pytest.approx(0.366, abs=5e-4)
    assert schedules.weight_decay_at(112_500, RECIPE) == pytest.approx(0.4)
    assert schedules.ema_momentum_at(0, RECIPE) == pytest.approx(0.998)
    assert schedules.ema_momentum_at(89_999, RECIPE) == pytest.approx(0.9996, abs=1e-6)
    assert schedules.ema_momentum_at(10**6, RECIPE) == 1.0


def test_no_warmup_and_bad_step():
    cfg = OptimizationConfig(total_steps=100, warmup_steps=0, schedule_scale=1.0, lr=1e-3, final_lr=0.0)
    assert schedules.lr_at(0, cfg) == pytest.approx(1e-3)
    assert schedules.lr_at(50, cfg) == pytest.approx(5e-4)
    assert schedules.lr_at(100, cfg) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="step"):
        schedules.lr_at(-1, cfg)


# The V-JEPA 2.0 ViT-L schedules (configs/train/vitl16/pretrain-256px-16f.yaml, cooldown-256px-64f.yaml):
# warmup 40 x ipe 300, start_lr 1e-4, lr 5.25e-4, WD 0.04, EMA 0.99925; the cooldown runs 40 x 300 steps
# with ipe_scale 1.25 down toward final_lr 1e-6.
V2_PRETRAIN = OptimizationConfig(schedule="constant", total_steps=240_000, warmup_steps=12_000, start_lr=1e-4,
                                 lr=5.25e-4, weight_decay=0.04, ema=[0.99925, 0.99925])
V2_COOLDOWN = OptimizationConfig(schedule="cooldown", total_steps=12_000, warmup_steps=0, lr=5.25e-4,
                                 final_lr=1e-6, weight_decay=0.04, ema=[0.99925, 0.99925])


def test_constant_schedule_warms_up_then_holds():
    assert schedules.lr_at(0, V2_PRETRAIN) == pytest.approx(1e-4)
    assert schedules.lr_at(6_000, V2_PRETRAIN) == pytest.approx((1e-4 + 5.25e-4) / 2)
    for step in (12_000, 100_000, 239_999, 10**6):
        assert schedules.lr_at(step, V2_PRETRAIN) == 5.25e-4
    for step in (0, 12_000, 239_999):
        assert schedules.weight_decay_at(step, V2_PRETRAIN) == 0.04
        assert schedules.ema_momentum_at(step, V2_PRETRAIN) == 0.99925


def test_constant_schedule_is_the_releases_cosine_with_equal_end_values():
    # The 2.0 release runs its cosine schedulers with final_lr = lr, final_weight_decay = weight_decay and
    # ema = [m, m]; ours holds the values without reading the final ones.
    cosine = dataclasses.replace(V2_PRETRAIN, schedule="cosine", final_lr=5.25e-4, final_weight_decay=0.04)
    constant = dataclasses.replace(V2_PRETRAIN, final_lr=0.0, final_weight_decay=0.9, ema=[0.99925, 1.0])
    for step in (0, 1, 5_000, 11_999, 12_000, 12_001, 150_000, 239_999):
        assert schedules.lr_at(step, constant) == schedules.lr_at(step, cosine)
        assert schedules.weight_decay_at(step, constant) == schedules.weight_decay_at(step, cosine)
        assert schedules.ema_momentum_at(step, constant) == schedules.ema_momentum_at(step, cosine)


def test_cooldown_decays_linearly_over_the_scaled_length_without_warmup():
    length = 15_000  # int(1.25 * 12_000): the release's T_max
    assert schedules.lr_at(0, V2_COOLDOWN) == 5.25e-4
    for step in (1, 3_000, 7_500, 11_999):
        assert schedules.lr_at(step, V2_COOLDOWN) == pytest.approx(5.25e-4 + (1e-6 - 5.25e-4) * step / length,
                                                                 rel=1e-12)
    # The release's run ends at 80% of the decay ...
    assert schedules.lr_at(11_999, V2_COOLDOWN) == pytest.approx(1.058e-4, rel=1e-3)
    # ... and only a run over the whole length reaches final_lr, where it stays.
    assert schedules.lr_at(length, V2_COOLDOWN) == pytest.approx(1e-6)
    assert schedules.lr_at(2 * length, V2_COOLDOWN) == pytest.approx(1e-6)
    assert (schedules.weight_decay_at(11_999, V2_COOLDOWN), schedules.ema_momentum_at(11_999, V2_COOLDOWN)) == \
        (0.04, 0.99925)


def test_schedule_names_and_the_cooldowns_warmup_are_checked():
    with pytest.raises(ConfigError, match=r"^optimization.schedule: 'wsd' is not one of cosine, constant, cooldown"):
        OptimizationConfig(schedule="wsd").validate("optimization")
    with pytest.raises(ConfigError, match=r"^optimization.warmup_steps: the cooldown schedule has no warmup"):
        OptimizationConfig(schedule="cooldown").validate("optimization")
    OptimizationConfig(schedule="cooldown", warmup_steps=0).validate("optimization")


def _models():
    encoder = VisionTransformer(img_size=16, num_frames=2, patch_size=8, tubelet_size=2, embed_dim=12, depth=1,
                                num_heads=2)
    return encoder, Predictor(encoder.grid, 12, predictor_embed_dim=8, depth=1, num_heads=2)


def test_param_groups_exclude_biases_and_1d_params_from_weight_decay():
    encoder, predictor = _models()
    named = [*encoder.named_parameters(prefix="encoder"), *predictor.named_parameters(prefix="predictor")]
    groups = optimizer.param_groups(named, 0.04)
    assert [(g["apply_wd"], g["weight_decay"]) for g in groups] == [(True, 0.04), (False, 0.0)]
    names = {id(p): n for n, p in named}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    not_decayed = {names[id(p)] for p in groups[1]["params"]}
    assert decayed | not_decayed == set(names.values()) and not decayed & not_decayed
    assert all(n.endswith("bias") or n.endswith("norm1.weight") or n.endswith("norm2.weight")
               or n.endswith("norm.weight") for n in not_decayed)
    assert {"encoder.blocks.0.attn.qkv.weight", "encoder.patch_embed.proj.weight",
            "predictor.mask_tokens.0", "predictor.predictor_proj.weight"} <= decayed  # mask tokens decay too
    assert "encoder.pos_embed" not in names.values()  # the fixed table is no parameter


def test_frozen_parameters_are_left_out():
    layer = nn.Linear(3, 3)
    layer.bias.requires_grad_(False)
    groups = optimizer.param_groups(layer.named_parameters(), 0.1)
    assert len(groups) == 1 and groups[0]["params"] == [layer.weight]


def test_adamw_uses_config_and_schedules_touch_decay_groups_only():
    encoder, predictor = _models()
    cfg = OptimizationConfig(betas=[0.8, 0.95], eps=1e-6)
    opt = optimizer.adamw(encoder.named_parameters(), cfg)
    assert [(g["betas"], g["eps"], g["lr"]) for g in opt.param_groups] == [((0.8, 0.95), 1e-6, 2e-4)] * 2
    optimizer.apply_schedules(opt, schedules.lr_at(12_000, cfg), schedules.weight_decay_at(112_500, cfg))
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(pytest.approx(6.25e-4), 0.4),
                                                                         (pytest.approx(6.25e-4), 0.0)]
    x = torch.randn(1, 3, 2, 16, 16)
    encoder(x).sum().backward()
    opt.step()  # the groups are valid for torch's AdamW
