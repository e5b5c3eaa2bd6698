"""The process environment of the Ray workers that train and decode: allocator settings, console logging and
what a Train worker imports.

Ray runs a task, and Ray Train its training function, on a thread other than the worker process's main
thread. glibc gives such threads malloc arenas of their own, which hand freed memory back to the kernel
eagerly and fault it in again at the next allocation, so a step run there pays page faults and system time
that the same step on a main thread does not. One arena with fixed mmap and trim thresholds makes a worker
allocate as the main thread does. glibc reads these variables when a process starts, so they travel in the
workers' ``runtime_env``; other C libraries ignore them.
"""

from __future__ import annotations

import logging
import sys
import warnings

from vjepa_ray.config import ConfigError
from vjepa_ray.redaction import install_log_redaction

MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "1",
    # Buffers under 64 MiB (frames, activations of one layer) come from the heap, not fresh mmaps ...
    "MALLOC_MMAP_THRESHOLD_": str(64 << 20),
    # ... and up to 128 MiB of freed heap stays mapped for the next step instead of being faulted in again.
    "MALLOC_TRIM_THRESHOLD_": str(128 << 20),
}

# Ray Train 2.60 logs every `ray.train.report` at INFO, metrics dict included, under a logger named after its
# source file (so outside `ray.train`, where `RunConfig(logging_config=...)` would reach it).
_TRAIN_REPORT_LOGGER_MODULE = "ray.train.v2._internal.execution.context"


class HideTracebacks(logging.Filter):
    """Drops Ray Train's console records of the ``errors`` (the worker's "Error in training function", the
    controller's "Error in control loop iteration", each with a traceback): a ``ConfigError``, whose one line
    the driver prints, or a run a callback stopped on purpose (``vjepa_ray.train.failures.RunStopped``).

    Ray Train logs the worker's record inside the ``except`` block that caught the error, without
    ``exc_info``: the error being handled is the one the record is about."""

    def __init__(self, errors: tuple[type[BaseException], ...]):
        super().__init__()
        self.errors = errors

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return not isinstance(error, self.errors)


def hide_tracebacks(*errors: type[BaseException]) -> None:
    """Adds the filter for ``errors`` to the console handlers of Ray Train's logger in this process (a worker,
    the controller); its log files keep every record."""
    for handler in logging.getLogger("ray.train").handlers:
        console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
        if console and not any(isinstance(f, HideTracebacks) and f.errors == errors for f in handler.filters):
            handler.addFilter(HideTracebacks(errors))


def configure_worker_logging(verbose: bool = False) -> None:
    """The console of a Ray Train worker: our progress lines at INFO, Ray's warnings and errors, not Ray's
    per-report and per-dataset-execution INFO lines (one of each per report and per chunk on every rank), nor,
    unless ``verbose``, the traceback of a config or data error.

    Ray forwards worker output to the driver (and the job logs), so this is what a user reads there; its
    records carry no credentials (``vjepa_ray.redaction``).
    """
    if not verbose:
        hide_tracebacks(ConfigError)
    install_log_redaction()
    package = logging.getLogger("vjepa_ray")
    if not package.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)
        package.propagate = False
    # Ray Data logs the end of every execution (one per chunk of an epoch) at INFO; its warnings stay.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    report_module = sys.modules.get(_TRAIN_REPORT_LOGGER_MODULE)
    if report_module is not None:
        logging.getLogger(report_module.__file__).setLevel(logging.WARNING)
    # DeepSpeed's ZeRO calls a gather that torch deprecated; the warning is DeepSpeed's to act on, not the user's.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)


def import_deepspeed() -> None:
    """Imports DeepSpeed in a Train worker without MLflow.

    DeepSpeed's autotuner, a tool runs never use, imports MLflow at DeepSpeed's import wherever MLflow is
    installed, as it is beside this package's tracking. Every Train worker would then hold MLflow and what it
    pulls in (pandas, scipy, FastAPI: some 900 modules), although tracking runs on the driver: start-up time and
    memory that grow with the worker count. While DeepSpeed is imported, ``import mlflow`` fails (a ``None``
    entry in ``sys.modules``), which the autotuner takes for MLflow not being installed.
    """
    if "deepspeed" in sys.modules:
        return
    hide = "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None
    try:
        import deepspeed  # noqa: F401
    finally:
        if hide:
            del sys.modules["mlflow"]
