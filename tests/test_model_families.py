"""V-JEPA 2.0 and 2.1 models: the rotary embedding against an independent formula, the releases' sizes,
2.1's encoder, and strict loading of files in the releases' layouts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vjepa_ray.config import ConfigError, load_config
from vjepa_ray.eval import loop
from vjepa_ray.export import main as export_main
from vjepa_ray.models import build_encoder, build_models, load_pretrained, load_pretrained_predictor
from vjepa_ray.models.hf import read_hf_folder
from vjepa_ray.models.pos_embed import sincos_3d
from vjepa_ray.models.predictor import Predictor
from vjepa_ray.models.pretrained import build_empty, load_state_checked
from vjepa_ray.models.rope import Rotary3D, rotate
from vjepa_ray.models.vit import VisionTransformer

PREFIX = "module.backbone."


def random_weights_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values in every parameter, LayerNorm scales around 1 (also for modules built empty)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_norm_scale = "norm" in name and p.dim() == 1 and name.endswith("weight")
            p.copy_(0.05 * torch.randn(p.shape, generator=gen) + (1.0 if is_norm_scale else 0.0))
    return module


def numpy_rotary(x: np.ndarray, ids: np.ndarray, grid: tuple[int, int, int], interleaved: bool,
                 interpolate_to: int | None = None) -> np.ndarray:
    """Channel by channel: pair (2i, 2i+1) of each axis block turns by position * 10000^(-f / half), with
    f = j // 2 (interleaved) or j mod half (2.0's repeated layout); channels past the three blocks stay."""
    n, head_dim = x.shape
    axis_dim = 2 * ((head_dim // 3) // 2)
    half = axis_dim // 2
    _, grid_h, grid_w = grid
    out = x.copy()
    for row, token in enumerate(ids):
        frame, rest = divmod(int(token), grid_h * grid_w)
        position = [float(frame), *map(float, divmod(rest, grid_w))]
        if interpolate_to is not None:
            position[1] *= (interpolate_to - 1) / (grid_h - 1)
            position[2] *= (interpolate_to - 1) / (grid_w - 1)
        for axis in range(3):
            for j in range(axis_dim):
                f = j // 2 if interleaved else j % half
                angle = position[axis] * 10000.0 ** (-f / half)
                c = axis * axis_dim + j
                partner = -x[row, c + 1] if j % 2 == 0 else x[row, c - 1]
                out[row, c] = x[row, c] * math.cos(angle) + partner * math.sin(angle)
    return out


@pytest.mark.parametrize("head_dim,interleaved,interpolate_to", [(20, False, None), (64, False, None),
                                                                  (64, True, 16), (32, True, 16)])
def test_rotary_embedding_equals_an_independent_formula(head_dim, interleaved, interpolate_to):
    grid = (3, 4, 5)
    ids = torch.tensor([0, 7, 19, 20, 33, 59, 41])
    x = torch.randn(2, 1, len(ids), head_dim, dtype=torch.float64)
    rope = Rotary3D(head_dim, interleaved=interleaved, interpolate_to=interpolate_to)
    got = rotate(x, rope.tables(ids, grid))
    for b in range(2):
        expected = numpy_rotary(x[b, 0].numpy(), ids.numpy(), grid, interleaved, interpolate_to)
        np.testing.assert_allclose(got[b, 0].numpy(), expected, rtol=0, atol=1e-5)


# Parameter counts of the releases' models, built on the meta device with Meta's code
# (facebookresearch/vjepa2 src/models/vision_transformer.py and predictor.py, use_rope=True; the predictor
# as src/hub/backbones.py builds it: 384 wide, 12 deep, 12 heads, 10 mask tokens). 2.1: that encoder with
# app/vjepa_2_1/models/vision_transformer.py's additions (patch_embed_img with tubelet 1, img_mod_embed,
# video_mod_embed, four norms_block LayerNorms in place of the final norm; vit_gigantic_xformers with
# MLP ratio 64/13).
RELEASE_ENCODER_PARAMS = {
    ("vjepa2", "vit_large"): 303_885_312,
    ("vjepa2", "vit_huge"): 631_648_000,
    ("vjepa2", "vit_giant_xformers"): 1_012_173_952,
    ("vjepa2_1", "vit_base"): 86_833_152,
    ("vjepa2_1", "vit_large"): 304_680_960,
    ("vjepa2_1", "vit_giant_xformers"): 1_013_267_968,
    ("vjepa2_1", "vit_gigantic_xformers"): 1_845_216_768,
}
RELEASE_PREDICTOR_PARAMS = {"vit_large": 22_086_016, "vit_huge": 22_282_880, "vit_giant_xformers": 22_381_312}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("family,name", list(RELEASE_ENCODER_PARAMS))
def test_every_release_size_builds_on_meta_with_the_release_parameter_count(family, name):
    with torch.device("meta"):
        encoder = build_encoder(name, num_frames=64, crop_size=384, family=family)
        if family == "vjepa2":
            predictor = Predictor(encoder.grid, encoder.embed_dim, 384, 12, num_heads=12, num_mask_tokens=10,
                                  family=family)
    assert count(encoder) == RELEASE_ENCODER_PARAMS[family, name]
    assert "pos_embed" not in encoder.state_dict()
    if family == "vjepa2":
        assert count(predictor) == RELEASE_PREDICTOR_PARAMS[name]
        assert "predictor_pos_embed" not in predictor.state_dict()


def turned_heads(t: torch.Tensor, ids: torch.Tensor, grid) -> torch.Tensor:
    """[B, N, heads, head_dim] -> [B, heads, N, head_dim], each head turned by 2.0's ``numpy_rotary``."""
    return torch.tensor(np.array([[numpy_rotary(t[i, :, h].double().numpy(), ids[i].numpy(), grid, False)
                                   for h in range(t.shape[2])] for i in range(len(t))]), dtype=torch.float32)


def reference_encoder(encoder, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """2.0's encoder written out: patch embedding, the kept tokens, then pre-norm blocks whose attention
    turns queries and keys by ``numpy_rotary`` at the kept tokens' positions, then the final norm."""
    tokens = F.conv3d(x, encoder.patch_embed.proj.weight, encoder.patch_embed.proj.bias, stride=(2, 16, 16))
    grid = tokens.shape[2:]
    tokens = tokens.flatten(2).transpose(1, 2)
    tokens = torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    b, n, c = tokens.shape
    heads = encoder.num_heads
    for block in encoder.blocks:
        y = F.layer_norm(tokens, (c,), block.norm1.weight, block.norm1.bias, 1e-6)
        q, k, v = (y @ block.attn.qkv.weight.T + block.attn.qkv.bias).view(b, n, 3, heads, c // heads).unbind(2)
        q, k = turned_heads(q, keep, grid), turned_heads(k, keep, grid)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // heads), -1) @ v.transpose(1, 2)
        tokens = tokens + attn.transpose(1, 2).reshape(b, n, c) @ block.attn.proj.weight.T + block.attn.proj.bias
        y = F.layer_norm(tokens, (c,), block.norm2.weight, block.norm2.bias, 1e-6)
        tokens = tokens + block.mlp.fc2(F.gelu(block.mlp.fc1(y)))
    return F.layer_norm(tokens, (c,), encoder.norm.weight, encoder.norm.bias, 1e-6)


def tiny(family: str, frames: int = 4, crop: int = 32, seed: int = 0, depth: int | None = None):
    """vit_tiny with random weights, built without the slower init."""
    encoder = random_weights_(build_empty(build_encoder, "vit_tiny", frames, crop, family=family), seed).eval()
    if depth is not None:
        del encoder.blocks[depth:]
    return encoder


def test_vjepa2_encoder_equals_a_written_out_forward_at_the_kept_tokens_true_positions():
    encoder = tiny("vjepa2", depth=2)
    x = torch.randn(2, 3, 4, 48, 32)  # not the built crop: rotary models have no table to resize
    keep = torch.tensor([[0, 3, 5, 8, 11], [11, 1, 2, 6, 9]])
    with torch.no_grad():
        torch.testing.assert_close(encoder(x, keep), reference_encoder(encoder, x, keep), rtol=0, atol=2e-5)


@pytest.mark.parametrize("family", ["vjepa2", "vjepa2_1"])
def test_tokens_keep_their_positions_whatever_their_order(family):
    encoder = tiny(family, depth=3)
    x = torch.randn(1, 3, 6, 32, 64)
    order = torch.randperm(3 * 2 * 4, generator=torch.Generator().manual_seed(0)).unsqueeze(0)
    with torch.no_grad():
        full = encoder(x)
        torch.testing.assert_close(encoder(x, order), full[:, order[0]], rtol=0, atol=1e-5)
        # The positions matter: the same tokens at other ids give other features.
        assert not torch.allclose(encoder(torch.flip(x, dims=[-1])), full.flip(1), atol=1e-3)


def test_vjepa2_1_encoder_levels_images_and_modalities():
    encoder = tiny("vjepa2_1")
    assert not hasattr(encoder, "norm") and encoder.hierarchical_layers == (2, 5, 8, 11)
    with torch.no_grad():
        encoder.img_mod_embed.fill_(0.5)
        x = torch.randn(2, 3, 4, 32, 32)
        levels = encoder.forward_layers(x, encoder.hierarchical_layers)
        assert torch.cat(levels, -1).shape == (2, 8, 4 * 192)
        torch.testing.assert_close(levels[-1], encoder(x), rtol=0, atol=0)
        image = torch.randn(2, 3, 1, 48, 32)  # one frame: 2.1's image path, 3x2 tokens of the tubelet-1 embedding
        tokens, (cos, _) = encoder.embed(image, None)
        torch.testing.assert_close(tokens, encoder.patch_embed_img(image) + 0.5, rtol=0, atol=0)
        assert cos.shape == (1, 1, 6, 3 * 2 * (64 // 3 // 2)) and encoder(image).shape == (2, 6, 192)
    with pytest.raises(ValueError, match=r"blocks \[2, 5, 8, 11\], got 4"):
        tiny("vjepa2_1").forward_layers(x, [4])


def test_vjepa2_predictor_rotates_instead_of_adding_a_table():
    encoder = tiny("vjepa2")
    predictor = random_weights_(Predictor(encoder.grid, 192, 48, 2, num_heads=4, num_mask_tokens=10, family="vjepa2"))
    assert "predictor_pos_embed" not in predictor.state_dict()
    context, ctx_idx = torch.randn(1, 3, 192), torch.tensor([[0, 2, 5]])
    with torch.no_grad():
        out = predictor(context, ctx_idx, torch.tensor([[1, 6, 7]]), mask_index=9)
        swapped = predictor(context[:, [2, 0, 1]], ctx_idx[:, [2, 0, 1]], torch.tensor([[7, 1, 6]]), mask_index=9)
    torch.testing.assert_close(swapped, out[:, [2, 0, 1]], rtol=0, atol=1e-5)
    assert not torch.allclose(out[:, 0], out[:, 1], atol=1e-3)  # same mask token, told apart by position


def test_vjepa2_models_start_with_the_release_depth_scaled_output_projections():
    """V-JEPA 2's models keep the reference's ``_rescale_blocks``: block i's attn.proj and mlp.fc2 start
    divided by sqrt(2 (i + 1)) of V-JEPA 1's (same seed, same draws); everything else is drawn alike."""
    def build(family: str):
        torch.manual_seed(0)
        encoder = VisionTransformer(32, 4, 16, embed_dim=64, depth=3, num_heads=4, family=family)
        torch.manual_seed(1)
        return encoder.blocks, Predictor((2, 2, 2), 64, 32, 3, num_heads=4, family=family).predictor_blocks

    for v1, v2 in zip(build("vjepa1"), build("vjepa2")):
        for i, (b1, b2) in enumerate(zip(v1, v2)):
            for name, p1 in b1.named_parameters():
                scale = math.sqrt(2 * (i + 1)) if name in ("attn.proj.weight", "mlp.fc2.weight") else 1.0
                torch.testing.assert_close(dict(b2.named_parameters())[name], p1 / scale, rtol=0, atol=0)
    # 2.1's encoder (other draws: its image patch embedding) scales alike: block 12's spread is 1/sqrt(12) of block 1's.
    blocks = build_encoder("vit_tiny", 4, 32, family="vjepa2_1").blocks
    for name in ("attn", "mlp"):
        first, last = ((b.attn.proj if name == "attn" else b.mlp.fc2).weight.std() for b in (blocks[0], blocks[-1]))
        assert 0.9 < (last / first).item() * math.sqrt(12) < 1.1


def release_file(tmp_path, family: str, name: str = "2.0.pt"):
    """Random models in a release's layout: 2.0 files still carry unused sin-cos tables; 2.1's distilled
    files keep the EMA encoder under ``ema_encoder`` (their ``target_encoder`` is something else)."""
    encoder = tiny(family)
    state = {PREFIX + k: v for k, v in encoder.state_dict().items()}
    if family == "vjepa2":
        predictor = random_weights_(Predictor(encoder.grid, 192, 48, 2, num_heads=12, num_mask_tokens=10,
                                         family=family), 1)
        tables = {PREFIX + "predictor_pos_embed": sincos_3d(48, *encoder.grid).unsqueeze(0)}
        checkpoint = {"encoder": {**state, PREFIX + "pos_embed": sincos_3d(192, *encoder.grid).unsqueeze(0)},
                      "predictor": {**{PREFIX + k: v for k, v in predictor.state_dict().items()}, **tables},
                      "epoch": 10}
        checkpoint["target_encoder"] = checkpoint["encoder"]
    else:
        other = {PREFIX + k: v for k, v in tiny(family, seed=5).state_dict().items()}
        checkpoint = {"ema_encoder": state, "target_encoder": other, "predictor": {}, "epoch": 1}
    torch.save(checkpoint, tmp_path / name)
    return tmp_path / name, encoder, checkpoint


@pytest.mark.parametrize("family", ["vjepa2", "vjepa2_1"])
def test_release_files_load_strictly_with_their_features(tmp_path, family):
    path, encoder, _ = release_file(tmp_path, family)
    loaded = load_pretrained(path, model_name="vit_tiny", num_frames=4, crop_size=32, family=family).eval()
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), encoder(x), rtol=0, atol=0)


def test_a_2_0_predictor_loads_with_its_ten_mask_tokens_and_says_the_count_to_configs(tmp_path):
    path, _, checkpoint = release_file(tmp_path, "vjepa2")
    predictor = load_pretrained_predictor(path, model_name="vit_tiny", num_frames=4, crop_size=32, family="vjepa2")
    assert predictor.num_mask_tokens == 10 and predictor.predictor_embed_dim == 48
    cfg = load_config(None, ["model.family=vjepa2", "model.name=vit_tiny", "model.pred_embed_dim=48",
                             "model.pred_depth=2", "model.pred_num_heads=12", "data.frames_per_clip=4",
                             "data.crop_size=32"])
    with torch.device("meta"):
        _, configured = build_models(cfg)
    state = {k[len(PREFIX):]: v for k, v in checkpoint["predictor"].items()}
    with pytest.raises(ValueError, match=r"set model.pred_num_mask_tokens=10"):
        load_state_checked(configured, state, "2.0.pt[predictor]")


def test_files_of_another_family_or_with_stray_keys_fail_naming_what_came(tmp_path):
    path_2_1, _, _ = release_file(tmp_path, "vjepa2_1", "2.1.pt")
    with pytest.raises(ValueError, match=r"(?s)unexpected.*norms_block.0.weight.*as family vjepa2_1"):
        load_pretrained(path_2_1, model_name="vit_tiny", num_frames=4, crop_size=32, key="ema_encoder",
                        family="vjepa2")
    path_2_0, _, checkpoint = release_file(tmp_path, "vjepa2")
    with pytest.raises(ValueError, match=r"(?s)missing.*norms_block.*as family vjepa1 or vjepa2"):
        load_pretrained(path_2_0, model_name="vit_tiny", num_frames=4, crop_size=32, family="vjepa2_1")
    # Only the two unused tables are ignored by name; any other stray tensor fails.
    checkpoint["target_encoder"] = {**checkpoint["encoder"], PREFIX + "pos_embed_extra": torch.zeros(1)}
    torch.save(checkpoint, path_2_0)
    with pytest.raises(ValueError, match=r"unexpected \(1\): pos_embed_extra"):
        load_pretrained(path_2_0, model_name="vit_tiny", num_frames=4, crop_size=32, family="vjepa2")


@pytest.mark.parametrize("family", ["vjepa2", "vjepa2_1"])
def test_the_probe_loads_the_encoder_of_model_family(tmp_path, family):
    path, encoder, _ = release_file(tmp_path, family)
    key = "target_encoder" if family == "vjepa2" else "ema_encoder"
    cfg = load_config(None, [f"model.family={family}", "model.name=vit_tiny", "data.frames_per_clip=4",
                             "data.crop_size=32", f"probe.checkpoint={path}", f"probe.checkpoint_key={key}"])
    loaded = loop.load_encoder(cfg)
    assert loaded.family.name == family
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in loaded.state_dict().items())
    groups = loop.layer_decay_groups(loaded, 1e-4, 0.05, layer_decay=0.5)
    assert sum(len(g["params"]) for g in groups) == len(list(loaded.parameters()))
    other = "vjepa2_1" if family == "vjepa2" else "vjepa2"
    with pytest.raises(ConfigError, match="probe.checkpoint"):
        loop.load_encoder(load_config(None, [f"model.family={other}", "model.name=vit_tiny", "data.frames_per_clip=4",
                                             "data.crop_size=32", f"probe.checkpoint={path}",
                                             f"probe.checkpoint_key={key}"]))


def test_the_2_0_release_layout_round_trips_through_the_export_commands(tmp_path, capsys):
    path, _, release = release_file(tmp_path, "vjepa2")
    config = ["model.family=vjepa2", "model.name=vit_tiny", "model.pred_embed_dim=48", "model.pred_depth=2",
              "model.pred_num_heads=12", "model.pred_num_mask_tokens=10", "data.frames_per_clip=4",
              "data.crop_size=32"]
    ours, back = tmp_path / "ours.pt", tmp_path / "back.pt"
    assert export_main(["from-official", "--input", str(path), "--output", str(ours), *config]) == 0
    assert export_main(["to-official", "--input", str(ours), "--output", str(back), *config]) == 0
    written = torch.load(back, weights_only=True)
    for key in ("encoder", "predictor", "target_encoder"):
        # Everything but the unused sin-cos tables, bit for bit.
        kept = {k: v for k, v in release[key].items() if not k.endswith("pos_embed")}
        assert written[key].keys() == kept.keys()
        assert all(torch.equal(written[key][k], v) for k, v in kept.items())
    default_tokens = [item for item in config if not item.startswith("model.pred_num_mask_tokens")]
    assert export_main(["from-official", "--input", str(path), "--output", str(ours), *default_tokens]) == 2
    assert "set model.pred_num_mask_tokens=10" in capsys.readouterr().err


def hf_model(tmp_path):
    """A small random ``transformers.VJEPA2Model`` (vit_tiny's sizes, a 2-block predictor), saved as HF does."""
    transformers = pytest.importorskip("transformers")
    config = transformers.VJEPA2Config(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, patch_size=16,
                                       tubelet_size=2, crop_size=32, frames_per_clip=4, pred_hidden_size=48,
                                       pred_num_hidden_layers=2, pred_num_attention_heads=4, pred_num_mask_tokens=10)
    with torch.device("meta"):  # every weight is set next: skip the (slow) init
        model = transformers.VJEPA2Model(config)
    model = random_weights_(model.to_empty(device="cpu")).eval()
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def hf_features(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():  # Hugging Face takes [B, T, C, H, W]
        return model(pixel_values_videos=x.transpose(1, 2), skip_predictor=True).last_hidden_state


def test_a_hugging_face_folder_loads_alone_with_the_same_features(tmp_path):
    model, folder = hf_model(tmp_path)
    encoder = load_pretrained(folder).eval()
    assert (encoder.family.name, encoder.grid, len(encoder.blocks)) == ("vjepa2", (2, 2, 2), 12)
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        assert (encoder(x) - hf_features(model, x)).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="the folder holds 'vjepa2', got 'vjepa2_1'"):
        load_pretrained(folder, family="vjepa2_1")
    (folder / "config.json").write_text('{"model_type": "vit"}')
    with pytest.raises(ValueError, match="expected model_type 'vjepa2', got 'vit'"):
        load_pretrained(folder)


def test_our_weights_round_trip_through_a_hugging_face_folder_that_transformers_reads(tmp_path):
    transformers = pytest.importorskip("transformers")
    model, folder = hf_model(tmp_path)
    ours, back, hf_again = tmp_path / "ours.pt", tmp_path / "back.pt", tmp_path / "hf_again"
    assert export_main(["from-hf", "--input", str(folder), "--output", str(ours)]) == 0
    config = ["model.family=vjepa2", "model.name=vit_tiny", "model.pred_embed_dim=48", "model.pred_depth=2",
              "model.pred_num_heads=4", "model.pred_num_mask_tokens=10", "data.frames_per_clip=4", "data.crop_size=32"]
    assert export_main(["to-hf", "--input", str(ours), "--output", str(hf_again), *config]) == 0
    reread = transformers.VJEPA2Model.from_pretrained(hf_again).eval()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in reread.state_dict().items())
    encoder = load_pretrained(ours, model_name="vit_tiny", num_frames=4, crop_size=32, family="vjepa2").eval()
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        assert (encoder(x) - hf_features(reread, x)).abs().max() <= 1e-4
    with pytest.raises(SystemExit) as refused:  # vjepa1: a bad input, exit 2
        export_main(["to-hf", "--input", str(ours), "--output", str(back), *config[1:]])
    assert refused.value.code == 2


def test_our_vjepa2_predictor_equals_hugging_faces_at_the_same_token_ids(tmp_path):
    """Hugging Face's predictor runs the release's math (context and mask tokens sorted by token id, rotated by
    their ids); ours, given the same weights, ids and mask token, predicts the same features."""
    model, folder = hf_model(tmp_path)
    _, _, weights = read_hf_folder(folder)
    predictor = Predictor((2, 2, 2), 192, 48, 2, num_heads=4, num_mask_tokens=10, family="vjepa2")
    predictor.load_state_dict(weights, strict=True)
    gen = torch.Generator().manual_seed(0)
    # Unsorted ids, targets interleaved with the context: the sort must not leak into positions.
    ids = torch.stack([torch.randperm(8, generator=gen) for _ in range(2)])
    context_ids, target_ids = ids[:, :5], ids[:, 5:]
    encoder_out = torch.randn(2, 8, 192, generator=gen)
    with torch.no_grad():
        # Hugging Face gathers the context from the full sequence and uses mask token 1 by default.
        expected = model.predictor(encoder_out, [context_ids], [target_ids]).last_hidden_state
        ours = predictor(torch.gather(encoder_out, 1, context_ids.unsqueeze(-1).expand(-1, -1, 192)), context_ids,
                         target_ids, mask_index=1)
    assert (ours - expected).abs().max() <= 1e-4
