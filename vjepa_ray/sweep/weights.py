"""A trial's pretrained encoder as a weights file the probe evaluation reads.

A training checkpoint is a folder (DeepSpeed state plus the EMA target's fp32 shards, see
``vjepa_ray.train.checkpoint``); ``vjepa_ray.evaluate`` reads a ``torch.save`` file in Meta's layout.
This writes the EMA target encoder, the one the reference evaluates, under ``target_encoder``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vjepa_ray.config import Config
from vjepa_ray.models import build_models
from vjepa_ray.models.pretrained import to_official
from vjepa_ray.train.ema import TargetEncoder


def export_target_encoder(cfg: Config, checkpoint_dir: str | Path, dest: str | Path) -> str:
    """Writes ``{"target_encoder": state dict}`` (official key names) from a training checkpoint folder."""
    encoder, _ = build_models(cfg)
    # The target's own loader re-assembles its shards, whatever number of ranks saved them.
    TargetEncoder.replicated(encoder, encoder).load(checkpoint_dir)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"target_encoder": to_official(encoder.state_dict())}, dest)
    return str(dest)
