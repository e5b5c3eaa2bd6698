"""Which checkpoint a (re)started run resumes from, and whether the run folder can serve this config at all.

Ray Train hands a restart its latest registered checkpoint (``ray.train.get_checkpoint()``), whole or not.
``open_intact`` checks it against its manifest (``vjepa_ray.train.manifest``) and, when it is damaged (a
truncated shard, a missing ``train_state.json``, a rank's share that never arrived), warns and takes the
newest intact one before it from the run folder, so that a damaged save costs the steps since the one before
instead of every attempt ``ray.max_failures`` allows. That needs ``checkpoint.num_to_keep >= 2``. The damaged
ones it skipped are emptied (``vjepa_ray.train.retention``): they must not take an intact one's place.

``check_run_folder`` runs on the driver before any worker starts: a run folder that refuses writes, or whose
checkpoints hold another model than the config asks for, is a one-line error naming the cause, and the
checkpoints stay as they are.
"""

from __future__ import annotations

import dataclasses
import logging
import posixpath
from contextlib import ExitStack
from pathlib import Path

import torch.distributed as dist
import yaml

from vjepa_ray import runs
from vjepa_ray.config import Config, ConfigError, ModelConfig
from vjepa_ray.train import manifest, retention
from vjepa_ray.train.checkpoint import CONFIG_FILE

log = logging.getLogger(__name__)

# Model keys that change how the model runs, not its weights.
RUNTIME_ONLY = {"activation_checkpointing"}


class NoIntactCheckpointError(RuntimeError):
    """Every checkpoint a restart could resume from is damaged."""


def open_intact(stack: ExitStack, latest, run_folder: str, rank: int) -> tuple[Path, str, list[str]]:
    """The local folder of the newest intact checkpoint at or before ``latest`` (a ``ray.train.Checkpoint``),
    open until ``stack`` closes; its name; and the names of the damaged ones skipped.

    Every rank calls it: rank 0 checks the candidates, newest first, and tells the others which to open.
    """
    import ray.train

    parent, latest_name = posixpath.split(latest.path.rstrip("/"))
    choice: list = [None]
    if rank == 0:
        choice = [_choose(stack, latest, parent, latest_name, run_folder)]
    dist.broadcast_object_list(choice, src=0)
    name, skipped, problems, folder = choice[0]
    if rank == 0 and name is not None:
        retention.quarantine(run_folder, skipped)
    if name is None:
        raise NoIntactCheckpointError(f"no intact checkpoint to resume from in {run_folder}: {problems}")
    if rank != 0:
        checkpoint = latest if name == latest_name else ray.train.Checkpoint(
            path=posixpath.join(parent, name), filesystem=latest.filesystem)
        folder = stack.enter_context(checkpoint.as_directory())
    return Path(folder), name, list(skipped)


def _choose(stack: ExitStack, latest, parent: str, latest_name: str, run_folder: str):
    """(name, skipped names with their first problem, problems, local folder) of the newest intact candidate;
    name None if none. Checkpoint folders emptied by the retention are no candidates."""
    import ray.train

    older = [name for name in runs.list_checkpoints(run_folder)
             if name < latest_name and runs.list_names(runs.join(run_folder, name))]
    skipped: dict[str, str] = {}
    found = []
    for name in [latest_name, *reversed(older)]:
        checkpoint = latest if name == latest_name else ray.train.Checkpoint(
            path=posixpath.join(parent, name), filesystem=latest.filesystem)
        with ExitStack() as attempt:
            folder = attempt.enter_context(checkpoint.as_directory())
            problems = manifest.problems(folder)
            if not problems:
                stack.enter_context(attempt.pop_all())  # keep it open for the restore
                if skipped:
                    log.warning("resuming from %s, the newest intact checkpoint", name)
                return name, skipped, "", str(folder)
        log.warning("checkpoint %s is damaged, skipping it: %s", name, "; ".join(problems[:5]))
        skipped[name] = problems[0]
        found.append(f"{name}: {problems[0]}")
    hint = "" if older else " (checkpoint.num_to_keep >= 2 keeps one to fall back on)"
    return None, skipped, "; ".join(found) + hint, None


def check_compatible(checkpoint_config: str, cfg: Config, where: str) -> None:
    """Raises ConfigError naming the first ``model.*`` key whose value differs between the config a
    checkpoint was saved with (``config.yaml``'s text) and ``cfg``: its weights would not fit."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    section = (yaml.safe_load(checkpoint_config) or {}).get("model") or {}
    # Keys a checkpoint predates take their defaults.
    saved = dataclasses.asdict(ModelConfig(**{k: v for k, v in section.items() if k in known}))
    wanted = dataclasses.asdict(cfg.model)
    for key in sorted(known - RUNTIME_ONLY):
        if saved[key] != wanted[key]:
            raise ConfigError(f"model.{key}", f"{where} holds a run trained with {saved[key]!r}, this config "
                              f"asks for {wanted[key]!r}; use another meta.name or the run's model settings")


def check_run_folder(cfg: Config) -> None:
    """What a run folder must allow before workers start: writes (``ray.storage_path``), and the model of
    its newest checkpoint that has a config."""
    folder = runs.run_dir(cfg)
    try:
        runs.check_writable(folder)
    except PermissionError as err:
        raise ConfigError("ray.storage_path", str(err)) from None
    for name in reversed(runs.list_checkpoints(folder)):
        config_file = runs.join(folder, name, CONFIG_FILE)
        if runs.is_file(config_file):
            check_compatible(runs.read_bytes(config_file).decode(), cfg, runs.join(folder, name))
            return
