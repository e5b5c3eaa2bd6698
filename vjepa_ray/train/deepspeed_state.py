"""DeepSpeed's engine and optimizer as a checkpoint component: DeepSpeed's own sharded files, and the universal
conversion that loads them on another world size.

Every save passes DeepSpeed the ``universal_checkpoint_info`` client state, so that ``ds_to_universal`` can
convert the files later. An engine built with ``load_universal`` (``vjepa_ray.train.checkpoint.Checkpointer``
decides when: ``needs_universal``) loads through that conversion: once per node, into a temporary folder.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from vjepa_ray.config import Config, ConfigError
from vjepa_ray.models.positions import FIXED_TABLES

log = logging.getLogger(__name__)

DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"


def needs_universal(saved_world_size: int, saved_zero_stage: int, world_size: int, cfg: Config,
                    saved_trained: set[str] | None = None, trained: set[str] | None = None) -> bool:
    """Whether DeepSpeed's state saved on ``saved_world_size`` ranks must go through a universal checkpoint to
    load on ``world_size``: partitioned state only loads on the world size that wrote it, which is ZeRO 1-3, and
    ZeRO-0 with bf16 (DeepSpeed's bf16 optimizer partitions the fp32 master weights like ZeRO-1).

    Nor does it load into an engine that trains another set of parameters (``saved_trained``, the names the
    checkpoint's optimizer holds, ``saved_trained_parameters``; ``trained``, the engine's): the flat buffers
    differ in size, and DeepSpeed copies every parameter the engine freezes from the checkpoint's frozen ones.
    Checkpoints saved before ``recipe.step.freeze_unused_`` trained every parameter. The universal conversion
    maps the optimizer state by parameter name and leaves a frozen parameter to the module's weights."""
    partitioned = cfg.deepspeed.zero_stage > 0 or saved_zero_stage > 0 or cfg.deepspeed.precision == "bf16"
    changed = saved_trained is not None and trained is not None and saved_trained != trained
    return partitioned and (saved_world_size != world_size or changed)


def saved_trained_parameters(folder: str | Path, trained: set[str]) -> set[str] | None:
    """The names of the parameters whose optimizer state checkpoint ``folder`` holds: DeepSpeed's
    ``param_shapes`` in its model states, which it writes for its partitioned optimizers (ZeRO 1-3, bf16).

    None for torch's own optimizer state (ZeRO-0 in fp32, fp16 or bf16), which names no parameters: that state
    loads only into as many parameters as it holds, and the universal conversion does not read it, so one held
    for another number than the engine trains (``trained``) raises ``ConfigError`` (a restart would fail the same
    way: the run stops with what to do)."""
    states = read_model_states(folder)
    if states.get("param_shapes") is not None:
        return {name for group in states["param_shapes"] for name in group}
    optimizer = states["optimizer"]
    # DeepSpeed's fp16 and bf16 wrappers keep torch's state under optimizer_state_dict.
    groups = optimizer.get("optimizer_state_dict", optimizer)["param_groups"]
    saved = sum(len(group["params"]) for group in groups)
    if saved != len(trained):
        raise ConfigError(str(folder), f"its ZeRO-0 optimizer state holds {saved} parameters, this version trains "
                          f"{len(trained)} (an older version trained the ones no step reaches too) and cannot load "
                          "it; start a new run (another meta.name) from its weights: model.init_from=<its run folder>")
    return None


def read_model_states(folder: str | Path) -> dict[str, Any]:
    """Rank 0's model states of checkpoint ``folder`` (ZeRO 0-2 write one file, ZeRO-3 one per rank), with
    ``weights_only`` (``deepspeed_globals``), memory-mapped: a tensor is read from disk only when used."""
    state = Path(folder) / DEEPSPEED_DIR / DEEPSPEED_TAG
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (state / name).exists():
            with torch.serialization.safe_globals(deepspeed_globals()):
                return torch.load(state / name, map_location="cpu", weights_only=True, mmap=True)
    raise FileNotFoundError(f"DeepSpeed found no model states in {state}")


def deepspeed_globals() -> list[Any]:
    """The classes DeepSpeed pickles into its state files besides tensors and plain containers: what
    ``torch.load(weights_only=True)`` may rebuild from them."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_frozen_parameters(engine, folder: str | Path) -> None:
    """The values of the parameters ``engine`` freezes, from the module weights of checkpoint ``folder``, by
    name. A universal load restores the optimizer's parameters only (DeepSpeed reads no module weights through
    it, nor converts frozen ones), which would leave frozen parameters at their initialisation.

    Under ZeRO-3 the module weights are partitioned, the file holds placeholders: frozen parameters keep the
    values they were built with, which is what they hold in a run that freezes them from its first step."""
    frozen = {name: param for name, param in engine.module.named_parameters() if not param.requires_grad}
    if not frozen:
        return
    if engine.zero_optimization_partition_weights():
        log.warning("ZeRO-3 universal load: %s keep the values they were built with", ", ".join(sorted(frozen)))
        return
    module = read_model_states(folder)["module"]
    missing = sorted(set(frozen) - set(module))
    if missing:
        raise KeyError(f"the module weights in {folder} hold no {', '.join(missing)}")
    with torch.no_grad():
        for name, param in frozen.items():
            param.copy_(module[name])


class DeepSpeedState:
    """The DeepSpeed engine's weights and optimizer state, in DeepSpeed's own sharded files (``deepspeed/``).

    An engine built with ``load_universal`` (``Checkpointer.needs_resharding``) loads through a universal
    conversion of the files, its frozen parameters from the module weights (``load_frozen_parameters``).
    Position tables (fixed buffers, a function of the clip size alone) stay the engine's own when a checkpoint's
    are of another clip size (``checkpoint.start_from`` another run's); everything else loads strictly.
    """

    def __init__(self, engine, rank: int, local_rank: int):
        self.engine, self.rank, self.local_rank = engine, rank, local_rank

    def save(self, folder: Path, rank: int) -> None:
        # The universal-checkpoint info lets ds_to_universal re-shard ZeRO 1-2 optimizer state later.
        self.engine.save_checkpoint(str(folder / DEEPSPEED_DIR), tag=DEEPSPEED_TAG,
                                    client_state={"universal_checkpoint_info": {}})

    def load(self, folder: Path) -> None:
        resharded = self.engine.load_universal_checkpoint()
        with _deepspeed_state(folder, self.rank, self.local_rank, resharded) as deepspeed_dir:
            load_path, _ = self.engine.load_checkpoint(str(deepspeed_dir), tag=DEEPSPEED_TAG,
                                                       load_lr_scheduler_states=False,
                                                       custom_load_fn=load_keeping_position_tables)
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {deepspeed_dir}")
        if resharded:
            load_frozen_parameters(self.engine, folder)

    def digest(self) -> str:
        return state_digest(self.engine)


def load_keeping_position_tables(src: dict[str, torch.Tensor], dst: torch.nn.Module) -> None:
    """DeepSpeed's module load (``custom_load_fn``): a position table of another clip size is replaced by the
    module's own, everything else loads with ``strict=True``."""
    own = dst.state_dict()
    state = {key: own[key] if key.rsplit(".", 1)[-1] in FIXED_TABLES and key in own
             and value.shape != own[key].shape else value for key, value in src.items()}
    dst.load_state_dict(state, strict=True)


def _universal_folder(token: str) -> Path:
    """Where a node writes this start's universal conversion: a folder of its own, named by ``token`` (drawn
    afresh for every start and shared by all ranks), so no other run, start or user of the node has or can
    foresee it; ``_convert_to_universal`` creates it private (0700), refusing one that exists."""
    return Path(tempfile.gettempdir()) / f"vjepa_ray_universal_{token}"


def _convert_to_universal(checkpoint_dir: str | Path, out: str | Path) -> Path:
    """``ds_to_universal`` on the DeepSpeed state of ``checkpoint_dir`` into the new folder ``out``;
    returns the folder to load from."""
    from deepspeed.checkpoint import ds_to_universal

    out = Path(out)
    out.mkdir(mode=0o700)
    args = argparse.Namespace(input_folder=str(Path(checkpoint_dir) / DEEPSPEED_DIR / DEEPSPEED_TAG),
                              output_folder=str(out / DEEPSPEED_TAG), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=False)
    log.info("converting %s to a universal checkpoint in %s", checkpoint_dir, out)
    ds_to_universal.main(args)
    (out / "latest_universal").write_text(DEEPSPEED_TAG)
    return out


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
