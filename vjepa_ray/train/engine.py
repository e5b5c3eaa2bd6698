"""The recipe's training step on DeepSpeed: the engine config, the engine, and the step adapter.

One DeepSpeed engine trains the ``JepaModule`` (context encoder and predictor); the EMA target encoder lives
beside it (``vjepa_ray.train.target_encoder``). The optimizer is the recipe's (``param_groups`` with AdamW),
and the step writes the LR/WD schedules into its groups, so DeepSpeed's own scheduler stays unused.
``DeepSpeedStep`` is ``vjepa_ray.recipe.step.JepaStep`` with the engine doing forward, backward and the
optimizer step; ``TrainStep`` feeds it one rank's micro batches from the data stream.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import nn

from vjepa_ray.config import Config, ConfigError
from vjepa_ray.models.families import get_family
from vjepa_ray.recipe.clipping import GradClipping
from vjepa_ray.recipe.masks import MaskCollator
from vjepa_ray.recipe.objective import ClipGroup, JepaModule, JepaOutput
from vjepa_ray.recipe.optimizer import adamw, param_groups
from vjepa_ray.recipe.step import JepaStep, MicroBatch, StepOutput, init_networks, take_clips
from vjepa_ray.train.elastic import BatchPlan
from vjepa_ray.train.nonfinite import StepGate
from vjepa_ray.train.target_encoder import TargetEncoder

if TYPE_CHECKING:
    from vjepa_ray.data.pipeline import ClipBatch
    from vjepa_ray.train.metrics import IntervalMeter

log = logging.getLogger(__name__)

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` merged into a copy of ``base`` key by key: nested dicts merge, anything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_overrides(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def run_clipping(cfg: Config) -> GradClipping | None:
    return GradClipping.of(cfg.optimization, get_family(cfg.model.family))


def deepspeed_clips(clipping: GradClipping | None) -> bool:
    """Whether DeepSpeed's own ``gradient_clipping`` does the clipping: one norm over all, from step 0."""
    return clipping is not None and not clipping.per_module and clipping.start == 0


def check_clipping(cfg: Config) -> None:
    """Clipping per module, or from a later step, runs on the gradients DeepSpeed holds in memory: whole
    (ZeRO-0 in fp32) or as this rank's partitions (ZeRO-1/2/3 without optimizer offload); ConfigError
    otherwise."""
    clipping, ds = run_clipping(cfg), cfg.deepspeed
    if clipping is None or deepspeed_clips(clipping):
        return
    if ds.offload_optimizer or (ds.zero_stage == 0 and ds.precision != "fp32"):
        raise ConfigError("optimization.clip_grad_rule",
                          f"clipping per module or from step {clipping.start} needs the gradients in memory, not "
                          f"offloaded or in DeepSpeed's ZeRO-0 {ds.precision} optimizer; set "
                          "optimization.clip_grad_rule=global with optimization.clip_grad_start=0, or none")


def deepspeed_config(cfg: Config, plan: BatchPlan, load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed config for this start of the run (batch sizes follow the world size)."""
    ds, clipping = cfg.deepspeed, run_clipping(cfg)
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.ray.use_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.ray.use_gpu}
    config: dict[str, Any] = {
        # DeepSpeed wants micro x accumulation x world; with an uneven split (vjepa_ray.train.elastic) that is
        # a little more than the global batch, which DeepSpeed only uses for bookkeeping.
        "train_batch_size": plan.micro_batch * plan.grad_accum * plan.world_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        # Other rules clip in DeepSpeedStep.clip_gradients.
        "gradient_clipping": clipping.max_norm if deepspeed_clips(clipping) else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "initial_scale_power": 16},
        # Our AdamW is a plain torch optimizer; ZeRO wraps it after this opt-in.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        # Progress is logged by the training loop; DeepSpeed's own prints would interleave with it.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    return merge_overrides(config, ds.overrides)


def target_engine_config(train_config: dict[str, Any]) -> dict[str, Any]:
    """Config of the optimizer-less ZeRO-3 engine that shards the EMA target like the online encoder.

    Parameter persistence is off so every forward re-gathers from the partitions the EMA writes into.
    """
    config = {key: copy.deepcopy(train_config[key]) for key in
              ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
               "bf16", "fp16", "steps_per_print", "wall_clock_breakdown") if key in train_config}
    zero = {key: value for key, value in train_config["zero_optimization"].items() if key != "offload_optimizer"}
    zero.update(stage=3, stage3_param_persistence_threshold=0, stage3_model_persistence_threshold=0)
    config["zero_optimization"] = zero
    return config


def build_optimizer(module: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """``adamw`` (no decay on biases and 1-D params); DeepSpeed's CPU Adam over the same groups when the
    optimizer is offloaded."""
    o = cfg.optimization
    if cfg.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(param_groups(module.named_parameters(), o.weight_decay), adamw_mode=True,
                                lr=o.start_lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    return adamw(module.named_parameters(), o)


def build_engine(module: JepaModule, cfg: Config, ds_config: dict[str, Any], rank: int = 0):
    """``deepspeed.initialize`` over the module with our optimizer; returns the engine. Rank 0 says what it built."""
    import deepspeed

    if rank == 0 and not cfg.ray.use_gpu and not shm_op_built():
        log.info("DeepSpeed is building its CPU communication op (first run only, about 2 minutes on 2 cores)")
    optimizer = build_optimizer(module, cfg)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    if rank == 0:
        log.info("DeepSpeed engine: ZeRO-%d, %s, %s", ds_config["zero_optimization"]["stage"],
                 cfg.deepspeed.precision, "CPU offload" if cfg.deepspeed.offload_optimizer else "no offload")
    return engine


def shm_op_built() -> bool:
    """Whether DeepSpeed's CPU shared-memory op is compiled already (torch keeps JIT-built ops under
    ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions/<python and device tag>/<op>/``)."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    return any(root.glob("**/deepspeed_shm_comm*.so"))


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer at the bottom of the engine: DeepSpeed hands it its (flat, partitioned) fp32 masters,
    wrapped one level deep, or uses it as given (fp32 ZeRO-0)."""
    inner = engine.optimizer
    while hasattr(inner, "optimizer"):
        inner = inner.optimizer
    return inner


def state_bytes(engine, target: TargetEncoder) -> dict[str, int]:
    """Bytes this rank holds for the module's weights, the optimizer (fp32 masters + moments) and the EMA.

    Tensors are counted once by storage: with fp32 ZeRO-0 the optimizer's masters are the weights.
    """
    seen: set[int] = set()

    def count(tensors) -> int:
        total = 0
        for t in tensors:
            if torch.is_tensor(t) and t.numel() and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
        return total

    # ZeRO-3: the partition, plus the full weight while it stays gathered (DeepSpeed keeps small
    # "persistent" parameters gathered).
    params = list(engine.module.parameters())
    weights = count(p.data for p in params) + count(p.ds_tensor for p in params if hasattr(p, "ds_tensor"))
    inner = base_optimizer(engine)
    optimizer = count(p for g in inner.param_groups for p in g["params"])
    optimizer += count(v for state in inner.state.values() for v in state.values())
    return {"weights": weights, "optimizer": optimizer, "ema": target.bytes_per_rank(),
            "total": weights + optimizer + target.bytes_per_rank()}


class DeepSpeedStep(JepaStep):
    """``JepaStep`` on a DeepSpeed engine and a ``TargetEncoder``.

    The engine runs the forward and the backward, and steps the optimizer when the last micro batch of the
    step is in: it divides the loss by its accumulation steps and averages the gradient over the ranks
    itself. One norm over all gradients from step 0 is DeepSpeed's own ``gradient_clipping``; other rules
    clip here between that last backward and the optimizer step (``check_clipping`` says where they run).
    The EMA updates this rank's share of the target (its ZeRO-3 partition, or all of it).
    Whether a step is applied is decided inside the engine's step (``vjepa_ray.train.nonfinite.StepGate``;
    none under fp16, whose loss scaler decides). Loss regulation decides on the loss all-reduced over the ranks
    before the engine steps, and a step it holds back goes through the engine's step with the gate closed, so
    DeepSpeed's counters and gradient buffers move on as after any step.
    """

    def __init__(self, engine, target: TargetEncoder, cfg: Config, device: torch.device, dtype: torch.dtype):
        super().__init__(engine.module, target.module, engine.optimizer,
                         MaskCollator(cfg.mask, engine.module.encoder.grid), cfg.optimization, cfg.meta.seed,
                         device, dtype, clip_lengths=cfg.data.clip_lengths())
        self.engine, self.target = engine, target
        self.gate = None if cfg.deepspeed.precision == "fp16" else StepGate(base_optimizer(engine), device)

    def forward(self, groups: list[ClipGroup]) -> JepaOutput:
        return self.engine(groups, self.target_encoder)

    def backward(self, weighted_loss: torch.Tensor, num_micro_batches: int) -> None:
        if self.gate is not None:
            self.gate.note_loss(weighted_loss)
        self.engine.backward(weighted_loss)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # DeepSpeed only counts a micro step; the last one steps in optimizer_step

    def step_loss(self, micro_batches, outputs) -> float:
        # This rank's share, averaged over the ranks as the engine averages the gradient: one value everywhere.
        loss = torch.tensor([super().step_loss(micro_batches, outputs)], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(loss)
        return float(loss) / torch.distributed.get_world_size()

    def clip_gradients(self, step: int) -> float | None:
        if deepspeed_clips(self.clipping) or self.clipping is None or not self.clipping.clips_at(step):
            return None
        modules = [self.module.encoder, self.module.predictor]
        if self.engine.zero_optimization_stage() == 0:  # every rank holds the whole averaged gradient
            return self.clipping.clip_(modules)
        return clip_partitions_(self.clipping, gradient_partitions(self.engine, modules), len(modules), self.device)

    def optimizer_step(self, step: int) -> float | None:
        norm = self.clip_gradients(step)
        self.engine.step()
        if norm is not None:
            return norm
        # The norm DeepSpeed computed while stepping, where it did.
        ds_norm = self.engine.get_global_grad_norm()
        return None if ds_norm is None else float(ds_norm)

    def apply_gradients(self, step: int, outputs, skip: bool = False) -> tuple[float | None, bool]:
        # The gate around the engine's optimizer (or DeepSpeed before it) decides inside the engine's step; a
        # skip (every rank's alike) closes it first. fp16 has no gate, and pretraining refuses regulation there.
        if skip:
            self.gate.close()
        norm = self.optimizer_step(step)
        return norm, self.gate is None or self.gate.take()

    def update_target(self, momentum: float) -> None:
        self.target.update(momentum)


GradientPiece = tuple[int, torch.Tensor, Callable[[torch.Tensor], None]]


def gradient_partitions(engine, modules: list[nn.Module]) -> list[GradientPiece]:
    """This rank's pieces of the averaged gradient after the step's last backward, before the optimizer step:
    (index of the module in ``modules``, piece, a function that writes the piece back). ZeRO-1/2 keep them
    per parameter group (``averaged_gradients``, aligned with ``params_in_partition``); ZeRO-3 per parameter
    (``safe_get_local_grad``)."""
    owner = {id(p): k for k, module in enumerate(modules) for p in module.parameters()}
    if engine.zero_optimization_stage() == 3:
        from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

        pieces = []
        for param in (p for module in modules for p in module.parameters() if p.requires_grad):
            grad = safe_get_local_grad(param)
            if grad is not None and grad.numel():
                pieces.append((owner[id(param)], grad, lambda value, p=param: safe_set_local_grad(p, value)))
        return pieces
    optimizer = engine.optimizer
    return [(owner[id(param)], grad, grad.copy_) for group, params in enumerate(optimizer.params_in_partition)
            for grad, param in zip(optimizer.averaged_gradients[group], params)]


def clip_partitions_(clipping: GradClipping, pieces: list[GradientPiece], num_modules: int,
                     device: torch.device) -> float:
    """``clipping`` applied to gradient pieces spread over the ranks: the squared norms of every rank's pieces
    of a module sum to the module's squared norm. Scales the pieces as ``clip_grad_norm_`` scales whole
    gradients (coefficient ``max_norm / (norm + 1e-6)``, at most 1); returns the norm of the whole gradient
    before clipping."""
    squares = torch.zeros(num_modules, dtype=torch.float32, device=device)
    for k, grad, _ in pieces:
        squares[k] += grad.detach().float().pow(2).sum().to(device)
    torch.distributed.all_reduce(squares)
    norms = squares.sqrt() if clipping.per_module else squares.sum().sqrt().expand(num_modules)
    coefficients = (clipping.max_norm / (norms + 1e-6)).clamp(max=1.0)
    for k, grad, write in pieces:
        write(grad * coefficients[k].to(grad.device, grad.dtype))
    return float(squares.sum().sqrt())


class TrainStep:
    """One rank's engine, EMA target and step, and ``__call__``: the step over this rank's micro batches."""

    def __init__(self, cfg: Config, plan: BatchPlan, rank: int, device: torch.device,
                 load_universal: bool = False, networks: tuple[JepaModule, nn.Module] | None = None):
        """``networks``: the trained module and the target encoder from ``init_networks``, which builds them
        from the seed when not given."""
        self.plan, self.rank = plan, rank
        dtype = PRECISION_DTYPES[cfg.deepspeed.precision]
        ds_config = deepspeed_config(cfg, plan, load_universal=load_universal)
        # Same seed (or the same initial weights, ``init_networks``) on every rank: identical initial
        # weights, which ZeRO-3 partitions as they are.
        module, target = networks if networks is not None else init_networks(cfg)
        self.engine = build_engine(module, cfg, ds_config, rank)
        online = self.engine.module.encoder
        if cfg.deepspeed.zero_stage == 3:
            self.target = TargetEncoder.partitioned(target, online, target_engine_config(ds_config))
        else:
            self.target = TargetEncoder.replicated(target.to(device, dtype), online)
        self.jepa_step = DeepSpeedStep(self.engine, self.target, cfg, device, dtype)

    def __call__(self, batches: Iterator[ClipBatch], step: int, meter: IntervalMeter | None = None) -> StepOutput:
        """Optimizer step ``step`` (0-based) over ``plan.grad_accum`` micro batches from ``batches``.
        ``meter`` times the waits for them and sums the step's losses and gradient norm."""
        sizes = self.plan.micro_batches(self.rank)
        # The recipe's step takes all micro batches of a step at once: they are fetched first.
        fetched = []
        for _ in sizes:
            with meter.waiting() if meter is not None else contextlib.nullcontext():
                fetched.append(next(batches))
        # The stream yields the largest micro batch of any rank; an uneven split takes fewer here.
        out = self.jepa_step([MicroBatch(take_clips(batch.clips, size), self.rank, micro, self.plan.loss_weight(size))
                              for micro, (batch, size) in enumerate(zip(fetched, sizes))], step)
        if meter is not None:
            for batch, size, micro_out in zip(fetched, sizes, out.outputs):
                meter.add_micro_step(micro_out.loss, micro_out.per_mask_losses, micro_out.target_features_std,
                                     clips=size, skipped=sum(batch.skipped.values()))
            meter.add_step(out.grad_norm)
        return out
