"""Encoder tokens for the probe: every view and segment through the encoder, segments joined.

As the reference's ``ClipAggregation`` with ``attend_across_segments``: all clips go through the
encoder independently (one batch), then the tokens of a view's segments are concatenated along the
token axis so one probe query attends across the whole video. No extra position table is added.
"""

from __future__ import annotations

import torch
from torch import nn

from vjepa_ray.recipe.objective import normalize_clips


def encode_views(encoder: nn.Module, clips: torch.Tensor, chunk: int = 0) -> torch.Tensor:
    """uint8 clips [B, V, S, T, H, W, 3] -> tokens [B, V, S * N, D].

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
    tokens = torch.cat([encoder(normalize_clips(flat[i:i + step].to(param.device), param.dtype))
                        for i in range(0, len(flat), step)])
    return tokens.view(b, v, s * tokens.shape[1], tokens.shape[2])
