"""Which failures Ray Train retries: faults (a lost worker, a crash) yes, bad input no.

``ray.train.FailureConfig(max_failures)`` retries every worker error. A ``ConfigError`` raised on a worker
(a config value, or a corpus that does not decode: ``NoUsableVideosError``) fails the same way on every
restart, so ``StopOnInputError`` ends the run at the first one: a ``UserCallback`` that raises makes the
controller fail with a ``ControllerError``, which Ray Train does not retry. ``failure_cause`` turns what
``fit()`` raised into the one line a user reads.
"""

from __future__ import annotations

import ray.train

from vjepa_ray.config import ConfigError
from vjepa_ray.worker_env import hide_config_error_tracebacks


class StopOnInputError(ray.train.UserCallback):
    """Ends the run, without the retries ``max_failures`` allows, when a worker raised a ``ConfigError``."""

    def __init__(self, verbose: bool = False):
        self.verbose = verbose

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        for rank in sorted(worker_exceptions):
            error = worker_exceptions[rank]
            if isinstance(error, ConfigError):
                if not self.verbose:
                    hide_config_error_tracebacks()
                raise error


def failure_cause(error: Exception) -> tuple[str, bool]:
    """(one line saying why the run failed, whether the cause is bad input rather than a fault)."""
    if isinstance(error, ray.train.ControllerError):
        cause = error.controller_failure
    elif isinstance(error, ray.train.WorkerGroupError) and error.worker_failures:
        cause = error.worker_failures[min(error.worker_failures)]
    else:
        cause = error
    if isinstance(cause, ConfigError):
        return str(cause), True
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}", False
