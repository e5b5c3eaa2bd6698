"""The V-JEPA objective: predict, from the visible tokens, the target encoder's features of the hidden ones.

One step of it (``jepa_loss``):

1. the target encoder (the EMA copy) encodes the full clips once, without gradients; its features are
   layer-normalised over the feature dim (no affine) and gathered at each config's target ids;
2. for each mask config ``i``, the encoder encodes only the context tokens and the predictor,
   using mask token ``i`` (or the one ``mask_tokens[i]`` names), predicts the features at the target ids;
3. the loss is the mean absolute error per config, averaged over the configs.

A micro batch of clips of several lengths (V-JEPA 2's frames per clip per source) is one ``ClipGroup``
per length, each with masks on its own token grid; ``grouped_jepa_loss`` averages the groups' losses, so
every (length, mask config) pair weighs the same whatever its number of clips, as in the 2.0 release.

``JepaModule`` holds the two trained networks and makes that loss its forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vjepa_ray.models.vit import gather_tokens
from vjepa_ray.recipe.masks import Grid, MaskPair

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
    """

    loss: torch.Tensor
    per_mask_losses: list[torch.Tensor]
    target_features_std: torch.Tensor


@dataclass(frozen=True)
class ClipGroup:
    """The clips of one length in a micro batch and what the objective needs for them.

    clips: float [B, 3, T, H, W] (``normalize_clips``); masks: one (context ids, target ids) pair per mask
    config, on ``grid``, the clips' token grid; mask_tokens: the predictor's mask token for each pair.
    """

    clips: torch.Tensor
    masks: Sequence[MaskPair]
    mask_tokens: Sequence[int]
    grid: Grid


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
def target_features(target_encoder: nn.Module, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer-normalised float32 features [B, N, D] of the full clips, the collapse statistic)."""
    raw = target_encoder(clips).float()
    spread = raw.flatten(0, 1).std(dim=0).mean()
    return F.layer_norm(raw, (raw.shape[-1],)), spread


def jepa_loss(clips: torch.Tensor, masks: Sequence[tuple[torch.Tensor, torch.Tensor]], encoder: nn.Module,
              predictor: nn.Module, target_encoder: nn.Module, mask_tokens: Sequence[int] | None = None,
              grid: Grid | None = None) -> JepaOutput:
    """The V-JEPA loss of one batch.

    clips: float [B, 3, T, H, W] (``normalize_clips``); masks: one (context ids [B, Nc], target ids
    [B, Nt]) pair per mask config, as ``MaskCollator`` makes them (moved to the clips' device here);
    mask_tokens: the predictor's mask token for each pair (default: the pair's index); grid: the clips'
    token grid (default: the predictor's). The L1 is taken in float32 whatever precision the models run in.
    """
    _check_inputs(clips, masks)
    mask_tokens = range(len(masks)) if mask_tokens is None else mask_tokens
    if len(mask_tokens) != len(masks):
        raise ValueError(f"mask_tokens: expected one per mask pair ({len(masks)}), got {list(mask_tokens)}")
    with torch.profiler.record_function("jepa/target_forward"):
        targets, spread = target_features(target_encoder, clips)
    losses = []
    for mask_index, ((context_ids, target_ids), token) in enumerate(zip(masks, mask_tokens)):
        with torch.profiler.record_function(f"jepa/context_forward_{mask_index}"):
            context_ids = context_ids.to(clips.device, non_blocking=True)
            target_ids = target_ids.to(clips.device, non_blocking=True)
            context = encoder(clips, context_ids)
            prediction = predictor(context, context_ids, target_ids, token, grid=grid)
            losses.append(F.l1_loss(prediction.float(), gather_tokens(targets, target_ids)))
    loss = torch.stack(losses).mean()
    return JepaOutput(loss=loss, per_mask_losses=[x.detach() for x in losses], target_features_std=spread)


def grouped_jepa_loss(groups: Sequence[ClipGroup], encoder: nn.Module, predictor: nn.Module,
                      target_encoder: nn.Module) -> JepaOutput:
    """The V-JEPA loss of a micro batch held as groups of clips of one length each: the mean of the groups'
    ``jepa_loss`` (one group: its loss, unchanged). Per-mask losses and the target spread are averaged over
    the groups too."""
    if len(groups) == 0:
        raise ValueError("groups: expected one or more groups of clips, got none")
    outputs = [jepa_loss(g.clips, g.masks, encoder, predictor, target_encoder, g.mask_tokens, g.grid)
               for g in groups]
    if len(outputs) == 1:
        return outputs[0]
    return JepaOutput(loss=torch.stack([out.loss for out in outputs]).mean(),
                      per_mask_losses=[torch.stack(per_mask).mean()
                                       for per_mask in zip(*(out.per_mask_losses for out in outputs))],
                      target_features_std=torch.stack([out.target_features_std for out in outputs]).mean())


class JepaModule(nn.Module):
    """The trained networks, the context encoder and the predictor; forward = ``grouped_jepa_loss`` of one
    micro batch.

    Making the whole objective one module's forward lets a wrapper that hooks the root forward (DeepSpeed's
    ZeRO-3 gathers and releases parameters around it) see one forward per micro batch.
    """

    def __init__(self, encoder: nn.Module, predictor: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor

    def forward(self, groups: Sequence[ClipGroup], target_encoder: nn.Module) -> JepaOutput:
        return grouped_jepa_loss(groups, self.encoder, self.predictor, target_encoder)
