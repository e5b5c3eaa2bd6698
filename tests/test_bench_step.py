"""``bench step`` at a toy size: the JSON it reports and its account of where the step's time goes."""

from __future__ import annotations

import argparse
import math

import pytest
from torch.utils.flop_counter import FlopCounterMode

from vjepa_ray.bench import _step_timing, step

TOY = ["--model", "vit_tiny", "--frames", "4", "--crop", "32", "--batch", "2", "--steps", "2", "--threads", "1"]


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    step.add_arguments(parser)
    return parser.parse_args(argv)


def test_toy_run_reports_rate_phases_and_time_shares():
    result = step.run(_args(TOY))

    assert result["clips_per_s"] == pytest.approx(2 / result["step_s"])
    assert set(result["phases_s"]) == set(step.PHASES)
    assert all(math.isfinite(loss) for loss in result["loss_first_last"])
    shares = result["time_shares"]
    assert sum(shares.values()) == pytest.approx(1.0)
    assert 0 < shares["gemm"] < 1 and 0 < shares["attention"] < 1
    gemm = result["gemm"]
    assert gemm["gflop_per_step"] > 0 and gemm["reference_gflop_per_s"] > 0
    assert gemm["of_reference"] == pytest.approx(gemm["gflop_per_s"] / gemm["reference_gflop_per_s"])


def test_profiled_matmul_flops_equal_the_flop_counters_for_the_same_step():
    # Two trainers built from one seed draw the same weights, clips and (for one step index) masks.
    profiled, counted = _step_timing.Trainer(_args(TOY)), _step_timing.Trainer(_args(TOY))
    breakdown = _step_timing.where_time_goes(profiled)
    counter = FlopCounterMode(display=False)
    with counter:
        counted.step(_step_timing.StepTimer(counted.device))
    names = {name.replace("::", ".") for name in _step_timing.GEMM_OPS}
    expected = sum(n for op, n in counter.get_flop_counts()["Global"].items() if str(op) in names)

    assert breakdown["gemm"]["gflop_per_step"] == pytest.approx(expected / 1e9, rel=1e-9)


def test_family_vjepa2_trains_a_rotary_model():
    trainer = _step_timing.Trainer(_args(TOY + ["--family", "vjepa2"]))
    encoder = trainer.train_step.target_encoder
    assert encoder.family.name == "vjepa2" and "pos_embed" not in encoder.state_dict()
    losses = [trainer.step(_step_timing.StepTimer(trainer.device)) for _ in range(2)]
    assert all(math.isfinite(loss) and loss > 0 for loss in losses)
