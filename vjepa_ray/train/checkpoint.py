"""Training checkpoints: when a run saves, what every rank writes, and how a (re)started run reads it back.

One checkpoint is one folder, assembled by Ray Train from every rank's local folder (``ray.train.report``
copies all ranks' files into ``<storage>/<name>/<checkpoint_dir_name>``)::

    deepspeed/state/...          DeepSpeed's sharded engine state (model, optimizer, per-rank ZeRO files)
    target_encoder/shard_*.pt    the EMA target, fp32 (vjepa_ray.train.target_encoder)
    rng/rank_*.pt                each rank's torch / numpy / python RNG state
    train_state.json             step, data position, world size, counters (rank 0)
    config.yaml                  the run's config (rank 0)
    manifest/rank_*.json         every rank's files with their sizes and SHA-256 (vjepa_ray.train.manifest)

A run that restarts with a different world size under ZeRO 1-3 cannot load DeepSpeed's partitioned files
directly: the checkpoint is converted once per node to a universal checkpoint (``ds_to_universal``) in a
temporary folder, which the new engine loads with ``checkpoint.load_universal``. That is why every save passes
DeepSpeed the ``universal_checkpoint_info`` client state.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import pickle
import random
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import yaml
from omegaconf.errors import OmegaConfBaseException

from vjepa_ray import runs
from vjepa_ray.config import Config, ConfigError, from_dict
from vjepa_ray.models import build_models
from vjepa_ray.models.pretrained import FIXED_TABLES
from vjepa_ray.train import manifest
from vjepa_ray.train.target_encoder import TargetEncoder

log = logging.getLogger(__name__)

DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"
TRAIN_STATE = runs.CHECKPOINT_MARKER
CONFIG_FILE = "config.yaml"
EXIT_IN_SAVE_ENV = "VJEPA_RAY_FAULT_EXIT_IN_SAVE"  # see _exit_if_armed


@dataclass(frozen=True)
class SaveSchedule:
    """Which steps save a checkpoint: every ``every_steps`` (``checkpoint.every_steps``), the last step
    (``total_steps``), and the step at which a preemption notice arrived."""

    every_steps: int
    total_steps: int

    def due(self, step: int, preempted: bool = False) -> bool:
        """Whether the run saves after ``step`` steps."""
        return preempted or step == self.total_steps or step % self.every_steps == 0


@dataclass
class TrainState:
    """Counters that travel with a checkpoint (``train_state.json``)."""

    step: int = 0
    world_size: int = 1
    global_batch: int = 0
    zero_stage: int = 0
    # Every rank's data stream state at the save, by rank (``ClipStream.state_dict()``).
    data_position: list[dict[str, Any]] | None = None
    skipped_videos: int = 0
    # Steps not applied because their loss or gradient was not finite (vjepa_ray.train.nonfinite).
    nonfinite_steps: int = 0
    last_loss: float | None = None
    world_sizes: list[int] = field(default_factory=list)
    # state_digest of weights and Adam moments at the save, when the run verifies its restores.
    state_digest: str | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        data = json.loads(text)
        if isinstance(data.get("data_position"), dict):
            # Checkpoints from before every rank's position was kept: rank 0's (epoch, chunk) alone.
            data["data_position"] = [data["data_position"]]
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


def read_train_state(folder: str | Path) -> TrainState:
    return TrainState.from_json((Path(folder) / TRAIN_STATE).read_text())


def rng_state() -> dict[str, Any]:
    """This process's torch, numpy, python (and CUDA) RNG states as tensors and plain Python values, so an
    ``rng/rank_*.pt`` file loads with ``torch.load(..., weights_only=True)``."""
    numpy_state = np.random.get_state(legacy=False)
    # The Mersenne Twister's uint32 key as an int64 tensor: numpy arrays would need the full unpickler.
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    return {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what ``rng_state`` returned, exactly."""
    torch.set_rng_state(state["torch"])
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {**numpy_state["state"], "key": numpy_state["state"]["key"].numpy().astype(np.uint32)}
    np.random.set_state(numpy_state)
    random.setstate(state["python"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(folder: str | Path, engine, target: TargetEncoder, state: TrainState, rank: int,
         config_yaml: str) -> None:
    """Every rank calls this (DeepSpeed's save holds collectives) into its own local ``folder``."""
    folder = Path(folder)
    # The universal-checkpoint info lets ds_to_universal re-shard ZeRO 1-2 optimizer state later.
    engine.save_checkpoint(str(folder / DEEPSPEED_DIR), tag=DEEPSPEED_TAG,
                           client_state={"universal_checkpoint_info": {}})
    _exit_if_armed()
    target.save(folder, rank)
    (folder / "rng").mkdir(exist_ok=True)
    torch.save(rng_state(), folder / "rng" / f"rank_{rank:05d}.pt")
    if rank == 0:
        (folder / TRAIN_STATE).write_text(state.to_json())
        (folder / CONFIG_FILE).write_text(config_yaml)
    manifest.write(folder, rank, state.world_size)


def _exit_if_armed() -> None:
    """Fault injection (``python -m vjepa_ray.bench chaos`` and its test): while the file that
    ``$VJEPA_RAY_FAULT_EXIT_IN_SAVE`` names exists, the first rank to reach here removes it and dies, half-way
    through writing a checkpoint (DeepSpeed's shards written, the EMA target, RNG and manifest not), as a
    worker lost in the middle of a save."""
    marker = os.environ.get(EXIT_IN_SAVE_ENV)
    if not marker:
        return
    try:
        os.unlink(marker)
    except FileNotFoundError:
        return
    log.warning("%s: exiting in the middle of a checkpoint save", EXIT_IN_SAVE_ENV)
    os._exit(1)


def needs_universal(saved: TrainState, world_size: int, cfg: Config) -> bool:
    """DeepSpeed's partitioned state only loads on the world size that wrote it: ZeRO 1-3, and ZeRO-0 with
    bf16 (DeepSpeed's bf16 optimizer partitions the fp32 master weights like ZeRO-1)."""
    partitioned = cfg.deepspeed.zero_stage > 0 or saved.zero_stage > 0 or cfg.deepspeed.precision == "bf16"
    return saved.world_size != world_size and partitioned


def _universal_folder(token: str) -> Path:
    """Where a node writes this start's universal conversion. ``token`` is drawn afresh for every start
    (and shared by all ranks), so a conversion is never confused with one of an earlier run or checkpoint
    that had the same run and step names."""
    return Path(tempfile.gettempdir()) / "vjepa_ray_universal" / token


def _convert_to_universal(checkpoint_dir: str | Path, out: str | Path) -> Path:
    """``ds_to_universal`` on the DeepSpeed state of ``checkpoint_dir`` into the new folder ``out``;
    returns the folder to load from."""
    from deepspeed.checkpoint import ds_to_universal

    out = Path(out)
    out.mkdir(parents=True)
    args = argparse.Namespace(input_folder=str(Path(checkpoint_dir) / DEEPSPEED_DIR / DEEPSPEED_TAG),
                              output_folder=str(out / DEEPSPEED_TAG), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=False)
    log.info("converting %s to a universal checkpoint in %s", checkpoint_dir, out)
    ds_to_universal.main(args)
    (out / "latest_universal").write_text(DEEPSPEED_TAG)
    return out


def restore(folder: str | Path, engine, target: TargetEncoder, rank: int, local_rank: int,
            resharded: bool = False) -> TrainState:
    """Loads engine, EMA target and this rank's RNG (a new rank keeps its fresh RNG) from ``folder``.

    Every rank calls it. ``resharded`` (``needs_universal``): see ``_deepspeed_state``.
    """
    with _deepspeed_state(folder, rank, local_rank, resharded) as deepspeed_dir:
        _load_engine(engine, deepspeed_dir)
    target.load(folder)
    restore_rng(folder, rank)
    return read_train_state(folder)


def start_from(folder: str | Path, engine, target: TargetEncoder, rank: int, local_rank: int,
               resharded: bool = False) -> None:
    """Loads another run's weights, optimizer state and EMA target from its checkpoint ``folder`` into this
    run's first start (``checkpoint.start_from``), as the V-JEPA 2 release's anneal loads the pretraining
    checkpoint: Adam's moments and step counts carry over, while this run keeps its own step (0), schedules,
    data stream and RNG.

    The clip size may differ from the source run's: the fixed sin-cos tables (buffers, a function of the
    clip size alone) stay this run's, every other tensor loads strictly. Every rank calls it; ``resharded``
    as in ``restore``.
    """
    with _deepspeed_state(folder, rank, local_rank, resharded) as deepspeed_dir:
        _load_engine(engine, deepspeed_dir, custom_load_fn=_load_keeping_position_tables)
    target.load(folder)


def _load_keeping_position_tables(src: dict[str, torch.Tensor], dst: torch.nn.Module) -> None:
    """DeepSpeed's module load (``custom_load_fn``) for ``start_from``: a position table of another clip size
    is replaced by the module's own, everything else loads with ``strict=True``."""
    own = dst.state_dict()
    state = {key: own[key] if key.rsplit(".", 1)[-1] in FIXED_TABLES and key in own
             and value.shape != own[key].shape else value for key, value in src.items()}
    dst.load_state_dict(state, strict=True)


@contextmanager
def _deepspeed_state(folder: str | Path, rank: int, local_rank: int, resharded: bool) -> Iterator[Path]:
    """The folder DeepSpeed loads the state of checkpoint ``folder`` from: its own, or, ``resharded``, a
    universal checkpoint: local rank 0 of each node converts the state in a folder named by a token rank 0
    draws, every rank loads from it (an engine built with ``load_universal``), and it is removed after."""
    if not resharded:
        yield Path(folder) / DEEPSPEED_DIR
        return
    token = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    universal_dir = _universal_folder(token[0])
    if local_rank == 0:
        _convert_to_universal(folder, universal_dir)
    dist.barrier()
    try:
        yield universal_dir
    finally:
        # No rank may still read the conversion when it goes.
        dist.barrier()
        if local_rank == 0:
            shutil.rmtree(universal_dir, ignore_errors=True)


def _load_engine(engine, deepspeed_dir: Path, custom_load_fn=None) -> None:
    load_path, _ = engine.load_checkpoint(str(deepspeed_dir), tag=DEEPSPEED_TAG, load_lr_scheduler_states=False,
                                          custom_load_fn=custom_load_fn)
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint in {deepspeed_dir}")


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


def restore_rng(folder: str | Path, rank: int) -> None:
    """This rank's saved RNG state, if the checkpoint has one (a rank new to the run keeps its fresh RNG)."""
    rng_file = Path(folder) / "rng" / f"rank_{rank:05d}.pt"
    if not rng_file.exists():
        return
    try:
        saved = torch.load(rng_file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Checkpoints from before RNG files held only tensors and plain values (numpy's state was an array).
        # The step draws its masks and clips from explicit seeds, not from these generators, so the run goes
        # on with fresh ones rather than unpickling in full.
        log.warning("%s needs the full unpickler (an older checkpoint format): this rank keeps a fresh RNG",
                    rng_file)
        return
    set_rng_state(saved)


def state_digest(engine) -> str:
    """SHA-256 over every trained parameter's fp32 master weights and Adam moments, gathered in full.

    Identical on all ranks and independent of the world size, so a restore (resharded or not) can be
    checked against the save. A collective under ZeRO-3.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    optimizer = engine.optimizer
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        # DeepSpeed's ZeRO 1-2 and bf16 optimizers link Adam moments to parameters during the first step, before
        # later param groups have moments, and never again: relink now that all groups have them.
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()
    digest = hashlib.sha256()
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        if engine.zero_optimization() or engine.bfloat16_enabled():
            tensors = [safe_get_full_fp32_param(param), safe_get_full_optimizer_state(param, "exp_avg"),
                       safe_get_full_optimizer_state(param, "exp_avg_sq")]
        else:
            state = engine.optimizer.state.get(param, {})
            tensors = [param.detach(), state.get("exp_avg"), state.get("exp_avg_sq")]
        digest.update(name.encode())
        for tensor in tensors:
            if tensor is not None:
                digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def read_model_weights(folder: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """``encoder``, ``predictor`` and ``target_encoder`` (the EMA) state dicts of a training checkpoint, fp32.

    ``folder`` is a local checkpoint folder (``vjepa_ray.runs`` finds a run's and copies a remote one here).

    Encoder and predictor are DeepSpeed's fp32 master weights, gathered from every rank's partition; the
    target comes from its own shards. The models are built from the checkpoint's ``config.yaml``.
    """
    from vjepa_ray.config import load_config

    folder = Path(folder)
    cfg = load_config(folder / CONFIG_FILE)
    saved = read_train_state(folder)
    deepspeed_dir = folder / DEEPSPEED_DIR
    if saved.zero_stage > 0 or cfg.deepspeed.precision == "bf16":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        module = get_fp32_state_dict_from_zero_checkpoint(str(deepspeed_dir), tag=DEEPSPEED_TAG)
    else:
        states = torch.load(deepspeed_dir / DEEPSPEED_TAG / "mp_rank_00_model_states.pt", map_location="cpu",
                            weights_only=False)
        module = {key: value.float() for key, value in states["module"].items()}
    encoder, _ = build_models(cfg)
    TargetEncoder.replicated(encoder, encoder).load(folder)
    return {
        "encoder": {k.removeprefix("encoder."): v for k, v in module.items() if k.startswith("encoder.")},
        "predictor": {k.removeprefix("predictor."): v for k, v in module.items() if k.startswith("predictor.")},
        "target_encoder": encoder.state_dict(),
    }


def node_local_tempdir(prefix: str) -> Path:
    """A fresh local folder for one rank's share of a checkpoint (kept until Ray has copied it)."""
    return Path(tempfile.mkdtemp(prefix=prefix))
