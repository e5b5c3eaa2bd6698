"""README.md's examples run: every Python snippet (with the files it names written here first), and every
command line of ours, with ``--dry-run`` or ``--help`` (nothing is trained or submitted)."""

from __future__ import annotations

import os
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# Commands whose --dry-run validates the config and prints it resolved, starting nothing.
DRY_RUN = ("vjepa_ray.pretrain", "vjepa_ray.evaluate", "vjepa_ray.tune")


def fenced(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def our_command_lines() -> list[str]:
    """``python -m vjepa_ray...`` lines of the bash blocks, continuation lines joined, comments dropped."""
    lines = []
    for block in fenced("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("python -m vjepa_ray"):
                    lines.append(part)
    return lines


def as_check(line: str) -> list[str]:
    """The line as a check: as it is when it asks for --dry-run or --help, else with one of them added."""
    argv = shlex.split(os.path.expanduser(line))
    if "--dry-run" in argv or "--help" in argv:
        return argv
    return argv + (["--dry-run"] if argv[2] in DRY_RUN else ["--help"])


def test_readme_has_examples():
    assert len(fenced("python")) >= 2
    assert {line.split()[2] for line in our_command_lines()} >= {
        "vjepa_ray.pretrain", "vjepa_ray.evaluate", "vjepa_ray.tune", "vjepa_ray.export", "vjepa_ray.data"}


@pytest.mark.parametrize("line", our_command_lines())
def test_readme_command_line(line, monkeypatch, capsys):
    """Each line as ``python -m`` runs it (in this process: the checks start nothing), from the repo root."""
    argv = as_check(line)
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [argv[2], *argv[3:]])
    with pytest.raises(SystemExit) as exited:
        runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
    out, err = capsys.readouterr()
    assert exited.value.code in (0, None), f"{' '.join(argv)}\n{err[-3000:]}"
    if "--dry-run" in argv:
        assert "config ok" in err
    else:
        assert "usage:" in out


def write_official_weights(path: Path, model_name: str, frames: int, crop: int) -> dict[str, torch.Tensor]:
    """A file in Meta's released layout for ``model_name`` (random weights, bf16 to halve the write); returns
    the weights as the file holds them."""
    from vjepa_ray.models.pretrained import OFFICIAL_PREFIX
    from vjepa_ray.models.vit import build_encoder

    encoder = build_encoder(model_name, num_frames=frames, crop_size=crop)
    state = {k: v.to(torch.bfloat16) for k, v in encoder.state_dict().items()}
    official = {OFFICIAL_PREFIX + k: v for k, v in state.items()}
    torch.save({"target_encoder": official, "encoder": official, "epoch": 300}, path)
    return state


def test_readme_python_snippets_run_in_order(tmp_path, monkeypatch):
    """The snippets, in README order and in one namespace (later ones use earlier ones' names)."""
    from vjepa_ray.recipe.schedules import lr_at

    monkeypatch.chdir(tmp_path)
    snippets = fenced("python")
    weights = {}
    for name in sorted({n for snippet in snippets for n in re.findall(r'"([\w.]+\.pth\.tar)"', snippet)}):
        weights[name] = write_official_weights(tmp_path / name, "vit_large", 16, 224)
    namespace: dict = {}
    for snippet in snippets:
        exec(compile(snippet, "README.md", "exec"), namespace)

    # Meta's weights: the file's tensors, in a ViT-L built for 16 x 224 clips.
    (saved,) = weights.values()
    loaded = namespace["encoder"].state_dict()
    assert loaded.keys() == saved.keys()
    torch.testing.assert_close(loaded["blocks.23.mlp.fc2.weight"], saved["blocks.23.mlp.fc2.weight"].float())
    # The step: step 0's schedules (the LR of index 1, as the releases index it), one output per micro batch,
    # a finite loss; then one micro batch's objective.
    cfg, out, loss = namespace["cfg"], namespace["out"], namespace["loss"]
    assert out.lr == lr_at(1, cfg.optimization) and len(out.outputs) == 2
    assert 0 < out.loss < 10
    assert len(loss.per_mask_losses) == len(cfg.mask) and float(loss.target_features_std) > 0
