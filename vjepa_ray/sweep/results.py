"""The sweep's results, for people: a table of every trial, one of every grid point, the best trial, two plots.

Rows are flat dicts (one per trial): ``trial_id``, ``status`` (``finished``, ``stopped_early`` by ASHA,
``collapsed`` (stopped by ``vjepa_ray.sweep.collapse``) or ``error``), one column per axis of the grid but the
seed, the trial's ``seed``, what its masks cover (``masked_fraction``), the pretraining's last ``step`` and
``loss``, the collapse monitor at its end
(``target_feature_std``), the best point of its probe grid (``probe_top1``, the mean over ``probe.num_inits``
initialisations, each one's in ``probe_top1_inits``; ``probe_lr``, ``probe_weight_decay``) and every point's
top-1 (``top1[lr=...,wd=...]``), top-1 in percent. A grid point is a trial's settings
without its seed; its summary row holds the mean and sample standard deviation of its trials' top-1 and how
many of its trials collapsed.
Files go into the sweep's folder (a local path or a URI, see ``vjepa_ray.runs``): ``results.csv``,
``results.json``, ``summary.csv``, ``best.json``, ``top1_vs_mask_ratio.png``, ``top1_vs_probe_lr.png``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from typing import Any, Iterable, Sequence

from vjepa_ray import runs
from vjepa_ray.sweep.space import MASK_RATIO

RESULT_FILES = ("results.csv", "results.json", "summary.csv", "best.json", "top1_vs_mask_ratio.png",
                "top1_vs_probe_lr.png")
_HEAD = re.compile(r"^top1\[lr=(?P<lr>[^,\]]+),wd=(?P<wd>[^\]]+)\]$")


def head_column(lr: float, weight_decay: float) -> str:
    """The table column of one probe of the grid."""
    return f"top1[lr={lr:g},wd={weight_decay:g}]"


def has_top1(row: dict[str, Any]) -> bool:
    value = row.get("probe_top1")
    return isinstance(value, (int, float)) and math.isfinite(value)


def best_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The trial with the highest probe top-1 (ties: the lower pretraining loss), or None."""
    scored = [r for r in rows if has_top1(r)]
    if not scored:
        return None
    return max(scored, key=lambda r: (r["probe_top1"], -float(r.get("loss") or math.inf)))


def summary_rows(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """One row per grid point (its settings: the columns ``keys``), in the order of the settings: ``top1_mean``
    and ``top1_std`` (sample standard deviation, ddof 1) of the best probe top-1 of its trials, and ``n``,
    how many of its trials have one, and ``collapsed``, how many of its trials the collapse stop ended. With
    one trial with a top-1 the std is None; with none, the mean too."""
    points: dict[str, tuple[list[Any], list[float], list[bool]]] = {}
    for row in rows:
        settings = [row.get(key) for key in keys]
        # JSON names the point: settings may be lists (EMA ranges), which a dict key cannot be.
        _, top1, collapsed = points.setdefault(json.dumps(settings), (settings, [], []))
        if has_top1(row):
            top1.append(float(row["probe_top1"]))
        collapsed.append(row.get("status") == "collapsed")
    return [{**dict(zip(keys, settings)),
             "top1_mean": round(statistics.fmean(top1), 3) if top1 else None,
             "top1_std": round(statistics.stdev(top1), 3) if len(top1) > 1 else None,
             "n": len(top1), "collapsed": sum(collapsed)}
            for settings, top1, collapsed in sorted(points.values(), key=lambda point: point[0])]


def columns(rows: Iterable[dict[str, Any]]) -> list[str]:
    """Every key of every row, in first-seen order (rows of stopped trials lack the probe's)."""
    out: dict[str, None] = {}
    for row in rows:
        out.update(dict.fromkeys(row))
    return list(out)


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns(rows), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        # Lists (EMA ranges, per-config values) as JSON, so the cell reads back unambiguously.
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    return text.getvalue()


def plot_top1_vs_mask_ratio(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> bytes:
    """PNG: probe top-1 against masking. With a ``mask_ratio`` axis among the grid point's ``keys``: each
    point's mean with its sample standard deviation as error bars, one line per setting of the other axes,
    and every trial as a dot. Without one: each trial's top-1 against its masked fraction."""
    fig, ax = _figure()
    scored = [r for r in rows if has_top1(r)]
    x_key = MASK_RATIO if MASK_RATIO in keys else "masked_fraction"
    ax.scatter([float(r[x_key]) for r in scored], [float(r["probe_top1"]) for r in scored], color="tab:gray",
               alpha=0.6, s=16, zorder=2, label="trials")
    if x_key == MASK_RATIO:
        others = [k for k in keys if k != MASK_RATIO]
        lines: dict[str, list[dict[str, Any]]] = {}
        for point in summary_rows(rows, keys):
            if point["n"]:
                lines.setdefault(_settings_text(point, others), []).append(point)
        for label, points in lines.items():
            ax.errorbar([p[MASK_RATIO] for p in points], [p["top1_mean"] for p in points],
                        yerr=[p["top1_std"] or 0.0 for p in points], marker="o", capsize=4, zorder=3,
                        label=f"mean ± std ({label})" if label else "mean ± std")
    if scored:
        ax.legend(fontsize=7, loc="best")
    ax.set_xlabel("mask ratio (requested)" if x_key == MASK_RATIO else "masked fraction (mean over mask configs)")
    ax.set_ylabel("probe top-1 (%)")
    ax.set_title(f"probe top-1 vs masking ({len(scored)} trials)")
    return _png(fig, empty=not scored)


def plot_top1_vs_probe_lr(rows: Sequence[dict[str, Any]], axes: Sequence[str] = ()) -> bytes:
    """PNG: for each finished trial, top-1 against the probe learning rate (best weight decay per lr)."""
    fig, ax = _figure()
    scored = [r for r in rows if has_top1(r)]
    for row in scored:
        per_lr: dict[float, float] = {}
        for key, value in row.items():
            match = _HEAD.match(key)
            if match and isinstance(value, (int, float)):
                lr = float(match["lr"])
                per_lr[lr] = max(per_lr.get(lr, -math.inf), float(value))
        lrs = sorted(per_lr)
        ax.plot(lrs, [per_lr[lr] for lr in lrs], marker="o", label=_label(row, axes))
    ax.set_xscale("log")
    ax.set_xlabel("probe learning rate")
    ax.set_ylabel("probe top-1 (%)")
    ax.set_title("probe top-1 vs probe learning rate")
    if scored:
        ax.legend(fontsize=7, loc="best")
    return _png(fig, empty=not scored)


def write_results(folder: str, rows: Sequence[dict[str, Any]], keys: Sequence[str],
                  best_config: dict[str, Any] | None) -> dict[str, str]:
    """Writes the result files (``RESULT_FILES``) into ``folder``; returns ``{file name: path}``.

    ``keys``: the columns that make a grid point (the swept settings but the seed); ``best_config``: the
    full config of the best trial, for ``best.json``.
    """
    best = best_row(rows)
    best_doc = {"trial": best, "config": best_config} if best is not None else {"trial": None, "config": None}
    contents = {
        "results.csv": to_csv(rows).encode(),
        "results.json": json.dumps(list(rows), indent=1).encode(),
        "summary.csv": to_csv(summary_rows(rows, keys)).encode(),
        "best.json": json.dumps(best_doc, indent=1).encode(),
        "top1_vs_mask_ratio.png": plot_top1_vs_mask_ratio(rows, keys),
        "top1_vs_probe_lr.png": plot_top1_vs_probe_lr(rows, [*keys, "seed"]),
    }
    paths = {}
    for name, data in contents.items():
        paths[name] = runs.join(folder, name)
        runs.write_bytes(paths[name], data)
    return paths


def _label(row: dict[str, Any], axes: Sequence[str]) -> str:
    settings = _settings_text(row, axes)
    return f"{row['trial_id']}" + (f" ({settings})" if settings else "")


def _settings_text(row: dict[str, Any], keys: Sequence[str]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={_short(row[k])}" for k in keys if k in row)


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on cluster nodes
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _png(fig, empty: bool) -> bytes:
    import matplotlib.pyplot as plt

    if empty:
        fig.axes[0].text(0.5, 0.5, "no trial finished its probe", ha="center", va="center",
                         transform=fig.axes[0].transAxes)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
