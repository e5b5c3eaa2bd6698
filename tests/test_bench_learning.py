"""``bench learning`` end to end at a toy size: real videos, pretraining, probes, and the JSON it reports."""

from __future__ import annotations

import argparse

import numpy as np

from vjepa_ray.bench import learning
from vjepa_ray.models.rope import Rotary3D
from vjepa_ray.recipe.schedules import ema_momentum_at, lr_at


def test_toy_run_reports_each_grid_point_as_the_mean_of_its_probe_initialisations(tmp_path):
    parser = argparse.ArgumentParser()
    learning.add_arguments(parser)
    args = parser.parse_args(["--workdir", str(tmp_path), "--size", "16", "--video-frames", "8", "--frames", "4",
                              "--pretrain-videos", "10", "--train-per-class", "2", "--val-per-class", "1",
                              "--patch", "8", "--embed-dim", "24", "--depth", "1", "--pred-dim", "12",
                              "--pred-depth", "1", "--steps", "3", "--batch", "4", "--probe-epochs", "2",
                              "--probe-lr", "1e-2", "3e-3", "--probe-seeds", "2", "--threads", "1"])
    result = learning.run(args)

    assert result["chance"] == 10.0
    for encoder in ("pretrained", "random_init", "frame_only"):
        seeds = result["per_probe_seed_top1"][encoder]
        assert set(seeds) == {"lr=0.01,wd=0.01", "lr=0.003,wd=0.01"}
        assert all(len(top1) == 2 for top1 in seeds.values())
        means = result["per_probe_top1"][encoder]
        assert means == {point: round(float(np.mean(top1)), 2) for point, top1 in seeds.items()}
        assert result[f"{encoder}_top1"] == max(means.values())
    assert len(result["pretrain_loss_first_last"]) == 2
    assert result["settings"]["probe_seeds"] == 2
    assert result["settings"]["schedule"] == "cosine"  # V-JEPA 1's, the default family's


def _parsed(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    learning.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_pretraining_follows_the_familys_schedule_unless_one_is_given():
    lr = 1.5e-4
    cosine = learning.pretrain_optimization(_parsed())
    constant = learning.pretrain_optimization(_parsed("--family", "vjepa2"))
    assert (cosine.schedule, constant.schedule) == ("cosine", "constant")
    last = constant.total_steps - 1
    assert lr_at(last, constant) == lr and ema_momentum_at(last, constant) == 0.998  # held after the warmup
    assert lr_at(last, cosine) < lr / 10 and ema_momentum_at(last, cosine) > 0.9999
    assert learning.pretrain_optimization(_parsed("--family", "vjepa2", "--schedule", "cosine")).schedule == "cosine"


def test_the_rotary_predictor_defaults_to_heads_of_the_releases_width():
    assert learning.predictor_width(_parsed()) == 48
    rotary = _parsed("--family", "vjepa2")
    head_dim = learning.predictor_width(rotary) // rotary.heads
    assert head_dim == 384 // 12  # the 2.0 release's predictor: 384 wide, 12 heads
    assert Rotary3D(head_dim).axis_dim // 2 == 5  # frequencies per axis, against 2 for 16-channel heads
    assert learning.predictor_width(_parsed("--family", "vjepa2", "--pred-dim", "48")) == 48
