"""Meta's released V-JEPA checkpoint layout: read it into our models, and write ours in it.

A released checkpoint is a ``torch.save`` dict with keys ``encoder``, ``predictor`` and
``target_encoder`` (plus ``opt``, ``scaler``, ``epoch``, ...); each is a state dict whose keys start
with ``module.backbone.`` (DDP around the reference's MultiMaskWrapper). Our modules use the
reference's names, so after stripping that prefix the keys map 1:1.

V-JEPA 2.0 files have the same layout; 2.1's distilled encoders sit under ``ema_encoder``, and 2.1's
encoders carry modules of their own (``norms_block``, ``patch_embed_img``, modality embeddings).

Loading is strict: a missing, unexpected or differently shaped tensor raises a ValueError that lists
the keys, never leaving random weights in place, and says which family or ``model.pred_num_mask_tokens``
a file looks like when that is what differs. Two exceptions, both about the fixed sin-cos tables
(``pos_embed`` / ``predictor_pos_embed``):

- When a V-JEPA 1 checkpoint was trained at another clip size its table has another number of rows;
  it is then checked to be the standard table of some grid and our own table for the requested size is
  kept. That is exact (the table is a function of the size alone) and is what the reference's
  evaluation code ends up with when it loads such a checkpoint.
- The 2.0 release's files still carry these tables although its rotary models do not use them (Meta's
  own loader says so); a model ignores exactly the keys its family names (``Family.ignored_keys``).
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping
from typing import Any, Callable, TypeVar

import torch
import torch.nn as nn

from vjepa_ray.models.families import DEFAULT_FAMILY, FAMILIES, Family, get_family
from vjepa_ray.models.hf import HF_FAMILY, is_hf_folder, model_name_of, read_hf_folder
from vjepa_ray.models.pos_embed import infer_sincos_grid, sincos_3d
from vjepa_ray.models.positions import FIXED_TABLES
from vjepa_ray.models.predictor import Predictor
from vjepa_ray.models.sizes import MODEL_SPECS
from vjepa_ray.models.vit import VisionTransformer, build_encoder

logger = logging.getLogger(__name__)

OFFICIAL_PREFIX = "module.backbone."
MODEL_KEYS = ("encoder", "predictor", "target_encoder")
_MAX_LISTED = 20

StateDict = Mapping[str, torch.Tensor]
T = TypeVar("T")


def build_empty(factory: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``factory(*args, **kwargs)`` with uninitialised CPU tensors, for models whose every tensor is
    loaded next: building on the meta device skips the random init (minutes for ViT-g on a CPU)."""
    with torch.device("meta"):
        built = factory(*args, **kwargs)
    modules = built if isinstance(built, tuple) else (built,)
    for module in modules:
        module.to_empty(device="cpu")
    return built


def strip_prefixes(state: StateDict) -> dict[str, torch.Tensor]:
    """Drops a leading ``module.`` and then a leading ``backbone.`` from every key (each optional)."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def to_official(state: StateDict) -> dict[str, torch.Tensor]:
    """Our state dict -> the released layout's (``module.backbone.`` keys, detached CPU tensors)."""
    return {OFFICIAL_PREFIX + key: value.detach().cpu() for key, value in strip_prefixes(state).items()}


def official_checkpoint(encoder: StateDict, predictor: StateDict, target_encoder: StateDict,
                        epoch: int = 0, **extra: Any) -> dict[str, Any]:
    """A dict in the released layout, readable by the reference code's evaluation scripts.

    ``epoch`` is included because the reference's loaders read it; optimizer and scaler states are
    not (ours are DeepSpeed's, which the reference cannot resume from anyway).
    """
    return {"encoder": to_official(encoder), "predictor": to_official(predictor),
            "target_encoder": to_official(target_encoder), "epoch": epoch, **extra}


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load`` of a checkpoint dict on the CPU, unpickling only what weights files hold.

    Downloaded files are untrusted: ``weights_only=True`` rebuilds tensors, numbers, strings and
    containers of them (what Meta's released checkpoints and probes hold: state dicts, optimizer and
    scaler states, counters) and refuses any other object before constructing it, so nothing in a
    hostile file runs. A refused file raises a ValueError that says so.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as err:  # torch's weights-only unpickler refused an object or opcode
        raise ValueError(f"{path}: refused to load: it holds objects outside what weights files hold (tensors, "
                         f"numbers, strings and containers of them); nothing in it was run "
                         f"({_refusal_reason(err)})") from err
    except Exception as err:  # torch.load fails on a foreign file with whatever its reader hit
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: not a readable torch checkpoint ({first})") from err
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(checkpoint).__name__}")
    return checkpoint


def _refusal_reason(err: pickle.UnpicklingError) -> str:
    """The weights-only unpickler's own complaint (e.g. ``Unsupported global: GLOBAL os.system ...``), without
    torch's advice around it, which suggests ``weights_only=False``: exactly what must not be done here."""
    _, marker, detail = str(err).partition("WeightsUnpickler error:")
    lines = [line.strip() for line in detail.splitlines() if line.strip()] if marker else []
    return lines[0].split(". ")[0] if lines else type(err).__name__


def state_from_checkpoint(checkpoint: Mapping[str, Any], key: str,
                          source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state dict under ``key`` with prefixes stripped; ValueError naming the keys that are there."""
    if key not in checkpoint or not isinstance(checkpoint[key], Mapping):
        raise ValueError(f"{source}: expected a state dict under {key!r}, found keys {sorted(checkpoint)}")
    return strip_prefixes(checkpoint[key])


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def load_state_checked(module: nn.Module, state: StateDict, source: str = "checkpoint") -> None:
    """Loads ``state`` into our encoder or predictor, strictly.

    A ValueError lists the missing, unexpected and mismatched keys (up to 20 of each, with counts).
    A fixed sin-cos table of another size is replaced by the one for ``module.grid`` (see the module
    docstring). Every tensor of ``module`` is overwritten, so it may come from ``build_empty``.
    """
    own = module.state_dict()
    state = dict(state)
    for name in module.family.ignored_keys:
        if state.pop(name, None) is not None:
            logger.info("%s: ignoring %s, which family %s does not use", source, name, module.family.name)
    for name in FIXED_TABLES:
        if name in state and name in own and state[name].shape != own[name].shape:
            grid = infer_sincos_grid(state[name], module.uniform_power)
            if grid is not None and state[name].shape[-1] == own[name].shape[-1]:
                logger.info("%s: %s was built for grid %s; using the table for grid %s", source, name, grid,
                            module.grid)
                table = sincos_3d(own[name].shape[-1], *module.grid, module.uniform_power)
                state[name] = table.unsqueeze(0).to(own[name].dtype)
    # Listed in module order, so the first lines name the first layers.
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} (checkpoint {list(state[k].shape)}, model {list(own[k].shape)})"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        lines = [f"{source} does not fit {type(module).__name__}:"]
        for label, keys in (("shape mismatch", mismatched), ("missing", missing), ("unexpected", unexpected)):
            if keys:
                lines.append(f"  {label} ({len(keys)}): {_listed(keys)}")
        lines += _mismatch_hints(module, state)
        raise ValueError("\n".join(lines))
    module.load_state_dict(state, strict=True)


def _mismatch_hints(module: nn.Module, state: StateDict) -> list[str]:
    """What a file that does not fit looks like, where its keys tell: another family, another mask-token count."""
    hints = []
    if isinstance(module, VisionTransformer) and not module.family.marks(state):
        others = [family.name for family in FAMILIES.values() if family.marks(state)]
        if others:
            hints.append(f"  the file holds the encoder of family {' or '.join(others)}: load it as family "
                         f"{' or '.join(others)} (model.family)")
    if isinstance(module, Predictor):
        count = sum(1 for key in state if key.startswith("mask_tokens."))
        if count and count != module.num_mask_tokens:
            hints.append(f"  the file has {count} mask tokens, the predictor {module.num_mask_tokens}: "
                         f"set model.pred_num_mask_tokens={count}")
    return hints


def load_pretrained(path: str | os.PathLike, model_name: str | None = None, num_frames: int | None = None,
                    crop_size: int | None = None, key: str | None = None, patch_size: int = 16,
                    tubelet_size: int = 2, family: Family | str | None = None,
                    **encoder_kwargs: Any) -> VisionTransformer:
    """An encoder of ``family`` built for ``num_frames`` x ``crop_size`` clips, with the weights under ``key``.

    ``path`` is a checkpoint file (defaults: ``vit_large``, V-JEPA 1, 16 frames of 224 px) or a Hugging Face
    V-JEPA 2 folder, whose ``config.json`` gives the model (family ``vjepa2``, size, patch, tubelet, and the
    default clip size); a ``model_name`` or ``family`` given for a folder must agree with it. For a file, the
    default key is the EMA encoder, which the reference evaluates: the first of the family's
    ``encoder_keys`` that the file has (``target_encoder``; 2.1's distilled models have ``ema_encoder``, and
    their ``target_encoder`` may be the teacher).
    """
    if is_hf_folder(path):
        config, state, _ = read_hf_folder(path)
        folder_name = model_name_of(config, str(path))
        given_family = None if family is None else get_family(family).name
        for arg, given, expected in (("model_name", model_name, folder_name),
                                     ("family", given_family, HF_FAMILY.name)):
            if given is not None and given != expected:
                raise ValueError(f"{path}: {arg}: the folder holds {expected!r}, got {given!r}")
        return encoder_from_state(state, str(path), folder_name, num_frames or config["frames_per_clip"],
                                  crop_size or config["crop_size"], config["patch_size"], config["tubelet_size"],
                                  family=HF_FAMILY, **encoder_kwargs)
    family = get_family(family or DEFAULT_FAMILY)
    checkpoint = read_checkpoint(path)
    if key is None:
        key = next((k for k in family.encoder_keys if k in checkpoint), family.encoder_keys[-1])
    state = state_from_checkpoint(checkpoint, key, str(path))
    return encoder_from_state(state, f"{path}[{key}]", model_name or "vit_large", num_frames or 16,
                              crop_size or 224, patch_size, tubelet_size, family=family, **encoder_kwargs)


def encoder_from_state(state: StateDict, source: str, model_name: str = "vit_large", num_frames: int = 16,
                       crop_size: int = 224, patch_size: int = 16, tubelet_size: int = 2,
                       **encoder_kwargs: Any) -> VisionTransformer:
    """An encoder built for ``num_frames`` x ``crop_size`` clips, loaded strictly from ``state``."""
    encoder = build_empty(build_encoder, model_name, num_frames, crop_size, patch_size, tubelet_size,
                          **encoder_kwargs)
    load_state_checked(encoder, state, source)
    return encoder


def load_pretrained_predictor(path: str | os.PathLike, model_name: str = "vit_large", num_frames: int = 16,
                              crop_size: int = 224, key: str = "predictor", patch_size: int = 16,
                              tubelet_size: int = 2, num_heads: int | None = None,
                              family: Family | str = DEFAULT_FAMILY, **predictor_kwargs: Any) -> Predictor:
    """The predictor of a checkpoint; width, depth and mask-token count are read from the weights.

    The head count is not in the weights: it defaults to the family's ``predictor_heads`` (the 2.0
    release's 12), else to the encoder's (V-JEPA 1).
    """
    family = get_family(family)
    if model_name not in MODEL_SPECS:
        raise ValueError(f"model name: expected one of {', '.join(MODEL_SPECS)}, got {model_name!r}")
    state = state_from_checkpoint(read_checkpoint(path), key, str(path))
    # 2.1's predictor_embed is a Linear, GELU, Linear sequence whose last layer sets the width.
    embed = state.get("predictor_embed.weight", state.get("predictor_embed.2.weight"))
    if embed is None:
        raise ValueError(f"{path}[{key}]: expected a predictor state dict, found keys {_listed(sorted(state))}")
    embed_dim, _, spec_heads, _ = MODEL_SPECS[model_name]
    predictor_dim = embed.shape[0]
    depth = len({k.split(".")[1] for k in state if k.startswith("predictor_blocks.")})
    num_mask_tokens = sum(1 for k in state if k.startswith("mask_tokens."))
    grid = (num_frames // tubelet_size, crop_size // patch_size, crop_size // patch_size)
    default_heads = family.predictor_heads or spec_heads
    predictor = build_empty(Predictor, grid, embed_dim, predictor_dim, depth, num_heads=num_heads or default_heads,
                            num_mask_tokens=max(num_mask_tokens, 1), patch_size=patch_size, family=family,
                            **predictor_kwargs)
    load_state_checked(predictor, state, f"{path}[{key}]")
    return predictor
