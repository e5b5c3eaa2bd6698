"""On Ray Train: the run keeps the newest ``checkpoint.num_to_keep`` intact checkpoints (a damaged latest one is
emptied after the fallback, never kept in place of the intact one), a second driver on a live run folder stops
with exit 2 naming the owner, and once that driver is killed a rerun takes its lease over and resumes. On S3 (moto)
the same lease is checked at the end of test_storage_faults' outage run, which has a finished run there already.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

import pytest
from test_train_e2e import tiny_config

from vjepa_ray import runs
from vjepa_ray.config import builtin_config_path
from vjepa_ray.train import driver
from vjepa_ray.train.checkpoint import TRAIN_STATE
from vjepa_ray.train.lease import LEASE_FILE
from vjepa_ray.train.synthetic_stream import SyntheticClipStream

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A driver that holds the run folder's lease, as ``driver.run`` does, until it is killed.
HOLDER = ("import sys, time; from vjepa_ray.train.lease import RunLease; RunLease(sys.argv[1]).acquire(); "
          "print('held', flush=True); time.sleep(600)")


def _checkpoints(folder: str) -> dict[str, bool]:
    """The run's checkpoint folders -> whether each holds a checkpoint (False: emptied)."""
    return {name: runs.is_checkpoint(runs.join(folder, name)) for name in runs.list_checkpoints(folder)}


def refuse_a_second_driver_until_the_holder_is_killed(storage: str, name: str) -> int:
    """With a live driver holding run ``name``'s lease, ``pretrain`` on the same folder exits 2 at once with one line
    naming that owner; then the holder is killed (SIGKILL: its lease stays behind). Returns the holder's pid."""
    folder = runs.join(storage, name)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, folder], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": REPO})
    try:
        assert holder.stdout.readline().strip() == "held"
        command = [sys.executable, "-m", "vjepa_ray.pretrain", "--config", str(builtin_config_path("local_demo")),
                   f"meta.name={name}", f"ray.storage_path={storage}", "model.pred_depth=2"]
        second = subprocess.run(command, capture_output=True, text=True, timeout=600,
                                env={**os.environ, "PYTHONPATH": REPO})
        assert second.returncode == 2 and second.stdout == ""
        assert second.stderr.count("\n") == 1 and f"pid {holder.pid}" in second.stderr
        assert "meta.name" in second.stderr and "heartbeat" in second.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert runs.exists(runs.join(folder, LEASE_FILE))  # the killed driver's lease, left behind
    return holder.pid


def test_damaged_latest_is_emptied_intact_ones_kept_and_a_second_driver_waits_for_the_lease(ray_local, tmp_path,
                                                                                           caplog):
    storage = str(tmp_path / "runs")
    overrides = ["checkpoint.every_steps=2", "checkpoint.num_to_keep=3", "logging.every_steps=2"]
    first = driver.run(tiny_config(storage, "kept", *overrides, "optimization.total_steps=6"),
                       stream_factory=SyntheticClipStream)
    folder = runs.join(storage, "kept")
    assert first["status"] == "finished" and first["steps"] == 6
    assert _checkpoints(folder) == {"step_00000002": True, "step_00000004": True, "step_00000006": True}
    assert not runs.exists(runs.join(folder, LEASE_FILE))
    runs.delete_file(runs.join(folder, "step_00000006", TRAIN_STATE))  # the latest checkpoint, damaged

    holder_pid = refuse_a_second_driver_until_the_holder_is_killed(storage, "kept")
    # The rerun takes the dead driver's lease over, falls back on step 4 and saves twice (6 again, then 8).
    with caplog.at_level(logging.WARNING, logger="vjepa_ray.train.lease"):
        rerun = driver.run(tiny_config(storage, "kept", *overrides, "optimization.total_steps=8"),
                           stream_factory=SyntheticClipStream)
    assert any(f"pid {holder_pid}" in r.getMessage() and "taking over" in r.getMessage() for r in caplog.records)
    assert rerun["status"] == "finished" and rerun["steps"] == 8 and rerun["starts"][0]["step"] == 4
    kept = _checkpoints(folder)
    # The three newest intact ones: the one the rerun fell back on survives both saves. The damaged step 6 is
    # emptied, and step 2, rotated out, too: Ray Train's snapshot still names it, so its folder stays (a restarted
    # driver checks that the folders it names exist).
    assert [name for name, holds in kept.items() if holds] == ["step_00000004", "step_00000006_1", "step_00000008"]
    assert kept["step_00000006"] is False and kept["step_00000002"] is False
    assert rerun["checkpoint"].endswith("step_00000008")
