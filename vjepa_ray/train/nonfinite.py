"""Non-finite steps: kept out of the weights, counted, and a run that keeps making them stopped.

A step whose loss (any rank's, any micro batch's) or gradient is not finite is not applied: no optimizer step,
no EMA update. DeepSpeed steps the optimizer inside ``engine.step()`` at the last micro batch of a step. Its
ZeRO and bf16 optimizers skip a step whose gradient norm overflowed, but the plain fp32 engine (ZeRO-0)
applies whatever it gets, and none of them looks at the loss (whose gradient can be finite while it is not).
``StepGate`` therefore wraps the torch optimizer at the bottom of every engine, the one that writes the fp32
master weights and Adam's moments, and lets it step only when this step's losses and the gradient it is
given are finite on every rank (an all-reduced flag: all ranks decide alike). What DeepSpeed does around that
step (copying the masters into the model's weights, clearing its gradient buffers) then leaves the weights
as they were. fp16 keeps DeepSpeed's loss scaler, whose skipped steps are part of how it finds its scale.

``NonFiniteSteps`` counts the steps not applied and says when ``optimization.max_nonfinite_steps`` of them
came in a row: the run then stops (``stop_message`` is the line the driver shows). ``check_finite_state``
refuses a checkpoint whose weights, optimizer state or EMA target hold a non-finite value.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class NonFiniteStateError(RuntimeError):
    """A checkpoint was about to be saved from non-finite weights or optimizer state."""


def _any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is set on any rank (a collective when the group is up)."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t is not None and t.numel())


class StepGate:
    """Lets ``optimizer`` (the torch optimizer inside a DeepSpeed engine) step only when the step is finite.

    The training step reports each micro batch's loss (``note_loss``) before the engine steps, or closes the
    gate for this step (``close``: loss regulation, decided alike on every rank, holds the update back); ``take``
    says, once per step, whether the update was applied (False also when DeepSpeed skipped it first) and starts
    the next step. ``device``: where the all-reduced flag lives (the process group's device).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device):
        self.optimizer, self.device = optimizer, device
        self._step = optimizer.step
        # DeepSpeed calls ``optimizer.step()`` on the object it was given: the bound method is replaced.
        optimizer.step = self._gated_step
        self._losses_finite, self._applied, self._closed = True, False, False

    def close(self) -> None:
        self._closed = True

    def note_loss(self, loss: torch.Tensor) -> None:
        self._losses_finite = self._losses_finite and bool(torch.isfinite(loss).all())

    def take(self) -> bool:
        applied = self._applied
        self._losses_finite, self._applied, self._closed = True, False, False
        return applied

    def _gated_step(self, *args: Any, **kwargs: Any) -> Any:
        if self._closed:  # closed on every rank alike: no rank waits in the collective below
            return None
        grads = (p.grad for group in self.optimizer.param_groups for p in group["params"])
        finite = not _any_rank(not (self._losses_finite and _all_finite(grads)), self.device)
        if not finite:
            return None
        self._applied = True
        return self._step(*args, **kwargs)


@dataclass
class NonFiniteSteps:
    """The run's steps that were not applied (``total``, over every start) and the current run of them in a
    row (``streak``, 1-based step numbers); ``limit`` is ``optimization.max_nonfinite_steps``."""

    limit: int
    total: int = 0
    streak: list[int] = field(default_factory=list)

    def record(self, step: int, applied: bool, loss: float, grad_norm: float | None, rank: int) -> bool:
        """Counts step ``step`` (1-based); returns whether the run must stop now."""
        if applied:
            self.streak.clear()
            return False
        self.total += 1
        self.streak.append(step)
        if rank == 0:
            log.warning("step %d not applied: loss %s, gradient norm %s (rank 0); %d in a row, the run stops at "
                        "optimization.max_nonfinite_steps=%d", step, loss, grad_norm, len(self.streak), self.limit)
        return len(self.streak) >= self.limit

    def metrics(self, stop: bool) -> dict[str, int]:
        return {"nonfinite_steps": self.total, "nonfinite_streak": len(self.streak),
                "nonfinite_first_step": self.streak[0] if self.streak else 0, "nonfinite_stop": int(stop)}


def stop_message(metrics: dict[str, Any], checkpoint: str | None, lr: float, precision: str) -> str:
    """The one line a run stopped by non-finite steps ends with: which steps, the checkpoint to go back to,
    and what to look at."""
    first, last = int(metrics["nonfinite_first_step"]), int(metrics["step"])
    where = f"the last checkpoint (finite weights) is {checkpoint}" if checkpoint else "no checkpoint was saved"
    return (f"stopped: steps {first}-{last} had a non-finite loss or gradient ({last - first + 1} in a row, "
            f"optimization.max_nonfinite_steps); none was applied; {where}; look at optimization.lr "
            f"(peak {lr:g}), optimization.warmup_steps and deepspeed.precision ({precision}), or the data of those "
            "steps")


def check_finite_state(engine, optimizer: torch.optim.Optimizer, target_shards: dict[str, torch.Tensor],
                       device: torch.device) -> None:
    """Raises NonFiniteStateError, on every rank, when any rank's weights (its ZeRO-3 partitions included),
    optimizer masters and state, or EMA target shards hold a non-finite value. A collective."""
    params = list(engine.module.parameters())
    tensors = [*(p.data for p in params), *(p.ds_tensor for p in params if hasattr(p, "ds_tensor")),
               *(p for group in optimizer.param_groups for p in group["params"]),
               *(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)),
               *target_shards.values()]
    if _any_rank(not _all_finite(tensors), device):
        raise NonFiniteStateError("refusing to save a checkpoint: the weights, optimizer state or EMA target "
                                  "hold a non-finite value")
