"""The collapse stopper: a trial whose target features stopped varying is stopped before it spends more.

A collapsed target encoder maps every token to nearly the same vector; the loss can still look fine, but
nothing the probe reads is left. ``target_feature_std`` (the collapse monitor of every pretraining report)
falls toward 0 when that happens. A trial whose reports stay below ``logging.collapse_std_threshold`` for
``tune.collapse_patience`` reports in a row is stopped (no more pretraining, no probe) and its row in the
results is marked ``collapsed``. The rule is one function, applied by the stopper as reports arrive and
by the results table to a trial's report history, so both agree on which trials collapsed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ray.tune import Stopper

STD = "target_feature_std"


def is_pretraining_report(result: dict[str, Any]) -> bool:
    """A pretraining report carries the collapse monitor; the trial's last result (its probe's) repeats the
    last one's and is not counted again."""
    return result.get(STD) is not None and "probe_top1" not in result


def low_streak(stds: Iterable[float], threshold: float) -> int:
    """How many of the last reports in a row were below ``threshold`` (a NaN spread is no collapse)."""
    streak = 0
    for std in stds:
        streak = streak + 1 if float(std) < threshold else 0
    return streak


def collapsed(stds: Iterable[float], threshold: float, patience: int) -> bool:
    """Whether a trial whose pretraining reports had these ``stds`` ended collapsed (``patience`` 0: never)."""
    return patience > 0 and low_streak(stds, threshold) >= patience


class CollapseStopper(Stopper):
    """Stops a trial at its ``patience``-th pretraining report in a row below ``threshold``."""

    def __init__(self, threshold: float, patience: int):
        self.threshold, self.patience = threshold, patience
        self.stds: dict[str, list[float]] = {}

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        if not is_pretraining_report(result):
            return False
        stds = self.stds.setdefault(trial_id, [])
        stds.append(float(result[STD]))
        return collapsed(stds, self.threshold, self.patience)

    def stopped(self, trial_id: str) -> bool:
        """Whether this stopper stopped the trial."""
        return collapsed(self.stds.get(trial_id, ()), self.threshold, self.patience)

    def stop_all(self) -> bool:
        return False
