"""Training curves: the scalar series in a run's TensorBoard event files, and their plots.

``vjepa_ray.train.metrics.TensorBoardCallback`` writes the files (tags ``train/<metric>``);
``python -m vjepa_ray.report`` reads and plots them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from vjepa_ray import runs

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
