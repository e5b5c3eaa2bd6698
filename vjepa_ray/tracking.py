"""Experiment tracking on an MLflow server: every pretraining run is an MLflow run; a sweep is a parent run
with one child run per trial.

The command reads the server once (``logging.mlflow_uri``, else ``MLFLOW_TRACKING_URI``) into an
``MlflowTarget`` and hands it down; nothing below the command reads the environment for it. A run logs
through ``RunLogger``, a Ray actor on the driver's node whose mailbox is the queue: the Train controller's
``MlflowCallback`` sends it every report without waiting, and the driver waits for it once, at the end, for
at most ``FINISH_TIMEOUT_S``. (Ray's ``MLflowLoggerCallback`` does not fit: it logs synchronously from Tune's
event loop, covers Tune trials but not a pretraining run of its own, and fails the experiment when the server
cannot be reached at setup.)

A server that cannot be reached never stops a run: a request gives up after a few seconds, the logger warns
once, skips calls for ``RETRY_AFTER_S`` after each failure, and the run's outcome counts what was not
logged. The MLflow run id is kept in the run folder (``mlflow_run_id``): a resumed run continues its MLflow
run rather than starting a second one.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from ray.train import UserCallback

from vjepa_ray import runs
from vjepa_ray.config import Config, ConfigError, to_dict
from vjepa_ray.redaction import install_log_redaction, redact

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"
PARENT_RUN_TAG = "mlflow.parentRunId"
# MLflow 3's UI opens an experiment of this kind on its training runs (else on GenAI traces).
EXPERIMENT_KIND_TAGS = {"mlflow.experimentKind": "custom_model_development"}
# The longest the driver waits for the logger at the end of a run (its pending calls, then the run's end).
FINISH_TIMEOUT_S = 10.0
# The longest a trial's logger waits for the sweep's logger to answer with the parent run's id.
PARENT_TIMEOUT_S = 60.0
# After a failed call the logger counts calls as not logged, without trying, for this long.
RETRY_AFTER_S = 30.0
# mlflow's defaults (120 s per request, 7 retries with backoff) would hold the logger for minutes per call.
# The logger's process sets these unless its environment has them (the driver passes its own on).
# No retries within a call: the logger's own pause (RETRY_AFTER_S) is the retry.
# mlflow prints each run's URL, the tracking URI's credentials included, unless told not to.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
            "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
# Errors the server answers with (a value it refuses): counted, but the server is there.
_REJECTIONS = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST"}
# mlflow's limits per log_batch request and per parameter value.
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
_PARAM_VALUE_CHARS = 6000


@dataclasses.dataclass(frozen=True)
class MlflowTarget:
    """Where a run logs: the server, the experiment, and for a sweep's trial the logger of the sweep's run
    (a ``RunLogger`` actor), which the trial's logger asks for the parent run's id."""

    uri: str
    experiment: str
    parent: Any = None

    def child_of(self, parent_logger: Any) -> MlflowTarget:
        return dataclasses.replace(self, parent=parent_logger)


def target_from_command(cfg: Config) -> MlflowTarget | None:
    """The command's tracking server: ``logging.mlflow_uri``, else ``MLFLOW_TRACKING_URI``; None for neither.

    Raises ConfigError when one is set but mlflow is not installed.
    """
    uri = cfg.logging.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return None
    if importlib.util.find_spec("mlflow") is None:
        key = "logging.mlflow_uri" if cfg.logging.mlflow_uri else "logging.mlflow_uri (from MLFLOW_TRACKING_URI)"
        raise ConfigError(key, f"{uri} needs the mlflow package: pip install 'vjepa_ray[mlflow]'")
    return MlflowTarget(uri, cfg.logging.mlflow_experiment or cfg.meta.name)


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow parameters: dot keys (list items by index), values as text."""
    if isinstance(tree, dict) and tree:
        items = tree.items()
    elif isinstance(tree, list) and tree and all(isinstance(x, dict) for x in tree):
        items = ((str(i), x) for i, x in enumerate(tree))
    else:
        text = json.dumps(tree) if isinstance(tree, (list, dict)) else str(tree)
        return {prefix: text[:_PARAM_VALUE_CHARS]}
    out: dict[str, str] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a report (MLflow metrics are floats; digests and paths are not metrics)."""
    return {key: float(value) for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


def probe_metrics(probes: list[dict[str, Any]]) -> dict[str, float]:
    """A probe grid's top-1s (``[{lr, weight_decay, top1}, ...]``) as metrics: the best and one per head."""
    out = {"probe_top1": max(head["top1"] for head in probes)}
    out.update({f"probe_top1/lr_{h['lr']:g}_wd_{h['weight_decay']:g}": h["top1"] for h in probes})
    return out


class RunLogger:
    """One MLflow run, logged call by call; the body of the actor ``MlflowRun`` starts on the driver's node.

    The run is created (or, when ``folder`` holds a run id, resumed) on the first call; ``params`` are logged
    then. Every call that fails is counted by kind (``params``, ``metric_reports``, ``artifacts``, ``run``).
    """

    def __init__(self, target: MlflowTarget, folder: str, run_name: str, params: dict[str, str],
                 tags: dict[str, str] | None = None):
        for key, value in HTTP_ENV.items():
            os.environ.setdefault(key, value)  # before mlflow reads them: this process is the logger's own
        install_log_redaction()  # its warnings name the server's URI
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=target.uri)
        self.target, self.folder, self.run_name = target, folder, run_name
        self.params, self.tags = params, dict(tags or {})
        self.run_id: str | None = None
        self.not_logged: Counter[str] = Counter()
        self.error: str | None = None
        self._warned: set[str] = set()
        self._retry_at = 0.0

    def get_run_id(self) -> str | None:
        self._ensure_run()
        return self.run_id

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(key, value, now, step) for key, value in scalars(metrics).items() if key != "step"]
        self._call("metric_reports", 1, lambda: self._log_batches(entries, _METRICS_PER_BATCH, "metrics"))

    def log_artifact(self, name: str, data: bytes) -> None:
        def upload() -> None:
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / name).write_bytes(data)
                self.client.log_artifact(self.run_id, str(Path(tmp) / name))

        self._call("artifacts", 1, upload)

    def finish(self, status: str) -> dict[str, Any]:
        """Ends the run (``FINISHED``, ``FAILED``, ``KILLED``); returns its id, what was not logged and the
        first error."""
        if not self._ensure_run():
            self.not_logged.update(run=1, params=len(self.params))
        elif not self._attempt(lambda: self.client.set_terminated(self.run_id, status)):
            self.not_logged["run_status"] += 1
        return {"run_id": self.run_id, "not_logged": dict(self.not_logged), "error": self.error}

    def _call(self, kind: str, count: int, fn: Callable[[], None]) -> None:
        if not self._ensure_run() or not self._attempt(fn):
            self.not_logged[kind] += count

    def _ensure_run(self) -> bool:
        return self.run_id is not None or self._attempt(self._open_run)

    def _attempt(self, fn: Callable[[], None]) -> bool:
        if time.monotonic() < self._retry_at:
            return False
        try:
            fn()
            return True
        except Exception as err:  # mlflow wraps transport errors in MlflowException; files raise OSError
            self._failed(err)
            return False

    def _failed(self, err: Exception) -> None:
        message = str(err).splitlines()[0][:300]
        self.error = self.error or message
        rejected = getattr(err, "error_code", None) in _REJECTIONS
        if not rejected:
            self._retry_at = time.monotonic() + RETRY_AFTER_S
        kind = "rejected" if rejected else "unreachable"
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("MLflow at %s %s: %s; the run goes on, and says at its end what was not logged",
                        self.target.uri, "refused a call" if rejected else "cannot be reached", message)

    def _open_run(self) -> None:
        run_id_file = runs.join(self.folder, RUN_ID_FILE)
        resumed = self._resumed_run(run_id_file)
        logged: dict[str, str] = {}
        if resumed is not None:
            self.client.update_run(resumed.info.run_id, status="RUNNING")
            self.run_id, logged = resumed.info.run_id, resumed.data.params
        else:
            # The parent first: it also makes the experiment, which its trials would otherwise race to make.
            tags = {**self.tags, **({PARENT_RUN_TAG: self._parent_run_id()} if self.target.parent is not None else {})}
            experiment = self.client.get_experiment_by_name(self.target.experiment)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self.client.create_experiment(self.target.experiment, tags=EXPERIMENT_KIND_TAGS))
            self.run_id = self.client.create_run(experiment_id, run_name=self.run_name, tags=tags).info.run_id
            runs.write_bytes(run_id_file, self.run_id.encode())
        # A parameter keeps its first value in MLflow: a restart with changed settings cannot log them again.
        changed = [key for key, value in self.params.items() if key in logged and logged[key] != value]
        if changed:
            self.not_logged["params"] += len(changed)
            log.warning("MLflow run %s keeps its first values of %s", self.run_id, ", ".join(changed))
        from mlflow.entities import Param

        new = [Param(key, value) for key, value in self.params.items() if key not in logged]
        self._call("params", len(new), lambda: self._log_batches(new, _PARAMS_PER_BATCH, "params"))

    def _parent_run_id(self) -> str:
        import ray

        run_id = ray.get(self.target.parent.get_run_id.remote(), timeout=PARENT_TIMEOUT_S)
        if run_id is None:
            raise RuntimeError("the sweep's own MLflow run could not be made")
        return run_id

    def _resumed_run(self, run_id_file: str):
        """The run a previous start of this run folder logged to, if the server has it."""
        from mlflow.exceptions import MlflowException

        if not runs.is_file(run_id_file):
            return None
        try:
            return self.client.get_run(runs.read_bytes(run_id_file).decode().strip())
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None  # another server, or the run was deleted there: a new run
            raise

    def _log_batches(self, entries: list, size: int, field: str) -> None:
        """``entries`` (mlflow Metric or Param) in requests of at most ``size``, the server's limit."""
        for start in range(0, len(entries), size):
            self.client.log_batch(self.run_id, **{field: entries[start:start + size]})


class MlflowCallback(UserCallback):
    """Sends rank 0's metrics of every ``ray.train.report`` to the run's logger, without waiting for it.

    It runs in the Train controller, where an exception would end the training run: tracking must not.
    """

    def __init__(self, logger):
        self.logger = logger
        self._failed = False

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if not metrics or "step" not in metrics[0]:
            return
        try:
            self.logger.log_metrics.remote(metrics[0], int(metrics[0]["step"]))
        except Exception:
            if not self._failed:
                self._failed = True
                log.exception("cannot hand a report to the MLflow logger; training goes on without it")


class MlflowRun:
    """A run's MLflow logging, seen from its driver. Cheap to make; ``start`` (with Ray connected) starts the
    ``RunLogger`` actor on this node, after which every call returns at once except ``finish``, which waits
    at most ``FINISH_TIMEOUT_S``."""

    def __init__(self, target: MlflowTarget, run_name: str, params: dict[str, Any] | None = None,
                 tags: dict[str, str] | None = None):
        self.target, self.run_name = target, run_name
        self.extra_params = {key: str(value) for key, value in (params or {}).items()}
        self.tags = tags or {}
        self.logger = None

    def start(self, cfg: Config, folder: str) -> None:
        """Starts logging the run in ``folder``: its parameters are ``cfg`` flattened and this run's own."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        env = {key: os.environ[key] for key in HTTP_ENV if key in os.environ}
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        actor = ray.remote(num_cpus=0, scheduling_strategy=here, runtime_env={"env_vars": env})(RunLogger)
        params = redact({**flatten(to_dict(cfg)), **self.extra_params})
        self.logger = actor.remote(self.target, folder, self.run_name, params, self.tags)

    def callback(self) -> MlflowCallback:
        return MlflowCallback(self.logger)

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        self.logger.log_metrics.remote(metrics, step)

    def log_artifact(self, name: str, data: bytes) -> None:
        self.logger.log_artifact.remote(name, data)

    def finish(self, status: str) -> dict[str, Any]:
        """Ends the run; returns ``{run_id, not_logged: {kind: count}, error, wait_s}`` and logs one line."""
        import ray

        started = time.perf_counter()
        try:
            outcome = ray.get(self.logger.finish.remote(status), timeout=FINISH_TIMEOUT_S)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
            outcome = {"run_id": None, "not_logged": {"run": 1}, "error": "the logger did not answer"}
        outcome["wait_s"] = round(time.perf_counter() - started, 2)
        missing = {kind: n for kind, n in outcome["not_logged"].items() if n}
        if missing:
            log.warning("MLflow run %s at %s: not logged: %s (%s)", outcome["run_id"], self.target.uri,
                        ", ".join(f"{n} {kind}" for kind, n in sorted(missing.items())), outcome["error"])
        else:
            log.info("MLflow run %s logged to %s (experiment %s)", outcome["run_id"], self.target.uri,
                     self.target.experiment)
        return outcome


def start_sweep(target: MlflowTarget | None, cfg: Config, folder: str) -> tuple[MlflowRun | None, MlflowTarget | None]:
    """A sweep's parent run and the target its trials log to as its children; (None, None) without a target.
    Nothing waits for the server: each trial's logger asks the parent's for its run id."""
    if target is None:
        return None, None
    parent = MlflowRun(target, cfg.meta.name)
    parent.start(cfg, folder)
    return parent, target.child_of(parent.logger)


def finish_sweep(parent: MlflowRun, counts: dict[str, int], best: dict[str, Any] | None,
                 files: dict[str, str]) -> dict[str, Any]:
    """The sweep's outcome on its parent run: trial counts, the best top-1, the result files."""
    parent.log_metrics({**counts, **({"probe_top1": best["probe_top1"]} if best is not None else {})}, step=0)
    for name, path in files.items():
        parent.log_artifact(name, runs.read_bytes(path))
    return parent.finish("FINISHED" if counts.get("error", 0) == 0 else "FAILED")
