"""Checkpoint size and write time per rank under ZeRO-3, checked against a formula on the files written.

``--world-size`` processes (gloo on the CPU, no Ray) each build the training step's DeepSpeed ZeRO-3 engine
and EMA target (``vjepa_ray.train.engine.TrainStep``) for ``--model``, take one optimizer step on synthetic
clips (so that Adam's moments exist) and save a checkpoint exactly as training does
(``vjepa_ray.train.checkpoint.Checkpointer.write`` of the components ``vjepa_ray.train.loop.register_run_state``
registers: DeepSpeed's model and optimizer states, the EMA target's shard, RNG, the data position, the train
state, config and a manifest with per-file SHA-256) into a node-local folder, as a Train worker does before Ray
copies it to storage. A small clip (``--frames``, ``--crop``) keeps the step
cheap; the parameter count does not depend on it, only the fixed position tables (buffers) do.

Figures, per rank:

- ``bytes_per_rank``: bytes on disk by kind (``module``: DeepSpeed's model states; ``optimizer``: its
  optimizer states; ``ema_target``; ``rng``; ``manifest``; ``other``: ``latest``, DeepSpeed's copy of
  ``zero_to_fp32.py``, train state, data position and config), and ``bytes_per_trained_parameter``: the total
  over the parameters this rank owns (trained / world size);
- ``formula_bytes_per_rank`` (``zero3_checkpoint_bytes``) and ``measured_vs_formula`` by kind;
- ``save_s``: seconds of the save (median over ``--repeats``), from a barrier to the rank's return, and
  ``save_mb_per_s`` (median over the ranks);
- ``recipe_models``: the formula for ViT-L/H/g at the recipe's clip and predictor on 8, 32 and 128 ranks,
  with the seconds a rank's save would take at ``save_mb_per_s``.

Baseline, in the same run, alternated with the saves (ABBA): each rank writes the same number of bytes as
one flat tensor with ``torch.save`` into the same filesystem (``plain_write_s``, ``plain_write_mb_per_s``),
so ``save_vs_plain_write`` is what the checkpoint's format, pickling of many tensors and digests cost over
the disk alone. Neither side calls fsync: a save returns once its bytes are in the page cache, as training's
does before Ray uploads the folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import socket
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from vjepa_ray.config import Config, load_config
from vjepa_ray.models.sizes import MODEL_SPECS

# torch, the models and the training modules are imported by the functions that use them:
# ``bench checkpoint --help`` reads the options without them.

log = logging.getLogger(__name__)

# What every rank's ZeRO-3 model states hold per parameter tensor besides its buffers: the tensor's name, its
# shape, and an empty placeholder in the module's state dict (this figure's ``measured_vs_formula`` checks it).
METADATA_BYTES_PER_TENSOR = 460
# fp32 master weights plus Adam's two moments, all fp32: DeepSpeed's optimizer state per trained parameter.
OPTIMIZER_BYTES_PER_PARAMETER = 12
EMA_BYTES_PER_PARAMETER = 4  # the EMA target is stored in fp32 (vjepa_ray.train.target_encoder)
RECIPE_MODELS = ("vit_large", "vit_huge", "vit_giant")
RECIPE_WORLD_SIZES = (8, 32, 128)


@dataclasses.dataclass(frozen=True)
class ModelSizes:
    """Element counts of a run's models: of every trained tensor (encoder + predictor), of the EMA target's
    (the encoder's) tensors, and of the buffers (the fixed position tables) in all."""

    trained: tuple[int, ...]
    target: tuple[int, ...]
    buffers: int

    @classmethod
    def of(cls, cfg: Config) -> "ModelSizes":
        """Counted on the meta device: no memory, so ViT-g counts as fast as ViT-tiny."""
        import torch

        from vjepa_ray.models import build_models

        with torch.device("meta"):
            encoder, predictor = build_models(cfg)
        trained = tuple(p.numel() for m in (encoder, predictor) for p in m.parameters())
        buffers = sum(b.numel() for m in (encoder, predictor) for b in m.buffers())
        return cls(trained, tuple(p.numel() for p in encoder.parameters()), buffers)

    @property
    def trained_total(self) -> int:
        return sum(self.trained)

    @property
    def target_total(self) -> int:
        return sum(self.target)


def zero3_checkpoint_bytes(sizes: ModelSizes, world_size: int) -> dict[str, int]:
    """Bytes one rank writes for a ZeRO-3 checkpoint, by kind (the small ``rng``, ``manifest`` and ``other``
    files left out), whatever the training precision.

    ZeRO-3 gives each rank ``ceil(n / world_size)`` elements of every parameter of ``n``. ``optimizer``: fp32
    master + Adam m and v of that partition; ``ema_target``: the EMA target's partition in fp32. ``module``:
    no weights (the fp32 masters are the weights; the bf16 copies are not saved), only what every rank writes
    whole: the buffers, kept in fp32, and each parameter's metadata.
    """
    def partition(numels: tuple[int, ...]) -> int:
        return sum(math.ceil(n / world_size) for n in numels)

    return {"module": 4 * sizes.buffers + METADATA_BYTES_PER_TENSOR * len(sizes.trained),
            "optimizer": OPTIMIZER_BYTES_PER_PARAMETER * partition(sizes.trained),
            "ema_target": EMA_BYTES_PER_PARAMETER * partition(sizes.target)}


def recipe_models(save_mb_per_s: float) -> dict[str, Any]:
    """``zero3_checkpoint_bytes`` for the recipe's large models (its clip, 16 x 224^2, and predictor) at
    ``RECIPE_WORLD_SIZES``, with the seconds one rank's save would take at ``save_mb_per_s``."""
    out: dict[str, Any] = {}
    for name in RECIPE_MODELS:
        sizes = ModelSizes.of(load_config(None, [f"model.name={name}"]))
        per_rank = {n: sum(zero3_checkpoint_bytes(sizes, n).values()) for n in RECIPE_WORLD_SIZES}
        out[name] = {"trained": sizes.trained_total, "target": sizes.target_total, "buffers": sizes.buffers,
                     "bytes_per_rank": per_rank,
                     "save_s_per_rank": {n: round(b / save_mb_per_s / 1e6, 2) for n, b in per_rank.items()}}
    return out


def file_kind(relative: str) -> str:
    """The kind (see the module docstring) of a file of one rank's checkpoint folder."""
    if relative.endswith("model_states.pt"):
        return "module"
    if relative.endswith("optim_states.pt"):
        return "optimizer"
    for prefix, kind in (("target_encoder/", "ema_target"), ("rng/", "rng"), ("manifest/", "manifest")):
        if relative.startswith(prefix):
            return kind
    return "other"


def bytes_by_kind(folder: Path) -> dict[str, int]:
    counted: Counter = Counter()
    for path in folder.rglob("*"):
        if path.is_file():
            counted[file_kind(path.relative_to(folder).as_posix())] += path.stat().st_size
    return dict(sorted(counted.items()))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="vit_base", choices=MODEL_SPECS)
    parser.add_argument("--world-size", type=int, default=2, help="ranks (processes), one CPU thread each")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"),
                        help="deepspeed.precision (default bf16, the recipe's)")
    parser.add_argument("--frames", type=int, default=8, help="frames per clip of the one training step")
    parser.add_argument("--crop", type=int, default=64, help="crop of the one training step")
    parser.add_argument("--repeats", type=int, default=3, help="saves, each alternated with a plain write")
    parser.add_argument("--dir", default=None,
                        help="where ranks write (default: the temporary folder, as training's node-local one)")


def _config(args: argparse.Namespace) -> Config:
    # The recipe's model and predictor (built-in defaults) at a small clip, ZeRO-3, one micro batch per rank.
    return load_config(None, [f"model.name={args.model}", f"data.frames_per_clip={args.frames}",
                              f"data.crop_size={args.crop}", "data.batch_size=1",
                              f"ray.num_workers={args.world_size}", "deepspeed.zero_stage=3",
                              f"deepspeed.precision={args.precision}"])


def _timed(write: Callable[[], object]) -> float:
    start = time.perf_counter()
    write()
    return time.perf_counter() - start


def _rank(rank: int, args: argparse.Namespace, port: int, workdir: str) -> None:
    """One rank: build, step, then ``--repeats`` rounds of a save and a plain write of as many bytes."""
    import torch
    import torch.distributed as dist

    from vjepa_ray.train.checkpoint import Checkpointer
    from vjepa_ray.train.elastic import global_batch_size, plan_batch
    from vjepa_ray.train.engine import TrainStep
    from vjepa_ray.train.loop import register_run_state
    from vjepa_ray.train.state import TrainState
    from vjepa_ray.train.synthetic_stream import SyntheticClipStream

    world_size = args.world_size
    # What a launcher would set; DeepSpeed reads LOCAL_RANK.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        cfg = _config(args)
        plan = plan_batch(global_batch_size(cfg), cfg.data.batch_size, world_size)
        step = TrainStep(cfg, plan, rank, torch.device("cpu"))
        data = dataclasses.replace(cfg.data, batch_size=plan.micro_batch)
        stream = SyntheticClipStream(data, cfg.meta.seed, rank, world_size)
        step(iter(stream), 0)
        state = TrainState(step=1, world_size=world_size, global_batch=plan.global_batch, zero_stage=3,
                           world_sizes=[world_size])
        checkpointer = Checkpointer(cfg, rank, world_size)
        register_run_state(checkpointer, step, stream, state, local_rank=rank)
        save_s: list[float] = []
        plain_s: list[float] = []
        sizes: dict[str, int] = {}
        for r in range(args.repeats):
            folder = Path(workdir) / f"save_{r}" / f"rank_{rank:05d}"
            plain = Path(workdir) / f"plain_{r}_rank_{rank:05d}.pt"
            # ABBA; the first round saves first, which gives the plain write its byte count.
            for side in ("save", "plain") if r % 2 == 0 else ("plain", "save"):
                dist.barrier()
                if side == "save":
                    folder.mkdir(parents=True)
                    save_s.append(_timed(functools.partial(checkpointer.write, folder)))
                    if not sizes:
                        sizes = bytes_by_kind(folder)
                        flat = torch.zeros(sum(sizes.values()), dtype=torch.uint8)
                else:
                    plain_s.append(_timed(functools.partial(torch.save, flat, plain)))
            dist.barrier()
            shutil.rmtree(folder)
            plain.unlink()
        result = {"bytes": sizes, "save_s": save_s, "plain_write_s": plain_s}
        (Path(workdir) / f"result_{rank:05d}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch.multiprocessing as mp

    cfg = _config(args)
    sizes = ModelSizes.of(cfg)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="vjepa_bench_checkpoint_", dir=args.dir)
    try:
        mp.start_processes(_rank, args=(args, port, workdir), nprocs=args.world_size, start_method="spawn")
        results = [json.loads((Path(workdir) / f"result_{r:05d}.json").read_text()) for r in range(args.world_size)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    log.info("saves took %s s, plain writes %s s", [r["save_s"] for r in results],
             [r["plain_write_s"] for r in results])
    formula = zero3_checkpoint_bytes(sizes, args.world_size)
    owned = sizes.trained_total / args.world_size
    save_s = [statistics.median(r["save_s"]) for r in results]
    plain_s = [statistics.median(r["plain_write_s"]) for r in results]
    totals = [sum(r["bytes"].values()) for r in results]
    save_mb_per_s = statistics.median(total / s / 1e6 for total, s in zip(totals, save_s))
    return {
        "figure": "checkpoint",
        "bytes_per_rank": [r["bytes"] for r in results],
        "total_bytes_per_rank": totals,
        "bytes_per_trained_parameter": [round(total / owned, 3) for total in totals],
        "formula_bytes_per_rank": formula,
        "measured_vs_formula": [{kind: round(r["bytes"].get(kind, 0) / expected, 4)
                                 for kind, expected in formula.items()} for r in results],
        "save_s": [round(s, 3) for s in save_s],
        "baseline": "torch.save of one flat tensor of the same bytes into the same folder, alternated with the saves",
        "plain_write_s": [round(s, 3) for s in plain_s],
        "plain_write_mb_per_s": [round(total / s / 1e6, 1) for total, s in zip(totals, plain_s)],
        "save_vs_plain_write": [round(a / b, 3) for a, b in zip(save_s, plain_s)],
        "save_mb_per_s": round(save_mb_per_s, 1),
        "recipe_models": recipe_models(save_mb_per_s),
        "runs": {"save_s": [r["save_s"] for r in results], "plain_write_s": [r["plain_write_s"] for r in results]},
        "parameters": {"trained": sizes.trained_total, "target": sizes.target_total, "buffers": sizes.buffers,
                       "trained_tensors": len(sizes.trained)},
        "settings": {"model": args.model, "world_size": args.world_size, "precision": args.precision,
                     "zero_stage": 3, "frames": args.frames, "crop": args.crop, "repeats": args.repeats,
                     "pred_depth": cfg.model.pred_depth, "pred_embed_dim": cfg.model.pred_embed_dim,
                     "threads_per_rank": 1, "filesystem": workdir.rsplit("/", 1)[0]},
    }
