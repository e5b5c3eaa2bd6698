"""The V-JEPA objective: predict, from the visible tokens, the target encoder's features of the hidden ones.

One step of it (``jepa_loss``):

1. the target encoder (the EMA copy) encodes the full clips once, without gradients; its features are
   layer-normalised over the feature dim (no affine) and gathered at each config's target ids;
2. for each mask config ``i``, the encoder encodes only the context tokens and the predictor,
   using mask token ``i`` (or the one ``mask_tokens[i]`` names), predicts the features at the target ids;
3. the loss is the mean absolute error per config, averaged over the configs (``loss_exp`` p: the mean of
   |error|^p / p, the releases' ``loss_exp``; 1 in all their recipes).

V-JEPA 2.1 (``dense_jepa_loss``) trains on the encoders' four levels: each target is its four D-wide levels,
layer-normalised one by one, the context encoder gives the predictor all four, and the predictor predicts
all four. Its predictor also predicts the context tokens; their error, each token's divided by the square
root of its distance to the nearest target token, is the context loss, added with a weight (lambda) that
warms up over the run.

A micro batch of clips of several lengths (V-JEPA 2's frames per clip per source) is one ``ClipGroup``
per length, each with masks on its own token grid; ``grouped_jepa_loss`` averages the groups' losses, so
every (length, mask config) pair weighs the same whatever its number of clips, as in the 2.0 release.

An ``Objective`` is a family's loss of a group and the weight of its context term at a step (``build_objective``
picks it from the family and ``cfg.loss``); ``JepaModule`` holds the two trained networks and the objective,
and makes the loss its forward.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vjepa_ray.config import LossConfig
from vjepa_ray.models.families import ContextLoss, Family
from vjepa_ray.models.vit import gather_tokens
from vjepa_ray.recipe.masks import Grid, MaskPair, distance_to_targets
from vjepa_ray.recipe.schedules import context_weight_at

# ImageNet statistics, in the 0-255 range of uint8 pixels.
IMAGENET_MEAN_255 = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_255 = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclass
class JepaOutput:
    """``loss`` carries the graph; the other fields are detached, for logging.

    ``target_features_std``: the standard deviation of each feature of the target encoder's raw
    output over all tokens of all clips, averaged over features. A healthy encoder gives different
    tokens different features (about 1 after its final LayerNorm at initialisation); a collapsed one
    maps every token to the same vector and this falls toward 0, while the loss can still look fine.

    ``context_loss``: the objective's context term before its weight (2.1), None where it has none;
    ``per_mask_losses`` are then the prediction losses alone.
    """

    loss: torch.Tensor
    per_mask_losses: list[torch.Tensor]
    target_features_std: torch.Tensor
    context_loss: torch.Tensor | None = None


@dataclass(frozen=True)
class ClipGroup:
    """The clips of one length in a micro batch and what the objective needs for them.

    clips: float [B, 3, T, H, W] (``normalize_clips``); masks: one (context ids, target ids) pair per mask
    config, on ``grid``, the clips' token grid; mask_tokens: the predictor's mask token for each pair;
    context_weight: the weight of the objective's context term for these clips at this step
    (``Objective.context_weight``).
    """

    clips: torch.Tensor
    masks: Sequence[MaskPair]
    mask_tokens: Sequence[int]
    grid: Grid
    context_weight: float = 0.0


def normalize_clips(clips: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 clips [B, T, H, W, 3] -> ImageNet-normalised ``dtype`` [B, 3, T, H, W] on the same device.

    The arithmetic runs in float32 whatever ``dtype`` is, so bf16 inputs carry one rounding only.
    """
    if not isinstance(clips, torch.Tensor) or clips.dtype != torch.uint8 or clips.dim() != 5 or clips.shape[-1] != 3:
        got = (f"{clips.dtype} {list(clips.shape)}" if isinstance(clips, torch.Tensor) else type(clips).__name__)
        raise ValueError(f"clips: expected a torch.uint8 tensor [B, T, H, W, 3], got {got}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype: expected a floating-point dtype, got {dtype}")
    mean = torch.tensor(IMAGENET_MEAN_255, device=clips.device).view(1, 3, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(IMAGENET_STD_255, device=clips.device).view(1, 3, 1, 1, 1)
    x = clips.permute(0, 4, 1, 2, 3).to(torch.float32, memory_format=torch.contiguous_format)
    return x.sub_(mean).mul_(inv_std).to(dtype)


def _check_inputs(clips: torch.Tensor, masks: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    if not isinstance(clips, torch.Tensor) or clips.dim() != 5 or clips.shape[1] != 3 \
            or not clips.is_floating_point():
        got = f"{clips.dtype} {list(clips.shape)}" if isinstance(clips, torch.Tensor) else type(clips).__name__
        raise ValueError(f"clips: expected a floating-point tensor [B, 3, T, H, W] (see normalize_clips), got {got}")
    if len(masks) == 0:
        raise ValueError("masks: expected one (context ids, target ids) pair per mask config, got none")
    batch = clips.shape[0]
    for i, pair in enumerate(masks):
        if len(pair) != 2:
            raise ValueError(f"masks[{i}]: expected a (context ids, target ids) pair, got {len(pair)} items")
        for name, ids in zip(("context", "target"), pair):
            if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.dim() != 2 \
                    or ids.shape[0] != batch or ids.shape[1] == 0:
                got = f"{ids.dtype} {list(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
                raise ValueError(f"masks[{i}] {name} ids: expected a torch.int64 tensor [{batch}, K>0], got {got}")


@torch.no_grad()
def target_features(target_encoder: nn.Module, clips: torch.Tensor, levels: int = 1
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer-normalised float32 features [B, N, levels * D] of the full clips, the collapse statistic).

    With several levels (2.1: ``target_encoder(clips, all_levels=True)``), each D-wide level is normalised
    by itself, so that each weighs the same in the loss whatever its scale.
    """
    raw = (target_encoder(clips) if levels == 1 else target_encoder(clips, all_levels=True)).float()
    spread = raw.flatten(0, 1).std(dim=0).mean()
    return torch.cat([F.layer_norm(level, (level.shape[-1],)) for level in raw.chunk(levels, dim=-1)], -1), spread


def regression_loss(prediction: torch.Tensor, target: torch.Tensor, loss_exp: float = 1.0,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """mean(|prediction - target|^p * weights) / p over every token and feature, in float32 (p = ``loss_exp``:
    the releases' ``loss_fn``). ``weights`` [B, N] scale each token's errors and are not normalised (2.1's
    distance weights: a plain mean of the weighted errors, as the release takes it)."""
    error = (prediction.float() - target).abs()
    if loss_exp != 1.0:
        error = error.pow(loss_exp)
    if weights is not None:
        error = error * weights.unsqueeze(-1)
    return error.mean() / loss_exp


def _check_mask_tokens(masks: Sequence[MaskPair], mask_tokens: Sequence[int] | None) -> Sequence[int]:
    """The mask token of each pair: ``mask_tokens``, by default the pair's index."""
    mask_tokens = range(len(masks)) if mask_tokens is None else mask_tokens
    if len(mask_tokens) != len(masks):
        raise ValueError(f"mask_tokens: expected one per mask pair ({len(masks)}), got {list(mask_tokens)}")
    return mask_tokens


def jepa_loss(clips: torch.Tensor, masks: Sequence[tuple[torch.Tensor, torch.Tensor]], encoder: nn.Module,
              predictor: nn.Module, target_encoder: nn.Module, mask_tokens: Sequence[int] | None = None,
              grid: Grid | None = None, loss_exp: float = 1.0) -> JepaOutput:
    """The V-JEPA loss of one batch.

    clips: float [B, 3, T, H, W] (``normalize_clips``); masks: one (context ids [B, Nc], target ids
    [B, Nt]) pair per mask config, as ``MaskCollator`` makes them (moved to the clips' device here);
    mask_tokens: the predictor's mask token for each pair (default: the pair's index); grid: the clips'
    token grid (default: the predictor's). The loss (``regression_loss``; p = 1: the L1) is taken in float32
    whatever precision the models run in.
    """
    _check_inputs(clips, masks)
    mask_tokens = _check_mask_tokens(masks, mask_tokens)
    with torch.profiler.record_function("jepa/target_forward"):
        targets, spread = target_features(target_encoder, clips)
    losses = []
    for mask_index, ((context_ids, target_ids), token) in enumerate(zip(masks, mask_tokens)):
        with torch.profiler.record_function(f"jepa/context_forward_{mask_index}"):
            context_ids = context_ids.to(clips.device, non_blocking=True)
            target_ids = target_ids.to(clips.device, non_blocking=True)
            context = encoder(clips, context_ids)
            prediction = predictor(context, context_ids, target_ids, token, grid=grid)
            losses.append(regression_loss(prediction, gather_tokens(targets, target_ids), loss_exp))
    loss = torch.stack(losses).mean()
    return JepaOutput(loss=loss, per_mask_losses=[x.detach() for x in losses], target_features_std=spread)


def dense_jepa_loss(clips: torch.Tensor, masks: Sequence[MaskPair], encoder: nn.Module, predictor: nn.Module,
                    target_encoder: nn.Module, mask_tokens: Sequence[int] | None = None, grid: Grid | None = None,
                    loss_exp: float = 1.0, *, context_weight: float, distance_weighted: bool) -> JepaOutput:
    """V-JEPA 2.1's loss of one batch: ``jepa_loss`` on the encoders' levels, plus the context term.

    The targets are the target encoder's ``encoder.num_levels`` levels, each layer-normalised by itself; the
    encoder gives the predictor the context tokens' levels and the predictor predicts the levels of both the
    target and the context tokens. Per mask config: the prediction loss at the target tokens, and the context
    loss at the context tokens, whose errors are divided by the square root of each token's distance to the
    nearest target token when ``distance_weighted`` (``masks.distance_to_targets``). Each is averaged over
    the mask configs; the loss is prediction loss + ``context_weight`` x context loss. Image clips (one
    frame) go through the encoder's image path and the predictor's image modality.

    Arguments as ``jepa_loss``'s; grid defaults to the clips' (the distances are measured on it).
    """
    _check_inputs(clips, masks)
    mask_tokens = _check_mask_tokens(masks, mask_tokens)
    grid = encoder.input_grid(clips) if grid is None else tuple(grid)
    image = encoder.is_image(clips)
    with torch.profiler.record_function("jepa/target_forward"):
        targets, spread = target_features(target_encoder, clips, encoder.num_levels)
    prediction_losses, context_losses = [], []
    for mask_index, ((context_ids, target_ids), token) in enumerate(zip(masks, mask_tokens)):
        with torch.profiler.record_function(f"jepa/context_forward_{mask_index}"):
            context_ids = context_ids.to(clips.device, non_blocking=True)
            target_ids = target_ids.to(clips.device, non_blocking=True)
            context = encoder(clips, context_ids, all_levels=True)
            prediction, context_prediction = predictor(context, context_ids, target_ids, token, grid=grid,
                                                       predict_context=True, image=image)
            prediction_losses.append(regression_loss(prediction, gather_tokens(targets, target_ids), loss_exp))
            weights = distance_to_targets(context_ids, target_ids, grid).rsqrt() if distance_weighted else None
            context_losses.append(regression_loss(context_prediction, gather_tokens(targets, context_ids), loss_exp,
                                                  weights))
    prediction_loss, context_loss = torch.stack(prediction_losses).mean(), torch.stack(context_losses).mean()
    return JepaOutput(loss=prediction_loss + context_weight * context_loss,
                      per_mask_losses=[x.detach() for x in prediction_losses], target_features_std=spread,
                      context_loss=context_loss.detach())


@dataclass(frozen=True)
class Objective:
    """V-JEPA 1's and 2.0's objective: ``jepa_loss`` of a group, and no context term.

    The base of the families' objectives: ``__call__`` gives a group's loss, ``context_weight`` the weight of
    the context term at a step (0: none).
    """

    loss_exp: float = 1.0

    def __call__(self, group: ClipGroup, encoder: nn.Module, predictor: nn.Module,
                 target_encoder: nn.Module) -> JepaOutput:
        return jepa_loss(group.clips, group.masks, encoder, predictor, target_encoder, group.mask_tokens, group.grid,
                         self.loss_exp)

    def context_weight(self, step: int) -> float:
        return 0.0


@dataclass(frozen=True)
class DenseObjective(Objective):
    """V-JEPA 2.1's objective: ``dense_jepa_loss`` of a group with ``context``'s distance weighting and,
    at step s, the context weight ``schedules.context_weight_at(s, context.weight, context.warmup)``."""

    context: ContextLoss = ContextLoss()

    def __call__(self, group: ClipGroup, encoder: nn.Module, predictor: nn.Module,
                 target_encoder: nn.Module) -> JepaOutput:
        return dense_jepa_loss(group.clips, group.masks, encoder, predictor, target_encoder, group.mask_tokens,
                               group.grid, self.loss_exp, context_weight=group.context_weight,
                               distance_weighted=self.context.distance_weighted)

    def context_weight(self, step: int) -> float:
        return context_weight_at(step, self.context.weight, self.context.warmup)


JEPA = Objective()


def build_objective(loss: LossConfig, schedule: str, family: Family) -> Objective:
    """The objective of a run: its family's, with ``cfg.loss``'s values in place of the family's defaults.

    ``schedule``: ``cfg.optimization.schedule``. The cooldown holds the context weight (no warm-up): the
    release's cooldown restarts its step count and turns ``lambda_progressive`` off.
    """
    if family.context_loss is None:
        return Objective(loss.loss_exp)
    given = {"weight": loss.context_weight, "distance_weighted": loss.context_distance_weighting,
             "warmup": None if loss.context_warmup is None else tuple(loss.context_warmup)}
    context = dataclasses.replace(family.context_loss, **{k: v for k, v in given.items() if v is not None})
    if schedule == "cooldown":
        context = dataclasses.replace(context, warmup=(0, 0))
    return DenseObjective(loss.loss_exp, context)


def grouped_jepa_loss(groups: Sequence[ClipGroup], encoder: nn.Module, predictor: nn.Module,
                      target_encoder: nn.Module, objective: Objective = JEPA) -> JepaOutput:
    """The loss of a micro batch held as groups of clips of one length each: the mean of the groups'
    ``objective`` losses (one group: its loss, unchanged). Per-mask losses, the target spread and the context
    term are averaged over the groups too."""
    if len(groups) == 0:
        raise ValueError("groups: expected one or more groups of clips, got none")
    outputs = [objective(g, encoder, predictor, target_encoder) for g in groups]
    if len(outputs) == 1:
        return outputs[0]
    context_losses = [out.context_loss for out in outputs if out.context_loss is not None]
    return JepaOutput(loss=torch.stack([out.loss for out in outputs]).mean(),
                      per_mask_losses=[torch.stack(per_mask).mean()
                                       for per_mask in zip(*(out.per_mask_losses for out in outputs))],
                      target_features_std=torch.stack([out.target_features_std for out in outputs]).mean(),
                      context_loss=torch.stack(context_losses).mean() if context_losses else None)


class JepaModule(nn.Module):
    """The trained networks, the context encoder and the predictor, and their ``objective``; forward =
    ``grouped_jepa_loss`` of one micro batch.

    Making the whole objective one module's forward lets a wrapper that hooks the root forward (DeepSpeed's
    ZeRO-3 gathers and releases parameters around it) see one forward per micro batch.
    """

    def __init__(self, encoder: nn.Module, predictor: nn.Module, objective: Objective = JEPA):
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor
        self.objective = objective

    def forward(self, groups: Sequence[ClipGroup], target_encoder: nn.Module) -> JepaOutput:
        return grouped_jepa_loss(groups, self.encoder, self.predictor, target_encoder, self.objective)
