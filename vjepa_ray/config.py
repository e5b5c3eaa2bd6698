"""The configuration schema, and how a command line becomes a validated config.

The schema is a tree of dataclasses whose defaults are the published V-JEPA ViT-L/16 recipe
(facebookresearch/jepa ``configs/pretrain/vitl16.yaml``). A command merges, in order: the schema
defaults, a base YAML (``--config FILE``, or the built-in local demo), and dot-list overrides
(``section.key=value``). The result is validated once; every error names the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

MODEL_NAMES = ("vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge", "vit_giant")
PRECISIONS = ("fp32", "bf16", "fp16")


class ConfigError(ValueError):
    """A config value that cannot work. ``str(err)`` is one line that starts with the key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


@dataclass
class MetaConfig:
    name: str = "vjepa_vitl16"
    seed: int = 234


@dataclass
class RayConfig:
    # int, or [min, max] for an elastic run (Train V2 then resizes between the two).
    num_workers: Any = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    max_failures: int = 3
    storage_path: str = "~/vjepa_runs"
    # Joins this cluster; empty = RAY_ADDRESS / a running `ray start`, else a new local cluster.
    address: str = ""


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)
    # Sampling proportion of each entry of `paths` (empty = uniform over videos).
    weights: list[float] = field(default_factory=list)
    frames_per_clip: int = 16
    frame_step: int = 4
    # When set, the frame step follows the video: ceil(video_fps) // fps (V-JEPA 2 style).
    fps: Optional[float] = None
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


@dataclass
class ModelConfig:
    name: str = "vit_large"
    patch_size: int = 16
    tubelet_size: int = 2
    pred_depth: int = 12
    pred_embed_dim: int = 384
    # Predictor heads; None = the encoder's (V-JEPA 1).
    pred_num_heads: Optional[int] = None
    uniform_power: bool = True
    activation_checkpointing: bool = False


@dataclass
class MaskConfig:
    num_blocks: int = 8
    spatial_scale: list[float] = field(default_factory=lambda: [0.15, 0.15])
    temporal_scale: list[float] = field(default_factory=lambda: [1.0, 1.0])
    aspect_ratio: list[float] = field(default_factory=lambda: [0.75, 1.5])
    max_temporal_keep: float = 1.0
    max_keep: Optional[int] = None


def _default_masks() -> list[MaskConfig]:
    return [
        MaskConfig(num_blocks=8, spatial_scale=[0.15, 0.15]),  # short-range
        MaskConfig(num_blocks=2, spatial_scale=[0.7, 0.7]),  # long-range
    ]


@dataclass
class OptimizationConfig:
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
    # Global grad-norm clip; 0 disables it.
    clip_grad: float = 10.0
    # Clips per optimizer step over all workers; 0 = data.batch_size x workers.
    global_batch_size: int = 0


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    precision: str = "bf16"
    offload_optimizer: bool = False
    offload_params: bool = False
    # A raw DeepSpeed config merged over ours key by key (experts only).
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    num_to_keep: int = 2


@dataclass
class LoggingConfig:
    every_steps: int = 10
    # Warn when the spread of target features falls below this (a sign of collapse).
    collapse_std_threshold: float = 0.01


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
    label_fraction: float = 1.0
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
    # Expected masked fraction of each mask config (sets every config's spatial scale); [] keeps them.
    mask_ratio: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    # EMA momentum ranges, each [start, end].
    ema: list[list[float]] = field(default_factory=list)
    # The probe grid, trained in one pass per trial; [] = probe.lr / probe.weight_decay.
    probe_lr: list[float] = field(default_factory=list)
    probe_weight_decay: list[float] = field(default_factory=list)
    # Any other config key -> its values, e.g. {mask.0.num_blocks: [4, 8]}.
    space: dict[str, Any] = field(default_factory=dict)
    # Retries of a failed trial (its pretraining resumes from its last checkpoint).
    max_failures: int = 1
    # CPUs held by each trial's driver, which mostly waits: pretraining and probe run on their own workers.
    driver_cpus: float = 0.25
    # Local demo: when the probe manifests do not exist, write a labelled synthetic set with this many
    # training videos per class into their folder (a quarter as many, at least 2, for validation).
    synthetic_probe_videos: int = 0


@dataclass
class Config:
    meta: MetaConfig = field(default_factory=MetaConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: list[MaskConfig] = field(default_factory=_default_masks)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    tune: SweepConfig = field(default_factory=SweepConfig)


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
        raise ConfigError("--config", f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    except OmegaConfBaseException as err:
        raise _as_config_error(err) from None
    validate(cfg)
    return cfg


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


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def _check_range(values: list[float], key: str, low: float, high: float, low_open: bool = True) -> None:
    _check(len(values) == 2, key, f"expected [min, max], got {values}")
    lo, hi = values
    _check(lo <= hi, key, f"min {lo} is above max {hi}")
    lower_ok = lo > low if low_open else lo >= low
    _check(lower_ok and hi <= high, key, f"{values} is outside {'(' if low_open else '['}{low}, {high}]")


def validate(cfg: Config) -> None:
    """Values the schema's types cannot rule out. Raises ConfigError naming the key."""
    workers = cfg.ray.num_workers
    if isinstance(workers, (list, tuple)):
        _check(len(workers) == 2 and all(isinstance(w, int) for w in workers), "ray.num_workers",
               f"expected an int or [min, max], got {workers}")
        _check(1 <= workers[0] <= workers[1], "ray.num_workers", f"need 1 <= min <= max, got {workers}")
    else:
        _check(isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1,
               "ray.num_workers", f"expected an int >= 1 or [min, max], got {workers!r}")
    _check(cfg.ray.cpus_per_worker >= 1, "ray.cpus_per_worker", "must be >= 1")
    _check(cfg.ray.max_failures >= -1, "ray.max_failures", "must be >= 0, or -1 for no limit")

    d, m = cfg.data, cfg.model
    _check(m.name in MODEL_NAMES, "model.name", f"{m.name!r} is not one of {', '.join(MODEL_NAMES)}")
    _check(m.patch_size >= 1, "model.patch_size", "must be >= 1")
    _check(m.tubelet_size >= 1, "model.tubelet_size", "must be >= 1")
    _check(d.crop_size > 0 and d.crop_size % m.patch_size == 0, "data.crop_size",
           f"{d.crop_size} is not a positive multiple of model.patch_size {m.patch_size}")
    _check(d.frames_per_clip > 0 and d.frames_per_clip % m.tubelet_size == 0, "data.frames_per_clip",
           f"{d.frames_per_clip} is not a positive multiple of model.tubelet_size {m.tubelet_size}")
    _check(d.frame_step >= 1, "data.frame_step", "must be >= 1")
    _check(d.fps is None or d.fps > 0, "data.fps", "must be > 0")
    _check(d.clips_per_video >= 1, "data.clips_per_video", "must be >= 1")
    _check(d.batch_size >= 1, "data.batch_size", "must be >= 1")
    _check(not d.weights or len(d.weights) == len(d.paths), "data.weights",
           f"has {len(d.weights)} entries for {len(d.paths)} data.paths")
    _check(all(w >= 0 for w in d.weights) and (not d.weights or sum(d.weights) > 0), "data.weights",
           "must be non-negative with a positive sum")
    _check_range(d.random_resize_scale, "data.random_resize_scale", 0.0, 1.0)
    _check_range(d.random_resize_aspect_ratio, "data.random_resize_aspect_ratio", 0.0, math.inf)
    _check(d.decode_cpus > 0, "data.decode_cpus", "must be > 0")
    _check(d.decode_concurrency >= 0, "data.decode_concurrency", "must be >= 0")
    _check(d.chunk_size >= 1, "data.chunk_size", "must be >= 1")
    _check(d.decode_timeout_s > 0, "data.decode_timeout_s", "must be > 0")
    _check(m.pred_depth >= 1, "model.pred_depth", "must be >= 1")
    _check(m.pred_embed_dim >= 1, "model.pred_embed_dim", "must be >= 1")
    if m.pred_num_heads is not None:
        _check(m.pred_num_heads >= 1 and m.pred_embed_dim % m.pred_num_heads == 0, "model.pred_num_heads",
               f"{m.pred_num_heads} does not divide model.pred_embed_dim {m.pred_embed_dim}")

    _check(len(cfg.mask) >= 1, "mask", "needs at least one mask config")
    for i, mc in enumerate(cfg.mask):
        _check(mc.num_blocks >= 1, f"mask.{i}.num_blocks", "must be >= 1")
        _check_range(mc.spatial_scale, f"mask.{i}.spatial_scale", 0.0, 1.0)
        _check_range(mc.temporal_scale, f"mask.{i}.temporal_scale", 0.0, 1.0)
        _check_range(mc.aspect_ratio, f"mask.{i}.aspect_ratio", 0.0, math.inf)
        _check(0.0 < mc.max_temporal_keep <= 1.0, f"mask.{i}.max_temporal_keep", "must be in (0, 1]")
        _check(mc.max_keep is None or mc.max_keep >= 1, f"mask.{i}.max_keep", "must be >= 1")

    o = cfg.optimization
    _check(o.total_steps >= 1, "optimization.total_steps", "must be >= 1")
    _check(0 <= o.warmup_steps <= o.total_steps, "optimization.warmup_steps",
           f"{o.warmup_steps} is outside [0, optimization.total_steps]")
    _check(o.schedule_scale >= 1.0, "optimization.schedule_scale", "must be >= 1")
    for key in ("start_lr", "lr", "final_lr", "weight_decay", "final_weight_decay", "eps", "clip_grad"):
        _check(getattr(o, key) >= 0, f"optimization.{key}", "must be >= 0")
    _check_range(o.ema, "optimization.ema", 0.0, 1.0, low_open=False)
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optimization.betas",
           f"expected two values in [0, 1), got {o.betas}")
    _check(o.global_batch_size >= 0, "optimization.global_batch_size", "must be >= 0")

    ds = cfg.deepspeed
    _check(ds.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", f"{ds.zero_stage} is not one of 0, 1, 2, 3")
    _check(ds.precision in PRECISIONS, "deepspeed.precision",
           f"{ds.precision!r} is not one of {', '.join(PRECISIONS)}")
    _check(cfg.checkpoint.every_steps >= 1, "checkpoint.every_steps", "must be >= 1")
    _check(cfg.checkpoint.num_to_keep >= 1, "checkpoint.num_to_keep", "must be >= 1")
    _check(cfg.logging.every_steps >= 1, "logging.every_steps", "must be >= 1")

    p = cfg.probe
    _check(len(p.lr) >= 1 and all(x > 0 for x in p.lr), "probe.lr", "needs one or more values > 0")
    _check(len(p.weight_decay) >= 1 and all(x >= 0 for x in p.weight_decay), "probe.weight_decay",
           "needs one or more values >= 0")
    _check(p.epochs >= 1, "probe.epochs", "must be >= 1")
    _check(0.0 < p.label_fraction <= 1.0, "probe.label_fraction", "must be in (0, 1]")
    _check(p.num_segments >= 1, "probe.num_segments", "must be >= 1")
    _check(p.num_views >= 1, "probe.num_views", "must be >= 1")
    _check(p.num_blocks >= 1, "probe.num_blocks", "must be >= 1")
    _check(p.num_classes >= 0, "probe.num_classes", "must be >= 0 (0 = from the manifests)")
    _check(p.num_heads >= 0, "probe.num_heads", "must be >= 0 (0 = the encoder's)")
    _check(p.finetune_lr_scale > 0, "probe.finetune_lr_scale", "must be > 0")
    _check(0 < p.layer_decay <= 1, "probe.layer_decay", "must be in (0, 1]")

    t = cfg.tune
    _check(t.num_samples >= 1, "tune.num_samples", "must be >= 1")
    _check(t.max_concurrent_trials >= 0, "tune.max_concurrent_trials", "must be >= 0 (0 = from the cluster)")
    _check(t.grace_period >= 0, "tune.grace_period", "must be >= 0 (0 = no early stopping)")
    _check(t.reduction_factor > 1, "tune.reduction_factor", "must be > 1")
    _check(all(0 < r < 1 for r in t.mask_ratio), "tune.mask_ratio", f"values must be in (0, 1), got {t.mask_ratio}")
    _check(all(x > 0 for x in t.lr), "tune.lr", f"values must be > 0, got {t.lr}")
    for i, ema in enumerate(t.ema):
        _check_range(ema, f"tune.ema.{i}", 0.0, 1.0, low_open=False)
    _check(all(x > 0 for x in t.probe_lr), "tune.probe_lr", f"values must be > 0, got {t.probe_lr}")
    _check(all(x >= 0 for x in t.probe_weight_decay), "tune.probe_weight_decay",
           f"values must be >= 0, got {t.probe_weight_decay}")
    for key, values in t.space.items():
        _check(isinstance(values, list) and len(values) >= 1, f"tune.space.{key}",
               f"expected a list of values, got {values!r}")
    _check(t.max_failures >= -1, "tune.max_failures", "must be >= 0, or -1 for no limit")
    _check(t.driver_cpus >= 0, "tune.driver_cpus", "must be >= 0")
    _check(t.synthetic_probe_videos >= 0, "tune.synthetic_probe_videos", "must be >= 0")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def from_dict(data: dict) -> Config:
    """Rebuilds a Config from `to_dict` output (as it travels to Ray workers or sits in a checkpoint)."""
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(data)))
    validate(cfg)
    return cfg


class OneLineArgumentParser(argparse.ArgumentParser):
    """Bad arguments end the command like a bad config does: one line on stderr, exit 2, no usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_arg_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The shared command line: ``--config FILE`` and ``section.key=value`` overrides."""
    parser = OneLineArgumentParser(
        prog=prog,
        description=description,
        epilog="Config sections: " + ", ".join(SECTIONS)
        + ". Override any key as section.key=value (lists as key=[a,b], mask configs as mask.0.num_blocks=4).",
    )
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="YAML config (default: the built-in local demo)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="dot-list overrides")
    return parser


def parse_cli(prog: str, description: str, argv: list[str] | None = None, default_config: str = "local_demo",
              check: Callable[[Config], None] | None = None) -> tuple[Config, argparse.Namespace]:
    """Parses a command line into a validated Config; on a bad config prints one line and exits 2.

    ``check`` is the command's own validation beyond the schema (raising ConfigError). With ``--dry-run``
    the resolved config is printed and the command exits 0 without starting anything.
    """
    parser = build_arg_parser(prog, description)
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config, print it resolved and exit (nothing starts)")
    args = parser.parse_args(argv)
    path = args.config if args.config is not None else builtin_config_path(default_config)
    try:
        cfg = load_config(path, args.overrides)
        if check is not None:
            check(cfg)
    except ConfigError as err:
        exit_on_config_error(prog, err)
    if args.dry_run:
        print(to_yaml(cfg), end="")
        print(f"# {prog}: config ok", file=sys.stderr)
        raise SystemExit(0)
    return cfg, args


def exit_on_config_error(prog: str, err: ConfigError) -> None:
    """One line on stderr, exit 2: how every command reports a config it cannot run."""
    print(f"{prog}: config error: {err}", file=sys.stderr)
    raise SystemExit(2)


def run_command(prog: str, description: str, argv: list[str] | None, check: Callable[[Config], None],
                run: Callable[[Config], Any]) -> Any:
    """The life of a Ray command (pretrain, evaluate, tune): parse and check the config, log at INFO, run.

    A ConfigError that ``run`` raises (something only found once running, e.g. a manifest without labels)
    ends the command as one found at parsing does: one line, exit 2.
    """
    cfg, _ = parse_cli(prog, description, argv, check=check)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return run(cfg)
    except ConfigError as err:
        exit_on_config_error(prog, err)
