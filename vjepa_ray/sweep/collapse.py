"""The collapse stop: a trial whose target features stopped varying ends before it spends more.

A collapsed target encoder maps every token to nearly the same vector; the loss can still look fine, but
nothing the probe reads is left. ``target_feature_std`` (the collapse monitor of every pretraining report)
falls toward 0 when that happens. A trial whose reports stay below ``logging.collapse_std_threshold`` for
``tune.collapse_patience`` reports in a row ends there (no more pretraining, no probe) and its row in the
results is marked ``collapsed``.

The rule runs inside the trial, in its Train run's controller (``CollapseStop``), not as a Tune ``Stopper`` on
the sweep's driver. Tune stops a trial by ending its actor: ``Trainable.stop`` does not wait for a function
trainable's thread, and the Train run that thread started dies with the actor. Its controller is killed
without shutting down, and the placement group its workers held outlives it: a placement group made by an
actor lives until that actor and its job (the sweep's driver) both ended. Ray Train's detached
``PlacementGroupCleaner`` removes it only once the State API, which needs the cluster's dashboard, says the
controller is dead, and after ``Tuner.fit`` returned; on a cluster without a dashboard, never (a test
cluster kept a stopped trial's CPUs for the rest of the session). Raised at the report, ``RunStopped``
(``stop_run``) ends the run as Ray Train ends a failed one, through the controller's shutdown, which stops
the workers and removes their placement group before ``fit()`` returns; the trial then reports its outcome
and returns to Tune like a finished one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import ray.train

from vjepa_ray.train.failures import stop_run

STD = "target_feature_std"


def low_streak(stds: Iterable[float], threshold: float) -> int:
    """How many of the last reports in a row were below ``threshold`` (a NaN spread is no collapse)."""
    streak = 0
    for std in stds:
        streak = streak + 1 if float(std) < threshold else 0
    return streak


def collapsed(stds: Iterable[float], threshold: float, patience: int) -> bool:
    """Whether a trial whose pretraining reports had these ``stds`` collapsed (``patience`` 0: never)."""
    return patience > 0 and low_streak(stds, threshold) >= patience


class CollapseStop(ray.train.UserCallback):
    """Ends a Train run at its ``patience``-th report in a row whose target feature spread is below ``threshold``.

    The spread is all-reduced over the workers before it is reported, so rank 0's report speaks for all.
    """

    def __init__(self, threshold: float, patience: int):
        self.threshold, self.patience = threshold, patience
        self.stds: list[float] = []

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if not metrics or metrics[0].get(STD) is None:
            return
        report = metrics[0]
        self.stds.append(float(report[STD]))
        if collapsed(self.stds, self.threshold, self.patience):
            stop_run(f"target collapsed: feature std {report[STD]:.3g} below {self.threshold:g} for "
                     f"{self.patience} report(s) in a row, at step {report.get('step')}", report)
