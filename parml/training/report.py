"""Results as files: a run folder with config.json, metrics.jsonl, summary.json and plot.png.

Only rank 0 writes and prints; other ranks get a writer that does nothing.
"""
from __future__ import annotations

import json
import math
import os
import sys

from matplotlib.figure import Figure
from tqdm import tqdm


class RunWriter:
    """Writes one run folder. ``active`` is False on every rank but 0."""

    def __init__(self, folder: str, active: bool = True, progress: bool = True, total: int | None = None,
                 desc: str = "train", keep_rows: list[dict] | None = None):
        self.folder, self.active = folder, active
        self._metrics = None
        self._bar = None
        if not active:
            return
        os.makedirs(folder, exist_ok=True)
        self._metrics = open(os.path.join(folder, "metrics.jsonl"), "w")
        for row in keep_rows or []:          # a resumed run continues the metrics it had checkpointed
            self._metrics.write(json.dumps(row) + "\n")
        self._bar_args = dict(total=total, desc=desc, unit="cycle", file=sys.stderr, dynamic_ncols=True,
                              leave=False, mininterval=0.5) if progress else None

    def write_json(self, name: str, obj) -> None:
        self.write_text(name, json.dumps(obj, indent=2, default=str))

    def write_text(self, name: str, text: str) -> None:
        if self.active:
            with open(os.path.join(self.folder, name), "w") as f:
                f.write(text)

    def log(self, record: dict) -> None:
        if not self.active:
            return
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self._bar is None and self._bar_args is not None:
            self._bar = tqdm(**self._bar_args)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}",
                                  acc=f"{record.get('val_acc', float('nan')):.3f}",
                                  U=f"{record.get('work_units', 0):.1f}", refresh=False)

    def print(self, *args) -> None:
        if self.active:
            if self._bar is not None:
                self._bar.clear()
            print(*args, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._metrics is not None:
            self._metrics.close()


def read_metrics(folder: str) -> list[dict]:
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def validation_curve(folder: str) -> dict:
    """The rows of a run's metrics.jsonl that carry a validation result, as columns (benchmarks)."""
    rows = [r for r in read_metrics(folder) if r.get("val_acc") is not None]
    return {"phase": [r.get("phase", "train") for r in rows], "cycle": [r["cycle"] for r in rows],
            "work_units": [round(r["work_units"], 5) for r in rows], "seconds": [round(r["seconds"], 4) for r in rows],
            "val_acc": [r["val_acc"] for r in rows], "val_loss": [float(f"{r['val_loss']:.6g}") for r in rows]}


def plot_run(folder: str, title: str = "") -> str:
    """Loss and validation accuracy against V-cycles, work units and seconds (paper Fig. 5)."""
    rows = read_metrics(folder)
    fig = Figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3)
    for ax, key, label in zip(axes, ("cycle", "work_units", "seconds"), ("V-cycles", "work units", "seconds")):
        # the loss is taken at the start of its cycle: plot it where that cycle began
        starts = {"cycle": [r["cycle"] - 1 for r in rows],
                  "work_units": [r.get("work_units_start", r["work_units"]) for r in rows],
                  "seconds": [0.0] + [r["seconds"] for r in rows[:-1]]}[key]
        ax.semilogy(starts, [r["loss"] for r in rows], color="C0", label="training loss")
        ax.set_xlabel(label)
        ax.set_ylabel("loss", color="C0")
        acc = [(r[key], r["val_acc"]) for r in rows if r.get("val_acc") is not None and not math.isnan(r["val_acc"])]
        if acc:
            twin = ax.twinx()
            twin.plot(*zip(*acc), "--", color="C1", label="validation accuracy")
            twin.set_ylim(0, 1.02)
            twin.set_ylabel("val acc", color="C1")
            if key == "cycle":
                lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
                ax.legend(lines, [line.get_label() for line in lines], loc="center right", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    path = os.path.join(folder, "plot.png")
    fig.savefig(path, dpi=90)
    return path
