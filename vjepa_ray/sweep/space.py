"""The sweep's grid: which config keys vary, and the config one trial runs with.

A trial's settings are a flat dict ``{key: value}``. Keys are config dot-keys (``optimization.lr``,
``mask.0.num_blocks``, ...) plus ``mask_ratio``, which sets the spatial scale of every mask config
(``vjepa_ray.sweep.mask_ratio``). Settings stay plain JSON values so Ray Tune can show, store and
restore them.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vjepa_ray.config import Config, ConfigError, from_dict, to_dict
from vjepa_ray.sweep.mask_ratio import apply_mask_ratio

MASK_RATIO = "mask_ratio"
# The axis of ``tune.num_samples``: repeats of a grid point with other seeds.
SEED = "meta.seed"


def token_grid(cfg: Config) -> tuple[int, int, int]:
    """(t, h, w) tokens of a clip, as the encoder cuts it."""
    side = cfg.data.crop_size // cfg.model.patch_size
    return cfg.data.frames_per_clip // cfg.model.tubelet_size, side, side


def sweep_axes(cfg: Config) -> dict[str, list[Any]]:
    """Every axis of the grid, in a stable order (the table's column order); empty axes left out."""
    t = cfg.tune
    axes: dict[str, list[Any]] = {}
    if t.mask_ratio:
        axes[MASK_RATIO] = list(t.mask_ratio)
    if t.lr:
        axes["optimization.lr"] = list(t.lr)
    if t.ema:
        axes["optimization.ema"] = [list(e) for e in t.ema]
    for key, values in t.space.items():
        if key in axes or key in (MASK_RATIO, SEED):
            raise ConfigError(f"tune.space.{key}", "is already an axis of its own in the tune section")
        axes[key] = list(values)
    if t.num_samples > 1:
        axes[SEED] = [cfg.meta.seed + i for i in range(t.num_samples)]
    return axes


def grid_point_keys(axes: dict[str, list[Any]]) -> list[str]:
    """The axes that make a grid point: every axis but the seed (a point's repeats differ only in it)."""
    return [key for key in axes if key != SEED]


def trial_config(base: Config, settings: dict[str, Any]) -> Config:
    """``base`` with one trial's settings applied and the probe grid taken from the tune section.

    ``mask_ratio`` is applied last, to the trial's own mask configs (their blocks may be swept too).
    """
    tree = OmegaConf.create(to_dict(base))
    for key, value in settings.items():
        if key == MASK_RATIO:
            continue
        try:
            if OmegaConf.select(tree, key, default=_MISSING) is _MISSING:
                raise ConfigError(f"tune.space.{key}", "is not a config key")
            OmegaConf.update(tree, key, value, merge=False)
        except OmegaConfBaseException as err:
            raise ConfigError(f"tune.space.{key}", str(err).splitlines()[0]) from None
    cfg = _validated(OmegaConf.to_container(tree), settings)
    if MASK_RATIO in settings:
        cfg.mask = apply_mask_ratio(cfg.mask, token_grid(cfg), float(settings[MASK_RATIO]))
    if cfg.tune.probe_lr:
        cfg.probe.lr = list(cfg.tune.probe_lr)
    if cfg.tune.probe_weight_decay:
        cfg.probe.weight_decay = list(cfg.tune.probe_weight_decay)
    return cfg


_MISSING = object()


def _validated(tree: dict, settings: dict[str, Any]) -> Config:
    try:
        return from_dict(tree)
    except ConfigError as err:
        message = str(err).removeprefix(f"{err.key}: ")
        raise ConfigError(err.key, f"{message} (with the sweep's settings {settings})") from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "tune.space"
        raise ConfigError(str(key), f"{str(err).splitlines()[0]} (with the sweep's settings {settings})") from None


def check_axes(cfg: Config, axes: dict[str, list[Any]]) -> None:
    """The grid has an axis and every value of every axis makes a valid config on its own (raises
    ConfigError naming the key)."""
    if not axes:
        raise ConfigError("tune", "the grid is empty: give values to tune.mask_ratio, tune.lr, tune.ema or "
                                  "tune.space, or tune.num_samples > 1")
    for key, values in axes.items():
        for value in values:
            trial_config(cfg, {key: value})
