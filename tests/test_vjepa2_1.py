"""V-JEPA 2.1's models in training mode and its objective, against what the release computes
(shared/notes/vjepa2_1-step-facts.md): four separately normalised target levels, the distance-weighted
context loss and its warm-up, loss regulation, the predictor's layout and mask tokens, and a tiny 2.1 model
whose loss falls through ``JepaStep``."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from vjepa_ray.config import ConfigError, LossConfig, OptimizationConfig, load_config
from vjepa_ray.models import (
    Predictor,
    VisionTransformer,
    build_encoder,
    build_models,
    get_family,
    load_pretrained_predictor,
)
from vjepa_ray.models.families import tokens_per_mask_and_length, tokens_per_mask_and_source
from vjepa_ray.recipe import objective
from vjepa_ray.recipe.masks import MaskCollator, distance_to_targets
from vjepa_ray.recipe.regulation import LossRegulation, LossRegulationError, exceeds_bound
from vjepa_ray.recipe.step import JepaStep, MicroBatch
from vjepa_ray.video.synthetic import moving_pattern

V2_1 = get_family("vjepa2_1")


def layer_norm(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)


class LevelsEncoder(nn.Module):
    """Token n of every clip -> features[n] ([N, 4 D]); with ``all_levels`` false, the last level."""

    num_levels = 4

    def __init__(self, features: torch.Tensor):
        super().__init__()
        self.features = features

    def input_grid(self, x):
        return (1, 2, 3)

    def is_image(self, x):
        return False

    def forward(self, x, keep=None, all_levels=False):
        out = self.features.expand(x.shape[0], -1, -1)
        out = out if all_levels else out[..., -out.shape[-1] // 4:]
        return out if keep is None else torch.gather(out, 1, keep[..., None].expand(-1, -1, out.shape[-1]))


class ConstantPredictor(nn.Module):
    """Predicts 1 for every feature of the targets and 2 for every feature of the context tokens."""

    def forward(self, context, context_idx, target_idx, mask_index, grid=None, *, predict_context=False, image=False):
        assert predict_context and not image
        return torch.ones(*target_idx.shape, context.shape[-1]), torch.full(context.shape, 2.0)


def test_targets_are_four_levels_each_layer_normalised_by_itself():
    gen = torch.Generator().manual_seed(0)
    # Levels of very different scales: one norm over all 4 D would let the largest dominate.
    features = torch.cat([torch.randn(6, 3, generator=gen) * scale for scale in (0.1, 1.0, 10.0, 100.0)], -1)
    targets, spread = objective.target_features(LevelsEncoder(features), torch.zeros(2, 3, 1, 1, 1), levels=4)
    f = features.numpy().astype(np.float64)
    expected = np.concatenate([layer_norm(f[:, 3 * k:3 * k + 3]) for k in range(4)], -1)
    np.testing.assert_allclose(targets[0].numpy(), expected, rtol=0, atol=1e-5)
    assert not np.allclose(targets[0].numpy(), layer_norm(f), atol=1e-2)
    assert spread.item() == pytest.approx(np.mean(np.tile(f, (2, 1)).std(0, ddof=1)), rel=1e-5)


def test_the_distance_of_context_tokens_to_the_nearest_target_on_a_hand_checked_mask():
    # Grid of 2 frames x 3 x 3, token id = 9 frame + 3 row + column. Clip 0's target is frame 0's centre
    # (0, 1, 1); clip 1's are (1, 0, 0) and (0, 2, 2).
    context = torch.tensor([[0, 1, 13, 9, 17], [0, 2, 10, 17, 4]])
    target = torch.tensor([[4, 4], [9, 8]])
    # Clip 1: (0,0,2) is 2 from (0,2,2) and sqrt(5) from (1,0,0); (0,1,1) is sqrt(2) from (0,2,2).
    by_hand = [[math.sqrt(2), 1, 1, math.sqrt(3), math.sqrt(3)], [1, 2, 1, 1, math.sqrt(2)]]
    distances = distance_to_targets(context, target, (2, 3, 3))
    torch.testing.assert_close(distances, torch.tensor(by_hand), rtol=0, atol=1e-6)
    # The context loss weighs each token by 1 / sqrt(distance): the release's dmin ** 0.5, then 1 / d.
    torch.testing.assert_close(distances.rsqrt()[1], torch.tensor([1, 2 ** -0.5, 1, 1, 2 ** -0.25]), rtol=0,
                               atol=1e-6)


def test_the_2_1_loss_is_prediction_plus_lambda_times_the_distance_weighted_context_error():
    """Two mask pairs on a 1 x 2 x 3 grid, loss_exp 2, against a computation by hand in numpy."""
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(6, 4 * 2, generator=gen)
    masks = [(torch.tensor([[0, 1], [3, 5]]), torch.tensor([[5, 2], [0, 4]])),
             (torch.tensor([[2], [4]]), torch.tensor([[3], [1]]))]
    encoder = LevelsEncoder(features)
    out = objective.dense_jepa_loss(torch.zeros(2, 3, 2, 32, 48), masks, encoder, ConstantPredictor(), encoder,
                                    [0, 0], loss_exp=2.0, context_weight=0.3, distance_weighted=True)

    f = features.numpy().astype(np.float64)
    normed = np.concatenate([layer_norm(f[:, 2 * k:2 * k + 2]) for k in range(4)], -1)
    positions = np.array([(0, i // 3, i % 3) for i in range(6)], dtype=np.float64)
    predictions, contexts = [], []
    for ctx, tgt in masks:
        ctx, tgt = ctx.numpy(), tgt.numpy()
        predictions.append(np.mean(np.abs(1.0 - normed[tgt]) ** 2) / 2)
        nearest = np.array([[min(np.linalg.norm(positions[c] - positions[t]) for t in tgt[b]) for c in ctx[b]]
                            for b in range(2)])
        contexts.append(np.mean(np.abs(2.0 - normed[ctx]) ** 2 / np.sqrt(nearest)[..., None]) / 2)
    assert [x.item() for x in out.per_mask_losses] == pytest.approx(predictions, rel=1e-5)
    assert out.context_loss.item() == pytest.approx(np.mean(contexts), rel=1e-5)
    assert out.loss.item() == pytest.approx(np.mean(predictions) + 0.3 * np.mean(contexts), rel=1e-5)
    unweighted = objective.dense_jepa_loss(torch.zeros(2, 3, 2, 32, 48), masks, encoder, ConstantPredictor(), encoder,
                                           [0, 0], loss_exp=2.0, context_weight=0.3, distance_weighted=False)
    assert unweighted.context_loss.item() > out.context_loss.item()  # every weight is <= 1


def test_lambda_is_zero_until_15k_linear_to_its_value_at_30k_then_held_and_held_in_the_cooldown():
    pretrain = objective.build_objective(LossConfig(), "constant", V2_1)
    assert [pretrain.context_weight(s) for s in (0, 14_999, 15_000, 22_500, 30_000, 500_000)] == \
        [0.0, 0.0, 0.0, 0.25, 0.5, 0.5]
    assert pretrain.context_weight(29_999) == pytest.approx(0.5 * 14_999 / 15_000)
    assert pretrain.context.distance_weighted and pretrain.loss_exp == 1.0
    cooldown = objective.build_objective(LossConfig(context_distance_weighting=False), "cooldown", V2_1)
    assert cooldown.context_weight(0) == 0.5 and not cooldown.context.distance_weighted
    given = objective.build_objective(LossConfig(context_weight=1.0, context_warmup=[0, 10]), "constant", V2_1)
    assert [given.context_weight(s) for s in (0, 5, 10)] == [0.0, 0.5, 1.0]
    # V-JEPA 1 and 2.0 have no context term, and a config that sets one for them is refused.
    assert objective.build_objective(LossConfig(), "cosine", get_family("vjepa1")) == objective.JEPA
    with pytest.raises(ConfigError, match=r"^loss.context_weight: model.family vjepa2 has no context loss "
                                          r"\(families with one: vjepa2_1\)"):
        load_config(None, ["model.family=vjepa2", "loss.context_weight=0.5"])


def test_loss_regulation_skips_a_loss_above_mean_plus_k_std_past_its_start_with_half_a_window():
    history = [1.0, 2.0, 3.0, 2.0]  # mean 2, population std sqrt(0.5)
    bound = 2.0 + 2.0 * math.sqrt(0.5)
    assert exceeds_bound(bound + 1e-9, history, 2.0, min_history=3) and not exceeds_bound(bound, history, 2.0, 3)
    assert not exceeds_bound(100.0, history, 2.0, min_history=4)  # needs more than half the window
    reg = LossRegulation(std_mult=2.0, window=6, start_step=10, max_skips=1)
    for loss in history:  # 4 of a window of 6: more than half
        reg.record(loss)
    assert not reg.skips_update(10.0, step=9)  # before its start
    assert reg.skips_update(10.0, step=10) and reg.skips == 1
    assert not reg.skips_update(bound, step=11)
    for loss in range(20):  # the window keeps the last 6 applied steps
        reg.record(float(loss))
    assert list(reg.history) == [float(x) for x in range(14, 20)]
    restored = LossRegulation(std_mult=2.0, window=6, start_step=10, max_skips=1)
    restored.load_state_dict(reg.state_dict())
    assert (list(restored.history), restored.skips) == (list(reg.history), 1)
    with pytest.raises(LossRegulationError, match="skipped 2 steps, more than optimization.loss_reg_max_skips=1"):
        reg.skips_update(1000.0, step=12)
    assert LossRegulation.of(OptimizationConfig()) is None  # off unless loss_reg_std_mult is set, as in the release
    # The trainer holds updates back through its step gate, which fp16 leaves to DeepSpeed's loss scaler.
    load_config(None, ["optimization.loss_reg_std_mult=3"]).validate_pretraining()
    with pytest.raises(ConfigError, match="^optimization.loss_reg_std_mult: loss regulation holds updates back"):
        load_config(None, ["optimization.loss_reg_std_mult=3", "deepspeed.precision=fp16"]).validate_pretraining()


def micro_models(family: str = "vjepa1"):
    torch.manual_seed(0)
    encoder = VisionTransformer(img_size=32, num_frames=4, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                                family=family)
    return encoder, Predictor(encoder.grid, 48, 32, 1, num_heads=2, num_mask_tokens=2, family=family)


def test_regulation_decides_on_the_loss_of_every_ranks_micro_batches_and_still_moves_the_target(one_thread):
    encoder, predictor = micro_models()
    module, target = objective.JepaModule(encoder, predictor), copy.deepcopy(encoder).requires_grad_(False)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(1.0)  # apart from the encoder, so that an EMA update shows
    opt = OptimizationConfig(total_steps=10, warmup_steps=0, schedule="constant", ema=[0.5, 0.5], clip_grad=0,
                             loss_reg_std_mult=0.0, loss_reg_window=4, loss_reg_start_step=0)
    step = JepaStep(module, target, torch.optim.SGD(module.parameters(), lr=0.1),
                    MaskCollator(load_config().mask, encoder.grid), opt, seed=0)
    seen = []
    decide = step.regulation.skips_update
    step.regulation.skips_update = lambda loss, s: seen.append(loss) or decide(loss, s)
    step.regulation.history.extend([0.0, 0.0, 0.0])  # any loss above 0 is then above the bound
    clips = torch.randint(0, 256, (3, 4, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    online = copy.deepcopy(module.state_dict())
    before = {k: p.clone() for k, p in target.named_parameters()}
    out = step([MicroBatch(clips[:2], rank=0), MicroBatch(clips[2:], rank=1, weight=0.5)], step=0)

    # One decision, on the loss whose gradient the update would follow: both ranks' micro batches, weighted.
    assert seen == [pytest.approx((float(out.outputs[0].loss) + 0.5 * float(out.outputs[1].loss)) / 2, rel=1e-12)]
    assert out.loss_regulated and not out.applied and step.regulation.skips == 1
    assert all(torch.equal(v, online[k]) for k, v in module.state_dict().items())
    assert all(p.grad is None for p in module.parameters())
    moved = {k: (p - before[k]).abs().max().item() for k, p in target.named_parameters()}
    assert min(moved.values()) == pytest.approx(0.5, abs=1e-6)  # halfway back to the encoder (momentum 0.5)
    assert list(step.regulation.history) == [0.0, 0.0, 0.0]  # a skipped step's loss is not tracked


def test_the_2_1_predictor_has_the_release_layout_shapes_and_modalities():
    encoder = build_encoder("vit_tiny", 4, 32, family=V2_1)
    predictor = Predictor(encoder.grid, 192, 48, 2, num_heads=4, num_mask_tokens=6, family=V2_1)
    blocks = {k for k in predictor.state_dict() if k.startswith("predictor_blocks.")}
    assert set(predictor.state_dict()) - blocks == {
        "predictor_embed.0.weight", "predictor_embed.0.bias", "predictor_embed.2.weight", "predictor_embed.2.bias",
        *(f"mask_tokens.{i}" for i in range(6)), "video_mod_embed", "img_mod_embed", "predictor_norm.weight",
        "predictor_norm.bias", "predictor_proj.weight", "predictor_proj.bias", "predictor_proj_context.weight",
        "predictor_proj_context.bias"}
    assert predictor.predictor_embed[0].weight.shape == (192, 4 * 192)  # 4 D -> D, GELU, D -> 48
    assert isinstance(predictor.predictor_embed[1], nn.GELU) and predictor.predictor_embed[2].weight.shape == (48, 192)
    assert predictor.predictor_proj.weight.shape == predictor.predictor_proj_context.weight.shape == (4 * 192, 48)
    x = torch.randn(2, 3, 4, 32, 32)
    context_ids, target_ids = torch.tensor([[0, 3, 5], [1, 2, 7]]), torch.tensor([[1, 6], [0, 3]])
    with torch.no_grad():
        levels = encoder(x, context_ids, all_levels=True)
        assert levels.shape == (2, 3, 4 * 192)
        torch.testing.assert_close(levels[..., -192:], encoder(x, context_ids), rtol=0, atol=0)  # features: the last
        prediction, context = predictor(levels, context_ids, target_ids, 0, predict_context=True)
        assert prediction.shape == (2, 2, 4 * 192) and context.shape == (2, 3, 4 * 192)
        torch.testing.assert_close(predictor(levels, context_ids, target_ids, 0), prediction, rtol=0, atol=1e-6)
        # The modality embedding reaches every token (a random one: a constant vector is what LayerNorm removes).
        predictor.img_mod_embed.normal_(generator=torch.Generator().manual_seed(0))
        image_prediction, image_context = predictor(levels, context_ids, target_ids, 0, predict_context=True,
                                                    image=True)
        assert not torch.allclose(image_prediction, prediction, atol=1e-3)
        assert not torch.allclose(image_context, context, atol=1e-3)
    with pytest.raises(ValueError, match="predict_context: family vjepa2's predictor predicts the targets only"):
        micro_models("vjepa2")[1](torch.zeros(1, 1, 48), torch.tensor([[0]]), torch.tensor([[1]]), 0,
                                  predict_context=True)


def test_a_2_1_predictor_in_the_release_layout_loads_with_its_width_depth_and_mask_tokens(tmp_path):
    saved = Predictor((2, 2, 2), 192, 48, 2, num_heads=4, num_mask_tokens=6, family=V2_1)
    torch.save({"predictor": {f"module.backbone.{k}": v for k, v in saved.state_dict().items()}}, tmp_path / "2.1.pt")
    loaded = load_pretrained_predictor(tmp_path / "2.1.pt", model_name="vit_tiny", num_frames=4, crop_size=32,
                                       num_heads=4, family=V2_1)
    assert (loaded.predictor_embed_dim, len(loaded.predictor_blocks), loaded.num_mask_tokens) == (48, 2, 6)
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_a_release_size_2_1_predictor_has_the_release_parameter_count():
    """vit_large's predictor as the release trains it: 24 blocks of 384 with 12 heads, 6 mask tokens."""
    d, w, depth = 1024, 384, 24
    block = 2 * w + (3 * w * w + 3 * w) + (w * w + w) + 2 * w + (4 * w * w + 4 * w) + (4 * w * w + w)
    expected = (4 * d * d + d + d * w + w) + 6 * w + 2 * w + depth * block + 2 * w + 2 * (w * 4 * d + 4 * d)
    with torch.device("meta"):
        predictor = Predictor((8, 16, 16), d, w, depth, num_heads=12, num_mask_tokens=6, family=V2_1)
    assert sum(p.numel() for p in predictor.parameters()) == expected


def test_mask_tokens_are_counted_per_mask_config_and_source_as_the_2_1_release_counts_them():
    assert tokens_per_mask_and_source(2, 3, 1) == 6 and tokens_per_mask_and_length(2, 3, 1) == 2
    sources = ["model.name=vit_tiny", "data.frames_per_clip=4", "data.crop_size=32", "model.pred_depth=1",
               "model.pred_embed_dim=48", "data.paths=[a,b,c]", "data.frames_per_clip_per_source=[4,4,4]"]
    with torch.device("meta"):
        assert build_models(load_config(None, ["model.family=vjepa2_1", *sources]))[1].num_mask_tokens == 6
        assert build_models(load_config(None, ["model.family=vjepa2", *sources]))[1].num_mask_tokens == 2
    # The release's recipes (three sources of 16 frames) only ever pick token 0.
    assert V2_1.mask_tokens(2, 0) == [0, 0]


@pytest.mark.parametrize("name,depth", [("vit_huge", 32), ("vit_micro", 4)])
def test_a_2_1_encoder_of_a_depth_without_hierarchical_layers_is_a_config_error(name, depth):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.family=vjepa2_1", f"model.name={name}"])
    assert str(info.value).startswith(f"model.name: {name} is {depth} blocks deep; vjepa2_1's hierarchical levels "
                                      "are defined for depths 12, 24, 40, 48 (vit_tiny, vit_small, vit_base")
    load_config(None, [f"model.name={name}"])  # other families take any depth


def test_a_tiny_2_1_model_trains_through_jepa_step_with_lambda_engaged(one_thread):
    cfg = load_config(None, ["model.family=vjepa2_1", "model.name=vit_tiny", "model.pred_depth=1",
                             "model.pred_embed_dim=48", "model.pred_num_heads=4", "data.frames_per_clip=4",
                             "data.crop_size=32", "optimization.schedule=constant", "optimization.warmup_steps=0",
                             "optimization.start_lr=1e-3", "optimization.lr=1e-3", "optimization.ema=[0.99,0.99]",
                             "loss.context_warmup=[0,2]"])
    train_step = JepaStep.from_config(cfg)
    assert isinstance(train_step.module.objective, objective.DenseObjective)
    before = {k: p.detach().clone() for k, p in train_step.module.named_parameters()}
    rng = np.random.default_rng(0)
    clips = torch.from_numpy(np.stack([moving_pattern(4, 32, 32, rng) for _ in range(2)]))
    outs = [train_step([MicroBatch(clips)], step) for step in range(8)]

    assert [out.context_weight for out in outs] == [0.0, 0.25] + [0.5] * 6
    losses = [out.loss for out in outs]  # lambda grows over the first steps, and the loss with it
    assert all(math.isfinite(x) for x in losses) and np.mean(losses[-2:]) < np.mean(losses[2:4])
    prediction = [torch.stack(out.outputs[0].per_mask_losses).mean().item() for out in outs]
    context = [out.outputs[0].context_loss.item() for out in outs]
    assert prediction[-1] < prediction[0] and context[-1] < context[0]  # both terms fall
    for out, p, c in zip(outs, prediction, context):  # the loss is the prediction loss plus lambda x the context loss
        assert out.loss == pytest.approx(p + out.context_weight * c, rel=1e-5)
    moved = {k for k, p in train_step.module.named_parameters() if not torch.equal(p, before[k])}
    assert {"predictor.predictor_proj_context.weight", "predictor.video_mod_embed", "encoder.norms_block.0.weight",
            "predictor.mask_tokens.0"} <= moved
    # Video only: the image path and the second mask token get no gradient, and AdamW leaves them as they were.
    assert not moved & {"encoder.patch_embed_img.proj.weight", "encoder.img_mod_embed", "predictor.img_mod_embed",
                        "predictor.mask_tokens.1"}
