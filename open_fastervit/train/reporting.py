"""What a run reports: log lines, the per-epoch CSV, the curves picture and strict-JSON files.

The engine writes ``summary.csv`` (one row per epoch), ``curves.png`` (matplotlib's Agg backend: loss, the task's
validation metric, lr) and ``results.json``; progress bars are tqdm's and TensorBoard logs torch's
``SummaryWriter``. JSON files are strict (NaN and infinities written as null) so any JSON reader takes them.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..serialization import atomic_write
from .distributed import DistInfo

__all__ = ["json_safe", "log", "plot_curves", "write_json", "write_summary_csv"]


def log(info: DistInfo, message: str) -> None:
    """Print ``message`` on the primary rank, above any progress bar (stderr)."""
    if info.is_primary:
        tqdm.write(message, file=sys.stderr)


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as None (null), so the file is strict JSON (JavaScript's ``JSON.parse``
    rejects NaN); the Python result dict keeps its NaNs."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: str | Path, value: Any, indent: int | None = 2) -> Path:
    """Write ``value`` to ``path`` as strict JSON (NaN and infinities as null, :func:`json_safe`), creating the
    folder; every JSON file of a run goes through here. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(value), indent=indent, allow_nan=False))
    return path


def write_summary_csv(history: list[dict[str, Any]], path: Path) -> None:
    """One row per epoch (columns: the union of the rows' keys, in first-seen order), written atomically."""
    columns = list(dict.fromkeys(key for row in history for key in row))

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(history)

    atomic_write(path, write)


def plot_curves(history: list[dict[str, Any]], curve: list[list[float]], steps_per_epoch: int, path: Path,
                metric: str = "top1", metric_title: str = "top-1 (%)") -> None:
    """PNG of the training curves with matplotlib's Agg backend: loss, the validation ``metric`` (raw and EMA)
    and lr against epochs.

    Train loss and lr are drawn per logging interval (``curve``), validation metrics per epoch.
    """
    # here, not at the top: matplotlib loads only when a run ends and draws its curves
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    loss_axis, top1_axis, lr_axis = figure.subplots(1, 3)
    if curve:
        steps, losses, lrs = zip(*curve)
        epochs = [step / max(steps_per_epoch, 1) for step in steps]
        loss_axis.plot(epochs, losses, label="train loss", linewidth=1)
        lr_axis.plot(epochs, lrs, label="lr", linewidth=1)
    name = metric_title.split(" (")[0]
    series = [(loss_axis, "loss", "val loss"), (loss_axis, "ema_loss", "EMA val loss"),
              (top1_axis, metric, name), (top1_axis, f"ema_{metric}", f"EMA {name}")]
    for axis, key, label in series:
        points = [(row["epoch"], row[key]) for row in history if key in row]
        if points:
            axis.plot(*zip(*points), marker="o", markersize=3, label=label)
    for axis, title in ((loss_axis, "loss"), (top1_axis, metric_title), (lr_axis, "learning rate")):
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.savefig(path, dpi=110)
