"""Loss regulation (V-JEPA 2.1's): skip the update of a step whose loss is far above the recent ones.

The rule (the 2.1 release's ``train.py``; optional, and off in its recipes): once the run is past
``start_step`` and more than half of ``window`` is tracked, a step whose loss is above mean + ``std_mult`` x
std of the tracked losses (the population standard deviation) is not applied. Its schedules and its EMA
update still run, its loss is not tracked (only applied steps' are, the last ``window`` of them), the batch is
not retried, and more than ``max_skips`` skips over the run stop it.

The release lets each rank decide on its own loss, so ranks whose batches differ can decide differently, and
a rank that skips leaves its replica behind the others'. Here the decision is a function of the step's loss
over all ranks (the mean whose gradient the update follows) and of the tracked history of such losses, so
every rank decides alike: in one process the step holds every rank's micro batches, and a distributed step
must all-reduce its loss before it asks.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

from vjepa_ray.config import OptimizationConfig


class LossRegulationError(RuntimeError):
    """Loss regulation skipped more steps than it may: the loss keeps rising above its recent range."""


def exceeds_bound(loss: float, history: Sequence[float], std_mult: float, min_history: int) -> bool:
    """Whether ``loss`` is above mean + ``std_mult`` x std (population) of ``history``, once ``history`` holds
    more than ``min_history`` losses (never before)."""
    if len(history) <= min_history:
        return False
    return loss > statistics.fmean(history) + std_mult * statistics.pstdev(history)


@dataclass
class LossRegulation:
    """The rule's settings and its state: the tracked losses and the skips so far (``state_dict``)."""

    std_mult: float
    window: int = 300
    start_step: int = 15_300
    max_skips: int = 10
    history: deque = field(default_factory=deque)
    skips: int = 0

    def __post_init__(self) -> None:
        # Only the last ``window`` applied steps' losses are tracked.
        self.history = deque(self.history, maxlen=self.window)

    @classmethod
    def of(cls, cfg: OptimizationConfig) -> "LossRegulation | None":
        """The regulation of a run's config; None when it is off (``loss_reg_std_mult`` unset)."""
        if cfg.loss_reg_std_mult is None:
            return None
        return cls(cfg.loss_reg_std_mult, cfg.loss_reg_window, cfg.loss_reg_start_step, cfg.loss_reg_max_skips)

    def skips_update(self, loss: float, step: int) -> bool:
        """Whether step ``step`` (0-based), of loss ``loss`` over all ranks, is skipped; a skip is counted, and
        one past ``max_skips`` raises LossRegulationError."""
        skip = step >= self.start_step and exceeds_bound(loss, self.history, self.std_mult, self.window // 2)
        if skip:
            self.skips += 1
            if self.skips > self.max_skips:
                raise LossRegulationError(
                    f"step {step}: loss regulation skipped {self.skips} steps, more than "
                    f"optimization.loss_reg_max_skips={self.max_skips}: loss {loss:.6g} is above the bound of the "
                    f"last {len(self.history)} applied steps again")
        return skip

    def record(self, loss: float) -> None:
        """Tracks the loss of an applied step."""
        self.history.append(loss)

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "skips": self.skips}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = deque(state["history"], maxlen=self.window)
        self.skips = int(state["skips"])
