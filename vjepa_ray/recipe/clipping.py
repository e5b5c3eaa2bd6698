"""Gradient clipping by rule: the encoder's and the predictor's norms separately, or one norm over both.

``optimization.clip_grad_rule`` picks the rule; ``family`` takes the family's release rule
(``Family.clipping``): V-JEPA 1 clips the two modules' norms separately, from 300 steps past the warmup
(its ``epoch > warmup`` with 300-step epochs); V-JEPA 2.0 never clips. A step the rule does not clip
computes no norm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from vjepa_ray.config import OptimizationConfig
from vjepa_ray.models.families import Family


@dataclass(frozen=True)
class GradClipping:
    """``max_norm`` per module (``per_module``) or over all modules, at steps from ``start`` on."""

    max_norm: float
    per_module: bool
    start: int

    @classmethod
    def of(cls, cfg: OptimizationConfig, family: Family) -> "GradClipping | None":
        """The clipping of a run's config and family; None when nothing is ever clipped."""
        rule = cfg.clip_grad_rule
        if rule == "none" or cfg.clip_grad == 0:
            return None
        if rule == "family":
            if family.clipping is None:
                return None
            after = family.clipping.after_warmup
            return cls(cfg.clip_grad, family.clipping.per_module, 0 if after is None else cfg.warmup_steps + after)
        return cls(cfg.clip_grad, rule == "per_module", cfg.clip_grad_start)

    def clips_at(self, step: int) -> bool:
        return step >= self.start

    def clip_(self, modules: Sequence[torch.nn.Module]) -> float:
        """Clips the gradients of ``modules`` in place; returns the norm of all of them before clipping."""
        if not self.per_module:
            params = [p for module in modules for p in module.parameters()]
            return float(torch.nn.utils.clip_grad_norm_(params, self.max_norm))
        norms = [float(torch.nn.utils.clip_grad_norm_(module.parameters(), self.max_norm)) for module in modules]
        return math.sqrt(sum(norm * norm for norm in norms))
