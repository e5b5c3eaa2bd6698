"""Fault injection from outside the training code: ``python -m vjepa_ray.bench._faults [pretrain arguments]``.

It runs ``python -m vjepa_ray.pretrain`` with the same arguments, after joining the cluster with a job runtime
environment whose ``worker_process_setup_hook`` arms every worker process: while the file that
``$VJEPA_RAY_FAULT_EXIT_IN_SAVE`` names exists, the first rank to have written DeepSpeed's share of a checkpoint
removes it and dies, half-way through the save (the EMA target, RNG, train state and manifest not written), as a
worker lost in the middle of a save. The chaos bench and its test start their drivers this way.
"""

from __future__ import annotations

import logging
import os
import sys

EXIT_IN_SAVE_ENV = "VJEPA_RAY_FAULT_EXIT_IN_SAVE"

log = logging.getLogger(__name__)


def arm_exit_in_save() -> None:
    """The ``worker_process_setup_hook``: wraps the checkpoint's DeepSpeed component so that its save ends with
    the check above."""
    marker = os.environ.get(EXIT_IN_SAVE_ENV)
    if not marker:
        return
    from vjepa_ray.train.deepspeed_state import DeepSpeedState

    save = DeepSpeedState.save

    def save_then_exit_if_armed(self, folder, rank):
        save(self, folder, rank)
        try:
            os.unlink(marker)
        except FileNotFoundError:
            return
        log.warning("%s: exiting in the middle of a checkpoint save", EXIT_IN_SAVE_ENV)
        os._exit(1)

    DeepSpeedState.save = save_then_exit_if_armed


def main(argv: list[str] | None = None) -> int:
    import ray

    from vjepa_ray import pretrain

    # The job's runtime environment reaches every worker, Ray Train's included (their own variables join it).
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, runtime_env={
        "worker_process_setup_hook": f"{__package__}._faults.arm_exit_in_save",
        "env_vars": {EXIT_IN_SAVE_ENV: os.environ.get(EXIT_IN_SAVE_ENV, "")}})
    return pretrain.main(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
