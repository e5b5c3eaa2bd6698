"""The run's own state that checkpoints carry beside the models: its counters and every process's RNG.

Both are components of the checkpointer (``vjepa_ray.train.checkpoint``): ``state_dict()`` says what they hold,
``load_state_dict()`` takes it back.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class TrainState:
    """The run's counters (``train_state.json``)."""

    step: int = 0
    world_size: int = 1
    global_batch: int = 0
    zero_stage: int = 0
    skipped_videos: int = 0
    # Steps not applied because their loss or gradient was not finite (vjepa_ray.train.nonfinite).
    nonfinite_steps: int = 0
    last_loss: float | None = None
    world_sizes: list[int] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Takes the fields it knows; those a checkpoint predates keep their values here."""
        for f in dataclasses.fields(self):
            if f.name in state:
                setattr(self, f.name, state[f.name])


class RngState:
    """This process's torch, numpy, python (and CUDA) generators."""

    def state_dict(self) -> dict[str, Any]:
        """The states as tensors and plain Python values, so that a file of them loads with
        ``torch.load(..., weights_only=True)``."""
        numpy_state = np.random.get_state(legacy=False)
        # The Mersenne Twister's uint32 key as an int64 tensor: numpy arrays would need the full unpickler.
        numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
        return {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what ``state_dict`` returned, exactly."""
        torch.set_rng_state(state["torch"])
        numpy_state = dict(state["numpy"])
        numpy_state["state"] = {**numpy_state["state"], "key": numpy_state["state"]["key"].numpy().astype(np.uint32)}
        np.random.set_state(numpy_state)
        random.setstate(state["python"])
        if state.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
