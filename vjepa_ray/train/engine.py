"""The DeepSpeed side of a training step: the engine config, the trained module and the optimizer.

One DeepSpeed engine trains a module holding the context encoder and the predictor; the EMA target encoder
lives beside it (``vjepa_ray.train.ema``). The optimizer is ours (``optim.param_groups`` with AdamW), and the
LR/WD schedules are written into its groups before every step, so DeepSpeed's own scheduler stays unused.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from vjepa_ray import jepa, optim, schedules
from vjepa_ray.config import Config
from vjepa_ray.masks import MaskCollator
from vjepa_ray.train.elastic import BatchPlan
from vjepa_ray.train.ema import TargetEncoder

log = logging.getLogger(__name__)

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class JepaModule(nn.Module):
    """What DeepSpeed trains: the context encoder and the predictor; forward = one step's objective.

    Routing the whole step through ``engine(...)`` lets DeepSpeed's ZeRO-3 hooks see one root forward per
    micro batch (they gather and release parameters around it).
    """

    def __init__(self, encoder: nn.Module, predictor: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor

    def forward(self, clips: torch.Tensor, masks: Sequence[tuple[torch.Tensor, torch.Tensor]],
                target_encoder: nn.Module) -> jepa.JepaOutput:
        return jepa.jepa_loss(clips, masks, self.encoder, self.predictor, target_encoder)


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
    """``optim.adamw`` (no decay on biases and 1-D params); DeepSpeed's CPU Adam over the same groups when
    the optimizer is offloaded."""
    o = cfg.optimization
    if cfg.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(optim.param_groups(module.named_parameters(), o.weight_decay), adamw_mode=True,
                                lr=o.start_lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    return optim.adamw(module.named_parameters(), o)


def build_engine(module: JepaModule, cfg: Config, ds_config: dict[str, Any]):
    """``deepspeed.initialize`` over the module with our optimizer; returns the engine."""
    import deepspeed

    optimizer = build_optimizer(module, cfg)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    log.info("DeepSpeed engine: ZeRO-%d, %s, %s", ds_config["zero_optimization"]["stage"],
             cfg.deepspeed.precision, "CPU offload" if cfg.deepspeed.offload_optimizer else "no offload")
    return engine


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
    inner = engine.optimizer
    # DeepSpeed hands its (flat, partitioned) fp32 masters to our torch optimizer, wrapped one level deep.
    while hasattr(inner, "optimizer"):
        inner = inner.optimizer
    optimizer = count(p for g in inner.param_groups for p in g["params"])
    optimizer += count(v for state in inner.state.values() for v in state.values())
    return {"weights": weights, "optimizer": optimizer, "ema": target.bytes_per_rank(),
            "total": weights + optimizer + target.bytes_per_rank()}


class TrainStep:
    """One rank's models, DeepSpeed engine, EMA target and masks, and the optimizer step over them."""

    def __init__(self, cfg: Config, plan: BatchPlan, rank: int, device: torch.device,
                 load_universal: bool = False):
        from vjepa_ray.models import build_models

        self.cfg, self.plan, self.rank, self.device = cfg, plan, rank, device
        self.dtype = PRECISION_DTYPES[cfg.deepspeed.precision]
        self.ds_config = deepspeed_config(cfg, plan, load_universal=load_universal)
        # Same seed on every rank: identical initial weights (ZeRO-3 partitions them as they are).
        torch.manual_seed(cfg.meta.seed)
        encoder, predictor = build_models(cfg)
        target = copy.deepcopy(encoder)
        self.engine = build_engine(JepaModule(encoder, predictor), cfg, self.ds_config)
        online = self.engine.module.encoder
        if cfg.deepspeed.zero_stage == 3:
            self.target = TargetEncoder.partitioned(target, online, target_engine_config(self.ds_config))
        else:
            self.target = TargetEncoder.replicated(target.to(device, self.dtype), online)
        self.collator = MaskCollator(cfg.mask, encoder.grid)

    def __call__(self, batches: Iterator, step: int, meter=None) -> dict[str, float]:
        """Optimizer step ``step`` (0-based) over ``plan.grad_accum`` micro batches from ``batches``;
        returns the schedules' values it used. ``meter`` (an ``IntervalMeter``) times and sums it."""
        o = self.cfg.optimization
        values = {"lr": schedules.lr_at(step, o), "wd": schedules.weight_decay_at(step, o),
                  "momentum": schedules.ema_momentum_at(step, o)}
        optim.apply_schedules(self.engine.optimizer, values["lr"], values["wd"])
        for micro, size in enumerate(self.plan.micro_batches(self.rank)):
            if meter is not None:
                with meter.waiting():
                    batch = next(batches)
            else:
                batch = next(batches)
            # The stream yields the largest micro batch of any rank; an uneven split takes fewer here.
            clips = jepa.normalize_clips(batch.clips[:size].to(self.device, non_blocking=True), self.dtype)
            masks = [(c.to(self.device), t.to(self.device)) for c, t in
                     self.collator(size, seed=(self.cfg.meta.seed, step, micro), rank=self.rank)]
            out = self.engine(clips, masks, self.target.module)
            self.engine.backward(out.loss * self.plan.loss_weight(size))
            self.engine.step()
            if meter is not None:
                meter.add_micro_step(out.loss.detach(), out.per_mask_losses, out.target_features_std,
                                     clips=size, skipped=sum(batch.skipped.values()))
        self.target.update(values["momentum"])
        if meter is not None:
            norm = self.engine.get_global_grad_norm()
            meter.add_step(None if norm is None else float(norm))
        return values
