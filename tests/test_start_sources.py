"""Where a run's first start comes from: ``model.init_from`` (weights) and ``checkpoint.start_from`` (another
run's checkpoint), and the driver's checks of both before any worker starts. One process, no Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vjepa_ray.config import Config, ConfigError, builtin_config_path, load_config, to_yaml
from vjepa_ray.models.pretrained import official_checkpoint
from vjepa_ray.recipe.step import init_networks
from vjepa_ray.train import driver
from vjepa_ray.train.checkpoint import CONFIG_FILE, TRAIN_STATE
from vjepa_ray.train.deepspeed_state import load_keeping_position_tables
from vjepa_ray.train.state import TrainState
from vjepa_ray.train.weights import read_initial_weights, write_training_weights


def tiny(tmp_path: Path, *overrides: str) -> Config:
    return load_config(builtin_config_path("local_demo"), [
        f"ray.storage_path={tmp_path / 'runs'}", "meta.name=run", f"data.paths=[{tmp_path / 'videos'}]",
        "data.synthetic_videos=0", "model.pred_depth=1", *overrides])


def weights_of(cfg: Config, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """A run's initial weights under another seed, with a target that differs from the encoder."""
    module, target = init_networks(load_config(builtin_config_path("local_demo"), [
        f"meta.seed={seed}", f"model.name={cfg.model.name}", "model.pred_depth=1"]))
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.5)
    return {"encoder": module.encoder.state_dict(), "predictor": module.predictor.state_dict(),
            "target_encoder": target.state_dict()}


CLIP = torch.randn(2, 3, 8, 64, 64, generator=torch.Generator().manual_seed(0))


def features(cfg: Config, state: dict[str, torch.Tensor]) -> torch.Tensor:
    encoder = init_networks(cfg)[0].encoder
    encoder.load_state_dict(state)
    with torch.no_grad():
        return encoder.eval()(CLIP)


def test_a_run_from_our_export_starts_with_exactly_its_encoder_features(tmp_path):
    cfg = tiny(tmp_path)
    saved = weights_of(cfg, seed=7)
    write_training_weights(tmp_path / "export.pt", saved)
    start = tiny(tmp_path, f"model.init_from={tmp_path / 'export.pt'}")
    module, target = init_networks(start, read_initial_weights(start))
    with torch.no_grad():
        got = module.encoder.eval()(CLIP)
    assert torch.equal(got, features(cfg, saved["encoder"]))
    assert not torch.equal(got, features(cfg, init_networks(cfg)[0].encoder.state_dict()))  # not the seed's init
    for key, model in (("predictor", module.predictor), ("target_encoder", target)):
        assert all(torch.equal(model.state_dict()[k], v) for k, v in saved[key].items()), key
    assert not any(p.requires_grad for p in target.parameters())


def test_a_release_layout_file_without_target_starts_the_target_as_its_encoder(tmp_path):
    saved = weights_of(tiny(tmp_path), seed=8)
    release = official_checkpoint(**saved)
    del release["target_encoder"]
    torch.save(release, tmp_path / "release.pt")
    start = tiny(tmp_path, f"model.init_from={tmp_path / 'release.pt'}")
    module, target = init_networks(start, read_initial_weights(start))
    for name, value in saved["encoder"].items():
        assert torch.equal(module.encoder.state_dict()[name], value)
        assert torch.equal(target.state_dict()[name], value)


def test_init_from_that_does_not_fit_is_one_config_error_line(tmp_path):
    small = tiny(tmp_path, "model.name=vit_small")
    write_training_weights(tmp_path / "small.pt", weights_of(small, seed=1))
    with pytest.raises(ConfigError) as err:
        driver.check_start_sources(tiny(tmp_path, f"model.init_from={tmp_path / 'small.pt'}"))
    message = str(err.value)
    assert message.startswith("model.init_from: ") and "\n" not in message
    assert "shape mismatch" in message and "patch_embed.proj.weight (checkpoint [384, 3, 2, 16, 16], model " \
        "[192, 3, 2, 16, 16])" in message
    with pytest.raises(ConfigError, match=r"^model.init_from: .*missing.pt"):
        driver.check_start_sources(tiny(tmp_path, f"model.init_from={tmp_path / 'missing.pt'}"))


def fake_checkpoint(folder: Path, cfg: Config) -> Path:
    """What the driver reads of a training checkpoint: its marker and its config."""
    folder.mkdir(parents=True)
    (folder / TRAIN_STATE).write_text(json.dumps(TrainState(step=4).state_dict()))
    (folder / CONFIG_FILE).write_text(to_yaml(cfg))
    return folder


def test_start_from_a_missing_folder_or_another_model_is_one_config_error_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^checkpoint.start_from: cannot start from .*nowhere: .*neither a "
                                          r"training checkpoint nor a run folder"):
        driver.check_start_sources(tiny(tmp_path, f"checkpoint.start_from={tmp_path / 'nowhere'}"))
    source = fake_checkpoint(tmp_path / "pretrain" / "step_00000004", tiny(tmp_path, "model.name=vit_small"))
    with pytest.raises(ConfigError) as err:
        driver.check_start_sources(tiny(tmp_path, f"checkpoint.start_from={source.parent}"))
    assert str(err.value) == (f"checkpoint.start_from: {source} holds another model than this run's (its model.name "
                              "vit_small, here vit_tiny): encoder.patch_embed.proj.weight is [384, 3, 2, 16, 16] "
                              "there and [192, 3, 2, 16, 16] here")
    # Another clip size and another predictor head count hold the same parameters: fine.
    same = fake_checkpoint(tmp_path / "same" / "step_00000004", tiny(tmp_path, "data.crop_size=32"))
    driver.check_start_sources(tiny(tmp_path, f"checkpoint.start_from={same.parent}", "data.frames_per_clip=16"))


def test_only_a_first_start_reads_its_sources_and_a_dry_run_reads_none(tmp_path):
    cfg = tiny(tmp_path, f"checkpoint.start_from={tmp_path / 'gone'}")
    driver.check_runnable(cfg)  # what --dry-run checks: the config, no files
    assert driver.is_first_start(cfg)
    fake_checkpoint(tmp_path / "runs" / "run" / "step_00000004", cfg)
    assert not driver.is_first_start(cfg)  # the run resumes its own checkpoint; the driver skips its sources


def test_cooldown_needs_a_start_and_init_from_excludes_start_from(tmp_path):
    with pytest.raises(ConfigError, match=r"^optimization.schedule: the cooldown continues a pretraining run"):
        driver.check_runnable(tiny(tmp_path, "optimization.schedule=cooldown", "optimization.warmup_steps=0"))
    with pytest.raises(ConfigError, match=r"^model.init_from: cannot be combined with checkpoint.start_from"):
        tiny(tmp_path, "model.init_from=a.pt", "checkpoint.start_from=b")


def test_start_from_keeps_the_new_clip_sizes_position_tables_and_loads_the_rest_strictly(tmp_path):
    source, _ = init_networks(tiny(tmp_path, "meta.seed=3"))
    longer, _ = init_networks(tiny(tmp_path, "data.frames_per_clip=16", "data.crop_size=96"))
    tables = {k: v.clone() for k, v in longer.state_dict().items() if k.endswith("pos_embed")}
    assert tables and all(source.state_dict()[k].shape != v.shape for k, v in tables.items())
    load_keeping_position_tables(src=source.state_dict(), dst=longer)
    for key, value in longer.state_dict().items():
        assert torch.equal(value, tables[key] if key in tables else source.state_dict()[key]), key
    other, _ = init_networks(tiny(tmp_path, "model.pred_embed_dim=48"))
    with pytest.raises(RuntimeError, match="predictor.predictor_embed.weight"):
        load_keeping_position_tables(src=other.state_dict(), dst=longer)


def test_init_from_a_hugging_face_folder_starts_with_its_features_and_the_target_as_its_encoder(tmp_path):
    from test_model_families import hf_features, hf_model

    model, folder = hf_model(tmp_path)
    start = tiny(tmp_path, f"model.init_from={folder}", "model.family=vjepa2", "model.name=vit_tiny",
                 "model.pred_embed_dim=48", "model.pred_depth=2", "model.pred_num_heads=4",
                 "model.pred_num_mask_tokens=10", "data.frames_per_clip=4", "data.crop_size=32")
    module, target = init_networks(start, read_initial_weights(start))
    x = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (module.encoder.eval()(x) - hf_features(model, x)).abs().max() <= 1e-4
    assert all(torch.equal(target.state_dict()[k], v) for k, v in module.encoder.state_dict().items())
    hf_tokens = model.state_dict()["predictor.embeddings.mask_tokens"]
    assert torch.equal(torch.stack(list(module.predictor.mask_tokens)), hf_tokens)
    with pytest.raises(ConfigError, match=r"^model.init_from: .*"):  # a folder of another size fails before workers
        driver.check_start_sources(tiny(tmp_path, f"model.init_from={folder}", "model.family=vjepa2",
                                        "model.name=vit_small", "data.frames_per_clip=4", "data.crop_size=32"))


# A tiny 2.1 run of three sources: six mask tokens, as the release's predictors hold.
TINY_2_1 = ("model.family=vjepa2_1", "model.pred_embed_dim=48", "model.pred_num_heads=4", "data.frames_per_clip=4",
            "data.crop_size=32")


def release_2_1(tmp_path: Path, target_key: str) -> tuple[Config, dict[str, dict[str, torch.Tensor]], dict]:
    """A tiny 2.1 run's random weights (a target apart from its encoder) and their export in the release layout,
    its target under ``target_key``."""
    cfg = tiny(tmp_path, *TINY_2_1, f"data.paths=[{tmp_path / 'a'},{tmp_path / 'b'},{tmp_path / 'c'}]")
    module, target = init_networks(cfg)
    with torch.no_grad():
        for p in target.parameters():
            p.normal_(generator=torch.Generator().manual_seed(3))
    ours = {"encoder": module.encoder.state_dict(), "predictor": module.predictor.state_dict(),
            "target_encoder": target.state_dict()}
    release = official_checkpoint(**ours)
    release[target_key] = release.pop("target_encoder")
    return cfg, ours, release


@pytest.mark.parametrize("target_key", ["target_encoder", "ema_encoder"])
def test_a_2_1_run_exports_to_the_release_layout_and_starts_from_it_bit_for_bit(tmp_path, target_key):
    cfg, ours, release = release_2_1(tmp_path, target_key)
    # The release's keys: its train.py writes target_encoder, its published models ema_encoder.
    assert set(release) == {"encoder", "predictor", target_key, "epoch"}
    prefix = "module.backbone."
    assert all(k.startswith(prefix) for key in ("encoder", "predictor", target_key) for k in release[key])
    assert {f"{prefix}{k}" for k in ("norms_block.3.weight", "patch_embed.proj.weight", "patch_embed_img.proj.weight",
                                     "img_mod_embed", "video_mod_embed")} <= set(release["encoder"])
    assert {f"{prefix}{k}" for k in ("predictor_embed.2.weight", "predictor_proj.weight",
                                     "predictor_proj_context.weight", "mask_tokens.5", "img_mod_embed")} \
        <= set(release["predictor"])
    torch.save(release, tmp_path / "release_2_1.pt")

    start = tiny(tmp_path, *TINY_2_1, f"data.paths=[{tmp_path / 'a'},{tmp_path / 'b'},{tmp_path / 'c'}]",
                 f"model.init_from={tmp_path / 'release_2_1.pt'}")
    driver.check_start_sources(start)
    loaded = read_initial_weights(start)
    module, target = init_networks(start, loaded)
    for key, model in (("encoder", module.encoder), ("predictor", module.predictor), ("target_encoder", target)):
        assert model.state_dict().keys() == ours[key].keys(), key
        assert all(torch.equal(model.state_dict()[k], v) for k, v in ours[key].items()), key


@pytest.mark.parametrize("model, key, change", [("predictor", "predictor_proj_context.bias", "missing"),
                                                 ("encoder", "norms_block.4.weight", "unexpected")])
def test_a_2_1_release_file_with_a_missing_or_an_extra_key_is_refused_in_one_line_naming_it(tmp_path, model, key,
                                                                                             change):
    cfg, _, release = release_2_1(tmp_path, "ema_encoder")
    if change == "missing":
        del release[model][f"module.backbone.{key}"]
    else:
        release[model][f"module.backbone.{key}"] = torch.zeros(192)
    torch.save(release, tmp_path / "release_2_1.pt")
    with pytest.raises(ConfigError) as err:
        driver.check_start_sources(tiny(tmp_path, *TINY_2_1, f"data.paths=[{tmp_path / 'a'},{tmp_path / 'b'},"
                                        f"{tmp_path / 'c'}]", f"model.init_from={tmp_path / 'release_2_1.pt'}"))
    message = str(err.value)
    assert message.startswith("model.init_from: ") and "\n" not in message
    assert f"[{model}] does not fit" in message and f"{change} (1): {key}" in message
