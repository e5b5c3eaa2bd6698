"""The ZeRO-aware EMA target encoder, kept by the training function beside the DeepSpeed engine.

ZeRO 0-2 replicate the module's weights on every rank, so the target is a full copy updated in place. Under
ZeRO-3 the target is a second ZeRO-3 module (an engine without optimizer): each rank holds and updates only
its partition (``param.ds_tensor``), which lines up element for element with the online encoder's partition
because both were partitioned from the same shapes over the same ranks; the target's forward gathers its
weights layer by layer like the online one. Memory per rank is then about 1/N of the replicated target.

With bf16/fp16 training the weights DeepSpeed runs the module with are half precision; an EMA of momentum
0.998+ applied in half precision would lose its updates to rounding, so an fp32 master of the target (of
the local partition under ZeRO-3) is averaged and copied into the half-precision weights after each update.

Checkpoints store the target as fp32 flat shards (one per rank under ZeRO-3, one in all for ZeRO 0-2) with
each parameter's size, so a target saved on N ranks loads on any number of ranks.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from vjepa_ray.recipe.ema import ema_update_

log = logging.getLogger(__name__)

SHARD_DIR = "target_encoder"
_SHARD_NAME = re.compile(r"shard_(\d+)_of_(\d+)\.pt$")


class TargetEncoder:
    """The target encoder (``.module``, callable on full clips) and its EMA update, save and load."""

    def __init__(self, module: nn.Module, names: list[str], target_params: list[nn.Parameter],
                 online_params: list[nn.Parameter], shard: Callable[[nn.Parameter], torch.Tensor],
                 layout: tuple[int, int]):
        if len(target_params) != len(online_params):
            raise ValueError(f"target has {len(target_params)} parameters, online encoder {len(online_params)}")
        self.module = module
        self._names = names
        self._target = target_params
        self._online = online_params
        # The tensor this rank owns of a parameter: the whole parameter, or its ZeRO-3 partition. Read
        # afresh each time because DeepSpeed may move partitions into flat buffers.
        self._shard = shard
        self._index, self._count = layout
        self._numels = {name: p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                        for name, p in zip(names, target_params)}
        local = self._local_target()
        self._master = None if all(t.dtype == torch.float32 for t in local) else [t.float() for t in local]

    @classmethod
    def replicated(cls, target: nn.Module, online: nn.Module) -> "TargetEncoder":
        """ZeRO 0-2: ``target`` is a full copy of ``online`` on the same device and dtype."""
        target.requires_grad_(False)
        names, target_params = zip(*target.named_parameters())
        return cls(target, list(names), list(target_params), list(online.parameters()),
                   shard=lambda p: p.data.view(-1), layout=(0, 1))

    @classmethod
    def partitioned(cls, target: nn.Module, online: nn.Module, engine_config: dict[str, Any]) -> "TargetEncoder":
        """ZeRO-3: ``target`` (a full, unpartitioned copy of the online encoder's weights) is wrapped in an
        optimizer-less ZeRO-3 engine, which partitions it over the ranks like the online encoder."""
        import deepspeed
        import torch.distributed as dist

        target.requires_grad_(False)
        target_engine, _, _, _ = deepspeed.initialize(model=target, config=engine_config)
        names, target_params = zip(*target_engine.module.named_parameters())
        online_params = list(online.parameters())
        for name, t, o in zip(names, target_params, online_params):
            if t.ds_tensor.shape != o.ds_tensor.shape:
                raise ValueError(f"target partition of {name} is {tuple(t.ds_tensor.shape)}, "
                                 f"online {tuple(o.ds_tensor.shape)}")
        return cls(target_engine, list(names), list(target_params), online_params,
                   shard=lambda p: p.ds_tensor.view(-1), layout=(dist.get_rank(), dist.get_world_size()))

    def _local_target(self) -> list[torch.Tensor]:
        return [self._shard(p) for p in self._target]

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        """target <- momentum * target + (1 - momentum) * online, on this rank's share of the weights."""
        online = [self._shard(p) for p in self._online]
        if self._master is None:
            ema_update_(self._local_target(), online, momentum)
            return
        ema_update_(self._master, [t.float() for t in online], momentum)
        torch._foreach_copy_(self._local_target(), self._master)

    def fp32_shards(self) -> dict[str, torch.Tensor]:
        """This rank's share of every parameter in fp32 (a ZeRO-3 partition keeps its padding)."""
        local = self._master if self._master is not None else self._local_target()
        return {name: t.detach().float() for name, t in zip(self._names, local)}

    def bytes_per_rank(self) -> int:
        """Bytes this rank holds for the target: its weights (or partitions) plus the fp32 master."""
        held = self._local_target() + (self._master or [])
        return sum(t.numel() * t.element_size() for t in held)

    def save(self, folder: str | Path, rank: int) -> None:
        """Writes this rank's shard (ZeRO 0-2: rank 0 writes the only one)."""
        if self._count == 1 and rank != 0:
            return
        out = Path(folder) / SHARD_DIR
        out.mkdir(parents=True, exist_ok=True)
        shards = {name: t.cpu().clone() for name, t in self.fp32_shards().items()}
        torch.save({"tensors": shards, "numels": self._numels},
                   out / f"shard_{self._index:05d}_of_{self._count:05d}.pt")

    @torch.no_grad()
    def load(self, folder: str | Path) -> None:
        """Loads shards saved by any number of ranks, re-slicing them to this rank's layout."""
        files = _shard_files(Path(folder) / SHARD_DIR)
        saved = [torch.load(path, map_location="cpu", weights_only=True) for path in files]
        local = self._local_target()
        for i, (name, current) in enumerate(zip(self._names, local)):
            numel = self._numels[name]
            if saved[0]["numels"].get(name) != numel:
                raise ValueError(f"checkpoint target {name} has {saved[0]['numels'].get(name)} elements, "
                                 f"model {numel}")
            if len(saved) == self._count:
                mine = saved[self._index]["tensors"][name]
            else:
                full = torch.cat([s["tensors"][name] for s in saved])[:numel]
                size = current.numel()
                mine = torch.zeros(size)
                start = min(self._index * size, numel)
                piece = full[start:start + size]
                mine[:piece.numel()] = piece
            current.copy_(mine.to(current.device, current.dtype))
            if self._master is not None:
                self._master[i].copy_(mine.to(current.device))
        log.info("EMA target loaded from %d shard(s) into shard %d of %d", len(saved), self._index, self._count)


def _shard_files(folder: Path) -> list[Path]:
    found = sorted((int(m.group(1)), int(m.group(2)), p) for p in folder.glob("shard_*_of_*.pt")
                   if (m := _SHARD_NAME.search(p.name)))
    if not found:
        raise FileNotFoundError(f"no EMA target shards in {folder}")
    count = found[0][1]
    if [i for i, _, _ in found] != list(range(count)) or any(c != count for _, c, _ in found):
        raise FileNotFoundError(f"incomplete EMA target shards in {folder}: {[p.name for _, _, p in found]}")
    return [p for _, _, p in found]
