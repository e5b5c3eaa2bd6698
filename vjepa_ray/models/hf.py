"""Hugging Face's V-JEPA 2 layout (``transformers.VJEPA2Model``): a folder of ``config.json`` and safetensors.

The model is V-JEPA 2.0's (the same rotary layout), under other names: ``encoder.layer.{i}`` for
``blocks.{i}``, separate ``query``/``key``/``value`` linears for the release's ``qkv`` (their concatenation
in that order), ``encoder.embeddings.patch_embeddings`` and ``encoder.layernorm`` for ``patch_embed`` and
``norm``; the predictor's mask tokens are one [M, 1, 1, D] tensor. ``config.json`` gives the sizes, so a
folder says which models it holds. Reading and writing needs ``safetensors`` only, not ``transformers``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vjepa_ray.models.families import VJEPA2
from vjepa_ray.models.sizes import MODEL_SPECS
from vjepa_ray.models.vit import LAYER_NORM_EPS

StateDict = Mapping[str, torch.Tensor]

# transformers' VJEPA2Model is V-JEPA 2.0's model.
HF_FAMILY = VJEPA2
HF_MODEL_TYPE = HF_FAMILY.hf_model_type
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# config.json values our models have and do not read from it: anything else is another model.
FIXED_FIELDS = {"in_chans": 3, "qkv_bias": True, "hidden_act": "gelu", "layer_norm_eps": LAYER_NORM_EPS}

# Our names -> Hugging Face's, within a block (the attention's qkv is handled apart).
_BLOCK_NAMES = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.proj", "mlp.fc1": "mlp.fc1",
                "mlp.fc2": "mlp.fc2"}
_ENCODER_NAMES = {"patch_embed.proj": "embeddings.patch_embeddings.proj", "norm": "layernorm"}
_PREDICTOR_NAMES = {"predictor_embed": "embeddings.predictor_embeddings", "predictor_norm": "layernorm",
                    "predictor_proj": "proj"}
_QKV = ("query", "key", "value")


def is_hf_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_hf_config(folder: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a V-JEPA 2 folder; ValueError naming what came when it is another model."""
    path = Path(folder) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable JSON config ({err})") from err
    if not isinstance(config, dict) or config.get("model_type") != HF_MODEL_TYPE:
        got = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{path}: expected model_type {HF_MODEL_TYPE!r}, got {got!r}")
    for field, value in FIXED_FIELDS.items():
        if field in config and config[field] != value:
            raise ValueError(f"{path}: expected {field} {value!r}, got {config[field]!r}")
    return config


def model_name_of(config: Mapping[str, Any], source: str = CONFIG_FILE) -> str:
    """The ``MODEL_SPECS`` name of a config's encoder sizes."""
    sizes = (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"])
    for name, (dim, depth, heads, mlp_ratio) in MODEL_SPECS.items():
        if (dim, depth, heads) == sizes and abs(mlp_ratio - config.get("mlp_ratio", 4.0)) < 1e-6:
            return name
    raise ValueError(f"{source}: no model has width {sizes[0]}, depth {sizes[1]}, {sizes[2]} heads and MLP ratio "
                     f"{config.get('mlp_ratio', 4.0)} (expected one of {', '.join(MODEL_SPECS)})")


def config_overrides(config: Mapping[str, Any], source: str = CONFIG_FILE) -> list[str]:
    """Our config's ``key=value`` settings for the models a Hugging Face config describes."""
    if config.get("pred_mlp_ratio", 4.0) != 4.0:
        raise ValueError(f"{source}: expected pred_mlp_ratio 4.0, got {config['pred_mlp_ratio']}")
    return [f"model.family={HF_FAMILY.name}", f"model.name={model_name_of(config, source)}",
            f"model.patch_size={config['patch_size']}", f"model.tubelet_size={config['tubelet_size']}",
            f"model.pred_embed_dim={config['pred_hidden_size']}",
            f"model.pred_depth={config['pred_num_hidden_layers']}",
            f"model.pred_num_heads={config['pred_num_attention_heads']}",
            f"model.pred_num_mask_tokens={config['pred_num_mask_tokens']}",
            f"data.frames_per_clip={config['frames_per_clip']}", f"data.crop_size={config['crop_size']}"]


def hf_config(*, model_name: str, patch_size: int, tubelet_size: int, frames_per_clip: int, crop_size: int,
              pred_embed_dim: int, pred_depth: int, pred_num_heads: int, pred_num_mask_tokens: int) -> dict[str, Any]:
    """A ``VJEPA2Config`` as JSON for our models."""
    dim, depth, heads, mlp_ratio = MODEL_SPECS[model_name]
    return {"model_type": HF_MODEL_TYPE, "architectures": ["VJEPA2Model"], **FIXED_FIELDS,
            "hidden_size": dim, "num_hidden_layers": depth, "num_attention_heads": heads, "mlp_ratio": mlp_ratio,
            "patch_size": patch_size, "tubelet_size": tubelet_size, "frames_per_clip": frames_per_clip,
            "crop_size": crop_size, "pred_hidden_size": pred_embed_dim, "pred_num_hidden_layers": pred_depth,
            "pred_num_attention_heads": pred_num_heads, "pred_num_mask_tokens": pred_num_mask_tokens,
            "pred_mlp_ratio": 4.0}


def _to_hf(state: StateDict, prefix: str, blocks: str, names: Mapping[str, str]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        match = re.fullmatch(rf"{blocks}\.(\d+)\.(.+)\.(weight|bias)", key)
        if match and match[2] == "attn.qkv":
            for name, part in zip(_QKV, value.chunk(3, dim=0)):
                out[f"{prefix}layer.{match[1]}.attention.{name}.{match[3]}"] = part.contiguous()
        elif match and match[2] in _BLOCK_NAMES:
            out[f"{prefix}layer.{match[1]}.{_BLOCK_NAMES[match[2]]}.{match[3]}"] = value
        else:
            module, _, leaf = key.rpartition(".")
            # Anything without a Hugging Face name keeps ours and fails there, listed.
            out[f"{prefix}{names[module]}.{leaf}" if module in names else prefix + key] = value
    return out


def _from_hf(state: StateDict, prefix: str, blocks: str, names: Mapping[str, str]) -> dict[str, torch.Tensor]:
    hf_block = {hf: ours for ours, hf in _BLOCK_NAMES.items()}
    hf_names = {hf: ours for ours, hf in names.items()}
    out, qkv = {}, {}
    for key, value in state.items():
        key = key[len(prefix):]
        match = re.fullmatch(r"layer\.(\d+)\.(.+)\.(weight|bias)", key)
        if match and match[2] in {f"attention.{name}" for name in _QKV}:
            qkv.setdefault((match[1], match[3]), {})[match[2].split(".")[1]] = value
        elif match and match[2] in hf_block:
            out[f"{blocks}.{match[1]}.{hf_block[match[2]]}.{match[3]}"] = value
        else:
            module, _, leaf = key.rpartition(".")
            out[f"{hf_names[module]}.{leaf}" if module in hf_names else key] = value
    for (block, leaf), parts in qkv.items():
        if set(parts) != set(_QKV):  # an incomplete triple keeps its names and fails strict loading, listed
            out.update({f"layer.{block}.attention.{name}.{leaf}": part for name, part in parts.items()})
        else:
            out[f"{blocks}.{block}.attn.qkv.{leaf}"] = torch.cat([parts[name] for name in _QKV])
    return out


def to_hf_state(encoder: StateDict, predictor: StateDict) -> dict[str, torch.Tensor]:
    """Our V-JEPA 2 encoder and predictor state dicts -> one ``VJEPA2Model`` state dict."""
    state = _to_hf(encoder, "encoder.", "blocks", _ENCODER_NAMES)
    predictor = dict(predictor)
    tokens = [predictor.pop(f"mask_tokens.{i}") for i in range(sum(k.startswith("mask_tokens.") for k in predictor))]
    state.update(_to_hf(predictor, "predictor.", "predictor_blocks", _PREDICTOR_NAMES))
    state["predictor.embeddings.mask_tokens"] = torch.stack(tokens)
    return {key: value.detach().cpu().contiguous() for key, value in state.items()}


def from_hf_state(state: StateDict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A ``VJEPA2Model`` state dict -> our encoder and predictor state dicts (keys neither part knows stay in
    the encoder's, where strict loading lists them)."""
    state = {key.removeprefix(f"{HF_MODEL_TYPE}."): value for key, value in state.items()}
    predictor_part = {k: v for k, v in state.items() if k.startswith("predictor.")}
    tokens = predictor_part.pop("predictor.embeddings.mask_tokens", None)
    predictor = _from_hf(predictor_part, "predictor.", "predictor_blocks", _PREDICTOR_NAMES)
    if tokens is not None:
        predictor.update({f"mask_tokens.{i}": token for i, token in enumerate(tokens)})
    encoder_part = {k: v for k, v in state.items() if not k.startswith("predictor.")}
    encoder = _from_hf({k: v for k, v in encoder_part.items() if k.startswith("encoder.")}, "encoder.", "blocks",
                       _ENCODER_NAMES)
    encoder.update({k: v for k, v in encoder_part.items() if not k.startswith("encoder.")})
    return encoder, predictor


def read_hf_folder(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor],
                                                         dict[str, torch.Tensor]]:
    """config.json, and our encoder and predictor state dicts, of a Hugging Face V-JEPA 2 folder."""
    config = read_hf_config(folder)
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: expected *.safetensors weights beside {CONFIG_FILE}, found none")
    state: dict[str, torch.Tensor] = {}
    for file in files:  # one file, or the shards of a sharded save
        state.update(load_file(file))
    return (config, *from_hf_state(state))


def write_hf_folder(folder: str | os.PathLike, config: Mapping[str, Any], encoder: StateDict,
                    predictor: StateDict) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(dict(config), indent=2) + "\n")
    save_file(to_hf_state(encoder, predictor), folder / WEIGHTS_FILE, metadata={"format": "pt"})
