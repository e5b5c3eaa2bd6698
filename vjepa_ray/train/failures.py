"""How a run ends early: which failures Ray Train retries (faults yes, bad input no), and a stop on purpose.

``ray.train.FailureConfig(max_failures)`` retries every worker error. A ``ConfigError`` raised on a worker
(a config value, or a corpus that does not decode: ``NoUsableVideosError``) fails the same way on every
restart, so ``StopOnInputError`` ends the run at the first one: a ``UserCallback`` that raises makes the
controller fail with a ``ControllerError``, which Ray Train does not retry. The same path ends a run on
purpose: a callback that calls ``stop_run`` at a report (a sweep's collapse rule does). ``failure`` turns
what ``fit()`` raised into what the run's summary says: the one line a user reads, and its kind.

A ``LossRegulationError`` (``recipe.regulation``: the loss kept rising above its recent range) ends the run the
same way: a restart resumes the last checkpoint with its loss history and replays the same batches, so it meets
the same losses and stops again.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NoReturn

import ray.train

from vjepa_ray.config import ConfigError
from vjepa_ray.recipe.regulation import LossRegulationError
from vjepa_ray.worker_env import hide_tracebacks

# What a restart raises again: Ray Train's retries would only repeat them.
NOT_RETRIED = (ConfigError, LossRegulationError)


class StopOnInputError(ray.train.UserCallback):
    """Ends the run, without the retries ``max_failures`` allows, when a worker raised a ``ConfigError`` or a
    ``LossRegulationError`` (``NOT_RETRIED``)."""

    def __init__(self, verbose: bool = False):
        self.verbose = verbose

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        for rank in sorted(worker_exceptions):
            error = worker_exceptions[rank]
            if isinstance(error, NOT_RETRIED):
                if not self.verbose:
                    hide_tracebacks(*NOT_RETRIED)
                raise error


class RunStopped(Exception):
    """Raised by a ``ray.train.UserCallback`` in ``after_report`` to end the run at that report, on purpose.

    Ray Train ends the run as it ends a failed one, through the controller's shutdown: the workers stop and
    their placement group is removed before ``fit()`` returns. ``metrics`` is the report that stopped it
    (rank 0's), which the run's summary keeps: Ray's result holds only the last checkpoint's.
    """

    def __init__(self, reason: str, metrics: dict[str, Any]):
        # Both as args: the exception travels from the controller to the driver by pickle.
        super().__init__(reason, metrics)

    @property
    def reason(self) -> str:
        return self.args[0]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.args[1]

    def __str__(self) -> str:
        return self.reason


def stop_run(reason: str, report: dict[str, Any]) -> NoReturn:
    """Ends the run at ``report``, from a callback's ``after_report``: raises ``RunStopped``, after telling this
    process (the controller) not to print its traceback, since the stop is no error (its log file keeps it)."""
    hide_tracebacks(RunStopped)
    raise RunStopped(reason, report)


@dataclasses.dataclass(frozen=True)
class Failure:
    """Why a run ended early: ``cause``, one line; ``kind``: ``input`` (a config or data error, not retried),
    ``regulation`` (a ``LossRegulationError``, not retried), ``stopped`` (a callback's ``RunStopped``, whose
    report is ``report``) or ``fault`` (anything else)."""

    cause: str
    kind: str
    report: dict[str, Any] | None = None


def failure(error: Exception) -> Failure:
    """What ``fit()`` raised (or the error that lost the controller), as the run's summary says it."""
    if isinstance(error, ray.train.ControllerError):
        cause = error.controller_failure
    elif isinstance(error, ray.train.WorkerGroupError) and error.worker_failures:
        cause = error.worker_failures[min(error.worker_failures)]
    else:
        cause = error
    if isinstance(cause, RunStopped):
        return Failure(cause.reason, "stopped", cause.metrics)
    if isinstance(cause, ConfigError):
        return Failure(str(cause), "input")
    if isinstance(cause, LossRegulationError):
        return Failure(f"{type(cause).__name__}: {cause}", "regulation")
    text = str(cause).strip().splitlines()
    return Failure(f"{type(cause).__name__}: {text[0] if text else ''}", "fault")
