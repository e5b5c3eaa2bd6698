"""Per-step schedules of the learning rate, the weight decay and the EMA momentum.

Pure functions of the optimizer step (0-based: the step about to run) and ``cfg.optimization``. As in
V-JEPA 1, the schedules are laid out over ``schedule_scale * total_steps`` steps (the reference's
``ipe_scale``), so a run of ``total_steps`` ends before they reach their final values: with the
ViT-L recipe, training stops at LR ~7.5e-5, WD ~0.366 and EMA momentum ~0.9996.

The reference advances its schedulers before the first step, so its step i uses our ``step = i + 1``;
the difference is one step in 90,000.
"""

from __future__ import annotations

import math

from vjepa_ray.config import OptimizationConfig


def schedule_length(cfg: OptimizationConfig) -> int:
    """Steps over which the schedules run (>= total_steps)."""
    return max(1, int(cfg.schedule_scale * cfg.total_steps))


def _check_step(step: int) -> None:
    if step < 0:
        raise ValueError(f"step: expected an int >= 0, got {step}")


def lr_at(step: int, cfg: OptimizationConfig) -> float:
    """Linear warmup start_lr -> lr over warmup_steps, then a cosine from lr toward final_lr."""
    _check_step(step)
    if step < cfg.warmup_steps:
        return cfg.start_lr + (cfg.lr - cfg.start_lr) * step / cfg.warmup_steps
    decay_steps = max(1, schedule_length(cfg) - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.final_lr + (cfg.lr - cfg.final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def weight_decay_at(step: int, cfg: OptimizationConfig) -> float:
    """A cosine from weight_decay to final_weight_decay (the recipe's WD grows, 0.04 -> 0.4)."""
    _check_step(step)
    progress = min(1.0, step / schedule_length(cfg))
    return cfg.final_weight_decay + (cfg.weight_decay - cfg.final_weight_decay) * 0.5 * (
        1.0 + math.cos(math.pi * progress))


def ema_momentum_at(step: int, cfg: OptimizationConfig) -> float:
    """Linear from ema[0] to ema[1]."""
    _check_step(step)
    start, end = cfg.ema
    progress = min(1.0, step / schedule_length(cfg))
    return start + (end - start) * progress
