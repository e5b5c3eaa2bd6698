"""Our runs' weights in and out of Meta's released V-JEPA layout, checked against the config's models.

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
from vjepa_ray.models.pretrained import (
    MODEL_KEYS,
    StateDict,
    build_empty,
    load_state_checked,
    official_checkpoint,
    read_checkpoint,
    state_from_checkpoint,
)
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

    ``model.init_from`` is a file in Meta's release layout or ours, or a run folder. A file without a
    ``target_encoder`` starts the target as a copy of its encoder, as a fresh run's target starts. Raises
    FileNotFoundError, or ValueError naming the keys and shapes that do not fit.
    """
    path = cfg.model.init_from
    if Path(path).is_dir():
        weights = read_training_weights(path)
    else:
        checkpoint = read_checkpoint(path)
        weights = {key: state_from_checkpoint(checkpoint, key, path) for key in ("encoder", "predictor")}
        weights["target_encoder"] = (state_from_checkpoint(checkpoint, "target_encoder", path)
                                     if "target_encoder" in checkpoint else weights["encoder"])
    return verified_weights(cfg, weights, path)


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
