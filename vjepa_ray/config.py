"""The configuration schema: sections with their defaults and checks, and how a config is read and written.

The schema is a tree of dataclasses whose defaults are the published V-JEPA ViT-L/16 recipe
(facebookresearch/jepa ``configs/pretrain/vitl16.yaml``). ``load_config`` merges, in order: the schema
defaults, a base YAML, and dot-list overrides (``section.key=value``). The result is validated once:
each section checks its own fields (``validate(key)``, ``key`` being where the section sits, e.g.
``mask.1``), then ``Config.validate`` checks what spans sections. Every error names the full key.
The command line around this lives in ``vjepa_ray.cli``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

PRECISIONS = ("fp32", "bf16", "fp16")


class ConfigError(ValueError):
    """A config value that cannot work. ``str(err)`` is one line that starts with the key."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")

    def __reduce__(self):  # raised on a Ray worker, it reaches the driver whole
        return type(self), (self.key, self.message)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


class _SectionChecks:
    """Checks on the fields of one section; an error names the field by its full key (``section.field``)."""

    def __init__(self, section: str):
        self.section = section

    def require(self, ok: bool, name: str, message: str) -> None:
        _require(ok, f"{self.section}.{name}", message)

    def range(self, name: str, values: list[float], low: float, high: float, low_open: bool = True) -> None:
        """``values`` is [min, max] within (low, high], or [low, high] when not ``low_open``."""
        self.require(len(values) == 2, name, f"expected [min, max], got {values}")
        lo, hi = values
        self.require(lo <= hi, name, f"min {lo} is above max {hi}")
        lower_ok = lo > low if low_open else lo >= low
        self.require(lower_ok and hi <= high, name, f"{values} is outside {'(' if low_open else '['}{low}, {high}]")


@dataclass
class MetaConfig:
    name: str = "vjepa_vitl16"
    seed: int = 234


@dataclass
class RayConfig:
    # int, or [min, max] for an elastic run (Train V2 then resizes between the two).
    num_workers: Any = 1
    use_gpu: bool = False
    # CPUs each Train worker reserves; fractional (e.g. 0.25) packs several workers onto a CPU, as on a node
    # whose accelerators do the math.
    cpus_per_worker: float = 1.0
    max_failures: int = 3
    storage_path: str = "~/vjepa_runs"
    # Joins this cluster; empty = RAY_ADDRESS / a running `ray start`, else a new local cluster.
    address: str = ""
    # How often an elastic run that has fewer than its most workers checks whether more would fit now.
    elastic_resize_interval_s: float = 60.0
    # Ray node labels the Train workers require, e.g. {vjepa-role: train}, to keep them off decode nodes.
    worker_label_selector: dict[str, str] = field(default_factory=dict)
    # Custom resources every Train worker requires beside its CPUs (and GPU), e.g. {train_slot: 1}.
    worker_resources: dict[str, float] = field(default_factory=dict)

    def worker_range(self) -> tuple[int, int]:
        """(min, max) workers; equal for a fixed-size run."""
        if isinstance(self.num_workers, (list, tuple)):
            return int(self.num_workers[0]), int(self.num_workers[1])
        return int(self.num_workers), int(self.num_workers)

    def worker_threads(self) -> int:
        """Threads of a worker's math: Ray sets ``OMP_NUM_THREADS`` to its whole CPUs, at least one."""
        return max(1, int(self.cpus_per_worker))

    def validate(self, key: str) -> None:
        check = _SectionChecks(key)
        workers = self.num_workers
        if isinstance(workers, (list, tuple)):
            check.require(len(workers) == 2 and all(isinstance(w, int) for w in workers), "num_workers",
                          f"expected an int or [min, max], got {workers}")
            check.require(1 <= workers[0] <= workers[1], "num_workers", f"need 1 <= min <= max, got {workers}")
        else:
            check.require(isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1,
                          "num_workers", f"expected an int >= 1 or [min, max], got {workers!r}")
        check.require(math.isfinite(self.cpus_per_worker) and self.cpus_per_worker > 0, "cpus_per_worker",
                      f"must be a number > 0, got {self.cpus_per_worker}")
        check.require(self.max_failures >= -1, "max_failures", "must be >= 0, or -1 for no limit")
        check.require(self.elastic_resize_interval_s > 0, "elastic_resize_interval_s", "must be > 0")


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)
    # Sampling proportion of each entry of `paths` (empty = uniform over videos).
    weights: list[float] = field(default_factory=list)
    frames_per_clip: int = 16
    # Frames per clip of each entry of `paths` (V-JEPA 2's dataset_fpcs); empty = frames_per_clip for all.
    frames_per_clip_per_source: list[int] = field(default_factory=list)
    frame_step: int = 4
    # When set, the frame step follows the video: ceil(video_fps) // fps (V-JEPA 2 style).
    fps: float | None = None
    clips_per_video: int = 1
    crop_size: int = 224
    batch_size: int = 24
    random_resize_scale: list[float] = field(default_factory=lambda: [0.3, 1.0])
    random_resize_aspect_ratio: list[float] = field(default_factory=lambda: [0.75, 1.35])
    horizontal_flip: bool = True
    # Short videos are padded by repeating their last frame; false skips them instead.
    pad_short_videos: bool = True
    decode_cpus: float = 1.0
    # Decoder tasks in flight (0 = as many as the cluster's CPUs allow).
    decode_concurrency: int = 0
    # Ray node labels the decode tasks require, e.g. {node-type: cpu}, to keep decoding off GPU nodes.
    decode_label_selector: dict[str, str] = field(default_factory=dict)
    # Files per chunk of an epoch: the granularity at which a restart resumes the stream.
    chunk_size: int = 256
    max_file_bytes: int = 4 * 1024**3
    max_pixels: int = 7680 * 4320
    max_duration_s: float = 4 * 3600.0
    decode_timeout_s: float = 60.0
    # Local demo: generate this many synthetic videos into `paths[0]` when it is empty.
    synthetic_videos: int = 0

    def source_frames(self, source_index: int) -> int:
        """Frames per clip of the ``paths`` entry ``source_index``."""
        return self.frames_per_clip_per_source[source_index] if self.frames_per_clip_per_source \
            else self.frames_per_clip

    def clip_lengths(self) -> tuple[int, ...]:
        """The distinct frames-per-clip settings of the sources, ascending."""
        return tuple(sorted(set(self.frames_per_clip_per_source or [self.frames_per_clip])))

    def validate(self, key: str) -> None:
        check = _SectionChecks(key)
        check.require(self.frame_step >= 1, "frame_step", "must be >= 1")
        check.require(not self.frames_per_clip_per_source or len(self.frames_per_clip_per_source) == len(self.paths),
                      "frames_per_clip_per_source",
                      f"has {len(self.frames_per_clip_per_source)} entries for {len(self.paths)} {key}.paths")
        check.require(self.fps is None or self.fps > 0, "fps", "must be > 0")
        check.require(self.clips_per_video >= 1, "clips_per_video", "must be >= 1")
        check.require(self.batch_size >= 1, "batch_size", "must be >= 1")
        check.require(not self.weights or len(self.weights) == len(self.paths), "weights",
                      f"has {len(self.weights)} entries for {len(self.paths)} {key}.paths")
        check.require(all(w >= 0 for w in self.weights) and (not self.weights or sum(self.weights) > 0), "weights",
                      "must be non-negative with a positive sum")
        check.range("random_resize_scale", self.random_resize_scale, 0.0, 1.0)
        check.range("random_resize_aspect_ratio", self.random_resize_aspect_ratio, 0.0, math.inf)
        check.require(self.decode_cpus > 0, "decode_cpus", "must be > 0")
        check.require(self.decode_concurrency >= 0, "decode_concurrency", "must be >= 0")
        check.require(self.chunk_size >= 1, "chunk_size", "must be >= 1")
        check.require(self.decode_timeout_s > 0, "decode_timeout_s", "must be > 0")


@dataclass
class ModelConfig:
    # A registered family (vjepa_ray.models.families): vjepa1: fixed sin-cos position tables (V-JEPA 1);
    # vjepa2: 3D rotary embeddings in every attention block (V-JEPA 2.0); vjepa2_1: V-JEPA 2.1's models
    # (hierarchical norms, modality embeddings, a predictor of four levels and of the context tokens), whose
    # encoders are 12, 24, 40 or 48 blocks deep.
    family: str = "vjepa1"
    name: str = "vit_large"
    patch_size: int = 16
    tubelet_size: int = 2
    pred_depth: int = 12
    pred_embed_dim: int = 384
    # Predictor heads; None = the encoder's (V-JEPA 1).
    pred_num_heads: int | None = None
    # The predictor's learned mask tokens; None = as the family counts them: one per mask config and clip length
    # (data.clip_lengths(); V-JEPA 2's release files hold 10), for vjepa2_1 one per mask config and data.paths
    # entry, as its release counts them.
    pred_num_mask_tokens: int | None = None
    uniform_power: bool = True
    activation_checkpointing: bool = False
    # Weights a new run starts from instead of a random init: a file in Meta's release layout or our export
    # (encoder, predictor, target encoder; a file without a target encoder starts the target as a copy of
    # the encoder), or a run folder. Only the run's first start reads it; a restart resumes its own checkpoint.
    init_from: str = ""

    def validate(self, key: str) -> None:
        # The registries, imported on use; like this module they import no torch, so reading and checking a
        # config (data tasks, the data doctor, --dry-run) never loads it.
        from vjepa_ray.models.families import FAMILIES
        from vjepa_ray.models.sizes import HIERARCHICAL_LAYERS, MODEL_SPECS

        check = _SectionChecks(key)
        check.require(self.family in FAMILIES, "family", f"{self.family!r} is not one of {', '.join(FAMILIES)}")
        check.require(self.name in MODEL_SPECS, "name", f"{self.name!r} is not one of {', '.join(MODEL_SPECS)}")
        depth = MODEL_SPECS[self.name][1]
        known = [name for name, spec in MODEL_SPECS.items() if spec[1] in HIERARCHICAL_LAYERS]
        check.require(not FAMILIES[self.family].hierarchical_norms or depth in HIERARCHICAL_LAYERS, "name",
                      f"{self.name} is {depth} blocks deep; {self.family}'s hierarchical levels are defined for "
                      f"depths {', '.join(map(str, HIERARCHICAL_LAYERS))} ({', '.join(known)})")
        check.require(self.patch_size >= 1, "patch_size", "must be >= 1")
        check.require(self.tubelet_size >= 1, "tubelet_size", "must be >= 1")
        check.require(self.pred_depth >= 1, "pred_depth", "must be >= 1")
        check.require(self.pred_embed_dim >= 1, "pred_embed_dim", "must be >= 1")
        if self.pred_num_heads is not None:
            check.require(self.pred_num_heads >= 1 and self.pred_embed_dim % self.pred_num_heads == 0,
                          "pred_num_heads",
                          f"{self.pred_num_heads} does not divide {key}.pred_embed_dim {self.pred_embed_dim}")
        if self.pred_num_mask_tokens is not None:
            check.require(self.pred_num_mask_tokens >= 1, "pred_num_mask_tokens", "must be >= 1")


@dataclass
class MaskConfig:
    num_blocks: int = 8
    spatial_scale: list[float] = field(default_factory=lambda: [0.15, 0.15])
    temporal_scale: list[float] = field(default_factory=lambda: [1.0, 1.0])
    aspect_ratio: list[float] = field(default_factory=lambda: [0.75, 1.5])
    max_temporal_keep: float = 1.0
    max_keep: int | None = None

    def validate(self, key: str) -> None:
        check = _SectionChecks(key)
        check.require(self.num_blocks >= 1, "num_blocks", "must be >= 1")
        check.range("spatial_scale", self.spatial_scale, 0.0, 1.0)
        check.range("temporal_scale", self.temporal_scale, 0.0, 1.0)
        check.range("aspect_ratio", self.aspect_ratio, 0.0, math.inf)
        check.require(0.0 < self.max_temporal_keep <= 1.0, "max_temporal_keep", "must be in (0, 1]")
        check.require(self.max_keep is None or self.max_keep >= 1, "max_keep", "must be >= 1")


def _default_masks() -> list[MaskConfig]:
    return [
        MaskConfig(num_blocks=8, spatial_scale=[0.15, 0.15]),  # short-range
        MaskConfig(num_blocks=2, spatial_scale=[0.7, 0.7]),  # long-range
    ]


@dataclass
class LossConfig:
    """The objective's terms (vjepa_ray.recipe.objective). A key left None takes the family's release value
    (vjepa_ray.models.families.ContextLoss); the release's own key names are given beside each."""

    # The loss is mean(|prediction - target|^loss_exp) / loss_exp: 1 is the L1 of every release (loss.loss_exp).
    loss_exp: float = 1.0
    # V-JEPA 2.1's dense context loss (families with one: model.family=vjepa2_1). Its weight lambda once warmed
    # up (model.lambda_value_vid; lambda_value_img on image ranks): 0.5.
    context_weight: float | None = None
    # [start, end] steps: lambda is 0 before start, rises linearly to context_weight at end, then holds
    # (Lambda_LinearWarmupHold's fixed 15000, 30000; [0, 0] holds it from the start: model.lambda_progressive
    # false). The cooldown schedule always holds it, as the release's cooldown does.
    context_warmup: list[int] | None = None
    # Divide each context token's error by the square root of its distance to the nearest target token
    # (loss.weight_distance_loss): true in the pretraining recipe; the release's cooldown sets false.
    context_distance_weighting: bool | None = None

    def validate(self, key: str) -> None:
        check = _SectionChecks(key)
        check.require(math.isfinite(self.loss_exp) and self.loss_exp > 0, "loss_exp", "must be a number > 0")
        check.require(self.context_weight is None or self.context_weight >= 0, "context_weight", "must be >= 0")
        if self.context_warmup is not None:
            warmup = self.context_warmup
            check.require(len(warmup) == 2 and 0 <= warmup[0] <= warmup[1], "context_warmup",
                          f"expected [start, end] steps with 0 <= start <= end, got {warmup}")

    def context_keys(self) -> list[str]:
        """The context-loss keys that are set."""
        return [name for name in ("context_weight", "context_warmup", "context_distance_weighting")
                if getattr(self, name) is not None]


# How the LR, weight decay and EMA momentum move over a run (vjepa_ray.recipe.schedules).
SCHEDULES = ("cosine", "constant", "cooldown")
# How gradients are clipped (vjepa_ray.recipe.clipping).
CLIP_GRAD_RULES = ("family", "per_module", "global", "none")


@dataclass
class OptimizationConfig:
    # cosine: V-JEPA 1. LR warmup start_lr -> lr, then a cosine to final_lr; weight decay a cosine
    #   weight_decay -> final_weight_decay; EMA momentum linear ema[0] -> ema[1].
    # constant: V-JEPA 2 pretraining. LR warmup start_lr -> lr, then lr held; weight decay and EMA momentum
    #   held at weight_decay and ema[0] (final_lr, final_weight_decay and ema[1] are not used).
    # cooldown: V-JEPA 2's anneal. No warmup (warmup_steps 0); LR linear lr -> final_lr; weight decay and EMA
    #   momentum held as in constant. Usually started from a pretraining run (checkpoint.start_from).
    schedule: str = "cosine"
    total_steps: int = 90_000
    warmup_steps: int = 12_000
    # Schedules run over schedule_scale * total_steps (the reference's ipe_scale), so training stops
    # before they reach their final values.
    schedule_scale: float = 1.25
    start_lr: float = 2e-4
    lr: float = 6.25e-4
    final_lr: float = 1e-6
    weight_decay: float = 0.04
    final_weight_decay: float = 0.4
    ema: list[float] = field(default_factory=lambda: [0.998, 1.0])
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # Gradient clipping: family (the family's release: V-JEPA 1 clips the encoder's and the predictor's norms
    # separately from 300 steps past the warmup, V-JEPA 2 never clips), per_module (those two norms
    # separately), global (one norm over both), or none. per_module and global clip from clip_grad_start on.
    clip_grad_rule: str = "family"
    # The largest gradient norm a clipping rule lets through; 0 disables clipping.
    clip_grad: float = 10.0
    clip_grad_start: int = 0
    # Clips per optimizer step over all workers; 0 = data.batch_size x workers.
    global_batch_size: int = 0
    # A step whose loss or gradient is not finite is skipped; this many in a row stop the run. A bad batch
    # or two is survivable, but a diverged run makes every step non-finite: 10 stops it within a few
    # seconds of wasted steps, and ten bad batches in a row are rarer than a divergence.
    max_nonfinite_steps: int = 10
    # Loss regulation (V-JEPA 2.1's, vjepa_ray.recipe.regulation): skip the update of a step whose loss is above
    # the mean + loss_reg_std_mult x the standard deviation of the last loss_reg_window applied steps' losses
    # (optimization.loss_reg_std_mult; None = off, as in the release's recipes). The loss is the step's over all
    # workers, so every worker skips alike (the release lets each rank decide on its own loss).
    loss_reg_std_mult: float | None = None
    # Applied steps whose losses are tracked; the rule waits for more than half of them
    # (optimization.loss_reg_num_tracking_steps).
    loss_reg_window: int = 300
    # The first step the rule may skip (optimization.loss_reg_min_epoch 50: its epoch > 50, epochs of 300 steps).
    loss_reg_start_step: int = 15_300
    # More skips than this over the run stop it (the release's MAX_REPEAT_COUNTS).
    loss_reg_max_skips: int = 10

    def validate(self, key: str) -> None:
        check = _SectionChecks(key)
        check.require(self.schedule in SCHEDULES, "schedule",
                      f"{self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        check.require(self.schedule != "cooldown" or self.warmup_steps == 0, "warmup_steps",
                      f"the cooldown schedule has no warmup: set 0 (got {self.warmup_steps})")
        check.require(self.total_steps >= 1, "total_steps", "must be >= 1")
        check.require(0 <= self.warmup_steps <= self.total_steps, "warmup_steps",
                      f"{self.warmup_steps} is outside [0, {key}.total_steps]")
        check.require(self.schedule_scale >= 1.0, "schedule_scale", "must be >= 1")
        check.require(self.clip_grad_rule in CLIP_GRAD_RULES, "clip_grad_rule",
                      f"{self.clip_grad_rule!r} is not one of {', '.join(CLIP_GRAD_RULES)}")
        check.require(self.clip_grad_start >= 0, "clip_grad_start", "must be >= 0")
        for name in ("start_lr", "lr", "final_lr", "weight_decay", "final_weight_decay", "eps", "clip_grad"):
            check.require(getattr(self, name) >= 0, name, "must be >= 0")
        check.range("ema", self.ema, 0.0, 1.0, low_open=False)
        check.require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
                      f"expected two values in [0, 1), got {self.betas}")
        check.require(self.global_batch_size >= 0, "global_batch_size", "must be >= 0")
        check.require(self.max_nonfinite_steps >= 1, "max_nonfinite_steps", "must be >= 1")
        check.require(self.loss_reg_std_mult is None or self.loss_reg_std_mult >= 0, "loss_reg_std_mult",
                      "must be >= 0, or null for no loss regulation")
        check.require(self.loss_reg_window >= 2, "loss_reg_window", "must be >= 2")
        check.require(self.loss_reg_start_step >= 0, "loss_reg_start_step", "must be >= 0")
        check.require(self.loss_reg_max_skips >= 0, "loss_reg_max_skips", "must be >= 0")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    precision: str = "bf16"
    offload_optimizer: bool = False
    offload_params: bool = False
    # A raw DeepSpeed config merged over ours key by key (experts only).
    overrides: dict[str, Any] = field(default_factory=dict)

    def validate(self, key: str) -> None:
        check = _SectionChecks(key)
        check.require(self.zero_stage in (0, 1, 2, 3), "zero_stage", f"{self.zero_stage} is not one of 0, 1, 2, 3")
        check.require(self.precision in PRECISIONS, "precision",
                      f"{self.precision!r} is not one of {', '.join(PRECISIONS)}")


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    # Intact checkpoints kept (damaged ones do not count, vjepa_ray.train.retention). Two or more: a restart
    # that finds the latest checkpoint damaged resumes from the one before.
    num_to_keep: int = 2
    # How long a checkpoint upload keeps retrying while the store is unreachable (bounded backoff).
    upload_retry_s: float = 300.0
    # A training checkpoint, or a run folder (its latest), that a new run starts from: weights, EMA target
    # and optimizer state, as V-JEPA 2's cooldown starts from pretraining. Step, schedules, data stream and
    # RNG start afresh; world size, clip size and batch split may differ. Only the run's first start reads
    # it; a restart resumes the run's own checkpoint.
    start_from: str = ""
    # Save a digest of the trained weights and Adam moments with every checkpoint, and fail a restore whose
    # state differs from it. Costs a gather of every parameter at each save and restore.
    verify_restore: bool = False

    def validate(self, key: str) -> None:
        check = _SectionChecks(key)
        check.require(self.every_steps >= 1, "every_steps", "must be >= 1")
        check.require(self.num_to_keep >= 2, "num_to_keep", f"must be >= 2 (got {self.num_to_keep}): a restart that "
                      "finds the latest checkpoint damaged falls back on the one before")
        check.require(self.upload_retry_s >= 0, "upload_retry_s", "must be >= 0")


@dataclass
class LoggingConfig:
    every_steps: int = 10
    # Warn when the spread of target features falls below this (a sign of collapse); a sweep stops a trial
    # that stays below it (tune.collapse_patience).
    collapse_std_threshold: float = 0.01
    # An MLflow tracking server (e.g. http://mlflow:5000) that every run logs to; empty = MLFLOW_TRACKING_URI,
    # or no tracking when that is unset too. Read once, by the command (vjepa_ray.tracking).
    mlflow_uri: str = ""
    # The MLflow experiment the runs go to; empty = meta.name.
    mlflow_experiment: str = ""
    # Everything Ray and DeepSpeed print (the command line's --verbose); off: our lines, Ray's dashboard address,
    # warnings and real failures.
    verbose: bool = False

    def validate(self, key: str) -> None:
        _SectionChecks(key).require(self.every_steps >= 1, "every_steps", "must be >= 1")


# probe.encoder_levels: the encoder's features alone, or every level of a family with several (2.1).
PROBE_ENCODER_LEVELS = ("last", "all")


@dataclass
class ProbeConfig:
    # Learning rates trained side by side on the same frozen features.
    lr: list[float] = field(default_factory=lambda: [1e-3])
    weight_decay: list[float] = field(default_factory=lambda: [0.01])
    epochs: int = 20
    batch_size: int = 4
    num_segments: int = 8
    num_views: int = 3
    num_blocks: int = 1
    # Probes per (lr, weight_decay) point, each from its own initialisation; the point's top-1 is their mean.
    # On small labelled sets one probe's top-1 moves with its initialisation alone more than most differences
    # between encoders (README, "Evaluation"), so comparisons average several.
    num_inits: int = 1
    label_fraction: float = 1.0
    # Training examples drawn afresh every epoch: a random-resized crop and a random clip start (true); or
    # fixed, as validation's: one center crop and one clip start per video, the same every epoch (false).
    train_augmentation: bool = True
    # Fixed training examples (train_augmentation false) are encoded once, in the first epoch, and their
    # tokens reused by every later epoch and every probe; they stay in the worker's memory (its examples x
    # segments x tokens x embed dim values).
    cache_features: bool = False
    finetune: bool = False
    # Fine-tuning: the encoder's LR is probe.lr x this, times layer_decay per block below the top.
    finetune_lr_scale: float = 0.1
    layer_decay: float = 0.75
    # The encoder: a weights file (Meta's layout or our export) or a run folder; weights under checkpoint_key.
    checkpoint: str = ""
    checkpoint_key: str = "target_encoder"
    train_manifest: str = ""
    val_manifest: str = ""
    # 0 = one more than the largest label in the manifests.
    num_classes: int = 0
    # Probe attention heads; 0 = the encoder's.
    num_heads: int = 0
    # What the probe reads of the encoder: "last", its features (its last level); or "all", V-JEPA 2.1's four
    # levels (the normalised outputs of its hierarchical blocks), their tokens side by side as the release's
    # multilevel frozen evals join their out_layers: 4 x the tokens, at the encoder's width.
    encoder_levels: str = "last"

    def validate(self, key: str) -> None:
        check = _SectionChecks(key)
        check.require(len(self.lr) >= 1 and all(x > 0 for x in self.lr), "lr", "needs one or more values > 0")
        check.require(len(self.weight_decay) >= 1 and all(x >= 0 for x in self.weight_decay), "weight_decay",
                      "needs one or more values >= 0")
        check.require(self.epochs >= 1, "epochs", "must be >= 1")
        check.require(0.0 < self.label_fraction <= 1.0, "label_fraction", "must be in (0, 1]")
        check.require(self.num_segments >= 1, "num_segments", "must be >= 1")
        check.require(self.num_views >= 1, "num_views", "must be >= 1")
        check.require(self.num_blocks >= 1, "num_blocks", "must be >= 1")
        check.require(self.num_inits >= 1, "num_inits", "must be >= 1")
        check.require(self.num_classes >= 0, "num_classes", "must be >= 0 (0 = from the manifests)")
        check.require(self.num_heads >= 0, "num_heads", "must be >= 0 (0 = the encoder's)")
        check.require(self.encoder_levels in PROBE_ENCODER_LEVELS, "encoder_levels",
                      f"expected one of {', '.join(PROBE_ENCODER_LEVELS)}, got {self.encoder_levels!r}")
        check.require(self.finetune_lr_scale > 0, "finetune_lr_scale", "must be > 0")
        check.require(0 < self.layer_decay <= 1, "layer_decay", "must be in (0, 1]")
        check.require(not (self.cache_features and self.train_augmentation), "cache_features",
                      f"needs fixed training examples: set {key}.train_augmentation=false (augmented examples "
                      "differ every epoch, so their tokens cannot be reused)")
        check.require(not (self.cache_features and self.finetune), "cache_features",
                      f"cannot be combined with {key}.finetune: the fine-tuned encoder changes every step")


@dataclass
class SweepConfig:
    """``python -m vjepa_ray.tune``: the grid of settings (every list is one axis of the grid)."""

    # Repeats of the grid; repeat i runs with meta.seed + i.
    num_samples: int = 1
    # Trials in flight; 0 = as many as the cluster's CPUs/GPUs hold.
    max_concurrent_trials: int = 0
    # ASHA: pretraining steps every trial runs before its loss is compared; 0 turns early stopping off.
    grace_period: int = 0
    reduction_factor: float = 2.0
    # The axes; None = not swept. Expected masked fraction of each mask config (sets every config's spatial
    # scale); None keeps them.
    mask_ratio: list[float] | None = None
    lr: list[float] | None = None
    # EMA momentum ranges, each [start, end].
    ema: list[list[float]] | None = None
    # The probe grid, trained in one pass per trial; [] = probe.lr / probe.weight_decay.
    probe_lr: list[float] = field(default_factory=list)
    probe_weight_decay: list[float] = field(default_factory=list)
    # Any other config key -> its values, e.g. {mask.0.num_blocks: [4, 8]}.
    space: dict[str, Any] = field(default_factory=dict)
    # Stop a trial whose target features stay below logging.collapse_std_threshold for this many pretraining
    # reports in a row (status "collapsed", no probe); 0 turns the collapse stop off.
    collapse_patience: int = 3
    # Retries of a failed trial (its pretraining resumes from its last checkpoint).
    max_failures: int = 1
    # CPUs held by each trial's driver, which mostly waits: pretraining and probe run on their own workers.
    driver_cpus: float = 0.25
    # Local demo: when the probe manifests do not exist, write a labelled synthetic set with this many
    # training videos per class into their folder, and as many for validation.
    synthetic_probe_videos: int = 0

    def validate(self, key: str) -> None:
        check = _SectionChecks(key)
        check.require(self.num_samples >= 1, "num_samples", "must be >= 1")
        check.require(self.max_concurrent_trials >= 0, "max_concurrent_trials", "must be >= 0 (0 = from the cluster)")
        check.require(self.grace_period >= 0, "grace_period", "must be >= 0 (0 = no early stopping)")
        check.require(self.reduction_factor > 1, "reduction_factor", "must be > 1")
        for name in ("mask_ratio", "lr", "ema"):
            # An axis without values would leave the grid without a point, not the setting unswept.
            check.require(getattr(self, name) != [], name, "is empty: give it one or more values, or leave it out")
        check.require(all(0 < r < 1 for r in self.mask_ratio or ()), "mask_ratio",
                      f"values must be in (0, 1), got {self.mask_ratio}")
        check.require(all(x > 0 for x in self.lr or ()), "lr", f"values must be > 0, got {self.lr}")
        for i, ema in enumerate(self.ema or ()):
            check.range(f"ema.{i}", ema, 0.0, 1.0, low_open=False)
        check.require(all(x > 0 for x in self.probe_lr), "probe_lr", f"values must be > 0, got {self.probe_lr}")
        check.require(all(x >= 0 for x in self.probe_weight_decay), "probe_weight_decay",
                      f"values must be >= 0, got {self.probe_weight_decay}")
        for name, values in self.space.items():
            check.require(isinstance(values, list) and len(values) >= 1, f"space.{name}",
                          f"expected a list of values, got {values!r}")
        check.require(self.collapse_patience >= 0, "collapse_patience", "must be >= 0 (0 = no collapse stop)")
        check.require(self.max_failures >= -1, "max_failures", "must be >= 0, or -1 for no limit")
        check.require(self.driver_cpus >= 0, "driver_cpus", "must be >= 0")
        check.require(self.synthetic_probe_videos >= 0, "synthetic_probe_videos", "must be >= 0")


@dataclass
class Config:
    meta: MetaConfig = field(default_factory=MetaConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: list[MaskConfig] = field(default_factory=_default_masks)
    loss: LossConfig = field(default_factory=LossConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    tune: SweepConfig = field(default_factory=SweepConfig)

    def validate(self) -> None:
        """Values the schema's types cannot rule out: each section's own checks, then those across sections.

        Raises ConfigError naming the key.
        """
        self.ray.validate("ray")
        self.data.validate("data")
        self.model.validate("model")
        _require(len(self.mask) >= 1, "mask", "needs at least one mask config")
        for i, mask in enumerate(self.mask):
            mask.validate(f"mask.{i}")
        self.loss.validate("loss")
        self.optimization.validate("optimization")
        self.deepspeed.validate("deepspeed")
        self.checkpoint.validate("checkpoint")
        self.logging.validate("logging")
        self.probe.validate("probe")
        self.tune.validate("tune")

        from vjepa_ray.models.families import FAMILIES

        context_keys = self.loss.context_keys()
        if context_keys and FAMILIES[self.model.family].context_loss is None:
            raise ConfigError(f"loss.{context_keys[0]}", f"model.family {self.model.family} has no context loss "
                              f"(families with one: "
                              f"{', '.join(name for name, f in FAMILIES.items() if f.context_loss is not None)})")
        _require(self.probe.encoder_levels != "all" or FAMILIES[self.model.family].hierarchical_norms,
                 "probe.encoder_levels", f"all reads the levels of a family with several (model.family="
                 f"{', '.join(name for name, f in FAMILIES.items() if f.hierarchical_norms)}); "
                 f"model.family {self.model.family}'s encoder has one")
        _require(not (self.model.init_from and self.checkpoint.start_from), "model.init_from",
                 "cannot be combined with checkpoint.start_from, whose checkpoint holds the weights already")
        # The clip must tile into whole patches and tubelets.
        d, m = self.data, self.model
        _require(d.crop_size > 0 and d.crop_size % m.patch_size == 0, "data.crop_size",
                 f"{d.crop_size} is not a positive multiple of model.patch_size {m.patch_size}")
        _require(d.frames_per_clip > 0 and d.frames_per_clip % m.tubelet_size == 0, "data.frames_per_clip",
                 f"{d.frames_per_clip} is not a positive multiple of model.tubelet_size {m.tubelet_size}")
        for frames in d.frames_per_clip_per_source:
            _require(frames > 0 and frames % m.tubelet_size == 0, "data.frames_per_clip_per_source",
                     f"{frames} is not a positive multiple of model.tubelet_size {m.tubelet_size}")

    def validate_pretraining(self) -> None:
        """What pretraining needs beyond ``validate`` (evaluation and export accept more: 2.1's encoders).

        Raises ConfigError naming the key.
        """
        from vjepa_ray.models.families import FAMILIES, get_family, pretrainable_families

        family = get_family(self.model.family)
        _require(family.pretrainable, "model.family",
                 f"{family.name} pretraining is not supported by the trainer yet; its encoders load for evaluate and "
                 f"export, and {', '.join(pretrainable_families())} pretrain")
        _require(self.optimization.loss_reg_std_mult is None or self.deepspeed.precision != "fp16",
                 "optimization.loss_reg_std_mult",
                 "loss regulation holds updates back through the trainer's step gate, which fp16 runs leave to "
                 "DeepSpeed's loss scaler: use bf16 or fp32")
        tableless = [f"model.family={name}" for name, other in FAMILIES.items()
                     if other.pretrainable and not other.positions.has_table]
        _require(len(self.data.clip_lengths()) == 1 or not family.positions.has_table,
                 "data.frames_per_clip_per_source",
                 f"clips of several lengths {list(self.data.clip_lengths())} need positions without a table "
                 f"({' or '.join(tableless)}): {family.name}'s predictor has a fixed position table")


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


def builtin_config_path(name: str) -> Path:
    """Path of a YAML shipped inside the package (``vjepa_ray/configs/<name>.yaml``)."""
    return Path(str(resources.files("vjepa_ray") / "configs" / f"{name}.yaml"))


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Schema defaults <- YAML file <- dot-list overrides, validated. Raises ConfigError."""
    merged = OmegaConf.structured(Config)
    try:
        if path is not None:
            loaded = OmegaConf.create(Path(path).expanduser().read_text())
            if not isinstance(loaded, DictConfig):
                raise ConfigError("--config", f"{path} does not hold a mapping of sections")
            merged = OmegaConf.merge(merged, loaded)
        for item in overrides:
            key, value = _split_override(item)
            # update() (unlike merging a dot-list) can address list items such as mask.0.num_blocks.
            OmegaConf.update(merged, key, value, merge=True, force_add=False)
        cfg = OmegaConf.to_object(merged)
    except OSError as err:
        raise ConfigError("--config", f"cannot read {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise ConfigError("--config", f"{path} is not valid YAML: {_yaml_problem(err)}") from None
    except OmegaConfBaseException as err:
        raise _as_config_error(err) from None
    cfg.validate()
    return cfg


def _yaml_problem(err: yaml.YAMLError) -> str:
    """What the parser found wrong and where (line and column count from 1)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def _split_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(item, "an override must look like section.key=value")
    if key.split(".")[0] not in SECTIONS:
        raise ConfigError(key, f"unknown section; expected one of {', '.join(SECTIONS)}")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(key, f"cannot parse the value {text!r}") from None
    return key, value


def _as_config_error(err: OmegaConfBaseException) -> ConfigError:
    key = getattr(err, "full_key", None) or "config"
    # OmegaConf messages span lines (with the object type and key repeated); keep the first.
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ConfigError(str(key), message)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def from_dict(data: dict) -> Config:
    """Rebuilds a Config from `to_dict` output (as it travels to Ray workers or sits in a checkpoint)."""
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(data)))
    cfg.validate()
    return cfg
