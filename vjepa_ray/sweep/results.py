"""The sweep's results, for people: a table of every trial, the best one, and two plots.

Rows are flat dicts (one per trial): ``trial_id``, ``status`` (``finished``, ``stopped_early`` by ASHA,
or ``error``), one column per axis of the grid, what the trial's masks cover (``masked_fraction``), the
pretraining's last ``step`` and ``loss``, the best probe of its grid (``probe_top1``, ``probe_lr``,
``probe_weight_decay``) and every probe's top-1 (``top1[lr=...,wd=...]``), top-1 in percent. Files go into the sweep's
folder (a local path or a URI, see ``vjepa_ray.runs``): ``results.csv``, ``results.json``, ``best.json``,
``top1_vs_mask_ratio.png``, ``top1_vs_probe_lr.png``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from typing import Any, Iterable, Sequence

from vjepa_ray import runs

RESULT_FILES = ("results.csv", "results.json", "best.json", "top1_vs_mask_ratio.png", "top1_vs_probe_lr.png")
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


def plot_top1_vs_mask_ratio(rows: Sequence[dict[str, Any]]) -> bytes:
    """PNG: each finished trial's best probe top-1 against its masked fraction (mean over mask configs)."""
    fig, ax = _figure()
    scored = [r for r in rows if has_top1(r)]
    x_key = "mask_ratio" if any("mask_ratio" in r for r in scored) else "masked_fraction"
    xs = [float(r[x_key]) for r in scored]
    ys = [float(r["probe_top1"]) for r in scored]
    ax.scatter(xs, ys, color="tab:blue", zorder=3)
    by_x: dict[float, list[float]] = {}
    for x, y in zip(xs, ys):
        by_x.setdefault(x, []).append(y)
    if len(by_x) > 1:
        line_x = sorted(by_x)
        ax.plot(line_x, [max(by_x[x]) for x in line_x], color="tab:blue", alpha=0.5, label="best per ratio")
        ax.legend()
    ax.set_xlabel("mask ratio (requested)" if x_key == "mask_ratio" else "masked fraction (mean over mask configs)")
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


def write_results(folder: str, rows: Sequence[dict[str, Any]], axes: Sequence[str],
                  best_config: dict[str, Any] | None) -> dict[str, str]:
    """Writes the five result files into ``folder``; returns ``{file name: path}``.

    ``axes``: the grid's keys (row columns) that name a trial in the plots' legends; ``best_config``: the
    full config of the best trial, for ``best.json``.
    """
    best = best_row(rows)
    best_doc = {"trial": best, "config": best_config} if best is not None else {"trial": None, "config": None}
    contents = {
        "results.csv": to_csv(rows).encode(),
        "results.json": json.dumps(list(rows), indent=1).encode(),
        "best.json": json.dumps(best_doc, indent=1).encode(),
        "top1_vs_mask_ratio.png": plot_top1_vs_mask_ratio(rows),
        "top1_vs_probe_lr.png": plot_top1_vs_probe_lr(rows, axes),
    }
    paths = {}
    for name, data in contents.items():
        paths[name] = runs.join(folder, name)
        runs.write_bytes(paths[name], data)
    return paths


def _label(row: dict[str, Any], axes: Sequence[str]) -> str:
    settings = ", ".join(f"{k.split('.')[-1]}={_short(row[k])}" for k in axes if k in row)
    return f"{row['trial_id']}" + (f" ({settings})" if settings else "")


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
