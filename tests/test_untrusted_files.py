"""Downloaded weight files are untrusted: every loader refuses a hostile pickle without running it, and
still reads a genuine file in Meta's released layout (state dicts, optimizer and scaler states, counters)."""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from vjepa_ray.config import ConfigError, builtin_config_path, load_config
from vjepa_ray.eval import loop
from vjepa_ray.export import main as export_main
from vjepa_ray.models import build_models, load_pretrained, load_pretrained_predictor
from vjepa_ray.models.pretrained import official_checkpoint, read_checkpoint
from vjepa_ray.models.probe import AttentiveClassifier, load_official_probe

FRAMES, CROP = 4, 32
TINY = ["model.name=vit_tiny", "model.pred_depth=1", "model.pred_embed_dim=48", f"data.frames_per_clip={FRAMES}",
        f"data.crop_size={CROP}"]
REFUSED = r"refused to load: it holds objects outside what weights files hold .*nothing in it was run"


class Payload:
    """Unpickling this calls ``Path.touch(marker)``: stands for any code a hostile file would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.fixture(params=["zip_format", "legacy_format"])
def hostile(request, tmp_path: Path) -> tuple[Path, Path]:
    """A weights-looking file whose unpickling would create ``marker``; (file, marker)."""
    marker = tmp_path / "payload_ran"
    contents = {"encoder": {"module.backbone.pos_embed": torch.zeros(1)}, "epoch": Payload(marker)}
    path = tmp_path / f"{request.param}.pth.tar"
    # torch.save's format since torch 1.6, and the one before it, which torch.load still reads.
    torch.save(contents, path, _use_new_zipfile_serialization=request.param == "zip_format")
    # The file does bite when unpickled the unsafe way.
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    return path, marker


def tiny_config():
    return load_config(builtin_config_path("local_demo"), TINY)


def tiny_probe(seed: int = 0) -> AttentiveClassifier:
    return AttentiveClassifier(32, 4, 5, generator=torch.Generator().manual_seed(seed))


def probe_config(tmp_path: Path, checkpoint: Path):
    return load_config(None, [*TINY, f"probe.checkpoint={checkpoint}", "probe.train_manifest=unused.txt",
                              "probe.val_manifest=unused.txt", f"ray.storage_path={tmp_path}"])


LOADERS: dict[str, Callable[[Path, Path], object]] = {
    "read_checkpoint": lambda path, _: read_checkpoint(path),
    "load_pretrained": lambda path, _: load_pretrained(path, "vit_tiny", FRAMES, CROP),
    "load_pretrained_predictor": lambda path, _: load_pretrained_predictor(path, "vit_tiny", FRAMES, CROP),
    "load_official_probe": lambda path, _: load_official_probe(tiny_probe(), path),
    "evaluate_probe_checkpoint": lambda path, tmp: loop.load_encoder(probe_config(tmp, path)),
}


@pytest.mark.parametrize("loader", LOADERS)
def test_every_loader_refuses_a_hostile_file_and_runs_nothing(loader, hostile, tmp_path):
    path, marker = hostile
    with pytest.raises(ValueError, match=REFUSED) as refused:
        LOADERS[loader](path, tmp_path)
    assert str(path) in str(refused.value) and len(str(refused.value).splitlines()) == 1
    if loader == "evaluate_probe_checkpoint":
        assert isinstance(refused.value, ConfigError) and refused.value.key == "probe.checkpoint"
    assert not marker.exists()


def test_export_from_official_refuses_a_hostile_file_in_one_line(hostile, tmp_path, capsys):
    path, marker = hostile
    out = tmp_path / "ours.pt"
    assert export_main(["from-official", "--input", str(path), "--output", str(out), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m vjepa_ray.export from-official: error: ")
    assert str(path) in err[0] and "nothing in it was run" in err[0]
    assert not marker.exists() and not out.exists()


def test_a_genuine_release_file_with_optimizer_and_scaler_state_still_loads(tmp_path):
    """Meta's checkpoints hold ``opt`` (an optimizer state dict: tensors, floats, bools, tuples, None),
    ``scaler`` (a GradScaler state dict) and plain counters next to the models' state dicts."""
    torch.manual_seed(0)
    encoder, predictor = build_models(tiny_config())
    opt = torch.optim.AdamW([*encoder.parameters(), *predictor.parameters()], lr=1e-3)
    sum(p.square().sum() for p in encoder.parameters()).backward()
    opt.step()  # fills the state with exp_avg, exp_avg_sq and step tensors
    scaler = torch.amp.GradScaler("cpu")
    path = tmp_path / "vitt-latest.pth.tar"
    torch.save(official_checkpoint(encoder.state_dict(), predictor.state_dict(), encoder.state_dict(), epoch=7,
                                   opt=opt.state_dict(), scaler=scaler.state_dict(), loss=0.25, batch_size=24,
                                   world_size=8, lr=6.25e-4), path)

    checkpoint = read_checkpoint(path)
    assert (checkpoint["epoch"], checkpoint["loss"], checkpoint["batch_size"], checkpoint["world_size"]) == (
        7, 0.25, 24, 8)
    assert checkpoint["opt"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert checkpoint["scaler"]["scale"] == scaler.get_scale()
    loaded = load_pretrained(path, "vit_tiny", FRAMES, CROP)
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in loaded.state_dict().items())
    loaded_predictor = load_pretrained_predictor(path, "vit_tiny", FRAMES, CROP)
    assert all(torch.equal(v, predictor.state_dict()[k]) for k, v in loaded_predictor.state_dict().items())
    assert loop.load_encoder(probe_config(tmp_path, path)).state_dict().keys() == encoder.state_dict().keys()
    assert export_main(["from-official", "--input", str(path), "--output", str(tmp_path / "ours.pt"), *TINY]) == 0

    probe = tiny_probe()
    weights = {f"module.{k}": v for k, v in tiny_probe(seed=1).state_dict().items()}
    probe_opt = torch.optim.AdamW(probe.parameters())
    torch.save({"classifier": weights, "opt": probe_opt.state_dict(), "scaler": None, "epoch": 20,
                "batch_size": 16, "world_size": 8, "lr": 1e-3}, tmp_path / "probe.pth.tar")
    load_official_probe(probe, tmp_path / "probe.pth.tar")
    assert all(torch.equal(probe.state_dict()[k.removeprefix("module.")], v) for k, v in weights.items())


def test_the_universal_conversion_works_in_a_private_folder_of_its_own(tmp_path, monkeypatch):
    from vjepa_ray.train import deepspeed_state

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    planted = deepspeed_state._universal_folder("planted")
    planted.mkdir()  # another user's folder where this start would convert: refused, left as it was
    with pytest.raises(FileExistsError):
        deepspeed_state._convert_to_universal(tmp_path / "no_checkpoint", planted)
    fresh = deepspeed_state._universal_folder("fresh")
    with pytest.raises(FileNotFoundError):  # nothing to convert; the folder was made first
        deepspeed_state._convert_to_universal(tmp_path / "no_checkpoint", fresh)
    assert fresh.parent == tmp_path and fresh.stat().st_mode & 0o777 == 0o700
