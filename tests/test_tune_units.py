"""The sweep's pieces in one process: mask-ratio mapping, grid and trial configs, the results files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from vjepa_ray.config import ConfigError, MaskConfig, builtin_config_path, load_config
from vjepa_ray.recipe.masks import MultiBlockMaskGenerator
from vjepa_ray.sweep import results
from vjepa_ray.sweep.driver import max_concurrent_trials
from vjepa_ray.sweep.mask_ratio import masked_fraction, spatial_scale_for_ratio
from vjepa_ray.sweep.space import MASK_RATIO, check_axes, sweep_axes, token_grid, trial_config

RECIPE_GRID = (8, 14, 14)  # 16 frames, tubelet 2, 224 px, patch 16
REPO = Path(__file__).resolve().parents[1]


def demo(*overrides: str):
    return load_config(builtin_config_path("local_demo"), list(overrides))


@pytest.mark.parametrize("num_blocks, scale", [(8, 0.15), (2, 0.7)])
def test_mask_ratio_of_the_recipe_maps_back_to_its_spatial_scale(num_blocks, scale):
    recipe = MaskConfig(num_blocks=num_blocks, spatial_scale=[scale, scale])
    fraction = masked_fraction(recipe, RECIPE_GRID)
    # Overlapping blocks: the union masks less than blocks x scale, and more than one block.
    assert scale < fraction < min(1.0, num_blocks * scale)
    match = spatial_scale_for_ratio(recipe, RECIPE_GRID, fraction)
    # Block areas are whole tokens: the recipe's scale comes back to within one token of area.
    assert abs(match.spatial_scale - scale) <= 1.0 / (14 * 14)
    assert match.masked_fraction == pytest.approx(fraction, abs=0.01)


def test_mask_ratio_scales_grow_with_the_ratio_and_the_generator_masks_that_share():
    cfg = MaskConfig(num_blocks=8, spatial_scale=[0.15, 0.15])
    matches = [spatial_scale_for_ratio(cfg, RECIPE_GRID, r) for r in (0.3, 0.5, 0.7, 0.9)]
    scales = [m.spatial_scale for m in matches]
    assert scales == sorted(scales) and len(set(scales)) == 4
    for ratio, match in zip((0.3, 0.5, 0.7, 0.9), matches):
        assert match.masked_fraction == pytest.approx(ratio, abs=0.02)
        # Independently of the estimate: a large batch of the generator's own masks at that scale.
        gen = MultiBlockMaskGenerator(MaskConfig(num_blocks=8, spatial_scale=[match.spatial_scale] * 2), RECIPE_GRID)
        rng = np.random.default_rng(123)
        masked = np.mean([gen(1, rng)[1].shape[1] for _ in range(300)]) / gen.num_tokens
        assert masked == pytest.approx(ratio, abs=0.04)


def test_mask_ratio_beyond_what_leaves_context_picks_the_largest_feasible_scale():
    two_blocks = MaskConfig(num_blocks=2, spatial_scale=[0.7, 0.7])
    match = spatial_scale_for_ratio(two_blocks, (4, 4, 4), 0.97)
    assert match.masked_fraction < 0.97
    gen = MultiBlockMaskGenerator(MaskConfig(num_blocks=2, spatial_scale=[match.spatial_scale] * 2), (4, 4, 4))
    ctx, tgt = gen(4, np.random.default_rng(0))  # runs: the blocks leave context
    assert ctx.shape[1] >= 1 and tgt.shape[1] >= 1
    with pytest.raises(ValueError, match="ratio"):
        spatial_scale_for_ratio(two_blocks, (4, 4, 4), 1.0)


def test_grid_axes_and_trial_configs():
    cfg = demo("tune.mask_ratio=[0.5,0.8]", "tune.lr=[1e-3,3e-4]", "tune.ema=[[0.99,1.0]]",
               "tune.space={mask.0.num_blocks: [4, 8]}", "tune.num_samples=2",
               "tune.probe_lr=[1e-2,1e-3]", "tune.probe_weight_decay=[0.0,0.05]")
    axes = sweep_axes(cfg)
    assert axes == {MASK_RATIO: [0.5, 0.8], "optimization.lr": [1e-3, 3e-4], "optimization.ema": [[0.99, 1.0]],
                    "mask.0.num_blocks": [4, 8], "meta.seed": [cfg.meta.seed, cfg.meta.seed + 1]}
    check_axes(cfg, axes)

    trial = trial_config(cfg, {MASK_RATIO: 0.8, "optimization.lr": 3e-4, "mask.0.num_blocks": 4,
                               "optimization.ema": [0.99, 1.0], "meta.seed": 1})
    assert (trial.optimization.lr, trial.optimization.ema, trial.meta.seed) == (3e-4, [0.99, 1.0], 1)
    assert [m.num_blocks for m in trial.mask] == [4, 2]
    # The ratio is met by the trial's own blocks (4 of them, not the base's 8).
    grid = token_grid(trial)
    assert grid == (4, 4, 4)
    for mask in trial.mask:
        assert mask.spatial_scale[0] == mask.spatial_scale[1]
        assert masked_fraction(mask, grid) == pytest.approx(0.8, abs=0.06)
    assert (trial.probe.lr, trial.probe.weight_decay) == ([1e-2, 1e-3], [0.0, 0.05])
    assert cfg.mask[0].num_blocks == 8 and cfg.optimization.lr == 1e-3  # the base is left alone


@pytest.mark.parametrize("override, key", [
    ("tune.space={mask.0.nope: [1]}", "tune.space.mask.0.nope"),
    ("tune.space={optimization.warmup_steps: [100000]}", "optimization.warmup_steps"),
    ("tune.space={optimization.lr: [1e-3]}", "tune.space.optimization.lr"),
    ("tune.space={meta.seed: [1, 2]}", "tune.space.meta.seed"),
])
def test_bad_axes_name_the_key(override, key):
    cfg = demo("tune.lr=[1e-3]", override)
    with pytest.raises(ConfigError) as err:
        check_axes(cfg, sweep_axes(cfg))
    assert err.value.key == key


def test_a_grid_without_axes_is_a_config_error():
    cfg = demo()
    with pytest.raises(ConfigError) as err:
        check_axes(cfg, sweep_axes(cfg))
    assert err.value.key == "tune"
    check_axes(demo("tune.num_samples=2"), sweep_axes(demo("tune.num_samples=2")))  # seeds alone are a grid


@pytest.mark.parametrize("overrides, line", [
    (["tune.mask_ratio=[]"], "tune.mask_ratio: is empty: give it one or more values, or leave it out"),
    (["tune.space={nope.key: [1]}"], "tune.space.nope.key: is not a config key"),
    (["tune.mask_ratio=null", "tune.lr=null", "tune.ema=null", "tune.num_samples=1"],
     "tune: the grid is empty: give values to tune.mask_ratio, tune.lr, tune.ema or tune.space, or "
     "tune.num_samples > 1"),
])
def test_tune_command_names_the_bad_grid_key_in_one_line_and_exits_2(overrides, line, capsys):
    from vjepa_ray import tune

    with pytest.raises(SystemExit) as info:
        tune.main(["--config", str(REPO / "jobs" / "tune_demo.yaml"), *overrides, "--dry-run"])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"python -m vjepa_ray.tune: config error: {line}"]


@pytest.mark.parametrize("override", ["tune.mask_ratio=[1.2]", "tune.mask_ratio=[]", "tune.lr=[]",
                                      "tune.ema=[]", "tune.ema=[[0.9]]", "tune.probe_lr=[0]",
                                      "tune.space={optimization.lr: 3}", "tune.reduction_factor=1",
                                      "tune.collapse_patience=-1"])
def test_bad_tune_section_is_a_config_error(override):
    with pytest.raises(ConfigError, match=r"^tune\."):
        demo(override)


def test_concurrency_follows_the_cluster():
    # Per trial: 0.5 (driver) + 1 (worker) + 0.5 (one decode task) CPUs.
    cfg = demo("ray.num_workers=1", "ray.cpus_per_worker=1", "tune.driver_cpus=0.5", "data.decode_cpus=0.5")
    assert max_concurrent_trials(cfg, {"CPU": 8.0}) == 4
    assert max_concurrent_trials(cfg, {"CPU": 1.0}) == 1  # never zero: the trial waits for resources
    gpu = demo("ray.num_workers=[1,2]", "ray.use_gpu=true", "ray.cpus_per_worker=8", "tune.driver_cpus=1")
    assert max_concurrent_trials(gpu, {"CPU": 64.0, "GPU": 8.0}) == 3  # 64 // (1 + 2 x 8 + 1) CPUs
    assert max_concurrent_trials(gpu, {"CPU": 640.0, "GPU": 8.0}) == 4  # 8 GPUs // 2 per trial
    assert max_concurrent_trials(demo("tune.max_concurrent_trials=3"), {"CPU": 1.0}) == 3
    # Fractional workers: 0.5 + 4 x 0.25 + 0.5 = 2 CPUs per trial.
    packed = demo("ray.num_workers=4", "ray.cpus_per_worker=0.25", "tune.driver_cpus=0.5", "data.decode_cpus=0.5")
    assert max_concurrent_trials(packed, {"CPU": 8.0}) == 4


def _rows():
    def head(lr, wd):
        return results.head_column(lr, wd)
    return [
        {"trial_id": "t0", "status": "finished", MASK_RATIO: 0.5, "optimization.ema": [0.99, 1.0],
         "masked_fraction": 0.52, "loss": 0.6, "probe_top1": 0.40, "probe_lr": 1e-3, "probe_weight_decay": 0.0,
         head(1e-3, 0.0): 0.40, head(1e-2, 0.0): 0.30},
        {"trial_id": "t1", "status": "finished", MASK_RATIO: 0.8, "optimization.ema": [0.99, 1.0],
         "masked_fraction": 0.79, "loss": 0.7, "probe_top1": 0.55, "probe_lr": 1e-2, "probe_weight_decay": 0.0,
         head(1e-3, 0.0): 0.50, head(1e-2, 0.0): 0.55},
        {"trial_id": "t2", "status": "stopped_early", MASK_RATIO: 0.8, "optimization.ema": [0.99, 1.0],
         "masked_fraction": 0.79, "loss": 0.9, "probe_top1": None, "probe_lr": None, "probe_weight_decay": None},
        {"trial_id": "t3", "status": "collapsed", MASK_RATIO: 0.8, "optimization.ema": [0.99, 1.0],
         "masked_fraction": 0.79, "loss": 0.2, "probe_top1": None, "probe_lr": None, "probe_weight_decay": None},
    ]


def test_results_files_hold_every_trial_the_grid_points_the_best_and_two_plots(tmp_path):
    rows = _rows()
    paths = results.write_results(str(tmp_path), rows, [MASK_RATIO, "optimization.ema"], {"meta": {"name": "t1"}})
    assert sorted(paths) == sorted(results.RESULT_FILES)
    with open(paths["summary.csv"]) as f:
        summary = list(csv.DictReader(f))
    assert list(summary[0]) == [MASK_RATIO, "optimization.ema", "top1_mean", "top1_std", "n", "collapsed"]
    # Two grid points; 0.8 has one trial with a top-1 (t2 stopped early, t3 collapsed): a mean, no std.
    assert [(r[MASK_RATIO], r["top1_mean"], r["top1_std"], r["n"], r["collapsed"]) for r in summary] == [
        ("0.5", "0.4", "", "1", "0"), ("0.8", "0.55", "", "1", "1")]
    with open(paths["results.csv"]) as f:
        table = list(csv.DictReader(f))
    assert [(r["trial_id"], r["status"]) for r in table] == [
        ("t0", "finished"), ("t1", "finished"), ("t2", "stopped_early"), ("t3", "collapsed")]
    assert float(table[1]["probe_top1"]) == 0.55 and table[2]["probe_top1"] == table[3]["probe_top1"] == ""
    assert json.loads(table[0]["optimization.ema"]) == [0.99, 1.0]
    assert json.loads((tmp_path / "results.json").read_text()) == rows
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["trial"]["trial_id"] == "t1" and best["config"] == {"meta": {"name": "t1"}}
    for name in ("top1_vs_mask_ratio.png", "top1_vs_probe_lr.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_summary_is_the_mean_and_sample_std_of_each_grid_points_seeds():
    def trial(ratio, lr, seed, top1):
        return {"trial_id": f"t{len(rows)}", MASK_RATIO: ratio, "optimization.lr": lr, "seed": seed,
                "probe_top1": top1}

    rows = []
    for ratio, lr, seed, top1 in [(0.9, 1e-3, 0, 50.0), (0.3, 1e-3, 0, 20.0), (0.9, 1e-3, 1, 60.0),
                                  (0.3, 1e-3, 1, 30.0), (0.9, 1e-3, 2, 70.0), (0.3, 1e-3, 2, None),
                                  (0.3, 3e-4, 0, 40.0), (0.5, 1e-3, 0, None)]:
        rows.append(trial(ratio, lr, seed, top1))
    summary = results.summary_rows(rows, [MASK_RATIO, "optimization.lr"])
    # By hand: 0.9 -> (50, 60, 70): mean 60, sample variance (100 + 0 + 100) / 2 = 100, std 10.
    # 0.3 at lr 1e-3 -> (20, 30) and a trial without top-1: mean 25, variance (25 + 25) / 1, std sqrt(50).
    assert summary == [
        {MASK_RATIO: 0.3, "optimization.lr": 3e-4, "top1_mean": 40.0, "top1_std": None, "n": 1,
         "collapsed": 0},
        {MASK_RATIO: 0.3, "optimization.lr": 1e-3, "top1_mean": 25.0, "top1_std": 7.071, "n": 2,
         "collapsed": 0},
        {MASK_RATIO: 0.5, "optimization.lr": 1e-3, "top1_mean": None, "top1_std": None, "n": 0,
         "collapsed": 0},
        {MASK_RATIO: 0.9, "optimization.lr": 1e-3, "top1_mean": 60.0, "top1_std": 10.0, "n": 3,
         "collapsed": 0},
    ]
    # Without the lr among the keys, the two lrs at 0.3 are one point: (40, 20, 30): mean 30, std 10.
    assert results.summary_rows(rows, [MASK_RATIO])[0] == {MASK_RATIO: 0.3, "top1_mean": 30.0, "top1_std": 10.0,
                                                            "n": 3, "collapsed": 0}


def test_best_row_skips_unfinished_trials_and_breaks_ties_by_loss():
    rows = _rows()
    rows[0]["probe_top1"] = 0.55
    assert results.best_row(rows)["trial_id"] == "t0"  # same top-1, lower loss
    assert results.best_row([rows[2]]) is None


def test_asha_compares_pretraining_loss_by_step_and_never_stops_a_trial_before_its_probe():
    from vjepa_ray.sweep.driver import _scheduler

    assert _scheduler(demo("tune.grace_period=0")) is None
    asha = _scheduler(demo("tune.grace_period=50", "optimization.total_steps=300"))
    assert (asha._time_attr, asha._metric, asha._mode, asha._max_t) == ("step", "loss", "min", 301)
    assert min(asha._brackets[0]._rungs)[0] == 50  # the first comparison: at step 50 (grace_period)
    # The last pretraining report (step 300) is below max_t: ASHA lets the trial go on to its probe.
    assert asha._max_t > 300
    # A rung judged at the last report would stop trials after all their pretraining, before their probe.
    from vjepa_ray.sweep.driver import asha_rungs, check_runnable

    short = ("optimization.total_steps=20", "optimization.warmup_steps=2", "logging.every_steps=5",
             "probe.train_manifest=train.txt", "probe.val_manifest=val.txt", "tune.lr=[1e-3]")
    assert asha_rungs(demo("tune.grace_period=10", *short)) == [10, 20]
    with pytest.raises(ConfigError, match="tune.grace_period"):
        check_runnable(demo("tune.grace_period=10", *short))
    with pytest.raises(ConfigError, match="tune.grace_period"):  # rung 16 is judged at the report of step 20
        check_runnable(demo("tune.grace_period=8", *short))
    check_runnable(demo("tune.grace_period=10", "tune.reduction_factor=3", *short))
    # Tune refuses a result without the scheduler's metric and time: a trial's last one (its probe's, or the
    # one saying its target collapsed) too.
    from vjepa_ray.sweep.trial import collapsed_result, trial_result

    last = trial_result({"steps": 300, "final_loss": 0.4, "checkpoint": "/runs/t/step_00000300",
                         "metrics": {"target_feature_std": 0.45}},
                        {"probes": [{"lr": 1e-3, "weight_decay": 0.01, "top1": 40.0},
                                    {"lr": 3e-4, "weight_decay": 0.01, "top1": 55.0, "top1_inits": [50.0, 60.0]}]})
    assert (last[asha._time_attr], last[asha._metric]) == (300, 0.4)
    assert (last["probe_top1"], last["probe_lr"]) == (55.0, 3e-4) and len(last["probe_heads"]) == 2
    assert last["probe_top1_inits"] == [50.0, 60.0]  # the best point's initialisations, whose mean it reports
    assert last["target_feature_std"] == 0.45 and not last["collapsed"]  # the last pretraining report's monitor
    last = collapsed_result({"steps": 40, "final_loss": 9.5, "checkpoint": None,
                             "metrics": {"target_feature_std": 0.004}})
    assert (last[asha._time_attr], last[asha._metric]) == (40, 9.5) and "probe_top1" not in last
    assert last["collapsed"] and last["target_feature_std"] == 0.004


def test_collapse_stop_ends_a_run_at_its_patience_th_low_report_in_a_row():
    from vjepa_ray.sweep.collapse import CollapseStop, collapsed, low_streak
    from vjepa_ray.train.failures import RunStopped

    assert low_streak([0.5, 0.001, 0.2, 0.001, 0.002], 0.01) == 2
    assert low_streak([0.001, float("nan")], 0.01) == 0  # a diverged spread is no collapse
    assert collapsed([0.5, 0.001, 0.002], 0.01, 2) and not collapsed([0.001, 0.5, 0.002], 0.01, 2)
    assert not collapsed([0.001] * 5, 0.01, 0)  # patience 0: no collapse stop

    def ends_at(stds: list[float]) -> int | None:
        """The step whose report the callback ended the run at (reports every 10 steps), or None."""
        stop = CollapseStop(threshold=0.01, patience=2)
        for i, std in enumerate(stds, 1):
            # Rank 0's report (the spread is all-reduced); a report without the monitor is not counted.
            reports = [{"step": 10 * i, "loss": 0.5, "target_feature_std": std}, {"step": 10 * i}]
            try:
                stop.after_report(None, reports, None)
                stop.after_report(None, [{"step": 10 * i}], None)
            except RunStopped as stopped:
                assert stopped.metrics == reports[0] and "at step" in stopped.reason
                return stopped.metrics["step"]
        return None

    assert ends_at([0.3, 0.005, 0.3, 0.004, 0.003]) == 50
    assert ends_at([0.3, 0.005, 0.3, 0.2, 0.3]) is None


def test_trial_pretrains_in_its_own_folder_of_the_sweep(tmp_path):
    from vjepa_ray import runs
    from vjepa_ray.sweep.trial import trial_run_config

    cfg = demo(f"ray.storage_path={tmp_path}", "meta.name=sweep", "tune.lr=[1e-3]")
    trial = trial_run_config(cfg, {"optimization.lr": 1e-3}, "abc_00001")
    assert runs.run_dir(cfg) == str(tmp_path / "sweep")
    assert (trial.ray.storage_path, trial.meta.name) == (str(tmp_path / "sweep" / "pretrain"), "abc_00001")
