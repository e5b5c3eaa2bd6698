"""Training metrics: what each logging interval measures, the collapse monitor, and TensorBoard files.

Workers measure; every ``logging.every_steps`` the interval's sums are all-reduced so rank 0 reports
values for the whole group through ``ray.train.report``. A ``UserCallback`` on the Train controller (which
runs on the driver's node) writes every report into TensorBoard event files in the run folder.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from ray.train import UserCallback

log = logging.getLogger(__name__)


class IntervalMeter:
    """Sums over the micro steps of one logging interval, on one rank."""

    def __init__(self, num_masks: int):
        self.num_masks = num_masks
        self.reset()

    def reset(self) -> None:
        self.started = time.perf_counter()
        self.data_wait_s = 0.0
        self.micro_steps = 0
        self.steps = 0
        self.clips = 0
        self.skipped = 0
        self._loss = torch.zeros(1 + self.num_masks, dtype=torch.float64)
        self._target_std = 0.0
        self._grad_norm = 0.0

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Wrap the wait for the next batch: its share of the interval is the data-wait share."""
        start = time.perf_counter()
        yield
        self.data_wait_s += time.perf_counter() - start

    def add_micro_step(self, loss: torch.Tensor, per_mask: list[torch.Tensor], target_std: torch.Tensor,
                       clips: int, skipped: int) -> None:
        self._loss += torch.tensor([float(loss)] + [float(x) for x in per_mask], dtype=torch.float64)
        self._target_std += float(target_std)
        self.micro_steps += 1
        self.clips += clips
        self.skipped += skipped

    def add_step(self, grad_norm: float | None) -> None:
        self.steps += 1
        if grad_norm is not None and math.isfinite(grad_norm):
            self._grad_norm += grad_norm

    def reduce(self, device: torch.device | str = "cpu") -> dict[str, float]:
        """Group-wide means (losses, target spread, data wait), sums (clips, skipped) over the interval.

        A collective: every rank calls it at the same step.
        """
        elapsed = time.perf_counter() - self.started
        local = torch.cat([self._loss, torch.tensor(
            [self._target_std, self.micro_steps, self.clips, self.skipped, self.data_wait_s, elapsed],
            dtype=torch.float64)]).to(device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(local)
            world = dist.get_world_size()
        else:
            world = 1
        values = local.cpu().tolist()
        losses, (target_std, micro, clips, skipped, wait_s, elapsed_sum) = values[:1 + self.num_masks], \
            values[1 + self.num_masks:]
        micro = max(micro, 1.0)
        wall = elapsed_sum / world
        out = {"loss": losses[0] / micro}
        out.update({f"loss_mask_{i}": value / micro for i, value in enumerate(losses[1:])})
        out.update(target_feature_std=target_std / micro, clips_per_s=clips / max(wall, 1e-9),
                   data_wait_share=wait_s / max(elapsed_sum, 1e-9), skipped_videos=int(skipped),
                   grad_norm=self._grad_norm / max(self.steps, 1))
        return out


def collapse_warning(target_std: float, threshold: float) -> str | None:
    """A warning when the target features' spread fell below ``logging.collapse_std_threshold``."""
    if target_std < threshold:
        return (f"possible representation collapse: target feature std {target_std:.4g} is below "
                f"logging.collapse_std_threshold={threshold:g}")
    return None


def format_progress(metrics: dict[str, Any], total_steps: int, clock: "Clock | None" = None) -> str:
    """One progress line (what the demo prints); with ``clock``, the time this start has run and an estimate of
    the time left."""
    line = (f"step {metrics['step']}/{total_steps}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.3g}  "
            f"wd {metrics['wd']:.3g}  momentum {metrics['momentum']:.5f}  {metrics['clips_per_s']:.1f} clips/s  "
            f"data wait {100 * metrics['data_wait_share']:.0f}%")
    if clock is None:
        return line
    elapsed, left = clock.times(metrics["step"], total_steps)
    return f"{line}  elapsed {format_duration(elapsed)}  ETA {format_duration(left)}"


class Clock:
    """Time since this start of the training function, and the time left at the pace of its steps so far."""

    def __init__(self, first_step: int, now: Callable[[], float] = time.monotonic):
        self.first_step, self.now, self.started = first_step, now, now()

    def times(self, step: int, total_steps: int) -> tuple[float, float]:
        elapsed = self.now() - self.started
        done = step - self.first_step
        return elapsed, elapsed / done * (total_steps - step) if done > 0 else math.inf


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``; ``?`` when not known yet."""
    if not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class TensorBoardCallback(UserCallback):
    """Writes rank 0's numeric metrics of every ``ray.train.report`` as scalars under ``logdir``."""

    def __init__(self, logdir: str | Path):
        self.logdir = str(logdir)
        self._writer = None

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if not metrics or "step" not in metrics[0]:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            Path(self.logdir).mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(self.logdir)
        step = int(metrics[0]["step"])
        for key, value in metrics[0].items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(f"train/{key}", value, step)
        self._writer.flush()

    def __getstate__(self) -> dict[str, Any]:
        # The callback travels to the controller actor; a writer does not pickle.
        return {"logdir": self.logdir, "_writer": None}
