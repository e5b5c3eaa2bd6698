"""Several attentive probes trained side by side on the same frozen features.

One encoder forward feeds every probe: each has its own learning rate, weight decay, initialisation
seed and AdamW, and sees exactly the batches the others see. A probe in a bank therefore ends with the
same weights as the same probe trained alone with the same seed and data order (tested).

In a data-parallel run (torch.distributed initialised), the gradients of all probes are averaged over
workers in one collective per step, so workers stay identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vjepa_ray.models.probe import AttentiveClassifier
from vjepa_ray.recipe.optimizer import apply_schedules, param_groups


@dataclass(frozen=True)
class ProbeSpec:
    lr: float
    weight_decay: float
    seed: int

    @property
    def name(self) -> str:
        return f"lr={self.lr:g},wd={self.weight_decay:g}"


def grid_specs(lrs: Sequence[float], weight_decays: Sequence[float], seed: int, inits: int = 1) -> list[ProbeSpec]:
    """The lr x weight-decay grid, ``inits`` probes per point: initialisation k of point i starts from
    seed + k * points + i, so one initialisation is the plain grid on seeds seed, seed + 1, ..."""
    pairs = [(lr, wd) for lr in lrs for wd in weight_decays]
    return [ProbeSpec(lr, wd, seed + k * len(pairs) + i) for k in range(inits) for i, (lr, wd) in enumerate(pairs)]


def mean_per_point(specs: Sequence[ProbeSpec], top1: Sequence[float]) -> list[dict]:
    """Each grid point's probes, in grid order: ``lr``, ``weight_decay``, the ``seeds`` and ``top1_inits`` of its
    initialisations and ``top1``, their mean."""
    points: dict[tuple[float, float], dict] = {}
    for spec, value in zip(specs, top1):
        point = points.setdefault((spec.lr, spec.weight_decay), {
            "lr": spec.lr, "weight_decay": spec.weight_decay, "seeds": [], "top1_inits": []})
        point["seeds"].append(spec.seed)
        point["top1_inits"].append(round(value, 3))
    for point in points.values():
        point["top1"] = round(sum(point["top1_inits"]) / len(point["top1_inits"]), 3)
    return list(points.values())


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """start = lr, no warmup, cosine to 0 over the run (the published probe schedule)."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / max(1, total_steps))))


def view_logits(probe: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """tokens [B, V, N, D] -> logits [B, V, C]: one probe forward per view (views never mix)."""
    if tokens.dim() != 4:
        raise ValueError(f"expected tokens [B, views, N, D], got {tuple(tokens.shape)}")
    b, v = tokens.shape[:2]
    return probe(tokens.flatten(0, 1)).view(b, v, -1)


def average_view_probs(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V, C] -> class probabilities [B, C]: the mean over views of each view's softmax."""
    return logits.float().softmax(dim=-1).mean(dim=1)


class ProbeBank:
    """N probes, their optimisers and their schedules; ``train_step`` runs all of them on one batch."""

    def __init__(self, make_probe: Callable[[torch.Generator], AttentiveClassifier], specs: Sequence[ProbeSpec],
                 total_steps: int, device: torch.device | str = "cpu"):
        if not specs:
            raise ValueError("specs: expected at least one probe")
        self.specs = list(specs)
        self.total_steps = total_steps
        self.step = 0
        self.probes = nn.ModuleList(make_probe(torch.Generator().manual_seed(s.seed)) for s in self.specs).to(device)
        self.optimizers = [torch.optim.AdamW(param_groups(p.named_parameters(), s.weight_decay), lr=s.lr)
                           for p, s in zip(self.probes, self.specs)]

    def train_step(self, tokens: torch.Tensor | None, labels: torch.Tensor,
                   extra_params: Sequence[torch.Tensor] = ()) -> list[float]:
        """One optimiser step of every probe on tokens [B, V, N, D]; the loss is CE averaged over views.

        ``extra_params`` (a fine-tuned encoder's) are only gradient-averaged here; their optimiser is
        the caller's. Returns each probe's loss.
        """
        self.probes.train()
        losses = []
        for probe, opt, spec in zip(self.probes, self.optimizers, self.specs):
            apply_schedules(opt, cosine_lr(spec.lr, self.step, self.total_steps), spec.weight_decay)
            opt.zero_grad(set_to_none=True)
            if labels.numel() == 0:
                # This worker's batch was all skipped files: it still joins the gradient average, with zeros.
                for param in probe.parameters():
                    param.grad = torch.zeros_like(param)
                losses.append(float("nan"))
                continue
            logits = view_logits(probe, tokens)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.repeat_interleave(logits.shape[1]))
            loss.backward()
            losses.append(loss.item())
        _average_gradients([*self.probes.parameters(), *extra_params])
        for opt in self.optimizers:
            opt.step()
        self.step += 1
        return losses

    @torch.no_grad()
    def predict(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, V, N, D] -> each probe's view-averaged class probabilities [P, B, C]."""
        self.probes.eval()
        return torch.stack([average_view_probs(view_logits(p, tokens)) for p in self.probes])

    def state_dict(self) -> dict:
        return {"specs": [vars(s) for s in self.specs], "step": self.step,
                "probes": [p.state_dict() for p in self.probes],
                "optimizers": [o.state_dict() for o in self.optimizers]}


def _average_gradients(params: Sequence[torch.Tensor]) -> None:
    """Mean of every gradient over the workers, in one flat all-reduce (a no-op outside a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
