"""The recipe's training step in one process: emulated ranks, the masks' seeds, clipping, and a loss that falls."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

from vjepa_ray.config import MaskConfig, OptimizationConfig
from vjepa_ray.models import Predictor, VisionTransformer
from vjepa_ray.recipe.masks import MaskCollator, MaskPair
from vjepa_ray.recipe.objective import ClipGroup, JepaModule, JepaOutput, jepa_loss, normalize_clips
from vjepa_ray.recipe.optimizer import adamw
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


def test_gradient_is_clipped_to_clip_grad_before_the_optimizer_steps(one_thread):
    # Plain SGD at LR 1 moves the weights by the clipped gradient itself.
    clipped = dataclasses.replace(CONSTANT, clip_grad=1e-3, lr=1.0, start_lr=1.0, final_lr=1.0, weight_decay=0.0,
                                  final_weight_decay=0.0)
    train_step = tiny_step(clipped, optimizer=torch.optim.SGD)
    before = [p.detach().clone() for p in train_step.module.parameters()]
    out = train_step([MicroBatch(random_clips(2))], 0)

    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(train_step.module.parameters(), before)])
    assert out.grad_norm > 1e-3
    assert update.norm().item() == pytest.approx(1e-3, rel=1e-4)
    assert all(p.grad is None for p in train_step.module.parameters())
    assert tiny_step()([MicroBatch(random_clips(2))], 0).grad_norm is None  # clip_grad 0: no clipping, no norm


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
