"""Meta's checkpoint layout: features equal a plain reference forward, strict loading, export round trips."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from vjepa_ray.config import builtin_config_path, load_config
from vjepa_ray.export import main as export_main
from vjepa_ray.models import build_encoder, build_models, load_pretrained, load_pretrained_predictor
from vjepa_ray.models.pos_embed import sincos_3d
from vjepa_ray.models.pretrained import official_checkpoint
from vjepa_ray.train.weights import read_training_weights, write_training_weights

PREFIX = "module.backbone."


def randomised(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values in every parameter (init leaves biases, LayerNorms and mask tokens constant)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return module


def official_file(tmp_path, name="vit_tiny", frames=4, crop=32, seed=0):
    """A checkpoint in the released layout, with the same random weights in all three models."""
    encoder = randomised(build_encoder(name, frames, crop), seed)
    state = {PREFIX + k: v for k, v in encoder.state_dict().items()}
    path = tmp_path / f"{name}_{frames}x{crop}.pth.tar"
    torch.save({"encoder": state, "target_encoder": state, "predictor": {}, "epoch": 3}, path)
    return path, state


def reference_forward(state: dict, x: torch.Tensor, heads: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The reference encoder's forward, spelled out on the released state-dict names."""
    w = {k[len(PREFIX):]: v for k, v in state.items()}
    cube = w["patch_embed.proj.weight"].shape[2:]
    x = F.conv3d(x, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=cube)
    x = x.flatten(2).transpose(1, 2) + w["pos_embed"]
    if keep is not None:
        x = torch.stack([x[b, keep[b]] for b in range(x.shape[0])])
    b, n, d = x.shape
    i = 0
    while f"blocks.{i}.norm1.weight" in w:
        p = f"blocks.{i}."
        h = F.layer_norm(x, (d,), w[p + "norm1.weight"], w[p + "norm1.bias"], eps=1e-6)
        qkv = h @ w[p + "attn.qkv.weight"].T + w[p + "attn.qkv.bias"]
        q, k, v = qkv.reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) / (d // heads) ** 0.5, dim=-1)
        h = (attn @ v).transpose(1, 2).reshape(b, n, d)
        x = x + h @ w[p + "attn.proj.weight"].T + w[p + "attn.proj.bias"]
        h = F.layer_norm(x, (d,), w[p + "norm2.weight"], w[p + "norm2.bias"], eps=1e-6)
        h = F.gelu(h @ w[p + "mlp.fc1.weight"].T + w[p + "mlp.fc1.bias"])
        x = x + h @ w[p + "mlp.fc2.weight"].T + w[p + "mlp.fc2.bias"]
        i += 1
    return F.layer_norm(x, (d,), w["norm.weight"], w["norm.bias"], eps=1e-6)


def test_loaded_encoder_matches_the_reference_forward(tmp_path):
    path, state = official_file(tmp_path)
    encoder = load_pretrained(path, model_name="vit_tiny", num_frames=4, crop_size=32).eval()
    x = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    keep = torch.tensor([[0, 2, 3, 7], [1, 4, 5, 6]])
    with torch.no_grad():
        for k in (None, keep):
            diff = (encoder(x, k) - reference_forward(state, x, heads=3, keep=k)).abs().max().item()
            assert diff <= 1e-4


def test_a_checkpoint_of_another_model_fails_listing_the_keys(tmp_path):
    path, _ = official_file(tmp_path, name="vit_small")
    with pytest.raises(ValueError) as err:
        load_pretrained(path, model_name="vit_tiny", num_frames=4, crop_size=32)
    assert "shape mismatch (149): pos_embed (checkpoint [1, 8, 384], model [1, 8, 192]), " \
           "patch_embed.proj.weight (checkpoint [384, 3, 2, 16, 16], model [192, 3, 2, 16, 16])" in str(err.value)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    path, state = official_file(tmp_path)
    state = dict(state)
    state.pop(PREFIX + "blocks.3.attn.qkv.bias")
    state[PREFIX + "head.weight"] = torch.zeros(1)
    torch.save({"target_encoder": state}, path)
    with pytest.raises(ValueError, match=r"missing \(1\): blocks.3.attn.qkv.bias(.|\n)*unexpected \(1\): head.weight"):
        load_pretrained(path, model_name="vit_tiny", num_frames=4, crop_size=32)
    with pytest.raises(ValueError, match=r"under 'encoder', found keys \['target_encoder'\]"):
        load_pretrained(path, model_name="vit_tiny", num_frames=4, crop_size=32, key="encoder")


def test_a_table_for_another_clip_size_is_regenerated_but_a_foreign_one_fails(tmp_path):
    path, state = official_file(tmp_path, frames=8, crop=64)
    encoder = load_pretrained(path, model_name="vit_tiny", num_frames=4, crop_size=32)
    assert torch.equal(encoder.pos_embed[0], sincos_3d(192, 2, 2, 2))
    assert torch.equal(encoder.blocks[0].attn.qkv.weight, state[PREFIX + "blocks.0.attn.qkv.weight"])
    torch.save({"target_encoder": {**state, PREFIX + "pos_embed": torch.randn(1, 64, 192)}}, path)
    with pytest.raises(ValueError, match=r"pos_embed \(checkpoint \[1, 64, 192\], model \[1, 8, 192\]\)"):
        load_pretrained(path, model_name="vit_tiny", num_frames=4, crop_size=32)


def demo_models(seed: int = 0):
    # The built-in demo: vit_tiny, 8 frames, crop 64, predictor 96 wide and 4 deep, two mask configs.
    cfg = load_config(builtin_config_path("local_demo"))
    encoder, predictor = build_models(cfg)
    return cfg, randomised(encoder, seed), randomised(predictor, seed + 1), randomised(build_models(cfg)[0], seed + 2)


def test_export_then_import_is_bit_exact(tmp_path):
    _, encoder, predictor, target = demo_models()
    ours = {"encoder": encoder.state_dict(), "predictor": predictor.state_dict(),
            "target_encoder": target.state_dict()}
    path = tmp_path / "official.pt"
    torch.save(official_checkpoint(**ours), path)
    back = torch.load(path, weights_only=True)
    assert back["epoch"] == 0 and all(k.startswith(PREFIX) for k in back["predictor"])
    for key, state in ours.items():
        assert back[key].keys() == {PREFIX + k for k in state}
        assert all(torch.equal(back[key][PREFIX + k], v) for k, v in state.items())
    loaded = load_pretrained(path, model_name="vit_tiny", num_frames=8, crop_size=64)
    assert all(torch.equal(v, ours["target_encoder"][k]) for k, v in loaded.state_dict().items())
    pred = load_pretrained_predictor(path, model_name="vit_tiny", num_frames=8, crop_size=64)
    assert (pred.predictor_embed_dim, len(pred.predictor_blocks), pred.num_mask_tokens) == (96, 4, 2)
    assert all(torch.equal(v, ours["predictor"][k]) for k, v in pred.state_dict().items())


def run_export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vjepa_ray.export", *args], capture_output=True, text=True,
                          timeout=300)


def test_export_cli_round_trips_and_rejects_bad_arguments(tmp_path, capsys):
    _, encoder, predictor, target = demo_models(seed=5)
    ours = tmp_path / "ours.pt"
    write_training_weights(ours, {"encoder": encoder.state_dict(), "predictor": predictor.state_dict(),
                                  "target_encoder": target.state_dict()})
    official, back = tmp_path / "official.pt", tmp_path / "back.pt"
    out = run_export("to-official", "--input", str(ours), "--output", str(official))
    assert out.returncode == 0, out.stderr
    assert all(k.startswith(PREFIX) for k in torch.load(official, weights_only=True)["encoder"])
    out = run_export("from-official", "--input", str(official), "--output", str(back))
    assert out.returncode == 0, out.stderr
    before, after = read_training_weights(ours), read_training_weights(back)
    for key in before:
        assert before[key].keys() == after[key].keys()
        assert all(torch.equal(before[key][k], after[key][k]) for k in before[key])

    with pytest.raises(SystemExit) as exited:
        export_main(["sideways", "--input", str(ours), "--output", str(back)])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and len(err.strip().splitlines()) == 1 and "sideways" in err
    # Weights that do not fit the config's model: exit 2 naming the mismatched keys.
    assert export_main(["to-official", "--input", str(ours), "--output", str(back), "model.name=vit_small"]) == 2
    assert "patch_embed.proj.weight (checkpoint [192" in capsys.readouterr().err
