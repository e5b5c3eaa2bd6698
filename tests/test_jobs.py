"""Every job config in jobs/ loads through its schema, and the paper recipes carry the paper's values."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vjepa_ray.config import SECTIONS, load_config
from vjepa_ray.train import driver

JOBS = Path(__file__).resolve().parents[1] / "jobs"
CONFIG_JOBS = sorted(p for p in JOBS.glob("*.yaml") if set(yaml.safe_load(p.read_text())) <= set(SECTIONS))
BENCH_JOBS = sorted(set(JOBS.glob("*.yaml")) - set(CONFIG_JOBS))


def test_every_job_file_is_a_config_or_a_benchmark_settings_file():
    assert len(CONFIG_JOBS) >= 7  # the paper recipes, the probes, the demos
    assert [p.name for p in BENCH_JOBS] == ["learning_large.yaml"]


@pytest.mark.parametrize("path", CONFIG_JOBS, ids=lambda p: p.name)
def test_job_config_validates(path):
    load_config(path)
    if path.name.endswith("_pretrain.yaml"):
        # What the schema cannot see, e.g. an elastic range that cannot hold the global batch; the recipes
        # leave data.paths to the command line.
        driver.check_runnable(load_config(path, ["data.paths=[s3://bucket/k710.csv]"]))


def test_benchmark_settings_file_parses():
    import argparse

    from vjepa_ray.bench import learning

    parser = argparse.ArgumentParser()
    learning.add_arguments(parser)
    args = parser.parse_args(["--config", str(JOBS / "learning_large.yaml")])
    assert args.steps == 5000 and args.frames == 16


# (file, model, crop, per-GPU batch, global batch) from the paper's pretraining configs.
PRETRAIN = [("vitl16_pretrain.yaml", "vit_large", 224, 24, 3072),
            ("vith16_pretrain.yaml", "vit_huge", 224, 24, 3072),
            ("vith16_384_pretrain.yaml", "vit_huge", 384, 10, 2400)]


@pytest.mark.parametrize("name, model, crop, batch, global_batch", PRETRAIN)
def test_pretraining_recipes_match_the_paper(name, model, crop, batch, global_batch):
    cfg = load_config(JOBS / name)
    assert (cfg.model.name, cfg.data.crop_size, cfg.data.batch_size) == (model, crop, batch)
    assert cfg.optimization.global_batch_size == global_batch
    assert (cfg.model.patch_size, cfg.model.tubelet_size, cfg.model.pred_depth, cfg.model.pred_embed_dim) == \
        (16, 2, 12, 384)
    assert (cfg.data.frames_per_clip, cfg.data.frame_step) == (16, 4)
    assert cfg.data.random_resize_scale == [0.3, 1.0] and cfg.data.random_resize_aspect_ratio == [0.75, 1.35]
    assert [(m.num_blocks, m.spatial_scale, m.temporal_scale, m.aspect_ratio) for m in cfg.mask] == [
        (8, [0.15, 0.15], [1.0, 1.0], [0.75, 1.5]), (2, [0.7, 0.7], [1.0, 1.0], [0.75, 1.5])]
    o = cfg.optimization
    assert (o.total_steps, o.warmup_steps, o.schedule_scale) == (90_000, 12_000, 1.25)
    assert (o.start_lr, o.lr, o.final_lr) == (2e-4, 6.25e-4, 1e-6)
    assert (o.weight_decay, o.final_weight_decay, o.ema, o.betas, o.eps, o.clip_grad) == \
        (0.04, 0.4, [0.998, 1.0], [0.9, 0.999], 1e-8, 10.0)
    assert cfg.deepspeed.precision == "bf16" and cfg.ray.use_gpu
    low, high = cfg.ray.num_workers
    assert global_batch % (high * batch) == 0, "the full cluster reaches the global batch without accumulation"


@pytest.mark.parametrize("name, segments, classes", [("vitl16_k400_probe.yaml", 8, 400),
                                                     ("vitl16_ssv2_probe.yaml", 2, 174)])
def test_probe_recipes_match_the_paper(name, segments, classes):
    cfg = load_config(JOBS / name)
    p = cfg.probe
    assert (cfg.data.frames_per_clip, cfg.data.frame_step, cfg.data.crop_size) == (16, 4, 224)
    assert (p.num_segments, p.num_views, p.num_classes) == (segments, 3, classes)
    assert (p.epochs, p.batch_size, p.lr, p.weight_decay, p.num_blocks) == (20, 4, [1e-3], [0.01], 1)
    assert p.batch_size * cfg.ray.num_workers == 256
