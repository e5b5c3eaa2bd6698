"""The recipe's training step in one process: emulated ranks, the masks' seeds, clipping, and a loss that falls."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

from vjepa_ray.config import MaskConfig, OptimizationConfig
from vjepa_ray.models import Predictor, VisionTransformer, get_family
from vjepa_ray.recipe.clipping import GradClipping
from vjepa_ray.recipe.masks import MaskCollator, MaskPair
from vjepa_ray.recipe.objective import ClipGroup, JepaModule, JepaOutput, jepa_loss, normalize_clips
from vjepa_ray.recipe.optimizer import adamw
from vjepa_ray.recipe.schedules import ema_momentum_at, lr_at, weight_decay_at
from vjepa_ray.recipe.step import JepaStep, MicroBatch
from vjepa_ray.train.elastic import plan_batch
from vjepa_ray.video.synthetic import moving_pattern

MASKS = [MaskConfig(num_blocks=2, spatial_scale=[0.15, 0.15]), MaskConfig(num_blocks=1, spatial_scale=[0.5, 0.5])]
# A constant LR and EMA momentum: what a step does then depends on the step index through the masks only.
CONSTANT = OptimizationConfig(total_steps=100, warmup_steps=0, start_lr=1e-3, lr=1e-3, final_lr=1e-3,
                              weight_decay=0.04, final_weight_decay=0.04, ema=[0.99, 0.99], clip_grad=0)
SEED = 7


class FixedMasks:
    """The same masks for every clip, whatever the seed and rank: any split of a batch sees the same ones."""

    def __init__(self, grid: tuple[int, int, int]):
        self.grid = grid
        ids = torch.arange(math.prod(grid))
        self.pairs = [(ids[None, ::2], ids[None, 1::2]), (ids[None, :8], ids[None, 8:])]

    def __call__(self, batch_size: int, seed, rank: int = 0) -> list[MaskPair]:
        return [(context.repeat(batch_size, 1), target.repeat(batch_size, 1)) for context, target in self.pairs]


def tiny_step(optimization: OptimizationConfig = CONSTANT, step_class: type[JepaStep] = JepaStep,
              collator=None, optimizer: type[torch.optim.Optimizer] | None = None) -> JepaStep:
    torch.manual_seed(0)
    encoder = VisionTransformer(img_size=32, num_frames=4, patch_size=8, tubelet_size=2, embed_dim=48, depth=2,
                                num_heads=3)
    predictor = Predictor(encoder.grid, 48, predictor_embed_dim=32, depth=1, num_heads=2, num_mask_tokens=2)
    module = JepaModule(encoder, predictor)
    opt = (adamw(module.named_parameters(), optimization) if optimizer is None
           else optimizer(module.parameters(), lr=optimization.lr))
    return step_class(module, copy.deepcopy(encoder).requires_grad_(False), opt,
                      collator or MaskCollator(MASKS, encoder.grid), optimization, SEED)


def random_clips(count: int) -> torch.Tensor:
    return torch.randint(0, 256, (count, 4, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def weights(step: JepaStep) -> dict[str, torch.Tensor]:
    return {**{f"online.{n}": p for n, p in step.module.named_parameters()},
            **{f"target.{n}": p for n, p in step.target_encoder.named_parameters()}}


def test_two_emulated_ranks_step_like_one_batch_of_all_their_clips(one_thread):
    clips = random_clips(3)
    grid = (2, 4, 4)
    split, whole = tiny_step(collator=FixedMasks(grid)), tiny_step(collator=FixedMasks(grid))
    # 3 clips over 2 ranks: rank 0 takes 2, rank 1 one; the weights make the gradient the mean over all 3.
    plan = plan_batch(3, 2, 2)
    for step in range(2):
        per_rank = split([MicroBatch(clips[:2], rank=0, weight=plan.loss_weight(2)),
                          MicroBatch(clips[2:], rank=1, weight=plan.loss_weight(1))], step)
        together = whole([MicroBatch(clips)], step)
        mean = sum(out.loss * w for out, w in zip(per_rank.outputs, (plan.loss_weight(2), plan.loss_weight(1)))) / 2
        assert mean.item() == pytest.approx(together.loss, rel=1e-6)
    start, got, want = weights(tiny_step()), weights(split), weights(whole)
    assert max((got[name] - start[name]).abs().max().item() for name in start) > 1e-3  # the steps moved them
    for name, value in got.items():
        torch.testing.assert_close(value, want[name], rtol=1e-6, atol=1e-7, msg=name)


class RecordingStep(JepaStep):
    """Records the masks each micro batch's forward is given."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.masks: list[list[MaskPair]] = []

    def forward(self, groups: list[ClipGroup]) -> JepaOutput:
        self.masks.extend(group.masks for group in groups)
        return super().forward(groups)


def test_masks_are_drawn_from_seed_step_and_micro_index_and_positioned_by_rank(one_thread):
    train_step = tiny_step(step_class=RecordingStep)
    clips = random_clips(2)
    batches = [MicroBatch(clips, rank=0, micro=0), MicroBatch(clips[:1], rank=0, micro=1),
               MicroBatch(clips, rank=1, micro=0)]
    train_step(batches, 3)

    collator = MaskCollator(MASKS, (2, 4, 4))
    for batch, got in zip(batches, train_step.masks):
        want = collator(len(batch.clips), seed=(SEED, 3, batch.micro), rank=batch.rank)
        assert all(torch.equal(g, w) for g_pair, w_pair in zip(got, want) for g, w in zip(g_pair, w_pair))
    rank0, _, rank1 = train_step.masks
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(rank0, rank1))  # the ranks' positions differ


def sgd_update_norms(optimization: OptimizationConfig, step: int) -> tuple[float | None, float, float]:
    """(the step's reported norm, the encoder's update norm, the predictor's) of one step of plain SGD at LR 1,
    which moves the weights by the clipped gradient itself."""
    unit = dataclasses.replace(optimization, lr=1.0, start_lr=1.0, final_lr=1.0, weight_decay=0.0,
                               final_weight_decay=0.0)
    train_step = tiny_step(unit, optimizer=torch.optim.SGD)
    modules = (train_step.module.encoder, train_step.module.predictor)
    before = [[p.detach().clone() for p in m.parameters()] for m in modules]
    out = train_step([MicroBatch(random_clips(2))], step)
    assert all(p.grad is None for p in train_step.module.parameters())
    encoder, predictor = (torch.cat([(p.detach() - b).flatten() for p, b in zip(m.parameters(), start)]).norm().item()
                          for m, start in zip(modules, before))
    return out.grad_norm, encoder, predictor


def test_global_rule_clips_one_norm_over_encoder_and_predictor(one_thread):
    norm, encoder, predictor = sgd_update_norms(dataclasses.replace(CONSTANT, clip_grad=1e-3, clip_grad_rule="global"),
                                                0)
    assert norm > 1e-3
    assert math.hypot(encoder, predictor) == pytest.approx(1e-3, rel=1e-4)


def test_vjepa1_rule_clips_encoder_and_predictor_separately_only_past_the_warmup_epoch(one_thread):
    # V-JEPA 1's release: clip_grad_norm_ on the encoder and on the predictor, once epoch > warmup (300-step
    # epochs), so from step warmup_steps + 300 on.
    rule = dataclasses.replace(CONSTANT, clip_grad=1e-5, warmup_steps=2, total_steps=400)
    unclipped, encoder, predictor = sgd_update_norms(rule, 301)
    assert unclipped is None and min(encoder, predictor) > 1e-4  # no norm computed, nothing clipped
    norm, encoder, predictor = sgd_update_norms(rule, 302)
    assert norm > 1e-4
    assert encoder == pytest.approx(1e-5, rel=1e-2) and predictor == pytest.approx(1e-5, rel=1e-2)
    # The explicit rule: per module from any step.
    _, encoder, predictor = sgd_update_norms(dataclasses.replace(CONSTANT, clip_grad=1e-5,
                                                                 clip_grad_rule="per_module", clip_grad_start=1), 1)
    assert encoder == pytest.approx(1e-5, rel=1e-2) and predictor == pytest.approx(1e-5, rel=1e-2)
    assert sgd_update_norms(dataclasses.replace(CONSTANT, clip_grad=0.0), 500)[0] is None  # clip_grad 0: none


def test_vjepa2_rule_never_clips(one_thread):
    family = get_family("vjepa2")
    assert GradClipping.of(CONSTANT, family) is None and GradClipping.of(OptimizationConfig(), family) is None
    assert GradClipping.of(dataclasses.replace(CONSTANT, clip_grad=1.0, clip_grad_rule="global"), family) == \
        GradClipping(1.0, per_module=False, start=0)  # the global option stays open to every family
    assert GradClipping.of(OptimizationConfig(), get_family("vjepa1")) == GradClipping(10.0, True, 12_300)


def test_lr_and_weight_decay_lead_the_ema_momentum_by_one_step_as_both_releases_index_them(one_thread):
    # The releases advance their LR and WD schedulers before step i uses them (index i + 1) and draw the
    # momentum from a generator starting at index 0 (index i).
    ramp = OptimizationConfig(total_steps=10, warmup_steps=4, schedule_scale=1.0, start_lr=1e-4, lr=1e-3,
                              final_lr=1e-5, weight_decay=0.04, final_weight_decay=0.4, ema=[0.9, 1.0], clip_grad=0)
    train_step = tiny_step(ramp)
    for step in range(3):
        out = train_step([MicroBatch(random_clips(2))], step)
        assert (out.lr, out.weight_decay, out.momentum) == (
            lr_at(step + 1, ramp), weight_decay_at(step + 1, ramp), ema_momentum_at(step, ramp))
        groups = train_step.optimizer.param_groups
        assert {g["lr"] for g in groups} == {lr_at(step + 1, ramp)}
        assert {g["weight_decay"] for g in groups} == {weight_decay_at(step + 1, ramp), 0.0}
    assert (out.lr, out.momentum) == (1e-4 + 3 * (1e-3 - 1e-4) / 4, 0.9 + 2 * 0.1 / 10)


def test_loss_falls_on_moving_patterns(one_thread):
    """30 steps of the recipe (AdamW, EMA target) on a tiny model and textures translating over frames."""
    rng = np.random.default_rng(0)
    videos = torch.from_numpy(np.stack([moving_pattern(4, 32, 32, rng) for _ in range(8)]))
    train_step = tiny_step()
    losses = [train_step([MicroBatch(videos[torch.from_numpy(rng.choice(8, 4, replace=False))])], step).loss
              for step in range(30)]
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_clips_of_two_lengths_get_masks_on_their_grids_and_the_release_mask_token_of_their_length(one_thread):
    torch.manual_seed(0)
    encoder = VisionTransformer(img_size=32, num_frames=4, patch_size=8, tubelet_size=2, embed_dim=48, depth=2,
                                num_heads=3, family="vjepa2")
    predictor = Predictor(encoder.grid, 48, predictor_embed_dim=32, depth=1, num_heads=2, num_mask_tokens=4,
                          family="vjepa2")
    with torch.no_grad():  # distinct tokens, so that using another would change the loss
        for token in predictor.mask_tokens:
            token.normal_()
    module, target = JepaModule(encoder, predictor), copy.deepcopy(encoder).requires_grad_(False)
    train_step = RecordingStep(module, target, torch.optim.SGD(module.parameters()),
                               MaskCollator(MASKS, encoder.grid), CONSTANT, SEED, clip_lengths=(4, 6))
    short = random_clips(2)
    long = torch.randint(0, 256, (3, 6, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    collator = MaskCollator(MASKS, encoder.grid)
    expected_masks = [collator(2, seed=(SEED, 3, 0), rank=1), collator.on_grid((3, 4, 4))(3, seed=(SEED, 3, 0), rank=1)]
    with torch.no_grad():  # each length by itself, with token 0 (4 frames) and token 1 (6 frames) for both masks
        by_hand = [jepa_loss(normalize_clips(clips), masks, encoder, predictor, target, [k, k], grid).loss.item()
                   for k, (clips, masks, grid) in enumerate(zip((short, long), expected_masks,
                                                                ((2, 4, 4), (3, 4, 4))))]
        other_token = jepa_loss(normalize_clips(long), expected_masks[1], encoder, predictor, target, [0, 0],
                                (3, 4, 4)).loss.item()
    assert by_hand[1] != pytest.approx(other_token, rel=1e-3)  # the token matters
    out = train_step([MicroBatch((short, long), rank=1, micro=0)], step=3)

    for got, want in zip(train_step.masks, expected_masks, strict=True):
        assert all(torch.equal(g, w) for pair_got, pair_want in zip(got, want) for g, w in zip(pair_got, pair_want))
    assert train_step.masks[1][0][0].max() >= 32  # ids on the 6-frame grid (48 tokens), past the 4-frame one's 32
    assert out.loss == pytest.approx(sum(by_hand) / 2, rel=1e-6)
    with pytest.raises(ValueError, match=r"8 frames is not one of the run's clip lengths \(4, 6\)"):
        train_step([MicroBatch(torch.zeros(1, 8, 32, 32, 3, dtype=torch.uint8))], step=0)
