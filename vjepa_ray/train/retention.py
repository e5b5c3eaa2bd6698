"""Which checkpoints a run keeps: the newest ``checkpoint.num_to_keep`` intact ones, never a damaged one instead.

Ray Train's own rotation counts every checkpoint it registered. A damaged latest checkpoint that a restart
skipped (``vjepa_ray.train.recovery``) stays registered, so Ray would delete the intact checkpoint the run fell
back on and keep the damaged one. The run therefore rotates its checkpoints itself (Ray's ``num_to_keep`` is
unset): the restart that finds a checkpoint damaged empties it (``quarantine``), and after every new checkpoint
``CheckpointRetention`` (on the Train controller) empties all but the newest ``num_to_keep`` that hold one.

A checkpoint is emptied, not removed: Ray Train's run snapshot names every checkpoint it registered, and a
driver restarted on the run folder refuses to start when one of those folders is gone. Only ``step_*`` folders
directly under the run folder are touched: what the run itself wrote.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow.fs as pafs
from ray.train import UserCallback

from vjepa_ray import runs

log = logging.getLogger(__name__)


def empty_checkpoint(run_folder: str, name: str) -> None:
    """Deletes the files of the run's checkpoint folder ``name`` and keeps the (empty) folder."""
    if not name.startswith(runs.CHECKPOINT_PREFIX) or "/" in name:
        raise ValueError(f"{name!r} is not one of the run's checkpoint folders")
    fs, inner = runs.filesystem(runs.join(run_folder, name))
    fs.delete_dir_contents(inner, missing_dir_ok=True)
    if fs.get_file_info(inner).type == pafs.FileType.NotFound:
        fs.create_dir(inner)


def quarantine(run_folder: str, damaged: dict[str, str]) -> None:
    """Empties the damaged checkpoints a restart skipped (name -> what is wrong with it), logging each."""
    for name, problem in damaged.items():
        empty_checkpoint(run_folder, name)
        log.warning("emptied damaged checkpoint %s (%s): it no longer counts as one of checkpoint.num_to_keep",
                    runs.join(run_folder, name), problem)


def rotate(run_folder: str, num_to_keep: int) -> list[str]:
    """Keeps the newest ``num_to_keep`` checkpoints of the run and empties every checkpoint folder older than
    those (a partial one, from a save a lost worker left, included); returns the names emptied."""
    names = runs.list_checkpoints(run_folder)
    holding = [name for name in names if runs.is_checkpoint(runs.join(run_folder, name))]
    if len(holding) <= num_to_keep:
        return []
    oldest_kept = holding[-num_to_keep]
    old = [name for name in names if name < oldest_kept and runs.list_names(runs.join(run_folder, name))]
    for name in old:
        empty_checkpoint(run_folder, name)
    return old


class CheckpointRetention(UserCallback):
    """Rotates the run's checkpoints after every checkpoint Ray Train registered (on the Train controller)."""

    def __init__(self, run_folder: str, num_to_keep: int):
        self.run_folder, self.num_to_keep = run_folder, num_to_keep

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if checkpoint is None:
            return
        try:
            emptied = rotate(self.run_folder, self.num_to_keep)
        except OSError as err:  # the store may be away for a while: the next checkpoint rotates again
            log.warning("checkpoint.num_to_keep: could not rotate the run's checkpoints now (%s)", err)
            return
        if emptied:
            log.info("checkpoint.num_to_keep=%d: emptied %s", self.num_to_keep, ", ".join(emptied))
