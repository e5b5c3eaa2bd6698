"""Model families: one registry that the config, the models and the step ask; a family registered from here
trains through JepaStep with no other module edited."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vjepa_ray.config import ConfigError, load_config
from vjepa_ray.models import FAMILIES, Family, get_family
from vjepa_ray.models.families import VJEPA1, token_per_clip_length, token_per_mask_config
from vjepa_ray.models.pos_embed import Grid
from vjepa_ray.models.positions import PositionScheme
from vjepa_ray.recipe.step import JepaStep, MicroBatch


def test_the_registry_holds_the_releases_and_the_config_checks_names_against_it():
    assert list(FAMILIES) == ["vjepa1", "vjepa2", "vjepa2_1"]
    assert get_family("vjepa2") is FAMILIES["vjepa2"] and get_family(VJEPA1) is VJEPA1
    with pytest.raises(ValueError, match="family: expected one of vjepa1, vjepa2, vjepa2_1, got 'vjepa3'"):
        get_family("vjepa3")
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.family=vjepa3"])
    assert str(info.value) == "model.family: 'vjepa3' is not one of vjepa1, vjepa2, vjepa2_1"


def test_mask_tokens_per_mask_config_for_vjepa1_and_per_clip_length_for_the_2_0_release():
    assert token_per_mask_config(2, 0) == [0, 1]
    assert token_per_clip_length(2, 0) == [0, 0] and token_per_clip_length(2, 3) == [3, 3]
    with pytest.raises(ValueError, match="trains one clip length"):
        token_per_mask_config(2, 1)
    assert get_family("vjepa1").mask_tokens is token_per_mask_config
    assert get_family("vjepa2").mask_tokens is token_per_clip_length


class FrameIndexTable(PositionScheme):
    """A table that tells tokens apart by frame only: every channel holds the token's frame index / 10."""

    has_table = True

    def table(self, width: int, grid: Grid, uniform_power: bool) -> torch.Tensor:
        frames = torch.arange(grid[0], dtype=torch.float32).repeat_interleave(grid[1] * grid[2]) / 10
        return frames[None, :, None].expand(1, -1, width).clone()


def reversed_tokens(num_masks: int, length_index: int) -> list[int]:
    return list(reversed(range(num_masks)))


TOY = Family(name="toy_frames", positions=FrameIndexTable(), depth_scaled_init=True, mask_tokens=reversed_tokens,
             pretrainable=True, schedule="constant")


@pytest.fixture
def toy_family(monkeypatch):
    monkeypatch.setitem(FAMILIES, TOY.name, TOY)
    return TOY


def test_a_family_registered_here_trains_one_step_through_jepa_step(toy_family, one_thread):
    cfg = load_config(None, [f"model.family={toy_family.name}", "model.name=vit_micro", "model.pred_depth=1",
                             "model.pred_embed_dim=48", "data.frames_per_clip=4", "data.crop_size=32",
                             "optimization.clip_grad=0"])
    cfg.validate_pretraining()
    train_step = JepaStep.from_config(cfg)
    encoder, predictor = train_step.module.encoder, train_step.module.predictor
    assert encoder.family is toy_family and predictor.family is toy_family and encoder.rope is None
    assert torch.equal(encoder.pos_embed[0, :, 0], torch.arange(2).repeat_interleave(4).float() / 10)
    assert predictor.predictor_pos_embed.shape == (1, 8, 48)
    before = {name: p.detach().clone() for name, p in train_step.module.named_parameters()}

    clips = torch.randint(0, 256, (2, 4, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    group = train_step.group(clips.permute(0, 4, 1, 2, 3).float(), (cfg.meta.seed, 0, 0), 0)
    assert group.mask_tokens == [1, 0]  # the family's own rule
    out = train_step([MicroBatch(clips)], step=0)

    assert torch.isfinite(torch.tensor(out.loss)) and out.grad_norm is None
    moved = {name for name, p in train_step.module.named_parameters() if not torch.equal(p, before[name])}
    assert {"mask_tokens.0", "mask_tokens.1"} <= {name.removeprefix("predictor.") for name in moved}


def test_a_family_whose_predictor_is_not_built_is_refused_for_pretraining_only(toy_family, monkeypatch):
    encoder_only = dataclasses.replace(toy_family, name="toy_encoder_only", pretrainable=False)
    monkeypatch.setitem(FAMILIES, encoder_only.name, encoder_only)
    cfg = load_config(None, [f"model.family={encoder_only.name}"])
    with pytest.raises(ConfigError, match="model.family: toy_encoder_only pretraining"):
        cfg.validate_pretraining()
