"""Results as files: a run folder with config.json, metrics.jsonl, summary.json and plot.png
(and TensorBoard scalars with ``--tensorboard``).

Only rank 0 writes and prints; other ranks get a writer that does nothing. A write that fails is a
``WriteError`` naming the file; metrics.jsonl is cut back to its last complete line.
"""
from __future__ import annotations

import io
import json
import math
import numbers
import os
import sys

from tqdm import tqdm

from ..config import TENSORBOARD_MISSING, ConfigError
from .files import atomic_write, remove_temporaries, write_all, write_error

METRICS = "metrics.jsonl"


class RunWriter:
    """Writes one run folder. ``active`` is False on every rank but 0. `keep_rows`: the metrics a
    resumed run continues; `tensorboard`: also write each row's numbers as scalars."""

    def __init__(self, folder: str, active: bool = True, progress: bool = True, total: int | None = None,
                 desc: str = "train", keep_rows: list[dict] | None = None, tensorboard: bool = False):
        self.folder, self.active = folder, active
        self._fd, self._pos, self._rows = None, 0, 0
        self._bar, self._tb = None, None
        self._bar_args = dict(total=total, desc=desc, unit="cycle", file=sys.stderr, dynamic_ncols=True,
                              leave=False, mininterval=0.5) if progress else None
        if active:
            self._open(keep_rows or [], tensorboard)

    def _open(self, keep_rows: list[dict], tensorboard: bool) -> None:
        path = os.path.join(self.folder, METRICS)
        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as e:
            raise write_error(self.folder, e) from None
        remove_temporaries(self.folder)         # left by a killed run of this folder
        if keep_rows:                           # a resumed run continues the metrics it had checkpointed
            atomic_write(path, "".join(json.dumps(row) + "\n" for row in keep_rows).encode())
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if keep_rows else os.O_TRUNC), 0o644)
            self._pos = os.fstat(self._fd).st_size
        except OSError as e:
            raise write_error(path, e) from None
        self._rows = len(keep_rows)
        if tensorboard:                         # a resumed run's steps replace the killed run's
            self._tb = TensorBoardScalars(os.path.join(self.folder, "tensorboard"), purge_step=self._rows + 1)

    def write_json(self, name: str, obj) -> None:
        self.write_text(name, json.dumps(obj, indent=2, default=str))

    def write_text(self, name: str, text: str) -> None:
        if self.active:
            atomic_write(os.path.join(self.folder, name), text.encode())

    def _append(self, record: dict) -> None:
        line = (json.dumps(record) + "\n").encode()
        try:
            write_all(self._fd, line)
        except OSError as e:
            try:
                os.ftruncate(self._fd, self._pos)          # cut a torn row off: rows are whole or absent
            except OSError:
                pass
            raise write_error(os.path.join(self.folder, METRICS), e) from None
        self._pos += len(line)
        self._rows += 1
        if self._tb is not None:
            self._tb.add(record, self._rows)

    def log(self, record: dict) -> None:
        if not self.active:
            return
        self._append(record)
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
        """Close the files; safe to call twice and after a failed write."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._tb is not None:
            tb, self._tb = self._tb, None
            tb.close()


class TensorBoardScalars:
    """Every number of a metrics row as a TensorBoard scalar (lists: one tag per level, level 1 the
    coarsest); the step is the row's position in metrics.jsonl, so cascade stages and training
    make one curve. `purge_step`: a resumed run hides what the killed run logged after its checkpoint."""

    def __init__(self, folder: str, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter      # optional: pip install 'parml[tb]'
        except ImportError:
            raise ConfigError(TENSORBOARD_MISSING) from None
        self.folder = folder
        try:
            self._writer = SummaryWriter(folder, purge_step=purge_step)
        except OSError as e:
            raise write_error(folder, e) from None

    def add(self, record: dict, step: int) -> None:
        try:
            for tag, value in scalars(record):
                self._writer.add_scalar(tag, value, step)
        except OSError as e:
            raise write_error(self.folder, e) from None

    def close(self) -> None:
        try:
            self._writer.close()
        except OSError as e:
            raise write_error(self.folder, e) from None


def scalars(record: dict) -> list[tuple[str, float]]:
    """(tag, value) of every number in a metrics row; ``level_seconds: [a, b]`` ->
    ``level_seconds/level1``, ``level_seconds/level2``."""
    out = []
    for key, value in record.items():
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            out.append((key, float(value)))
        elif isinstance(value, (list, tuple)):
            out += [(f"{key}/level{i + 1}", float(v)) for i, v in enumerate(value)
                    if isinstance(v, numbers.Real) and not isinstance(v, bool)]
    return out


def read_metrics(folder: str) -> list[dict]:
    """The rows of a run's metrics.jsonl; a torn last line (a run killed while writing) is dropped."""
    with open(os.path.join(folder, METRICS)) as f:
        lines = [line for line in f if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise
    return rows


def validation_curve(folder: str) -> dict:
    """The rows of a run's metrics.jsonl that carry a validation result, as columns (benchmarks)."""
    rows = [r for r in read_metrics(folder) if r.get("val_acc") is not None]
    return {"phase": [r.get("phase", "train") for r in rows], "cycle": [r["cycle"] for r in rows],
            "work_units": [round(r["work_units"], 5) for r in rows], "seconds": [round(r["seconds"], 4) for r in rows],
            "val_acc": [r["val_acc"] for r in rows], "val_loss": [float(f"{r['val_loss']:.6g}") for r in rows]}


def plot_run(folder: str, title: str = "") -> str:
    """Loss and validation accuracy against V-cycles, work units and seconds (paper Fig. 5)."""
    rows = read_metrics(folder)
    from matplotlib.figure import Figure   # 0.5 s at start-up on every rank; only rank 0 plots, at the end

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
    # fixed margins, not tight_layout(): that draws the figure an extra time (0.6 s on rank 0 per run)
    fig.subplots_adjust(left=0.07, right=0.94, bottom=0.14, top=0.88, wspace=0.6)
    path = os.path.join(folder, "plot.png")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    atomic_write(path, buf.getvalue())
    return path
