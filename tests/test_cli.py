"""The shared command line: --help, --dry-run, and one line with exit 2 for a config a command cannot run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vjepa_ray.cli import build_arg_parser, run_command
from vjepa_ray.config import SECTIONS, Config, ConfigError


def test_help_lists_every_config_section():
    text = " ".join(build_arg_parser("prog", "test").format_help().split())
    assert "Config sections: " + ", ".join(SECTIONS) + "." in text


BENCH_HELP = """
import contextlib, io, json, sys
from vjepa_ray.bench.__main__ import _figures, main
heavy = {}
for figure in _figures():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main([figure, "--help"])
    heavy[figure] = sorted(m for m in ("torch", "ray", "deepspeed", "av") if m in sys.modules)
print(json.dumps(heavy))
"""


def test_bench_figure_help_imports_neither_torch_ray_deepspeed_nor_av():
    # A fresh interpreter, one figure after the other: the first figure whose options import one of them names it.
    proc = subprocess.run([sys.executable, "-c", BENCH_HELP], capture_output=True, text=True, timeout=60, check=True)
    heavy = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(heavy) == ["chaos", "checkpoint", "data", "learning", "masks", "object_store", "scale", "step",
                             "train"]
    assert heavy == {figure: [] for figure in heavy}


def test_dry_run_prints_the_resolved_config_and_runs_nothing(capsys):
    ran = []
    with pytest.raises(SystemExit) as info:
        run_command("prog", "test", ["--dry-run", "data.batch_size=5"], check=lambda cfg: None, run=ran.append)
    assert info.value.code == 0 and ran == []
    out, err = capsys.readouterr()
    assert "  batch_size: 5\n" in out
    assert err == "# prog: config ok\n"


def test_a_config_error_found_while_running_exits_2_with_one_line(capsys):
    def run(cfg: Config) -> None:
        raise ConfigError("probe.train_manifest", "has no labels")

    with pytest.raises(SystemExit) as info:
        run_command("prog", "test", [], check=lambda cfg: None, run=run)
    assert info.value.code == 2
    assert capsys.readouterr().err == "prog: config error: probe.train_manifest: has no labels\n"


def test_cli_exits_2_with_one_line_and_no_traceback(tmp_path):
    # parse_cli is shared by every entry point; exercise it through a real interpreter.
    code = "from vjepa_ray.cli import parse_cli; parse_cli('prog', 'test', ['data.crop_size=250'])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["prog: config error: data.crop_size: 250 is not a positive multiple of model.patch_size 16"]

    missing = tmp_path / "absent.yaml"
    code = f"from vjepa_ray.cli import parse_cli; parse_cli('prog', 'test', ['--config', {str(missing)!r}])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "--config" in proc.stderr
