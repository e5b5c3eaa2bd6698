"""An in-memory stand-in for ``ClipStream``: moving-pattern clips made on the fly, no decoding.

Batch ``i`` of rank ``r`` depends only on (seed, r, i) and the stream resumes exactly at the batch after
a checkpoint, so it serves where the data must be known in advance: comparing a distributed run with a
one-process reference, and benchmarking the training step apart from video decoding.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterator, Sequence

import numpy as np
import torch

from vjepa_ray.config import DataConfig
from vjepa_ray.data.pipeline import ClipBatch
from vjepa_ray.video.synthetic import moving_pattern


def synthetic_clips(data: DataConfig, seed: int, rank: int, index: int) -> torch.Tensor:
    """uint8 [data.batch_size, T, crop, crop, 3]: batch ``index`` of rank ``rank``."""
    rng = np.random.default_rng([seed, rank, index])
    clips = [moving_pattern(data.frames_per_clip, data.crop_size, data.crop_size, rng)
             for _ in range(data.batch_size)]
    return torch.from_numpy(np.stack(clips))


class SyntheticClipStream:
    """``ClipStream``'s interface (iterate, ``state_dict``, ``load_state_dict``) over ``synthetic_clips``.

    Its state is ``ClipStream``'s (epoch, chunk) with the epoch always 0 and the index of the next batch
    as the chunk.
    """

    def __init__(self, data: DataConfig, seed: int, rank: int = 0, world_size: int = 1):
        self.data, self.seed, self.rank, self.world_size = data, seed, rank, world_size
        self._index = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": 0, "chunk": self._index}

    def load_state_dict(self, states: Sequence[dict[str, int]]) -> None:
        # Every rank stands at the same index.
        self._index = int(states[0]["chunk"])

    def __iter__(self) -> Iterator[ClipBatch]:
        while True:
            clips = synthetic_clips(self.data, self.seed, self.rank, self._index)
            self._index += 1
            yield ClipBatch(clips, ("synthetic",) * len(clips), (0, self._index - 1), Counter())
