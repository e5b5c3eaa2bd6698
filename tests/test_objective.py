"""The V-JEPA objective: clip normalisation, the loss against a hand computation and against the passes by hand."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from vjepa_ray.config import MaskConfig
from vjepa_ray.models import Predictor, VisionTransformer
from vjepa_ray.recipe import objective
from vjepa_ray.recipe.masks import MaskCollator


def test_normalize_clips_values_layout_and_dtype():
    clips = torch.zeros(2, 4, 8, 8, 3, dtype=torch.uint8)
    clips[..., 0] = 255
    clips[1, 2, 3, 5] = torch.tensor([10, 20, 30], dtype=torch.uint8)
    out = objective.normalize_clips(clips)
    assert out.shape == (2, 3, 4, 8, 8) and out.dtype == torch.float32 and out.is_contiguous()
    assert out[0, 0, 0, 0, 0].item() == pytest.approx((1.0 - 0.485) / 0.229, rel=1e-5)
    assert out[0, 1, 0, 0, 0].item() == pytest.approx(-0.456 / 0.224, rel=1e-5)
    assert out[1, :, 2, 3, 5].tolist() == pytest.approx(
        [(10 / 255 - 0.485) / 0.229, (20 / 255 - 0.456) / 0.224, (30 / 255 - 0.406) / 0.225], rel=1e-5)
    assert objective.normalize_clips(clips, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("bad", [torch.zeros(2, 4, 8, 8, 3), torch.zeros(2, 3, 4, 8, 8, dtype=torch.uint8),
                                 torch.zeros(4, 8, 8, 3, dtype=torch.uint8)], ids=["float", "channels_first", "4d"])
def test_normalize_clips_rejects_bad_input(bad):
    with pytest.raises(ValueError, match=r"expected a torch.uint8 tensor \[B, T, H, W, 3\], got"):
        objective.normalize_clips(bad)


class FixedEncoder(nn.Module):
    """Token n of every clip -> the feature vector features[n]; records its calls."""

    def __init__(self, features: torch.Tensor):
        super().__init__()
        self.features = features
        self.scale = nn.Parameter(torch.ones(()))
        self.calls = []

    def forward(self, x, keep=None):
        self.calls.append(None if keep is None else keep.clone())
        out = self.features.expand(x.shape[0], -1, -1) * self.scale
        return out if keep is None else torch.gather(out, 1, keep[..., None].expand(-1, -1, out.shape[-1]))


class ConstantPredictor(nn.Module):
    """Predicts the value ``mask_index`` for every feature of every target; records its calls."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, context, context_idx, target_idx, mask_index, grid=None):
        self.calls.append((context.shape, context_idx.clone(), target_idx.clone(), mask_index))
        return torch.full((*target_idx.shape, context.shape[-1]), float(mask_index)) + self.bias + 0 * context.sum()


def test_loss_equals_a_hand_computed_l1():
    features = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 1.0, 4.0, 0.0], [2.0, 2.0, 0.0, 6.0]])  # 3 tokens, D=4
    target_encoder, encoder, predictor = FixedEncoder(features), FixedEncoder(features), ConstantPredictor()
    clips = torch.zeros(2, 3, 2, 4, 4)
    masks = [(torch.tensor([[0], [1]]), torch.tensor([[1, 2], [0, 2]])),
             (torch.tensor([[2], [2]]), torch.tensor([[0], [1]]))]
    out = objective.jepa_loss(clips, masks, encoder, predictor, target_encoder)

    f = features.numpy().astype(np.float64)
    normed = (f - f.mean(1, keepdims=True)) / np.sqrt(f.var(1, keepdims=True) + 1e-5)  # layer_norm, no affine
    loss0 = np.mean(np.abs(normed[[[1, 2], [0, 2]]] - 0.0))  # config 0: mask token 0 predicts 0
    loss1 = np.mean(np.abs(normed[[[0], [1]]] - 1.0))  # config 1 predicts 1
    assert [x.item() for x in out.per_mask_losses] == pytest.approx([loss0, loss1], rel=1e-5)
    assert out.loss.item() == pytest.approx((loss0 + loss1) / 2, rel=1e-5)
    assert out.target_features_std.item() == pytest.approx(np.mean(np.tile(f, (2, 1)).std(0, ddof=1)), rel=1e-5)

    # One target pass on the full clip; one encoder + one predictor pass per config, mask_index = config.
    assert target_encoder.calls == [None]
    assert [torch.equal(k, m[0]) for k, m in zip(encoder.calls, masks)] == [True, True]
    assert [(c[3], torch.equal(c[1], m[0]), torch.equal(c[2], m[1])) for c, m in zip(predictor.calls, masks)] == \
        [(0, True, True), (1, True, True)]
    out.loss.backward()
    assert encoder.scale.grad is not None and predictor.bias.grad is not None and target_encoder.scale.grad is None


def test_collapsed_target_features_have_zero_spread():
    encoder = FixedEncoder(torch.tensor([[1.0, 2.0, 3.0]]).expand(4, 3))  # every token the same vector
    masks = [(torch.tensor([[0, 1]]), torch.tensor([[2, 3]]))]
    out = objective.jepa_loss(torch.zeros(1, 3, 2, 4, 4), masks, encoder, ConstantPredictor(), encoder)
    assert out.target_features_std.item() == 0.0


def test_bad_inputs_raise_value_error():
    enc, pred = FixedEncoder(torch.zeros(3, 4)), ConstantPredictor()
    good = [(torch.tensor([[0]]), torch.tensor([[1]]))]
    with pytest.raises(ValueError, match=r"clips: expected a floating-point tensor \[B, 3, T, H, W\]"):
        objective.jepa_loss(torch.zeros(1, 2, 4, 4, 3, dtype=torch.uint8), good, enc, pred, enc)
    with pytest.raises(ValueError, match=r"masks\[0\] context ids: expected a torch.int64 tensor \[1, K>0\], got"):
        objective.jepa_loss(torch.zeros(1, 3, 2, 4, 4), [(torch.tensor([[0.0]]), torch.tensor([[1]]))], enc, pred, enc)
    with pytest.raises(ValueError, match="got none"):
        objective.jepa_loss(torch.zeros(1, 3, 2, 4, 4), [], enc, pred, enc)


def _tiny_models():
    encoder = VisionTransformer(img_size=32, num_frames=4, patch_size=8, tubelet_size=2, embed_dim=48, depth=2,
                                num_heads=3)
    predictor = Predictor(encoder.grid, 48, predictor_embed_dim=32, depth=2, num_heads=2, num_mask_tokens=2)
    return encoder, predictor


def test_real_models_loss_matches_the_passes_done_by_hand(one_thread):
    torch.manual_seed(0)
    encoder, predictor = _tiny_models()
    target = copy.deepcopy(encoder).requires_grad_(False)
    clips = objective.normalize_clips(torch.randint(0, 256, (2, 4, 32, 32, 3), dtype=torch.uint8))
    masks = MaskCollator([MaskConfig(num_blocks=2, spatial_scale=[0.15, 0.15]),
                          MaskConfig(num_blocks=1, spatial_scale=[0.5, 0.5])], encoder.grid)(2, 3)
    out = objective.jepa_loss(clips, masks, encoder, predictor, target)
    with torch.no_grad():
        h = nn.functional.layer_norm(target(clips), (48,))
        expected = []
        for i, (ctx, tgt) in enumerate(masks):
            pred = predictor(encoder(clips, ctx), ctx, tgt, i)
            expected.append((pred - torch.stack([h[b, tgt[b]] for b in range(2)])).abs().mean().item())
    assert [x.item() for x in out.per_mask_losses] == pytest.approx(expected, rel=1e-5)
    assert out.loss.item() == pytest.approx(sum(expected) / 2, rel=1e-5)


def test_bf16_autocast_loss_is_float32_and_close(one_thread):
    torch.manual_seed(0)
    encoder, predictor = _tiny_models()
    target = copy.deepcopy(encoder).requires_grad_(False)
    clips = objective.normalize_clips(torch.randint(0, 256, (2, 4, 32, 32, 3), dtype=torch.uint8))
    masks = MaskCollator([MaskConfig(num_blocks=2, spatial_scale=[0.15, 0.15])], encoder.grid)(2, 0)
    full = objective.jepa_loss(clips, masks, encoder, predictor, target).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = objective.jepa_loss(clips, masks, encoder, predictor, target)
    assert half.loss.dtype == torch.float32
    assert half.loss.item() == pytest.approx(full.item(), rel=0.05)
    half.loss.backward()
    assert all(p.grad is not None for p in encoder.parameters())


def test_groups_of_clip_lengths_average_their_losses_with_the_mask_tokens_given():
    features = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 1.0, 4.0, 0.0], [2.0, 2.0, 0.0, 6.0]])
    target_encoder, encoder, predictor = FixedEncoder(features), FixedEncoder(features), ConstantPredictor()
    masks = [(torch.tensor([[0]]), torch.tensor([[1, 2]])), (torch.tensor([[2]]), torch.tensor([[0]]))]
    groups = [objective.ClipGroup(torch.zeros(1, 3, 2, 4, 4), masks, [0, 0], (1, 1, 3)),
              objective.ClipGroup(torch.zeros(3, 3, 4, 4, 4), [(c.repeat(3, 1), t.repeat(3, 1)) for c, t in masks],
                                  [1, 1], (2, 1, 3))]
    out = objective.grouped_jepa_loss(groups, encoder, predictor, target_encoder)
    h = nn.functional.layer_norm(features, (4,))
    # Token k predicts the value k everywhere: |k - h| averaged over the target tokens' features.
    per_group = [[(h[[1, 2]] - k).abs().mean().item(), (h[[0]] - k).abs().mean().item()] for k in (0, 1)]
    assert [x.item() for x in out.per_mask_losses] == pytest.approx(
        [(per_group[0][i] + per_group[1][i]) / 2 for i in range(2)], rel=1e-6)
    # Each (length, mask) pair weighs the same, whatever the group sizes (1 and 3 clips): the 2.0 release's mean.
    assert out.loss.item() == pytest.approx(sum(map(sum, per_group)) / 4, rel=1e-6)
    assert [call[3] for call in predictor.calls] == [0, 0, 1, 1]
    single = objective.grouped_jepa_loss(groups[:1], encoder, predictor, target_encoder)
    assert single.loss.item() == pytest.approx(sum(per_group[0]) / 2, rel=1e-6)
