"""What a command prints on the driver: our lines, Ray's dashboard address, warnings and real failures.

Ray forwards every worker's and actor's output to the driver. Some of it says nothing a user can act on:
DeepSpeed announcing the op it built (from every rank), Ray Data's "Progress bars disabled", an error-level
line from Ray's core about the PreemptionWatcher actor's constructor arguments, the token-auth notices of a
new local cluster. ``quiet_ray`` drops those lines before Ray prints them (Ray Train's own INFO lines are
off by ``ray.train.LoggingConfig``, see ``vjepa_ray.train.trainer``); ``logging.verbose`` (``--verbose``)
keeps everything. ``wait_for_workers`` lets the last forwarded lines arrive before a command prints its
summary, so that the summary is the last thing on the screen.
"""

from __future__ import annotations

import functools
import logging
import re
import time

# Lines of forwarded output that only Ray's or DeepSpeed's developers act on; the traceback that follows such
# a line goes with it.
RAY_NOISE = re.compile("|".join([
    r"DeepSpeed \S+ built successfully",
    r"Progress bars disabled\. To enable",
    r"core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher'.*max_restarts > 0",
    # Ray Train's placement-group monitor finding several local clusters on one machine (it repeats this at every
    # poll; its failure, if any, stays visible as its own traceback).
    r"Found multiple active Ray instances: .*Connecting to latest cluster",
    # Ray Train's autoscaling client on a busy machine; it says itself that a transient one is safe to ignore.
    r"Failed to send resource request for train-.*safe to ignore",
]))
_TRACEBACK_LINE = re.compile(r"^(\s|Traceback \(most recent call last\)|[\w.]+(Error|Exception)\b)")
# Loggers of the driver process whose INFO and WARNING lines are notices, not problems.
QUIET_LOGGERS = ("ray._private.authentication.authentication_token_setup",)
_PRINT_HANDLER = "ray_print_logs"  # the name ray.init gives the handler that prints forwarded output

_last_forwarded = 0.0


def quiet_driver_loggers(verbose: bool) -> None:
    """Before ``ray.init``: the token-auth notices of a new local cluster off (unless ``verbose``)."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.ERROR)


def quiet_ray(verbose: bool) -> None:
    """After ``ray.init``: forwarded output is printed without ``RAY_NOISE`` (all of it when ``verbose``), and
    its arrival is timed for ``wait_for_workers``."""
    from ray._private import worker

    dispatcher = worker.global_worker_stdstream_dispatcher
    if not any(name == _PRINT_HANDLER for name, _ in dispatcher.handlers):  # log_to_driver=False: none forwarded
        return
    dispatcher.remove_handler(_PRINT_HANDLER)
    print_logs = functools.partial(worker.print_to_stdstream,
                                   ignore_prefix=worker._should_ignore_worker_log_prefix(worker.global_worker))
    dispatcher.add_handler(_PRINT_HANDLER, functools.partial(_print_forwarded, print_logs, verbose))


def _print_forwarded(print_logs, verbose: bool, data: dict) -> None:
    global _last_forwarded
    _last_forwarded = time.monotonic()
    if not verbose:
        data = {**data, "lines": without_noise(data["lines"])}
        if not data["lines"]:
            return
    print_logs(data)


def without_noise(lines: list[str]) -> list[str]:
    """``lines`` without those ``RAY_NOISE`` matches and the traceback lines that follow one."""
    kept, dropping = [], False
    for line in lines:
        dropping = bool(RAY_NOISE.search(line)) or (dropping and bool(_TRACEBACK_LINE.match(line)))
        if not dropping:
            kept.append(line)
    return kept


def wait_for_workers(quiet_s: float = 1.5, at_most_s: float = 10.0) -> None:
    """Returns once no forwarded output arrived for ``quiet_s`` (Ray forwards it a moment after it is written),
    or after ``at_most_s``."""
    deadline = time.monotonic() + at_most_s
    while time.monotonic() < deadline and time.monotonic() - _last_forwarded < quiet_s:
        time.sleep(0.1)
