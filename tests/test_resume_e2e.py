"""Exact resumption end to end: real videos decoded by Ray Data, 2 CPU workers under ZeRO-2, fp32.

A worker dies after a checkpoint taken in the middle of a chunk; the restart re-decodes the chunk, skips
the batches already trained, and the run ends with the weights of an undisturbed run, bit for bit.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from test_train_e2e import tiny_config

from vjepa_ray.data.pipeline import ClipStream
from vjepa_ray.train import driver
from vjepa_ray.train.checkpoint import TRAIN_STATE, read_model_weights

pytestmark = pytest.mark.slow


class DyingClipStream(ClipStream):
    """``ClipStream`` whose rank 1 process exits (as if killed) before yielding its batch ``die_at``, once
    per ``marker`` file."""

    def __init__(self, *args, marker: str, die_at: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.marker, self.die_at = Path(marker), die_at

    def __iter__(self):
        for index, batch in enumerate(super().__iter__()):
            if self.rank == 1 and index == self.die_at and not self.marker.exists():
                self.marker.touch()
                os._exit(1)
            yield batch


def test_worker_killed_after_a_mid_chunk_checkpoint_ends_with_the_undisturbed_weights(ray_local, tmp_path):
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/
    # 16 videos of 2 clips in one chunk: 4 micro batches of 4 per rank, one per step. Checkpoints every 3
    # steps fall in the middle of a chunk.
    overrides = [f"data.paths=[{tmp_path / 'videos'}]", "data.synthetic_videos=16", "data.chunk_size=16",
                 "deepspeed.zero_stage=2", "optimization.total_steps=6", "checkpoint.every_steps=3"]
    undisturbed = driver.run(tiny_config(tmp_path, "undisturbed", *overrides))
    assert undisturbed["status"] == "finished" and undisturbed["restarts"] == 0

    # Rank 1 dies on its 5th batch (step 5), after the checkpoint of step 3, taken after batch 3 of chunk 0.
    dying = functools.partial(DyingClipStream, marker=str(tmp_path / "died"), die_at=4)
    killed = driver.run(tiny_config(tmp_path, "killed", *overrides), stream_factory=dying)
    assert killed["status"] == "finished" and killed["steps"] == 6
    assert killed["restarts"] == 1 and [s["step"] for s in killed["starts"]] == [0, 3]
    saved = json.loads((tmp_path / "killed" / "step_00000003" / TRAIN_STATE).read_text())
    assert [(p["epoch"], p["chunk"], p["batch"]) for p in saved["data_position"]] == [(0, 0, 3)] * 2

    want, got = read_model_weights(undisturbed["checkpoint"]), read_model_weights(killed["checkpoint"])
    initial = read_model_weights(tmp_path / "undisturbed" / "step_00000003")
    for key in ("encoder", "predictor", "target_encoder"):
        assert want[key].keys() == got[key].keys()
        assert all(torch.equal(want[key][name], got[key][name]) for name in want[key]), key
        assert any(not torch.equal(want[key][name], initial[key][name]) for name in want[key])  # it trained on
