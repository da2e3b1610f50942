"""Running a plan: one ``train`` per row and seed on the communicator, reusing finished runs."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import time

from ..config import TrainConfig
from ..data import load_dataset
from ..training.loop import TrainingError
from ..training.report import read_metrics
from ..training.trainer import train
from .paper import THRESHOLDS
from .plan import Plan, Row
from .render import first_reach, medians


def run_config(plan: Plan, row: Row, seed: int, out: str, overwrite: bool = False):
    base = dict(plan.base)
    if plan.max_work_units is not None:
        base["max_cycles"] = max(1, min(base["max_cycles"], math.ceil(plan.max_work_units / row.eq10 - 1e-9)))
    cfg = TrainConfig(**base, levels=row.levels, cycle=row.cycle, lr=row.lr, beta=row.beta, seed=seed,
                      out=os.path.join(out, "runs"),
                      run_name=f"{plan.name}-{row.key}-K{plan.base['blocks']}-s{seed}", overwrite=overwrite)
    return cfg


def _run_one(cfg, comm, data) -> dict:
    """One training run; a non-finite loss is a result ("diverged"), not a failure of the whole table."""
    t0 = time.perf_counter()
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink):
            s = train(cfg, comm, data)
    except TrainingError as e:
        folder = os.path.join(cfg.out, cfg.name)
        last = {}
        if comm.rank == 0 and os.path.exists(os.path.join(folder, "metrics.jsonl")):
            rows = read_metrics(folder)
            last = rows[-1] if rows else {}
        return {"seed": cfg.seed, "status": "diverged", "error": str(e), "cycles": last.get("cycle", 0),
                "work_units": last.get("work_units", 0.0), "uc": None, "seconds": time.perf_counter() - t0,
                "compute_seconds": None, "reached_target": False, "val_acc": last.get("val_acc"),
                "final_loss": last.get("loss"), "folder": folder}
    s.pop("levels", None)
    return {"seed": cfg.seed, "status": "reached" if s["reached_target"] else "not reached",
            "cycles": s["cycles"], "epochs": s["epochs"], "work_units": s["work_units"],
            "uc": s["work_units"] / s["cycles"] if s["cycles"] else None,
            "seconds": s["seconds"], "compute_seconds": sum(s["level_seconds"]),
            "reached_target": s["reached_target"], "val_acc": s["val_acc"], "val_loss": s["val_loss"],
            "final_loss": s["final_loss"], "level_seconds": s["level_seconds"],
            "level_gradients": s["level_gradients"], "folder": s["folder"]}


def _comparable(d: dict) -> dict:
    return {k: v for k, v in json.loads(json.dumps(d, default=str)).items() if k not in ("progress",)}


def _reusable(cfg) -> dict | None:
    """The finished run of exactly `cfg` already in its folder (rank 0), as `_run_one` reports it; else None."""
    folder = os.path.join(cfg.out, cfg.name)
    try:
        with open(os.path.join(folder, "config.json")) as f:
            old = json.load(f)
        with open(os.path.join(folder, "summary.json")) as f:
            s = json.load(f)
    except (OSError, ValueError):
        return None
    new = _comparable(cfg.to_dict())
    if any(old.get(k) != v for k, v in new.items()):
        return None
    return {"seed": cfg.seed, "status": "reached" if s["reached_target"] else "not reached", "reused": True,
            "cycles": s["cycles"], "epochs": s.get("epochs"), "work_units": s["work_units"],
            "uc": s["work_units"] / s["cycles"] if s["cycles"] else None, "seconds": s["seconds"],
            "compute_seconds": sum(s.get("level_seconds") or [0.0]), "reached_target": s["reached_target"],
            "val_acc": s.get("val_acc"), "val_loss": s.get("val_loss"), "final_loss": s.get("final_loss"),
            "level_seconds": s.get("level_seconds"), "level_gradients": s.get("level_gradients"), "folder": folder}


def run_plan(plan: Plan, comm, out: str, progress: bool = True, echo=print, reuse: bool = False,
             overwrite: bool = False) -> dict:
    """Train every (row, seed) of `plan` on `comm`; returns the results (complete on rank 0).
    `reuse`: keep a run whose folder already holds the summary of exactly the same config;
    `overwrite`: replace a run folder of another config (else that is a one-line error)."""
    if comm.rank == 0:
        os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    data_cache = {}
    results, total, done = [], len(plan.rows) * len(plan.seeds), 0
    for row in plan.rows:
        runs = []
        for seed in plan.seeds:
            cfg = run_config(plan, row, seed, out, overwrite)
            r = None
            if reuse:
                r = _reusable(cfg) if comm.rank == 0 else None
                if comm.size > 1:
                    r = comm.broadcast_object(r, 0)
            if r is None:
                if seed not in data_cache:   # the same data train() would load from cfg.seed
                    data_cache[seed] = load_dataset(cfg.dataset, cfg.data_dir, seed=seed)
                r = _run_one(cfg, comm, data_cache[seed])
            if comm.rank == 0:
                r["first_reach"] = first_reach(r["folder"], THRESHOLDS[plan.task])
            runs.append(r)
            done += 1
            if progress and comm.rank == 0:
                acc = r["val_acc"] if r["val_acc"] is not None else float("nan")
                echo(f"[{done}/{total}] {plan.name} {row.label} seed {seed}: {r['cycles']} V-cycles, "
                     f"{r['work_units']:.1f} U, {r['seconds']:.1f} s, val acc {acc:.4f} ({r['status']}"
                     f"{', reused' if r.get('reused') else ''})")
        results.append({"row": row, "runs": runs, "median": medians(runs)})
    return {"plan": plan, "rows": results, "elapsed_s": time.perf_counter() - t0,
            "world_size": comm.size, "backend": comm.backend, "device": str(getattr(comm, "device", "cpu"))}
