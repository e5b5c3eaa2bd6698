"""The encoder, the predictor and the position tables: sizes, values, shapes, and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vjepa_ray.config import load_config
from vjepa_ray.models import MODEL_SPECS, Predictor, VisionTransformer, build_encoder, build_models
from vjepa_ray.models.pos_embed import resize_table, sincos_3d

# Encoder parameter counts of the reference models at 16x224 (the fixed table is not a parameter).
REFERENCE_PARAMS = {"vit_large": 303.9e6, "vit_huge": 631.6e6, "vit_giant": 1012e6}


def small_encoder(depth: int = 2, **kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(32, 4, 16, 2, embed_dim=48, depth=depth, num_heads=3, **kwargs)


def numpy_table(dim: int, grid: tuple[int, int, int], uniform_power: bool) -> np.ndarray:
    """Written from the paper's description, independently of vjepa_ray.models.pos_embed."""
    if uniform_power:
        widths = [2 * int(np.ceil(dim / 6))] * 3
    else:
        widths = [dim // 2, dim // 4, dim // 4]
    coords = np.stack(np.meshgrid(*(np.arange(n) for n in grid), indexing="ij"), -1).reshape(-1, 3)
    columns = []
    for axis, width in enumerate(widths):
        freqs = 1.0 / 10000 ** (np.arange(width // 2) / (width // 2))
        phase = coords[:, axis:axis + 1].astype(np.float64) * freqs
        columns += [np.sin(phase), np.cos(phase)]
    return np.concatenate(columns, axis=1)[:, :dim].astype(np.float32)


@pytest.mark.parametrize("name", list(MODEL_SPECS))
def test_every_size_builds_on_meta_with_reference_parameter_counts(name):
    with torch.device("meta"):
        encoder = build_encoder(name, num_frames=16, crop_size=224)
    dim, depth, heads, mlp_ratio = MODEL_SPECS[name]
    assert encoder.grid == (8, 14, 14) and encoder.pos_embed.shape == (1, 1568, dim)
    assert encoder.pos_embed.is_meta and len(encoder.blocks) == depth
    assert encoder.blocks[0].mlp.fc1.out_features == int(dim * mlp_ratio)
    count = sum(p.numel() for p in encoder.parameters())
    hidden = int(dim * mlp_ratio)
    per_block = 4 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + 2 * dim * hidden + hidden + dim
    assert count == 3 * 2 * 16 * 16 * dim + dim + depth * per_block + 2 * dim
    if name in REFERENCE_PARAMS:
        assert abs(count / REFERENCE_PARAMS[name] - 1) < 0.01


@pytest.mark.parametrize("dim,grid,uniform", [(192, (8, 4, 4), True), (1024, (2, 3, 5), True),
                                              (100, (3, 2, 2), True), (64, (2, 3, 4), False)])
def test_position_table_matches_independent_formula(dim, grid, uniform):
    table = sincos_3d(dim, *grid, uniform_power=uniform)
    assert table.dtype == torch.float32 and table.shape == (math.prod(grid), dim)
    np.testing.assert_allclose(table.numpy(), numpy_table(dim, grid, uniform), rtol=0, atol=1e-6)


def test_table_resizing_is_exact_at_the_same_size_and_trilinear_otherwise():
    table = sincos_3d(24, 2, 3, 4).unsqueeze(0)
    assert resize_table(table, (2, 3, 4), (2, 3, 4)) is table
    assert resize_table(table, (2, 3, 4), (4, 5, 7)).shape == (1, 4 * 5 * 7, 24)
    # A table constant along t stays the same slice at every new t; h and w unchanged -> exact.
    slab = torch.randn(1, 1, 3, 4, 24).expand(1, 2, 3, 4, 24).reshape(1, -1, 24)
    resized = resize_table(slab, (2, 3, 4), (5, 3, 4)).reshape(5, 12, 24)
    torch.testing.assert_close(resized, slab.reshape(2, 12, 24)[:1].expand(5, 12, 24), rtol=0, atol=1e-6)


def test_forward_shapes_with_and_without_keep():
    encoder = small_encoder()
    x = torch.randn(2, 3, 4, 32, 32)
    assert encoder.grid == (2, 2, 2)
    assert encoder(x).shape == (2, 8, 48)
    assert encoder(x, torch.tensor([[0, 5, 7], [1, 2, 3]])).shape == (2, 3, 48)


def test_keep_gathers_tokens_after_the_position_table():
    x = torch.randn(2, 3, 4, 32, 32)
    keep = torch.tensor([[7, 0, 3], [2, 6, 5]])
    # No blocks: the output is per-token, so keeping then encoding = encoding then picking.
    flat = small_encoder(depth=0).eval()
    full = flat(x)
    torch.testing.assert_close(flat(x, keep), torch.stack([full[b, keep[b]] for b in range(2)]))
    # With blocks, attention is permutation-equivariant: keeping all tokens in another order permutes
    # the output rows, which holds only if positions were added before the gather.
    deep = small_encoder(depth=2).eval()
    perm = torch.stack([torch.randperm(8) for _ in range(2)])
    full = deep(x)
    torch.testing.assert_close(deep(x, perm), torch.stack([full[b, perm[b]] for b in range(2)]),
                               rtol=1e-5, atol=1e-5)
    # ...and a subset sees less context than the full clip does.
    assert not torch.allclose(deep(x, keep), torch.stack([full[b, keep[b]] for b in range(2)]), atol=1e-3)


def test_other_clip_sizes_use_an_interpolated_table():
    encoder = small_encoder().eval()
    assert encoder(torch.randn(1, 3, 8, 64, 48)).shape == (1, 4 * 4 * 3, 48)
    assert encoder(torch.randn(1, 3, 2, 16, 16)).shape == (1, 1, 48)


@pytest.mark.parametrize("x,keep,message", [
    (torch.randn(3, 4, 32, 32), None, "expected a 5-D tensor"),
    (torch.randn(1, 1, 4, 32, 32), None, "expected 3 channels"),
    (torch.randn(1, 3, 3, 32, 32), None, "multiple of 2"),
    (torch.randn(1, 3, 4, 32, 40), None, "multiples of 16"),
    (torch.zeros(1, 3, 4, 32, 32, dtype=torch.uint8), None, "floating-point"),
    (torch.randn(1, 3, 4, 32, 32), torch.tensor([[0, 1]], dtype=torch.int32), "torch.int64"),
    (torch.randn(1, 3, 4, 32, 32), torch.tensor([[0, 8]]), r"\[0, 8\), got values in \[0, 8\]"),
    (torch.randn(1, 3, 4, 32, 32), torch.tensor([0, 1]), r"expected shape \[1, K\]"),
])
def test_encoder_rejects_bad_inputs_saying_what_it_expected(x, keep, message):
    with pytest.raises(ValueError, match=message):
        small_encoder(depth=0)(x, keep)


def test_activation_checkpointing_gives_the_same_gradients():
    x = torch.randn(1, 3, 4, 32, 32)
    grads = []
    for ckpt in (False, True):
        encoder = small_encoder(activation_checkpointing=ckpt)
        encoder(x).square().sum().backward()
        grads.append([p.grad for p in encoder.parameters()])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(plain, recomputed)


def small_predictor(**kwargs) -> Predictor:
    torch.manual_seed(1)
    return Predictor((2, 2, 2), 48, 24, 2, num_heads=3, num_mask_tokens=2, **kwargs).eval()


def test_predictor_outputs_follow_the_target_order_and_ignore_the_context_order():
    predictor = small_predictor()
    context, ctx_idx = torch.randn(2, 3, 48), torch.tensor([[0, 1, 2], [4, 6, 7]])
    tgt_idx = torch.tensor([[3, 5, 7], [0, 2, 3]])
    out = predictor(context, ctx_idx, tgt_idx, 0)
    assert out.shape == (2, 3, 48)
    flip = torch.tensor([2, 0, 1])
    torch.testing.assert_close(predictor(context, ctx_idx, tgt_idx[:, flip], 0), out[:, flip], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(predictor(context[:, flip], ctx_idx[:, flip], tgt_idx, 0), out, rtol=1e-5, atol=1e-5)
    # Every query starts as the same mask token; only its position tells targets apart.
    assert not torch.allclose(out[0, 0], out[0, 1], atol=1e-3)


def test_mask_index_selects_its_own_mask_token():
    predictor = small_predictor()
    assert all(torch.equal(t, torch.zeros(1, 1, 24)) for t in predictor.mask_tokens)  # zero-initialised
    with torch.no_grad():
        predictor.mask_tokens[1].normal_()
    args = (torch.randn(1, 2, 48), torch.tensor([[0, 1]]), torch.tensor([[4, 5]]))
    first, second = predictor(*args, 0), predictor(*args, 1)
    assert not torch.allclose(first, second, atol=1e-3)
    with torch.no_grad():
        predictor.mask_tokens[0].copy_(predictor.mask_tokens[1])
    torch.testing.assert_close(predictor(*args, 0), second)
    with pytest.raises(ValueError, match=r"mask_index: expected an int in \[0, 2\), got 2"):
        predictor(*args, 2)


@pytest.mark.parametrize("ctx_shape,ctx_idx,tgt_idx,message", [
    ((1, 2, 40), [[0, 1]], [[2]], r"context: expected shape \[B, Nc, 48\]"),
    ((1, 2, 48), [[0, 1, 2]], [[3]], "to match context"),
    ((1, 2, 48), [[0, 1]], [[9]], r"target_idx: expected token ids in \[0, 8\)"),
])
def test_predictor_rejects_bad_inputs(ctx_shape, ctx_idx, tgt_idx, message):
    with pytest.raises(ValueError, match=message):
        small_predictor()(torch.randn(ctx_shape), torch.tensor(ctx_idx), torch.tensor(tgt_idx), 0)


def test_build_models_follows_the_config():
    cfg = load_config(None, ["model.name=vit_small", "model.pred_depth=3", "model.pred_embed_dim=96",
                             "data.frames_per_clip=8", "data.crop_size=64"])
    with torch.device("meta"):
        encoder, predictor = build_models(cfg)
    assert (encoder.embed_dim, encoder.num_heads, encoder.grid) == (384, 6, (4, 4, 4))
    assert predictor.grid == encoder.grid and predictor.num_mask_tokens == len(cfg.mask) == 2
    assert (predictor.predictor_embed_dim, len(predictor.predictor_blocks), predictor.num_heads) == (96, 3, 6)
    assert predictor.predictor_proj.out_features == 384
