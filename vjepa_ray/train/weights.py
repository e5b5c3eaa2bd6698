"""Our runs' weights in and out of Meta's released V-JEPA layout and Hugging Face's V-JEPA 2 folders, checked
against the config's models.

Both directions load every state dict strictly into the models the config describes before writing, so a
file that does not fit fails here, listing the keys, rather than in whoever reads it next.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from vjepa_ray import runs
from vjepa_ray.config import Config
from vjepa_ray.models import build_models
from vjepa_ray.models.families import get_family
from vjepa_ray.models.hf import HF_FAMILY, hf_config, is_hf_folder, read_hf_folder, write_hf_folder
from vjepa_ray.models.pretrained import (
    MODEL_KEYS,
    StateDict,
    build_empty,
    load_state_checked,
    official_checkpoint,
    read_checkpoint,
    state_from_checkpoint,
)
from vjepa_ray.models.sizes import MODEL_SPECS
from vjepa_ray.train.checkpoint import read_model_weights


def read_training_weights(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """The encoder, predictor and target-encoder state dicts of our weights: a local run folder or one of its
    training checkpoints (``step_*``), or a file ``from-official`` wrote
    (``{"encoder": sd, "predictor": sd, "target_encoder": sd}``)."""
    if Path(path).is_dir():
        return read_model_weights(runs.find_checkpoint(str(path)))
    checkpoint = read_checkpoint(path)
    return {key: state_from_checkpoint(checkpoint, key, str(path)) for key in MODEL_KEYS}


def read_initial_weights(cfg: Config) -> dict[str, dict[str, torch.Tensor]]:
    """``model.init_from``'s encoder, predictor and target encoder, verified against the run's models.

    ``model.init_from`` is a file in Meta's release layout or ours, a Hugging Face V-JEPA 2 folder, or a run
    folder. A file or folder without a ``target_encoder`` starts the target as a copy of its encoder, as a
    fresh run's target starts. Raises FileNotFoundError, or ValueError naming the keys and shapes that do not
    fit.
    """
    path = cfg.model.init_from
    if is_hf_folder(path):
        weights = read_hf_weights(path)
    elif Path(path).is_dir():
        weights = read_training_weights(path)
    else:
        checkpoint = read_checkpoint(path)
        weights = {key: state_from_checkpoint(checkpoint, key, path) for key in ("encoder", "predictor")}
        weights["target_encoder"] = (state_from_checkpoint(checkpoint, "target_encoder", path)
                                     if "target_encoder" in checkpoint else weights["encoder"])
    return verified_weights(cfg, weights, path)


def read_hf_weights(folder: str | os.PathLike) -> dict[str, StateDict]:
    """The encoder and predictor of a ``VJEPA2Model`` folder; it has no target encoder, which starts as a copy
    of the encoder, as the EMA would."""
    _, encoder, predictor = read_hf_folder(folder)
    return {"encoder": encoder, "predictor": predictor, "target_encoder": encoder}


def write_training_weights(path: str | os.PathLike, weights: Mapping[str, StateDict]) -> None:
    """The inverse of ``read_training_weights``."""
    torch.save({key: dict(weights[key]) for key in MODEL_KEYS}, path)


def verified_weights(cfg: Config, weights: Mapping[str, StateDict], source: str) -> dict[str, dict[str, torch.Tensor]]:
    """Loads each state dict into the config's model (strictly) and returns the models' state dicts.

    A position table of another clip size is replaced by the config's (see models.pretrained).
    """
    encoder, predictor = build_empty(build_models, cfg)
    models = {"encoder": encoder, "predictor": predictor, "target_encoder": copy.deepcopy(encoder)}
    for key, model in models.items():
        load_state_checked(model, weights[key], f"{source}[{key}]")
    return {key: model.state_dict() for key, model in models.items()}


def to_official_file(cfg: Config, source: str | os.PathLike, dest: str | os.PathLike) -> None:
    weights = verified_weights(cfg, read_training_weights(source), str(source))
    torch.save(official_checkpoint(**weights), dest)


def from_official_file(cfg: Config, source: str | os.PathLike, dest: str | os.PathLike) -> None:
    checkpoint = read_checkpoint(source)
    weights = {key: state_from_checkpoint(checkpoint, key, str(source)) for key in MODEL_KEYS}
    write_training_weights(dest, verified_weights(cfg, weights, str(source)))


def to_hf_folder(cfg: Config, source: str | os.PathLike, dest: str | os.PathLike) -> None:
    """A ``VJEPA2Model`` folder of a run's target (EMA) encoder and its predictor. Hugging Face's model is
    V-JEPA 2.0's, so the config's family must be its (``hf.HF_FAMILY``)."""
    if get_family(cfg.model.family) is not HF_FAMILY:
        raise ValueError(f"Hugging Face's VJEPA2Model is V-JEPA 2.0's model: expected model.family "
                         f"{HF_FAMILY.name}, got {cfg.model.family}")
    weights = verified_weights(cfg, read_training_weights(source), str(source))
    m, predictor = cfg.model, weights["predictor"]
    config = hf_config(model_name=m.name, patch_size=m.patch_size, tubelet_size=m.tubelet_size,
                       frames_per_clip=cfg.data.frames_per_clip, crop_size=cfg.data.crop_size,
                       pred_embed_dim=m.pred_embed_dim, pred_depth=m.pred_depth,
                       pred_num_heads=m.pred_num_heads or MODEL_SPECS[m.name][2],
                       pred_num_mask_tokens=sum(k.startswith("mask_tokens.") for k in predictor))
    write_hf_folder(dest, config, weights["target_encoder"], predictor)


def from_hf_folder(cfg: Config, source: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Our weights file from a ``VJEPA2Model`` folder (``cfg`` as ``hf.config_overrides`` makes it)."""
    write_training_weights(dest, verified_weights(cfg, read_hf_weights(source), str(source)))
