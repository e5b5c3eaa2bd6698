"""The V-JEPA training step: schedules -> masks -> normalise -> loss -> backward -> optimizer -> EMA.

The loss is the module's ``Objective`` (its family's: V-JEPA 1's and 2.0's, or 2.1's with its context term,
whose weight the step takes from the objective at each step); a run may regulate its loss
(``recipe.regulation``: skip the update of a step whose loss is far above the recent ones).

A step takes the micro batches of one optimizer step. Each names the rank that draws it and its index
among that rank's micro batches, and its masks follow from them as in a distributed run: block sizes from
``(meta.seed, step, micro)``, shared by every rank, positions from those and the rank. A micro batch of
clips of several lengths (``data.frames_per_clip_per_source``) comes as one tensor per length; each
length gets masks on its own token grid from the same seed, and the predictor's mask tokens that its family
gives that length (``Family.mask_tokens``). So one process can
replay the step of W ranks: given every rank's micro batches, it draws the same masks and, weighting and
averaging the micro losses as DeepSpeed does, computes the same gradient.

``JepaStep`` runs the step with plain autograd and a torch optimizer. Its hooks (``forward``, ``backward``,
``optimizer_step``, ``update_target``) are what a distributed runtime replaces: ``vjepa_ray.train.engine``
runs the same step on a DeepSpeed engine.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import statistics
from dataclasses import dataclass
from typing import ContextManager, Mapping, Protocol, Sequence, Union

import torch
from torch import nn

from vjepa_ray.config import Config, OptimizationConfig
from vjepa_ray.models import build_models, get_family
from vjepa_ray.recipe.clipping import GradClipping
from vjepa_ray.recipe.ema import ema_update_
from vjepa_ray.recipe.masks import Grid, MaskCollator
from vjepa_ray.recipe.objective import ClipGroup, JepaModule, JepaOutput, build_objective, normalize_clips
from vjepa_ray.recipe.optimizer import adamw, apply_schedules
from vjepa_ray.recipe.regulation import LossRegulation
from vjepa_ray.recipe.schedules import StepSchedules, step_schedules

# uint8 clips [B, T, H, W, 3] of one length, or one such tensor per length (ascending lengths).
Clips = Union[torch.Tensor, Sequence[torch.Tensor]]


def clip_groups(clips: Clips) -> tuple[torch.Tensor, ...]:
    """The clips of a micro batch as one tensor per length."""
    return (clips,) if isinstance(clips, torch.Tensor) else tuple(clips)


def take_clips(clips: Clips, size: int) -> Clips:
    """The first ``size`` clips of a micro batch (in group order), in the same form."""
    if isinstance(clips, torch.Tensor):
        return clips[:size]
    taken = []
    for group in clips:
        if size > 0:
            taken.append(group[:size])
        size -= len(group)
    return tuple(taken)


@dataclass(frozen=True)
class MicroBatch:
    """One micro batch of a step.

    clips: uint8 [B, T, H, W, 3], or one such tensor per clip length (``Clips``); rank: the rank that draws
    it; micro: its index among that rank's micro batches; weight: the factor on its mean loss
    (``BatchPlan.loss_weight``: 1 unless the global batch splits unevenly).
    """

    clips: Clips
    rank: int = 0
    micro: int = 0
    weight: float = 1.0


@dataclass
class StepOutput:
    """The schedules' values a step used, each micro batch's (detached) objective, the norm of the whole
    gradient before clipping (None where it was not computed: ``JepaStep`` computes it only to clip), and
    whether the update was applied (False: a loss or the gradient was not finite, and neither the weights, the
    optimizer state nor the EMA target moved; or ``loss_regulated``: loss regulation skipped the update, and
    the EMA target still moved, as in the release). ``context_weight``: the objective's context-term weight."""

    lr: float
    weight_decay: float
    momentum: float
    outputs: list[JepaOutput]
    grad_norm: float | None
    applied: bool = True
    loss_regulated: bool = False
    context_weight: float = 0.0

    @property
    def loss(self) -> float:
        """The mean of the micro batches' losses (the step's loss when they hold equally many clips)."""
        return statistics.fmean(float(out.loss) for out in self.outputs)


class PhaseTimer(Protocol):
    """Times the phases of a step: masks, normalize, forward, backward, optimizer, ema."""

    def phase(self, name: str) -> ContextManager[None]: ...


class _Untimed:
    def phase(self, name: str) -> ContextManager[None]:
        return contextlib.nullcontext()


def init_networks(cfg: Config, weights: Mapping[str, Mapping[str, torch.Tensor]] | None = None
                  ) -> tuple[JepaModule, nn.Module]:
    """The trained module and the target encoder (a frozen copy of the encoder), initialised from
    ``cfg.meta.seed``: every rank of a run, and any one-process replay of it, starts from these weights.

    ``weights`` (state dicts under ``encoder``, ``predictor`` and ``target_encoder`` that fit the config's
    models, e.g. ``model.init_from``'s) replace the random initialisation, strictly. The module's objective is
    the family's (``objective.build_objective``). Parameters no step of the run uses are frozen
    (``freeze_unused_``).
    """
    torch.manual_seed(cfg.meta.seed)
    encoder, predictor = build_models(cfg)
    target = copy.deepcopy(encoder)
    if weights is not None:
        for key, model in (("encoder", encoder), ("predictor", predictor), ("target_encoder", target)):
            model.load_state_dict(weights[key], strict=True)
    objective = build_objective(cfg.loss, cfg.optimization.schedule, get_family(cfg.model.family))
    module = JepaModule(encoder, predictor, objective)
    freeze_unused_(module, len(cfg.mask), cfg.data.clip_lengths())
    return module, target.requires_grad_(False)


def freeze_unused_(module: JepaModule, num_masks: int, clip_lengths: Sequence[int]) -> list[str]:
    """Turns off ``requires_grad`` of the parameters that no step of a run reaches, and returns their names.

    Unused are the predictor's mask tokens that the family never picks for the run's ``num_masks`` mask configs
    and ``clip_lengths``, and the image path (``image_parameters``) unless a clip length is one frame. The
    releases' AdamW skips a parameter whose gradient is None, so these never move there; DeepSpeed's ZeRO
    optimizers instead flatten every parameter they are given and zero-fill the missing gradients, on which
    AdamW's decoupled weight decay still shrinks them. Frozen, they stay out of the optimizer's groups
    (``optimizer.param_groups``) and of ZeRO's flat buffers, and keep their values on every runtime. The EMA
    target still averages them, as the releases' EMA averages every encoder parameter.
    """
    family = module.predictor.family
    used_tokens = {token for index in range(max(len(clip_lengths), 1))
                   for token in family.mask_tokens(num_masks, index)}
    unused = {f"predictor.mask_tokens.{k}": token for k, token in enumerate(module.predictor.mask_tokens)
              if k not in used_tokens}
    if 1 not in clip_lengths:
        images = {id(p) for p in [*module.encoder.image_parameters(), *module.predictor.image_parameters()]}
        unused.update((name, p) for name, p in module.named_parameters() if id(p) in images)
    for param in unused.values():
        param.requires_grad_(False)
    return sorted(unused)


class JepaStep:
    """One optimizer step of V-JEPA over micro batches, in this process.

    ``module`` holds the trained encoder and predictor, ``target_encoder`` the EMA copy of the encoder; the
    models run in ``dtype`` on ``device``. Masks come from ``collator`` seeded with ``seed`` (``meta.seed``),
    on the token grid of each clip length. The models' family (``module.predictor.family``) and
    ``clip_lengths`` (``DataConfig.clip_lengths``; empty: one length) choose the predictor's mask tokens.
    ``optimization.loss_reg_std_mult`` turns loss regulation on (``recipe.regulation``), decided on the step's
    loss over all its micro batches, whichever ranks they stand for.
    """

    def __init__(self, module: JepaModule, target_encoder: nn.Module, optimizer: torch.optim.Optimizer,
                 collator: MaskCollator, optimization: OptimizationConfig, seed: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, *,
                 clip_lengths: Sequence[int] = ()):
        self.module, self.target_encoder, self.optimizer = module, target_encoder, optimizer
        self.collator, self.optimization, self.seed = collator, optimization, seed
        self.device, self.dtype = torch.device(device), dtype
        self.family, self.clip_lengths = module.predictor.family, tuple(clip_lengths)
        self.clipping = GradClipping.of(optimization, self.family)
        self.regulation = LossRegulation.of(optimization)
        self._collators: dict[Grid, MaskCollator] = {collator.grid: collator}

    @classmethod
    def from_config(cls, cfg: Config, device: torch.device | str = "cpu", fused: bool | None = None) -> "JepaStep":
        """The step of a run's config: ``init_networks`` on ``device``, AdamW (``fused`` as ``adamw``)."""
        module, target = init_networks(cfg)
        module, target = module.to(device), target.to(device)
        return cls(module, target, adamw(module.named_parameters(), cfg.optimization, fused=fused),
                   MaskCollator(cfg.mask, module.encoder.grid), cfg.optimization, cfg.meta.seed, device,
                   clip_lengths=cfg.data.clip_lengths())

    def __call__(self, micro_batches: Sequence[MicroBatch], step: int, timer: PhaseTimer | None = None) -> StepOutput:
        """Optimizer step ``step`` (0-based) over ``micro_batches``, in their order."""
        timer = timer or _Untimed()
        lr, weight_decay, momentum = self.schedules(step)
        context_weight = self.module.objective.context_weight(step)
        with timer.phase("optimizer"):
            apply_schedules(self.optimizer, lr, weight_decay)
        outputs = []
        for batch in micro_batches:
            with timer.phase("normalize"):
                groups = [normalize_clips(clips.to(self.device, non_blocking=True), self.dtype)
                          for clips in clip_groups(batch.clips)]
            with timer.phase("masks"):
                groups = [self.group(clips, (self.seed, step, batch.micro), batch.rank, context_weight)
                          for clips in groups]
            with timer.phase("forward"):
                out = self.forward(groups)
            with timer.phase("backward"):
                self.backward(out.loss * batch.weight, len(micro_batches))
            outputs.append(dataclasses.replace(out, loss=out.loss.detach()))
        with timer.phase("optimizer"):
            regulated = False
            if self.regulation is not None:
                step_loss = self.step_loss(micro_batches, outputs)
                regulated = math.isfinite(step_loss) and self.regulation.skips_update(step_loss, step)
            grad_norm, applied = self.apply_gradients(step, outputs, skip=regulated)
        if applied and self.regulation is not None:
            self.regulation.record(step_loss)
        if applied or regulated:
            with timer.phase("ema"):
                self.update_target(momentum)
        return StepOutput(lr, weight_decay, momentum, outputs, grad_norm, applied, regulated, context_weight)

    def step_loss(self, micro_batches: Sequence[MicroBatch], outputs: Sequence[JepaOutput]) -> float:
        """The loss whose gradient the update follows (the weighted mean over the micro batches of every rank the
        step holds), on which loss regulation decides: the same on every rank."""
        return math.fsum(batch.weight * float(out.loss) for batch, out in zip(micro_batches, outputs)) \
            / len(micro_batches)

    def schedules(self, step: int) -> StepSchedules:
        """The LR, weight decay and EMA momentum of ``step`` (``schedules.step_schedules``)."""
        return step_schedules(step, self.optimization)

    def group(self, clips: torch.Tensor, seed: Sequence[int], rank: int, context_weight: float = 0.0) -> ClipGroup:
        """Normalised clips of one length with their masks (drawn from ``seed`` and ``rank``), mask tokens and
        the step's ``context_weight``."""
        grid = self.module.encoder.input_grid(clips)
        if grid not in self._collators:
            self._collators[grid] = self.collator.on_grid(grid)
        masks = [(context.to(self.device), target.to(self.device))
                 for context, target in self._collators[grid](len(clips), seed=seed, rank=rank)]
        frames = clips.shape[2]
        if self.clip_lengths and frames not in self.clip_lengths:
            raise ValueError(f"clips: {frames} frames is not one of the run's clip lengths {self.clip_lengths}")
        length_index = self.clip_lengths.index(frames) if self.clip_lengths else 0
        return ClipGroup(clips, masks, self.family.mask_tokens(len(masks), length_index), grid, context_weight)

    def forward(self, groups: list[ClipGroup]) -> JepaOutput:
        return self.module(groups, self.target_encoder)

    def backward(self, weighted_loss: torch.Tensor, num_micro_batches: int) -> None:
        """Accumulates the gradient of the mean over all micro batches of the step (of all emulated ranks),
        as DeepSpeed's accumulation and all-reduce make it."""
        (weighted_loss / num_micro_batches).backward()

    def clip_gradients(self, step: int) -> float | None:
        """Clips the gradients by the step's clipping rule (``recipe.clipping``); returns the norm of the
        whole gradient before clipping, or None (and computes no norm) where the rule does not clip."""
        if self.clipping is None or not self.clipping.clips_at(step):
            return None
        return self.clipping.clip_([self.module.encoder, self.module.predictor])

    def optimizer_step(self, step: int) -> float | None:
        """Clips (``clip_gradients``), steps, zeroes the gradients; returns the norm before clipping, if
        clipped."""
        norm = self.clip_gradients(step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def apply_gradients(self, step: int, outputs: Sequence[JepaOutput], skip: bool = False
                        ) -> tuple[float | None, bool]:
        """Clips and applies the step's gradient (``optimizer_step``) unless ``skip`` (loss regulation held the
        step back) or a micro batch's loss or the gradient is not finite (it would poison the weights, Adam's
        moments and, through the EMA, the target), else drops the gradient; returns the norm before clipping
        (or None) and whether the update was applied."""
        if skip or not self.is_finite(outputs):
            self.optimizer.zero_grad(set_to_none=True)
            return None, False
        return self.optimizer_step(step), True

    def is_finite(self, outputs: Sequence[JepaOutput]) -> bool:
        """Whether every micro batch's loss and the accumulated gradient are finite."""
        if not all(math.isfinite(float(out.loss)) for out in outputs):
            return False
        return all(bool(torch.isfinite(p.grad).all()) for p in self.module.parameters() if p.grad is not None)

    def update_target(self, momentum: float) -> None:
        ema_update_(list(self.target_encoder.parameters()), list(self.module.encoder.parameters()), momentum)
