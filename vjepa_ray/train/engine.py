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
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import torch
from torch import nn

from vjepa_ray.config import Config
from vjepa_ray.models.pretrained import StateDict
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


def deepspeed_config(cfg: Config, plan: BatchPlan, load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed config for this start of the run (batch sizes follow the world size)."""
    ds, o = cfg.deepspeed, cfg.optimization
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
        "gradient_clipping": o.clip_grad,
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


def build_engine(module: JepaModule, cfg: Config, ds_config: dict[str, Any]):
    """``deepspeed.initialize`` over the module with our optimizer; returns the engine."""
    import deepspeed

    optimizer = build_optimizer(module, cfg)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    log.info("DeepSpeed engine: ZeRO-%d, %s, %s", ds_config["zero_optimization"]["stage"],
             cfg.deepspeed.precision, "CPU offload" if cfg.deepspeed.offload_optimizer else "no offload")
    return engine


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

    The engine runs the forward and the backward, and steps the optimizer (clipping the gradient norm,
    ``gradient_clipping``) when the last micro batch of the step is in: it divides the loss by its
    accumulation steps and averages the gradient over the ranks itself. The EMA updates this rank's share
    of the target (its ZeRO-3 partition, or all of it). Whether a step is applied is decided inside the
    engine's step (``vjepa_ray.train.nonfinite.StepGate``; none under fp16, whose loss scaler decides).
    """

    def __init__(self, engine, target: TargetEncoder, cfg: Config, device: torch.device, dtype: torch.dtype):
        super().__init__(engine.module, target.module, engine.optimizer,
                         MaskCollator(cfg.mask, engine.module.encoder.grid), cfg.optimization, cfg.meta.seed,
                         device, dtype, family=cfg.model.family, clip_lengths=cfg.data.clip_lengths())
        self.engine, self.target = engine, target
        self.gate = None if cfg.deepspeed.precision == "fp16" else StepGate(base_optimizer(engine), device)

    def forward(self, groups: list[ClipGroup]) -> JepaOutput:
        return self.engine(groups, self.target_encoder)

    def backward(self, weighted_loss: torch.Tensor, num_micro_batches: int) -> None:
        if self.gate is not None:
            self.gate.note_loss(weighted_loss)
        self.engine.backward(weighted_loss)
        self.engine.step()

    def is_finite(self, outputs) -> bool:
        # Decided in the engine's step (``backward`` of the last micro batch), by the gate or by DeepSpeed first.
        return self.gate is None or self.gate.take()

    def optimizer_step(self) -> float | None:
        # The engine stepped in ``backward``; the norm is the one it computed there.
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def drop_gradients(self) -> float | None:
        # The engine cleared its gradient after the step it did not apply.
        return self.optimizer_step()

    def update_target(self, momentum: float) -> None:
        self.target.update(momentum)


class TrainStep:
    """One rank's engine, EMA target and step, and ``__call__``: the step over this rank's micro batches."""

    def __init__(self, cfg: Config, plan: BatchPlan, rank: int, device: torch.device,
                 load_universal: bool = False, initial_weights: Mapping[str, StateDict] | None = None):
        self.plan, self.rank = plan, rank
        dtype = PRECISION_DTYPES[cfg.deepspeed.precision]
        ds_config = deepspeed_config(cfg, plan, load_universal=load_universal)
        # Same seed (or the same initial weights, ``init_networks``) on every rank: identical initial
        # weights, which ZeRO-3 partitions as they are.
        module, target = init_networks(cfg, initial_weights)
        self.engine = build_engine(module, cfg, ds_config)
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
