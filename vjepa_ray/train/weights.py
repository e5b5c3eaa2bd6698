"""Our runs' weights in and out of training checkpoints, Meta's released V-JEPA layout and Hugging Face's V-JEPA 2
folders, checked against the config's models.

Both directions load every state dict strictly into the models the config describes before writing, so a
file that does not fit fails here, listing the keys, rather than in whoever reads it next. A training
checkpoint is read from its files alone (``read_model_weights``), without DeepSpeed engines or the checkpointer.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf.errors import OmegaConfBaseException

from vjepa_ray import runs
from vjepa_ray.config import Config, ConfigError, from_dict, load_config
from vjepa_ray.models import build_models
from vjepa_ray.models.families import Family, get_family
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
from vjepa_ray.train.checkpoint import CONFIG_FILE, read_train_state
from vjepa_ray.train.deepspeed_state import DEEPSPEED_DIR, DEEPSPEED_TAG, read_model_states
from vjepa_ray.train.target_encoder import TargetEncoder


def read_model_weights(folder: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """``encoder``, ``predictor`` and ``target_encoder`` (the EMA) state dicts of a training checkpoint, fp32.

    ``folder`` is a local checkpoint folder (``vjepa_ray.runs`` finds a run's and copies a remote one here).

    Encoder and predictor are DeepSpeed's fp32 master weights, gathered from every rank's partition; the
    target comes from its own shards. The models are built from the checkpoint's ``config.yaml``.
    """
    folder = Path(folder)
    cfg = load_config(folder / CONFIG_FILE)
    saved = read_train_state(folder)
    deepspeed_dir = folder / DEEPSPEED_DIR
    if saved.zero_stage > 0 or cfg.deepspeed.precision == "bf16":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        module = get_fp32_state_dict_from_zero_checkpoint(str(deepspeed_dir), tag=DEEPSPEED_TAG)
    else:
        module = {key: value.float() for key, value in read_model_states(folder)["module"].items()}
    encoder, _ = build_models(cfg)
    TargetEncoder.replicated(encoder, encoder).load(folder)
    return {
        "encoder": {k.removeprefix("encoder."): v for k, v in module.items() if k.startswith("encoder.")},
        "predictor": {k.removeprefix("predictor."): v for k, v in module.items() if k.startswith("predictor.")},
        "target_encoder": encoder.state_dict(),
    }


def check_start_from(cfg: Config) -> str:
    """The training checkpoint ``checkpoint.start_from`` names (itself, or a run folder's), checked on the
    driver to hold the parameters this run's config builds; raises ConfigError."""
    source = cfg.checkpoint.start_from
    try:
        found = runs.find_checkpoint(source)
        saved = from_dict(yaml.safe_load(runs.read_bytes(runs.join(found, CONFIG_FILE))))
    except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError("checkpoint.start_from", f"cannot start from {source}: {first}") from None
    difference = _parameter_difference(saved, cfg)
    if difference:
        raise ConfigError("checkpoint.start_from", f"{found} holds another model than this run's "
                          f"(its model.name {saved.model.name}, here {cfg.model.name}): {difference}")
    return found if runs.is_uri(found) else str(Path(found).expanduser().resolve())


def _parameter_difference(saved: Config, cfg: Config) -> str | None:
    """The first parameter whose name or shape differs between the two configs' models, or None."""
    def shapes(c: Config) -> dict[str, tuple[int, ...]]:
        with torch.device("meta"):
            encoder, predictor = build_models(c)
        return {**{f"encoder.{n}": tuple(p.shape) for n, p in encoder.named_parameters()},
                **{f"predictor.{n}": tuple(p.shape) for n, p in predictor.named_parameters()}}

    theirs, ours = shapes(saved), shapes(cfg)
    for name in dict.fromkeys([*ours, *theirs]):
        if theirs.get(name) != ours.get(name):
            there = list(theirs[name]) if name in theirs else "absent"
            here = list(ours[name]) if name in ours else "absent"
            return f"{name} is {there} there and {here} here"
    return None


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

    ``model.init_from`` is a file in Meta's release layout or ours (``release_weights``), a Hugging Face V-JEPA 2
    folder, or a run folder. A file or folder without a target encoder starts the target as a copy of its
    encoder, as a fresh run's target starts. Raises FileNotFoundError, or ValueError naming the keys and shapes
    that do not fit.
    """
    path = cfg.model.init_from
    if is_hf_folder(path):
        weights = read_hf_weights(path)
    elif Path(path).is_dir():
        weights = read_training_weights(path)
    else:
        weights = release_weights(read_checkpoint(path), get_family(cfg.model.family), path)
    return verified_weights(cfg, weights, path)


def release_weights(checkpoint: Mapping[str, Any], family: Family, source: str) -> dict[str, StateDict]:
    """The ``encoder``, ``predictor`` and target encoder of a file in Meta's release layout (or ours).

    The target is the first of the family's ``encoder_keys`` the file holds (a training checkpoint's
    ``target_encoder``; 2.1's released models keep it under ``ema_encoder``), else a copy of the encoder.
    """
    weights = {key: state_from_checkpoint(checkpoint, key, source) for key in ("encoder", "predictor")}
    target = next((key for key in family.encoder_keys if key in checkpoint), None)
    weights["target_encoder"] = weights["encoder"] if target is None else state_from_checkpoint(checkpoint, target,
                                                                                                   source)
    return weights


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
    weights = release_weights(read_checkpoint(source), get_family(cfg.model.family), str(source))
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
