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
from typing import Iterator

import torch
import torch.distributed as dist

from vjepa_ray.config import Config
from vjepa_ray.models.positions import FIXED_TABLES

log = logging.getLogger(__name__)

DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"


def needs_universal(saved_world_size: int, saved_zero_stage: int, world_size: int, cfg: Config) -> bool:
    """Whether DeepSpeed's state saved on ``saved_world_size`` ranks must go through a universal checkpoint to
    load on ``world_size``: partitioned state only loads on the world size that wrote it, which is ZeRO 1-3, and
    ZeRO-0 with bf16 (DeepSpeed's bf16 optimizer partitions the fp32 master weights like ZeRO-1)."""
    partitioned = cfg.deepspeed.zero_stage > 0 or saved_zero_stage > 0 or cfg.deepspeed.precision == "bf16"
    return saved_world_size != world_size and partitioned


class DeepSpeedState:
    """The DeepSpeed engine's weights and optimizer state, in DeepSpeed's own sharded files (``deepspeed/``).

    An engine built with ``load_universal`` (``Checkpointer.needs_resharding``) loads through a universal
    conversion of the files. Position tables (fixed buffers, a function of the clip size alone) stay the
    engine's own when a checkpoint's are of another clip size (``checkpoint.start_from`` another run's);
    everything else loads strictly.
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
