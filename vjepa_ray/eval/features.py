"""Encoder tokens for the probe: every view and segment through the encoder, segments joined.

As the reference's ``ClipAggregation`` with ``attend_across_segments``: all clips go through the
encoder independently (one batch), then the tokens of a view's segments are concatenated along the
token axis so one probe query attends across the whole video. No extra position table is added.

With ``all_levels`` (``probe.encoder_levels=all``), a clip's tokens are those of each of the encoder's levels
(V-JEPA 2.1's four), joined along the token axis as the release's multilevel wrapper joins its ``out_layers``:
the probe keeps the encoder's width and attends over every level's tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from vjepa_ray.recipe.objective import normalize_clips


def clip_tokens(encoder: nn.Module, x: torch.Tensor, all_levels: bool = False) -> torch.Tensor:
    """Normalised clips [B, 3, T, H, W] -> the encoder's tokens [B, N, D]; ``all_levels``: every level's,
    [B, L * N, D] (L = ``encoder.num_levels``)."""
    if not all_levels:
        return encoder(x)
    return torch.cat(encoder.forward_layers(x, encoder.output_layers), dim=1)


def encode_views(encoder: nn.Module, clips: torch.Tensor, chunk: int = 0, all_levels: bool = False) -> torch.Tensor:
    """uint8 clips [B, V, S, T, H, W, 3] -> tokens [B, V, S * N, D] (``all_levels``: [B, V, S * L * N, D]).

    ``chunk`` > 0 bounds how many clips go through the encoder at once (memory). Gradients flow when
    the caller enables them (fine-tuning); a frozen probe calls this under ``torch.no_grad()``.
    """
    if clips.dim() != 7 or clips.dtype != torch.uint8 or clips.shape[-1] != 3:
        raise ValueError(f"clips: expected uint8 [B, views, segments, T, H, W, 3], got {clips.dtype} "
                         f"{list(clips.shape)}")
    b, v, s = clips.shape[:3]
    flat = clips.flatten(0, 2)
    step = chunk if chunk > 0 else len(flat)
    param = next(encoder.parameters())
    tokens = torch.cat([clip_tokens(encoder, normalize_clips(flat[i:i + step].to(param.device), param.dtype),
                                    all_levels) for i in range(0, len(flat), step)])
    return tokens.view(b, v, s * tokens.shape[1], tokens.shape[2])
