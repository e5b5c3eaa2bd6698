"""Per-step schedules of the learning rate, the weight decay and the EMA momentum.

Pure functions of the optimizer step (0-based: the step about to run) and ``cfg.optimization``, whose
``schedule`` picks one of three shapes:

- ``cosine`` (V-JEPA 1): warmup then a cosine LR, a cosine weight decay, a linear EMA momentum.
- ``constant`` (V-JEPA 2 pretraining): warmup then a constant LR; constant weight decay and momentum.
  The 2.0 release runs its cosine code with final values equal to the initial ones, which is this.
- ``cooldown`` (V-JEPA 2's anneal, the release's ``LinearDecaySchedule``): no warmup, the LR falls
  linearly from ``lr`` to ``final_lr``; weight decay and momentum stay constant.

As in both releases, the cosine and the cooldown are laid out over ``schedule_scale * total_steps`` steps
(the reference's ``ipe_scale``), so a run of ``total_steps`` ends before they reach their final values:
with the V-JEPA 1 ViT-L recipe, training stops at LR ~7.5e-5, WD ~0.366 and EMA momentum ~0.9996; the
V-JEPA 2 cooldown (12k steps, scale 1.25) stops at 80% of its decay, LR ~1.06e-4.

``step_schedules`` gives the values a step uses, indexed as both releases index them: their LR and
weight-decay schedulers are advanced before each step uses them (jepa and vjepa2 ``app/vjepa/train.py``,
``train_step``'s first lines: ``scheduler.step()``, ``wd_scheduler.step()``), while the EMA momentum comes
from a generator that starts at index 0 (``momentum_scheduler``, drawn after ``optimizer.step()``). So step
``s`` (0-based) trains at the LR and weight decay of index ``s + 1`` and updates the target with the
momentum of index ``s``.

``context_weight_at`` is V-JEPA 2.1's weight of its context loss (lambda), warmed up over the run.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from vjepa_ray.config import OptimizationConfig


def schedule_length(cfg: OptimizationConfig) -> int:
    """Steps over which the schedules run (>= total_steps)."""
    return max(1, int(cfg.schedule_scale * cfg.total_steps))


def _check_step(step: int) -> None:
    if step < 0:
        raise ValueError(f"step: expected an int >= 0, got {step}")


def _progress(step: int, cfg: OptimizationConfig) -> float:
    """How far into the schedule's length ``step`` is, in [0, 1]."""
    return min(1.0, step / schedule_length(cfg))


def lr_at(step: int, cfg: OptimizationConfig) -> float:
    """Linear warmup start_lr -> lr over warmup_steps, then a cosine from lr toward final_lr (cosine) or lr
    held (constant); the cooldown falls linearly from lr toward final_lr from step 0."""
    _check_step(step)
    if cfg.schedule == "cooldown":
        return cfg.lr + (cfg.final_lr - cfg.lr) * _progress(step, cfg)
    if step < cfg.warmup_steps:
        return cfg.start_lr + (cfg.lr - cfg.start_lr) * step / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    decay_steps = max(1, schedule_length(cfg) - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.final_lr + (cfg.lr - cfg.final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def weight_decay_at(step: int, cfg: OptimizationConfig) -> float:
    """A cosine from weight_decay to final_weight_decay (V-JEPA 1's WD grows, 0.04 -> 0.4); weight_decay
    held by the constant and cooldown schedules."""
    _check_step(step)
    if cfg.schedule != "cosine":
        return cfg.weight_decay
    progress = _progress(step, cfg)
    return cfg.final_weight_decay + (cfg.weight_decay - cfg.final_weight_decay) * 0.5 * (
        1.0 + math.cos(math.pi * progress))


def ema_momentum_at(step: int, cfg: OptimizationConfig) -> float:
    """Linear from ema[0] to ema[1]; ema[0] held by the constant and cooldown schedules."""
    _check_step(step)
    start, end = cfg.ema
    if cfg.schedule != "cosine":
        return start
    return start + (end - start) * _progress(step, cfg)


class StepSchedules(NamedTuple):
    lr: float
    weight_decay: float
    momentum: float


def step_schedules(step: int, cfg: OptimizationConfig) -> StepSchedules:
    """The LR, weight decay and EMA momentum of step ``step`` (0-based), indexed as the releases do."""
    return StepSchedules(lr_at(step + 1, cfg), weight_decay_at(step + 1, cfg), ema_momentum_at(step, cfg))


def context_weight_at(step: int, weight: float, warmup: tuple[int, int]) -> float:
    """V-JEPA 2.1's lambda at step ``step`` (0-based, the release's ``epoch * ipe + itr``): 0 before
    ``warmup[0]``, then linear to ``weight`` at ``warmup[1]`` and ``weight`` from there on
    (``Lambda_LinearWarmupHold``; a warm-up that ends at 0 holds ``weight`` from the start)."""
    _check_step(step)
    start, end = warmup
    if step >= end:
        return weight
    if step < start:
        return 0.0
    return weight * (step - start) / (end - start)
