"""``python -m vjepa_ray.report RUN_DIR``: a finished (or running) run, summarised and plotted.

Reads ``summary.json`` and the TensorBoard event files that training writes, prints a summary, and writes
PNG plots into ``RUN_DIR/plots/``: loss (total and per mask config), learning rate, EMA momentum,
throughput, data-wait share and the collapse monitor (spread of the target features). ``RUN_DIR`` is a
local folder or a URI (``vjepa_ray.runs``); the event files are read where training writes them while
that folder is on this machine, else from the run folder's copy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vjepa_ray import runs
from vjepa_ray.train.curves import read_scalars, write_plots

PROG = "python -m vjepa_ray.report"


def summary_lines(summary: dict, scalars: dict[str, list[tuple[int, float]]]) -> list[str]:
    """What the report prints: the summary's counts, then first/last/min/max of the main curves."""
    lines = [f"status {summary.get('status', 'running (no summary.json yet)')}"]
    for key in ("steps", "final_loss", "restarts", "skipped_videos", "world_sizes", "global_batch", "elapsed_s",
                "checkpoint"):
        if key in summary:
            lines.append(f"{key} {summary[key]}")
    for name in ("loss", "clips_per_s", "data_wait_share", "target_feature_std"):
        if scalars.get(name):
            values = [v for _, v in scalars[name]]
            lines.append(f"{name}: first {values[0]:.4g}  last {values[-1]:.4g}  min {min(values):.4g}  "
                         f"max {max(values):.4g}  ({len(values)} points)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="A finished (or running) run, summarised and plotted.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="<ray.storage_path>/<meta.name>: a folder or a URI")
    parser.add_argument("--out", metavar="DIR", default=None, help="where the PNGs go (default RUN_DIR/plots)")
    args = parser.parse_args(argv)
    run_dir = args.run_dir if runs.is_uri(args.run_dir) else str(Path(args.run_dir).expanduser())
    if not runs.exists(run_dir):
        parser.exit(2, f"{PROG}: error: RUN_DIR: no such folder: {run_dir}\n")
    summary = runs.read_summary(run_dir) or {}
    with runs.tensorboard_files(run_dir) as logdir:
        scalars = read_scalars(logdir) if logdir is not None else {}
    for line in summary_lines(summary, scalars):
        print(line)
    if not scalars:
        where = summary.get("tensorboard") or runs.join(run_dir, runs.TENSORBOARD_DIR)
        print(f"no metrics found under {where}", file=sys.stderr)
        return 1
    for path in write_plots(scalars, args.out or runs.join(run_dir, runs.PLOTS_DIR)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
