"""``python -m vjepa_ray.report RUN_DIR``: a finished (or running) run, summarised and plotted.

Reads ``summary.json`` and the TensorBoard event files that training writes, prints a summary, and writes
PNG plots into ``RUN_DIR/plots/``: loss (total and per mask config), learning rate, EMA momentum,
throughput, data-wait share and the collapse monitor (spread of the target features).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

PROG = "python -m vjepa_ray.report"
TAG_PREFIX = "train/"


@dataclass(frozen=True)
class Plot:
    filename: str
    title: str
    ylabel: str
    # Series are metric names; a trailing '*' matches every metric with that prefix (one line each).
    series: tuple[str, ...]
    log_y: bool = False


PLOTS = (
    Plot("loss.png", "JEPA loss", "L1 loss", ("loss", "loss_mask_*")),
    Plot("lr.png", "Learning rate", "lr", ("lr",), log_y=True),
    Plot("momentum.png", "EMA momentum", "momentum", ("momentum",)),
    Plot("throughput.png", "Throughput", "clips/s (all workers)", ("clips_per_s",)),
    Plot("data_wait.png", "Share of time waiting for data", "share", ("data_wait_share",)),
    Plot("collapse.png", "Collapse monitor: spread of target features", "std", ("target_feature_std",),
         log_y=True),
)


def read_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series under ``logdir`` as metric -> [(step, value)], sorted by step; later
    writes of the same step (a resumed run repeating steps) replace earlier ones."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, dict[int, float]] = {}
    for events in sorted(logdir.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            name = tag[len(TAG_PREFIX):] if tag.startswith(TAG_PREFIX) else tag
            for event in acc.Scalars(tag):
                series.setdefault(name, {})[event.step] = event.value
    return {name: sorted(points.items()) for name, points in series.items()}


def series_for(plot: Plot, scalars: dict[str, list]) -> list[str]:
    """The metric names ``plot`` draws, in legend order."""
    names = []
    for pattern in plot.series:
        if pattern.endswith("*"):
            names += sorted(n for n in scalars if n.startswith(pattern[:-1]))
        elif pattern in scalars:
            names.append(pattern)
    return names


def write_plots(scalars: dict[str, list[tuple[int, float]]], out_dir: Path) -> list[Path]:
    """One PNG per entry of PLOTS that has data; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for plot in PLOTS:
        names = series_for(plot, scalars)
        if not names:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for name in names:
            steps, values = zip(*scalars[name])
            ax.plot(steps, values, label=name)
        ax.set(title=plot.title, xlabel="step", ylabel=plot.ylabel)
        if plot.log_y and all(v > 0 for name in names for _, v in scalars[name]):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / plot.filename
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def summary_lines(summary: dict, scalars: dict[str, list[tuple[int, float]]]) -> list[str]:
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
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="<ray.storage_path>/<meta.name> of a local run")
    parser.add_argument("--out", metavar="DIR", default=None, help="where the PNGs go (default RUN_DIR/plots)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir).expanduser()
    if not run_dir.is_dir():
        parser.exit(2, f"{PROG}: error: RUN_DIR: no such folder: {run_dir}\n")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    logdir = Path(summary.get("tensorboard") or run_dir / "tensorboard")
    scalars = read_scalars(logdir) if logdir.is_dir() else {}
    for line in summary_lines(summary, scalars):
        print(line)
    if not scalars:
        print(f"no metrics found under {logdir}", file=sys.stderr)
        return 1
    for path in write_plots(scalars, Path(args.out) if args.out else run_dir / "plots"):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
