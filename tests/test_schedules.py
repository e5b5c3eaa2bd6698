"""LR / weight-decay / EMA-momentum schedules (the ViT-L recipe's numbers) and the optimizer's param groups."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from vjepa_ray.config import OptimizationConfig
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
