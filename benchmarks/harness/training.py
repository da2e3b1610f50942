"""A training run as the studies record it: ``parml.training.trainer.train`` timed through its
``around_cycle`` hook, its summary, its curve from metrics.jsonl and its level plan."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
from dataclasses import dataclass, field

from .records import from_json
from .timing import CycleTimer


@dataclass
class Curve:
    """Rows of a run's metrics.jsonl as columns."""
    cycle: list[int] = field(default_factory=list)
    phase: list[str] = field(default_factory=list)
    work_units: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    val_acc: list[float | None] = field(default_factory=list)
    val_loss: list[float | None] = field(default_factory=list)

    @classmethod
    def read(cls, folder: str, phases: tuple[str, ...] | None = None, validated: bool = False) -> "Curve":
        """The rows of `phases` (None: all), only those with a validation result if `validated`."""
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        rows = [r for r in rows if (phases is None or r.get("phase", "train") in phases)
                and (not validated or r.get("val_acc") is not None)]
        g = [float(f"{r['val_loss']:.6g}") if r.get("val_loss") is not None else None for r in rows]
        return cls([r["cycle"] for r in rows], [r.get("phase", "train") for r in rows],
                   [round(r["work_units"], 5) for r in rows], [round(r["seconds"], 4) for r in rows],
                   [float(f"{r['loss']:.6g}") for r in rows], [r.get("val_acc") for r in rows], g)


@dataclass
class Stage:
    """One cascade stage (``config.json`` ``cascade_stages``)."""
    blocks: int = 0
    ranks: int = 1
    replicas: int = 1            # data-parallel copies of the stage (--data-parallel)
    cycles: int = 0
    val_acc: float | None = None
    work_units: float = 0.0


@dataclass(kw_only=True)
class TrainRun:
    """One ``train`` call, rank 0's view. *seconds*: wall time with validation; *train_s*: inside
    the V-cycle / GD-step calls only; *steps*: those calls, cascade stages included."""
    cycles: int = 0
    epochs: int = 0
    work_units: float = 0.0
    cascade_work_units: float = 0.0
    seconds: float = 0.0
    train_s: float = 0.0
    steps: int = 0
    reached_target: bool = False
    final_loss: float | None = None
    val_acc: float | None = None
    val_loss: float | None = None
    best_val_acc: float | None = None
    level_seconds: list[float] = field(default_factory=list)
    level_gradients: list[int] = field(default_factory=list)
    plan: list[int] = field(default_factory=list)          # ranks per level, coarsest first
    stages: list[Stage] = field(default_factory=list)
    curve: Curve = field(default_factory=Curve)


def timed_train(cfg, comm, data, kind: type = TrainRun, world=None, curve=None, **extra):
    """Train `cfg` on `comm` quietly, timing every cycle; returns (record of type `kind` with the
    `extra` fields, the summary's levels, the ``CycleTimer``). `curve(folder)` reads the curve
    (default: every row); raises what ``train`` raises."""
    from parml.training.trainer import train
    timer = CycleTimer(world)
    with contextlib.redirect_stdout(io.StringIO()):
        summary = train(cfg, comm, data, around_cycle=timer)
    levels = summary.pop("levels")
    record = None
    if comm.rank == 0:
        with open(os.path.join(summary["folder"], "config.json")) as f:
            saved = json.load(f)
        names = {f.name for f in dataclasses.fields(TrainRun)}
        record = kind(**{k: v for k, v in summary.items() if k in names}, train_s=timer.seconds,
                      steps=len(timer.cycles), plan=[p["ranks"] for p in saved["plan"]],
                      stages=[from_json(Stage, s) for s in saved.get("cascade_stages", [])],
                      curve=(curve or Curve.read)(summary["folder"]), **extra)
        accs = [a for a in record.curve.val_acc if a is not None]
        record.best_val_acc = max(accs) if accs else None
    return record, levels, timer
