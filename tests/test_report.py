"""``python -m vjepa_ray.report``: summary and plots from a run folder's event files."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np

from vjepa_ray.train.curves import PLOTS, read_scalars, series_for

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir, steps=30, resumed_from=None):
    """A run folder as training leaves it: summary.json and TensorBoard scalars under tensorboard/."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / "tensorboard"))
    for step in range(resumed_from or 0, steps):
        values = {"loss": 1.0 / (1 + step), "loss_mask_0": 0.9 / (1 + step), "loss_mask_1": 1.1 / (1 + step),
                  "lr": 1e-4 + 1e-5 * step, "momentum": 0.998 + 1e-5 * step, "clips_per_s": 10.0 + step % 3,
                  "data_wait_share": 0.1, "target_feature_std": 0.5 * math.exp(-step / 50)}
        for name, value in values.items():
            writer.add_scalar(f"train/{name}", value, step)
    writer.close()
    (run_dir / "summary.json").write_text(json.dumps(
        {"status": "finished", "steps": steps, "final_loss": 1.0 / steps, "restarts": 0, "skipped_videos": 2,
         "world_sizes": [2], "checkpoint": str(run_dir / "checkpoint_x")}))


def check_plots(plots_dir, scalars):
    for plot in PLOTS:
        path = plots_dir / plot.filename
        assert path.read_bytes()[:8] == PNG_SIGNATURE, plot.filename
        import matplotlib.image

        pixels = matplotlib.image.imread(str(path))
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0).shape[0] > 10, f"{path} looks blank"
        assert series_for(plot, scalars), plot.filename


def test_read_scalars_keeps_the_last_write_of_a_repeated_step(tmp_path):
    write_run(tmp_path, steps=20)
    write_run(tmp_path, steps=30, resumed_from=10)  # a restart repeats steps 10..19
    scalars = read_scalars(tmp_path / "tensorboard")
    assert [s for s, _ in scalars["loss"]] == list(range(30))
    assert series_for(PLOTS[0], scalars) == ["loss", "loss_mask_0", "loss_mask_1"]


def test_report_cli_writes_every_plot(tmp_path):
    write_run(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "vjepa_ray.report", str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "status finished" in proc.stdout and "skipped_videos 2" in proc.stdout
    check_plots(tmp_path / "plots", read_scalars(tmp_path / "tensorboard"))


def test_report_cli_missing_run_dir_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vjepa_ray.report", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
