"""V-JEPA models: the families, the video ViT encoder, the predictor, and Meta's checkpoint layout.

Importing the package imports no torch: command lines that build no model (``--help``, config checks) read
the families and the sizes, and the names below that need torch import their module when first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from vjepa_ray.models.families import FAMILIES, Family, get_family, register
from vjepa_ray.models.sizes import MODEL_SPECS

if TYPE_CHECKING:
    from vjepa_ray.models.predictor import Predictor
    from vjepa_ray.models.pretrained import load_pretrained, load_pretrained_predictor, official_checkpoint
    from vjepa_ray.models.vit import VisionTransformer, build_encoder

# The names that need torch, by the module that defines them: imported when first used (PEP 562).
_TORCH_NAMES = {"Predictor": "predictor", "load_pretrained": "pretrained", "load_pretrained_predictor": "pretrained",
                "official_checkpoint": "pretrained", "VisionTransformer": "vit", "build_encoder": "vit"}

__all__ = ["FAMILIES", "MODEL_SPECS", "Family", "Predictor", "VisionTransformer", "build_encoder", "build_models",
           "get_family", "load_pretrained", "load_pretrained_predictor", "official_checkpoint", "register"]


def __getattr__(name: str) -> Any:
    if name not in _TORCH_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_TORCH_NAMES[name]}"), name)


def build_models(cfg: Any) -> tuple[VisionTransformer, Predictor]:
    """The encoder and predictor of a run's ``vjepa_ray.config.Config`` (the models import nothing from the
    config layer above them): cfg.model, clip size from cfg.data, by default as many mask tokens as the
    family counts (``Family.mask_token_count``: per mask config and clip length, or per mask config and data
    source as the 2.1 release counts them).

    The target encoder is a deep copy of the encoder, made by the caller.
    """
    from vjepa_ray.models.predictor import Predictor
    from vjepa_ray.models.vit import build_encoder

    m = cfg.model
    num_mask_tokens = m.pred_num_mask_tokens or get_family(m.family).mask_token_count(
        len(cfg.mask), len(cfg.data.paths) or 1, len(cfg.data.clip_lengths()))
    encoder = build_encoder(m.name, cfg.data.frames_per_clip, cfg.data.crop_size, m.patch_size, m.tubelet_size,
                            uniform_power=m.uniform_power, activation_checkpointing=m.activation_checkpointing,
                            family=m.family)
    predictor = Predictor(encoder.grid, encoder.embed_dim, m.pred_embed_dim, m.pred_depth,
                          num_heads=m.pred_num_heads or encoder.num_heads,
                          num_mask_tokens=num_mask_tokens, uniform_power=m.uniform_power,
                          activation_checkpointing=m.activation_checkpointing, patch_size=m.patch_size,
                          family=m.family)
    return encoder, predictor
