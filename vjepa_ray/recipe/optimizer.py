"""Optimizer parameter groups and AdamW, as V-JEPA trains: no weight decay on biases and 1-D parameters."""

from __future__ import annotations

from typing import Iterable

import torch

from vjepa_ray.config import OptimizationConfig


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether weight decay applies: not to biases nor to 1-D tensors (LayerNorm gains), as the reference.

    Mask tokens ([1, 1, D]) do decay, as in the reference.
    """
    return "bias" not in name and param.dim() > 1


def param_groups(named_params: Iterable[tuple[str, torch.Tensor]], weight_decay: float) -> list[dict]:
    """[decaying group, non-decaying group] of the trainable parameters; each records ``apply_wd``.

    A schedule writes its weight decay into the groups whose ``apply_wd`` is true only. Frozen
    parameters are left out. A group with no parameters is dropped (torch rejects empty groups).
    """
    decay, no_decay = [], []
    for name, param in named_params:
        if param.requires_grad:
            (decay if decays(name, param) else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "apply_wd": True},
              {"params": no_decay, "weight_decay": 0.0, "apply_wd": False}]
    return [g for g in groups if g["params"]]


def adamw(named_params: Iterable[tuple[str, torch.Tensor]], cfg: OptimizationConfig,
          fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over ``param_groups`` with the config's betas, eps and initial LR/WD.

    ``fused`` picks torch's single-kernel implementation (CPU and CUDA); None = torch's default.
    """
    return torch.optim.AdamW(param_groups(named_params, cfg.weight_decay), lr=cfg.start_lr,
                             betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps, weight_decay=cfg.weight_decay,
                             fused=fused)


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Writes a step's LR into every group and its weight decay into the groups with ``apply_wd``."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("apply_wd", True):
            group["weight_decay"] = weight_decay
