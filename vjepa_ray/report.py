"""``python -m vjepa_ray.report RUN_DIR``: a finished (or running) run, summarised and plotted.

Reads ``summary.json`` and the TensorBoard event files that training writes, prints a summary, and writes
PNG plots into ``RUN_DIR/plots/``: loss (total and per mask config), learning rate, EMA momentum,
throughput, data-wait share and the collapse monitor (spread of the target features). ``RUN_DIR`` is a
local folder or a URI (``vjepa_ray.runs``); the event files are read where training writes them while
that folder is on this machine, else from the run folder's copy.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vjepa_ray import runs

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
    for events in sorted(logdir.rglob("events.out.tfevents.*"), key=_written_at):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            name = tag.removeprefix(TAG_PREFIX)
            for event in acc.Scalars(tag):
                series.setdefault(name, {})[event.step] = event.value
    return {name: sorted(points.items()) for name, points in series.items()}


def _written_at(events: Path) -> tuple[int, float]:
    # The file name starts with its writer's creation time (events.out.tfevents.<seconds>.<host>...), which a
    # copy keeps and its modification time does not; within a second, the modification time decides.
    return int(events.name.split(".")[3]), events.stat().st_mtime


def series_for(plot: Plot, scalars: dict[str, list]) -> list[str]:
    """The metric names ``plot`` draws, in legend order."""
    names = []
    for pattern in plot.series:
        if pattern.endswith("*"):
            names += sorted(n for n in scalars if n.startswith(pattern[:-1]))
        elif pattern in scalars:
            names.append(pattern)
    return names


def write_plots(scalars: dict[str, list[tuple[int, float]]], out_dir: str) -> list[str]:
    """One PNG per entry of PLOTS that has data, into ``out_dir`` (a local folder or a URI); returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=100)
        plt.close(fig)
        path = runs.join(out_dir, plot.filename)
        runs.write_bytes(path, png.getvalue())
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


@contextmanager
def _event_files(run_dir: str, summary: dict) -> Iterator[Path | None]:
    """A local folder with the run's event files: where training writes them, when that is on this machine,
    else the run folder's ``tensorboard/`` (copied here when remote); None when there is neither."""
    live = summary.get("tensorboard")
    if live and Path(live).is_dir():
        yield Path(live)
        return
    copy = runs.join(run_dir, runs.TENSORBOARD_DIR)
    if not runs.exists(copy):
        yield None
        return
    with runs.local_copy(copy) as folder:
        yield folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="<ray.storage_path>/<meta.name>: a folder or a URI")
    parser.add_argument("--out", metavar="DIR", default=None, help="where the PNGs go (default RUN_DIR/plots)")
    args = parser.parse_args(argv)
    run_dir = args.run_dir if runs.is_uri(args.run_dir) else str(Path(args.run_dir).expanduser())
    if not runs.exists(run_dir):
        parser.exit(2, f"{PROG}: error: RUN_DIR: no such folder: {run_dir}\n")
    summary = runs.read_summary(run_dir) or {}
    with _event_files(run_dir, summary) as logdir:
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
