"""``bench step`` at a toy size: the JSON it reports and its account of where the step's time goes."""

from __future__ import annotations

import argparse
import math

import pytest
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vjepa_ray.bench import _step_timing, step
from vjepa_ray.models.sizes import MODEL_SPECS
from vjepa_ray.recipe.objective import normalize_clips

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


def _linear(rows: int, n_in: int, n_out: int) -> int:
    return 2 * rows * n_in * n_out


def _block(rows: int, width: int, hidden: int, queries: int) -> int:
    """One transformer block on ``rows`` tokens whose last ``queries`` rows are computed (all for every block but
    a predictor's last when it predicts the targets only): qkv on every row, then q k^T and attention x v, the
    output projection and the MLP on the query rows."""
    return (_linear(rows, width, 3 * width) + 2 * 2 * queries * rows * width + _linear(queries, width, width)
            + _linear(queries, width, hidden) + _linear(queries, hidden, width))


def _hand_count_per_clip(trainer: _step_timing.Trainer, step_index: int) -> int:
    """The step's FLOPs per clip counted by hand from the model's sizes and the masks of ``step_index``; a
    backward pass costs twice its forward (gradients of the inputs and of the weights), but the patch
    convolution's (no gradient of the clip)."""
    cfg, step = trainer.cfg, trainer.train_step
    width, depth, _, mlp_ratio = MODEL_SPECS[cfg.model.name]
    hidden, pred_width = int(width * mlp_ratio), cfg.model.pred_embed_dim
    levels = 4 if step.family.name == "vjepa2_1" else 1
    grid = step.module.encoder.grid
    tokens = math.prod(grid)
    conv = 2 * tokens * (3 * cfg.model.tubelet_size * cfg.model.patch_size ** 2) * width

    def encoder(rows: int) -> int:
        return depth * _block(rows, width, hidden, rows)

    total = conv + encoder(tokens)  # the target pass: forward only
    group = step.group(normalize_clips(trainer.clips), (cfg.meta.seed, step_index, 0), 0)
    for context_ids, target_ids in group.masks:
        nc, nt = context_ids.shape[1], target_ids.shape[1]
        if levels == 1:  # predicts the targets: the last block computes the target rows only
            predictor = (_linear(nc, width, pred_width)
                         + (cfg.model.pred_depth - 1) * _block(nc + nt, pred_width, 4 * pred_width, nc + nt)
                         + _block(nc + nt, pred_width, 4 * pred_width, nt) + _linear(nt, pred_width, width))
        else:  # four levels in (4 D -> D -> width) and out, of the target and (context loss) the context tokens
            predictor = (_linear(nc, levels * width, width) + _linear(nc, width, pred_width)
                         + cfg.model.pred_depth * _block(nc + nt, pred_width, 4 * pred_width, nc + nt)
                         + _linear(nt, pred_width, levels * width) + _linear(nc, pred_width, levels * width))
        total += 3 * (encoder(nc) + predictor) + 2 * conv
    return total


@pytest.mark.parametrize("family", ["vjepa2", "vjepa2_1"])
def test_flops_per_clip_equal_a_hand_count_of_the_step(family):
    args = _args(TOY + ["--family", family, "--pred-depth", "2"])
    trainer = _step_timing.Trainer(args)
    counted = _step_timing.flops_per_clip(trainer.cfg, [3, 4])

    assert counted == pytest.approx((_hand_count_per_clip(trainer, 3) + _hand_count_per_clip(trainer, 4)) / 2,
                                    rel=1e-12)


def test_flops_on_the_meta_device_are_those_of_the_step_on_the_cpu():
    # The counter has no formula for the CPU's fused attention kernel: with torch's reference math, it counts
    # attention's matmuls as it does on the meta device.
    trainer = _step_timing.Trainer(_args(TOY + ["--family", "vjepa2_1"]))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        trainer.step(_step_timing.StepTimer(trainer.device))

    assert _step_timing.flops_per_clip(trainer.cfg, [0]) * 2 == counter.get_total_flops()


def test_family_vjepa2_1_times_its_step_with_the_context_loss_weighed_in():
    args = _args(TOY + ["--family", "vjepa2_1", "--steps", "1", "--warmup", "0"])
    result = step.run(args)

    assert result["settings"]["family"] == "vjepa2_1"
    assert result["context_weight"] == 0.5  # the release's lambda, from the first timed step on
    flops = _step_timing.flops_per_clip(_step_timing.bench_config(args), [0])
    assert result["flops_per_clip"] == flops
    assert result["flop_per_s"] == pytest.approx(flops * result["clips_per_s"])
    assert all(math.isfinite(loss) for loss in result["loss_first_last"])
    # Counting alone builds and times nothing on the device, and counts the same.
    counted = step.run(_args(TOY + ["--family", "vjepa2_1", "--steps", "1", "--warmup", "0", "--flops-only"]))
    assert set(counted) == {"figure", "flops_per_clip", "settings"}
    assert counted["flops_per_clip"] == flops and counted["settings"]["family"] == "vjepa2_1"


def test_a_model_the_family_cannot_build_is_one_config_error_line(capsys):
    from vjepa_ray.bench.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(["step", "--family", "vjepa2_1", "--model", "vit_micro", "--steps", "1"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "\n" not in err
    assert err.startswith("python -m vjepa_ray.bench step: config error: model.name: vit_micro is 4 blocks deep")
