"""The config schema: recipe defaults, merging, and one-line errors naming the key."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vjepa_ray.config import (
    Config,
    ConfigError,
    DataConfig,
    MaskConfig,
    ModelConfig,
    OptimizationConfig,
    SweepConfig,
    builtin_config_path,
    from_dict,
    load_config,
    to_dict,
)
from vjepa_ray.models.sizes import MODEL_SPECS


def test_defaults_are_the_vitl16_recipe():
    cfg = load_config()
    assert cfg.model.name == "vit_large" and cfg.model.patch_size == 16 and cfg.model.tubelet_size == 2
    assert (cfg.data.frames_per_clip, cfg.data.frame_step, cfg.data.crop_size, cfg.data.batch_size) == (16, 4, 224, 24)
    assert [(m.num_blocks, m.spatial_scale) for m in cfg.mask] == [(8, [0.15, 0.15]), (2, [0.7, 0.7])]
    assert all(m.temporal_scale == [1.0, 1.0] and m.aspect_ratio == [0.75, 1.5] for m in cfg.mask)
    o = cfg.optimization
    assert (o.total_steps, o.warmup_steps, o.schedule_scale) == (90_000, 12_000, 1.25)
    assert (o.start_lr, o.lr, o.final_lr) == (2e-4, 6.25e-4, 1e-6)
    assert (o.weight_decay, o.final_weight_decay, o.ema, o.clip_grad) == (0.04, 0.4, [0.998, 1.0], 10.0)
    assert cfg.data.random_resize_scale == [0.3, 1.0] and cfg.data.random_resize_aspect_ratio == [0.75, 1.35]
    assert cfg.deepspeed.precision == "bf16"


def test_yaml_then_overrides_take_precedence(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {name: vit_small}\ndata: {batch_size: 8}\n")
    cfg = load_config(path, ["data.batch_size=6", "mask.1.num_blocks=3", "ray.num_workers=[1,4]"])
    assert cfg.model.name == "vit_small"
    assert cfg.data.batch_size == 6
    assert cfg.mask[1].num_blocks == 3 and cfg.mask[0].num_blocks == 8
    assert cfg.ray.num_workers == [1, 4]


def test_round_trip_through_dict():
    cfg = load_config(builtin_config_path("local_demo"))
    assert from_dict(to_dict(cfg)) == cfg
    assert isinstance(from_dict(to_dict(cfg)), Config)


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.crop_size=250", "data.crop_size"),
        ("data.frames_per_clip=15", "data.frames_per_clip"),
        ("mask.0.spatial_scale=[0.1,1.5]", "mask.0.spatial_scale"),
        ("mask.1.temporal_scale=[0.0,0.5]", "mask.1.temporal_scale"),
        ("data.batch_size=abc", "data.batch_size"),
        ("data.no_such_key=1", "data.no_such_key"),
        ("nosection.key=1", "nosection.key"),
        ("model.name=vit_enormous", "model.name"),
        ("ray.num_workers=[3,1]", "ray.num_workers"),
        ("ray.elastic_resize_interval_s=0", "ray.elastic_resize_interval_s"),
        ("ray.cpus_per_worker=0", "ray.cpus_per_worker"),
        ("ray.cpus_per_worker=-0.5", "ray.cpus_per_worker"),
        ("ray.cpus_per_worker=nan", "ray.cpus_per_worker"),
        ("ray.cpus_per_worker=two", "ray.cpus_per_worker"),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
        ("optimization.warmup_steps=100000", "optimization.warmup_steps"),
    ],
)
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "section, where, key",
    [
        (DataConfig(batch_size=0), "data", "data.batch_size"),
        (DataConfig(paths=["a", "b"], weights=[1.0]), "data", "data.weights"),
        (MaskConfig(spatial_scale=[0.5, 0.2]), "mask.3", "mask.3.spatial_scale"),
        (OptimizationConfig(total_steps=10, warmup_steps=20), "optimization", "optimization.warmup_steps"),
        (SweepConfig(ema=[[0.99, 1.0], [1.0, 0.99]]), "tune", "tune.ema.1"),
    ],
)
def test_a_section_checks_its_own_fields_under_its_full_key(section, where, key):
    with pytest.raises(ConfigError) as info:
        section.validate(where)
    assert info.value.key == key


def test_sections_alone_accept_what_only_a_cross_section_check_rejects():
    # A 250-pixel crop is a fine data section; only next to model.patch_size 16 does it fail.
    DataConfig(crop_size=250, frames_per_clip=15).validate("data")
    cfg = Config(data=DataConfig(crop_size=250))
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert info.value.key == "data.crop_size"
    cfg = Config(data=DataConfig(frames_per_clip=15), model=ModelConfig(tubelet_size=2))
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert str(info.value) == "data.frames_per_clip: 15 is not a positive multiple of model.tubelet_size 2"


def test_model_names_are_the_model_registry():
    for name in MODEL_SPECS:
        ModelConfig(name=name).validate("model")
    with pytest.raises(ConfigError) as info:
        ModelConfig(name="vit_bogus").validate("model")
    assert str(info.value) == f"model.name: 'vit_bogus' is not one of {', '.join(MODEL_SPECS)}"


def test_loading_a_config_leaves_torch_out():
    # Data tasks and --dry-run load configs: the model names and families they are checked against need no torch.
    code = "import sys, vjepa_ray.config as c; c.load_config(); print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert proc.stdout.split() == ["False"]


def test_frames_per_clip_per_source_one_per_path_each_a_multiple_of_the_tubelet():
    cfg = load_config(None, ["data.paths=[a,b,c]", "data.frames_per_clip_per_source=[16,64,16]"])
    assert [cfg.data.source_frames(i) for i in range(3)] == [16, 64, 16] and cfg.data.clip_lengths() == (16, 64)
    assert load_config(None, ["data.paths=[a,b]"]).data.clip_lengths() == (16,)
    for overrides, message in (
            (["data.paths=[a,b]", "data.frames_per_clip_per_source=[16]"],
             "data.frames_per_clip_per_source: has 1 entries for 2 data.paths"),
            (["data.paths=[a,b]", "data.frames_per_clip_per_source=[16,15]"],
             "data.frames_per_clip_per_source: 15 is not a positive multiple of model.tubelet_size 2")):
        with pytest.raises(ConfigError) as info:
            load_config(None, overrides)
        assert str(info.value) == message


def test_pretraining_refuses_vjepa2_1_and_several_lengths_on_position_tables_that_loading_accepts():
    cfg = load_config(None, ["model.family=vjepa2_1"])  # evaluate and export load 2.1's encoders
    with pytest.raises(ConfigError) as info:
        cfg.validate_pretraining()
    assert info.value.key == "model.family" and "\n" not in str(info.value)
    lengths = ["data.paths=[a,b]", "data.frames_per_clip_per_source=[16,8]"]
    with pytest.raises(ConfigError) as info:
        load_config(None, lengths).validate_pretraining()
    assert info.value.key == "data.frames_per_clip_per_source" and "model.family=vjepa2" in str(info.value)
    load_config(None, [*lengths, "model.family=vjepa2"]).validate_pretraining()
