"""``parml reproduce``: the paper's Tables 1 and 2 and the §4.5 sensitivity study, rerun with parml.

Gaedke-Merzhäuser et al. report, for ODE ResNets with K = 2048 blocks trained by MG/OPT:

- Table 1: V-cycles, cost per V-cycle U_c (eq. 10) and total cost U = V-cycles x U_c to reach the
  target validation accuracy, for L = 1, 2, 4, 6, 8 levels, on co-centric circles (width 3,
  lr 0.1, β 1e-4, full-batch GD, target 1.0) and MNIST (width 10, lr 0.01, β 1e-5, mini-batches
  of 1000, target 0.93);
- Table 2: six level-optimizer setups of the 8-level method on circles;
- §4.5: U(L=1) / U(L=8) on circles over the 3 x 3 grid lr ∈ {0.05, 0.1, 0.5} x β ∈ {1e-3, 1e-4, 1e-5}
  (paper: 3.54 on average, relative standard deviation 8.02 %).

Every run is one ``TrainConfig`` passed to ``parml.train.train`` on the communicator of
``make_communicator("auto")``, so the same command also runs layer-parallel under torchrun or
mpirun; only rank 0 writes and prints. Seed s sets everything random in a run, exactly as
``parml train --seed s`` does: the initialization, the circles draw / MNIST split and the
mini-batch order.

Results (under ``--out``): ``<mode>.md`` (the table), ``<mode>.json`` (every number, per seed),
``<mode>-cycles.png`` and ``<mode>-work-units.png`` (loss and validation accuracy of the first seed
against V-cycles and against work units, one curve per setup: the paper's Figure 5), and one run
folder per training run under ``runs/``.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field

from .data import default_mnist_dir
from .mgopt import CycleSetup

MODES = ("table1", "table2", "sensitivity")
TASKS = ("circles", "mnist")

# --- what the paper reports (hard-coded as printed) ------------------------------------------------

#: Table 1: L -> (setup as printed, # V-cycles, U_c, U)
PAPER_TABLE1 = {
    "circles": {1: ("[{1}]", 95, 1.00, 95), 2: ("[(1),{2}]", 32, 3.00, 96), 4: ("[(1),1,2,{2}]", 12, 5.00, 60),
                6: ("[(1),1,1,2,2,{2}]", 7, 5.25, 37), 8: ("[(1),1,1,1,2,2,2,{2}]", 5, 5.19, 26)},
    "mnist": {1: ("[{1}]", 460, 1.00, 460), 2: ("[(1),{2}]", 152, 3.00, 456), 4: ("[(1),1,2,{2}]", 55, 5.00, 275),
              6: ("[(1),1,1,2,2,{2}]", 33, 5.25, 173), 8: ("[(1),1,1,1,2,2,2,{2}]", 28, 5.19, 145)},
}

#: Table 2 (circles, 8 levels): (setup, # V-cycles, U_c as printed, U). The first two printed U_c are
#: swapped with respect to eq. (10) (5.96 for {1}, 5.97 for {2}); the table shows eq. (10)'s values.
PAPER_TABLE2 = (
    ("[1,1,1,1,1,1,1,{1}]", 7, 5.97, 42),
    ("[1,1,1,1,1,1,1,{2}]", 7, 5.96, 42),
    ("[1,1,1,1,1,1,1,{5}]", 6, 5.99, 36),
    ("[1,1,1,1,1,1,1,{10}]", 5, 6.03, 30),
    ("[1,1,1,1,2,2,2,{2}]", 5, 6.19, 31),
    ("[(1),1,1,1,2,2,2,{2}]", 5, 5.19, 26),
)
TABLE2_SWAPPED = (0, 1)   # rows whose printed U_c disagree with eq. (10)

#: §4.5: the grid and the reported mean and relative standard deviation of U(L=1) / U(L=8)
PAPER_SENSITIVITY = {"lrs": (0.05, 0.1, 0.5), "betas": (1e-3, 1e-4, 1e-5),
                     "cycle_L8": "[(1),1,1,1,2,2,2,{2}]", "mean_ratio": 3.54, "rsd_percent": 8.02}

#: the paper's setups (§4.1-4.2) per task
TASK_SETUP = {
    "circles": {"dataset": "circles", "width": 3, "lr": 0.1, "beta": 1e-4, "batch_size": None,
                "target_accuracy": 1.0},
    "mnist": {"dataset": "mnist", "width": 10, "lr": 0.01, "beta": 1e-5, "batch_size": 1000,
              "target_accuracy": 0.93},
}
#: the method of §2-4 pinned, so that later changes of TrainConfig's defaults do not change the reproduction:
#: ReLU blocks, forward Euler on [0, 1], plain (S)GD on every level with a constant learning rate, constant
#: (piecewise-constant) interpolation in time, no multilevel initialization.
PAPER_METHOD = {"T": 1.0, "activation": "relu", "stepper": "euler", "optimizer": "sgd", "interpolation": "constant",
                "lr_schedule": "constant", "cascade": 0, "dtype": "float32"}
#: validation accuracies at which the work spent so far is read off the logs (Table 1), so that levels can be
#: compared even where a run misses the paper's target
THRESHOLDS = {"circles": (0.9, 0.95, 0.99, 1.0), "mnist": (0.8, 0.85, 0.88, 0.9, 0.93)}
FULL = {"blocks": 2048, "seeds": 3, "max_cycles": 3000}
QUICK = {"blocks": 128, "seeds": 2, "max_cycles": 600, "table1_levels": (1, 2, 4)}


class ReproduceError(ValueError):
    """A bad option of ``parml reproduce``; the message is the one line the user sees."""


# --- the plan: which runs, with which paper numbers -----------------------------------------------

@dataclass(frozen=True)
class Row:
    """One line of a table: a setup (levels, cycle, lr, β) and what the paper reports for it."""
    key: str                      # unique within the mode, used in run names
    label: str                    # first column
    levels: int
    cycle: str
    lr: float
    beta: float
    paper_cycles: int | None = None
    paper_uc: float | None = None  # shown in the table (eq. (10) where the print disagrees)
    paper_u: float | None = None
    paper_uc_printed: float | None = None
    note: str = ""                # footnote marker

    @property
    def eq10(self) -> float:
        return CycleSetup.parse(self.cycle).cost()


@dataclass
class Plan:
    mode: str                     # table1 | table2 | sensitivity
    task: str
    rows: list[Row]
    seeds: list[int]
    base: dict                    # TrainConfig fields shared by every run
    quick: bool = False
    notes: list[str] = field(default_factory=list)
    max_work_units: float | None = None   # same work budget for every row: max_cycles <= W / U_c

    @property
    def name(self) -> str:
        return f"table1-{self.task}" if self.mode == "table1" else self.mode


def _fmt_beta(b: float) -> str:
    return f"{b:.0e}".replace("e-0", "e-")


def table1_rows(task: str, levels=None) -> list[Row]:
    s = TASK_SETUP[task]
    rows = []
    for L, (cycle, n, uc, u) in PAPER_TABLE1[task].items():
        if levels is None or L in levels:
            rows.append(Row(f"L{L}", f"{L} {cycle}", L, cycle, s["lr"], s["beta"], n, uc, u, uc))
    return rows


def table2_rows() -> list[Row]:
    s = TASK_SETUP["circles"]
    rows = []
    for i, (cycle, n, uc, u) in enumerate(PAPER_TABLE2):
        swapped = i in TABLE2_SWAPPED
        shown = round(CycleSetup.parse(cycle).cost(), 2) if swapped else uc
        rows.append(Row(f"r{i + 1}", f"8 {cycle}", 8, cycle, s["lr"], s["beta"], n, shown, u, uc,
                        "[a]" if swapped else ""))
    return rows


def sensitivity_rows() -> list[Row]:
    rows = []
    for lr in PAPER_SENSITIVITY["lrs"]:
        for beta in PAPER_SENSITIVITY["betas"]:
            for L, cycle in ((1, "[{1}]"), (8, PAPER_SENSITIVITY["cycle_L8"])):
                rows.append(Row(f"lr{lr:g}-b{_fmt_beta(beta)}-L{L}", f"α={lr:g}, β={_fmt_beta(beta)}: {L} {cycle}",
                                L, cycle, lr, beta))
    return rows


def build_plan(mode: str, task: str = "circles", seeds: int | None = None, quick: bool = False,
               max_cycles: int | None = None, target_accuracy: float | None = None,
               data_dir: str | None = None, levels=None, blocks: int | None = None,
               max_work_units: float | None = None) -> Plan:
    """Check the options and list the runs; raises ReproduceError with a one-line message."""
    if mode not in MODES:
        raise ReproduceError(f"unknown table {mode!r} (valid: {', '.join(MODES)})")
    if task not in TASKS:
        raise ReproduceError(f"--task {task!r} is not one of: {', '.join(TASKS)}")
    if mode != "table1" and task != "circles":
        raise ReproduceError(f"--task {task}: {mode} is the co-centric circles example only (paper §4.5)")
    if seeds is not None and seeds < 1:
        raise ReproduceError(f"--seeds {seeds} must be at least 1")
    if max_cycles is not None and max_cycles < 1:
        raise ReproduceError(f"--max-cycles {max_cycles} must be at least 1")
    if max_work_units is not None and not max_work_units > 0:
        raise ReproduceError(f"--max-work-units {max_work_units} must be positive")
    if target_accuracy is not None and not 0 < target_accuracy <= 1:
        raise ReproduceError(f"--target-accuracy {target_accuracy} must be in (0, 1]")
    if levels is not None:
        if mode != "table1":
            raise ReproduceError(f"--levels applies to table1 only, not {mode}")
        bad = [L for L in levels if L not in PAPER_TABLE1[task]]
        if bad or not levels:
            raise ReproduceError(f"--levels {','.join(map(str, levels)) or '(empty)'}: Table 1 has L = "
                                 f"{', '.join(map(str, PAPER_TABLE1[task]))}")
    sizes = QUICK if quick else FULL
    if mode == "table1":
        rows = table1_rows(task, levels if levels is not None else (QUICK["table1_levels"] if quick else None))
    elif mode == "table2":
        rows = table2_rows()
    else:
        rows = sensitivity_rows()
    setup = dict(TASK_SETUP[task])
    setup.pop("lr"), setup.pop("beta")
    if target_accuracy is not None:
        setup["target_accuracy"] = target_accuracy
    notes = []
    if task == "mnist":
        data_dir = data_dir or default_mnist_dir()
        if data_dir is None:
            raise ReproduceError("--data-dir is required for --task mnist (a folder with the MNIST IDX files)")
        setup["data_dir"] = data_dir
        notes.append("MNIST: the paper trains on the 60,000 training images and validates on the 10,000 "
                     "test images; here only the official test set (t10k) is available, so parml trains on a "
                     "seeded 8000-image split of it and validates on the other 2000 (the split follows the seed).")
    K = blocks or sizes["blocks"]
    base = {**setup, **PAPER_METHOD, "blocks": K, "max_cycles": max_cycles or sizes["max_cycles"], "eval_every": 1,
            "progress": False}
    if quick:
        notes.append(f"--quick: K = {K} instead of 2048, {len(rows)} setups, at most {base['max_cycles']} "
                     "V-cycles; the counts are not comparable with the paper's.")
    if max_work_units is not None:
        notes.append(f"Work budget: every run stops after at most {max_work_units:g} work units "
                     f"(V-cycles <= min({base['max_cycles']}, ⌈{max_work_units:g} / U_c⌉)).")
    n = seeds if seeds is not None else sizes["seeds"]
    return Plan(mode, task, rows, list(range(n)), base, quick, notes, max_work_units)


# --- running -----------------------------------------------------------------------------------------

def _config(plan: Plan, row: Row, seed: int, out: str):
    from .config import TrainConfig
    base = dict(plan.base)
    if plan.max_work_units is not None:
        base["max_cycles"] = max(1, min(base["max_cycles"], math.ceil(plan.max_work_units / row.eq10 - 1e-9)))
    cfg = TrainConfig(**base, levels=row.levels, cycle=row.cycle, lr=row.lr, beta=row.beta, seed=seed,
                      out=os.path.join(out, "runs"),
                      run_name=f"{plan.name}-{row.key}-K{plan.base['blocks']}-s{seed}")
    return cfg


def _run_one(cfg, comm, data) -> dict:
    """One training run; a non-finite loss is a result ("diverged"), not a failure of the whole table."""
    from .train import TrainingError, train

    t0 = time.perf_counter()
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink):
            s = train(cfg, comm, data)
    except TrainingError as e:
        folder = os.path.join(cfg.out, cfg.name)
        last = {}
        if comm.rank == 0 and os.path.exists(os.path.join(folder, "metrics.jsonl")):
            from .report import read_metrics
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


def first_reach(folder: str, thresholds) -> dict:
    """For each accuracy t: [V-cycle, work units] of the first validation with val acc >= t (None if never)."""
    from .report import read_metrics
    try:
        recs = read_metrics(folder)
    except OSError:
        return {}
    out = {}
    for t in thresholds:
        hit = next((r for r in recs if r.get("val_acc") is not None and r["val_acc"] >= t - 1e-12), None)
        out[f"{t:g}"] = [hit["cycle"], hit["work_units"]] if hit else None
    return out


def run_plan(plan: Plan, comm, out: str, progress: bool = True, echo=print, reuse: bool = False) -> dict:
    """Train every (row, seed) of `plan` on `comm`; returns the results (complete on rank 0).
    `reuse`: keep a run whose folder already holds the summary of exactly the same config."""
    from .data import load_dataset

    if comm.rank == 0:
        os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    data_cache = {}
    results, total, done = [], len(plan.rows) * len(plan.seeds), 0
    for row in plan.rows:
        runs = []
        for seed in plan.seeds:
            cfg = _config(plan, row, seed, out)
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
        results.append({"row": row, "runs": runs, "median": _medians(runs)})
    return {"plan": plan, "rows": results, "elapsed_s": time.perf_counter() - t0,
            "world_size": comm.size, "backend": comm.backend, "device": str(getattr(comm, "device", "cpu"))}


def _median(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(values) if values else None


def _medians(runs: list[dict]) -> dict:
    keys = ("cycles", "work_units", "uc", "seconds", "compute_seconds", "val_acc")
    m = {k: _median([r.get(k) for r in runs]) for k in keys}
    cyc = [r["cycles"] for r in runs]
    m.update(cycles_min=min(cyc), cycles_max=max(cyc), reached=sum(r["reached_target"] for r in runs),
             diverged=sum(r["status"] == "diverged" for r in runs), n=len(runs))
    return m


# --- ratios -----------------------------------------------------------------------------------------

def _ratio(a, b):
    return a / b if a is not None and b else None


def table1_ratio(results: dict) -> dict | None:
    """U(L=1) / U(L=max) from the medians over seeds, the same for wall-clock and compute seconds."""
    by_l = {r["row"].levels: r for r in results["rows"]}
    if 1 not in by_l or len(by_l) < 2:
        return None
    hi = max(by_l)
    a, b = by_l[1], by_l[hi]
    out = {"levels": [1, hi], "U": _ratio(a["median"]["work_units"], b["median"]["work_units"]),
           "cycles": _ratio(a["median"]["cycles"], b["median"]["cycles"]),
           "seconds": _ratio(a["median"]["seconds"], b["median"]["seconds"]),
           "compute_seconds": _ratio(a["median"]["compute_seconds"], b["median"]["compute_seconds"]),
           "U_per_seed": [_ratio(x["work_units"], y["work_units"]) for x, y in zip(a["runs"], b["runs"])],
           "seconds_per_seed": [_ratio(x["seconds"], y["seconds"]) for x, y in zip(a["runs"], b["runs"])],
           "all_reached": a["median"]["reached"] == a["median"]["n"] and b["median"]["reached"] == b["median"]["n"]}
    if a["row"].paper_u and b["row"].paper_u:
        out["paper"] = {"U_L1": a["row"].paper_u, "U_Lmax": b["row"].paper_u,
                        "U": a["row"].paper_u / b["row"].paper_u}
    return out


def relative_u(results: dict) -> dict | None:
    """U of every row over U of a reference row (Table 1: L = 1; Table 2: the paper's setup, the last row),
    for the paper and for parml's medians: the shape of the table, free of the absolute scale."""
    plan: Plan = results["plan"]
    rows = results["rows"]
    if plan.mode == "table1":
        ref = next((r for r in rows if r["row"].levels == 1), None)
    elif plan.mode == "table2":
        ref = rows[-1] if rows else None
    else:
        return None
    if ref is None or len(rows) < 2:
        return None
    pu, mu = ref["row"].paper_u, ref["median"]["work_units"]
    return {"reference": ref["row"].label,
            "paper": [_ratio(r["row"].paper_u, pu) if r["row"].paper_u is not None else None for r in rows],
            "parml": [_ratio(r["median"]["work_units"], mu) for r in rows]}


def reach_table(results: dict) -> dict | None:
    """Median work units (and V-cycles) to first reach each accuracy in THRESHOLDS, per row; ratio L=1 / L=max."""
    plan: Plan = results["plan"]
    if plan.mode != "table1":
        return None
    ts = [f"{t:g}" for t in THRESHOLDS[plan.task]]
    rows = []
    for r in results["rows"]:
        cells = {}
        for t in ts:
            hits = [run.get("first_reach", {}).get(t) for run in r["runs"]]
            got = [h for h in hits if h]
            cells[t] = {"U": _median([h[1] for h in got]) if len(got) == len(hits) else None,
                        "cycles": _median([h[0] for h in got]) if len(got) == len(hits) else None,
                        "seeds_reached": len(got)}
        rows.append({"levels": r["row"].levels, "label": r["row"].label, "cells": cells})
    by_l = {x["levels"]: x for x in rows}
    ratio = None
    if 1 in by_l and len(by_l) > 1:
        hi = by_l[max(by_l)]
        ratio = {"levels": [1, hi["levels"]],
                 "U": {t: _ratio(by_l[1]["cells"][t]["U"], hi["cells"][t]["U"]) for t in ts}}
    return {"thresholds": ts, "rows": rows, "ratio": ratio}


def sensitivity_summary(results: dict) -> dict:
    """Per (lr, β): U(L=1) / U(L=8) of the medians; their mean and relative standard deviation."""
    cells = {}
    for r in results["rows"]:
        row = r["row"]
        cells.setdefault((row.lr, row.beta), {})[row.levels] = r
    out = []
    for (lr, beta), c in cells.items():
        if 1 not in c or 8 not in c:
            continue
        a, b = c[1], c[8]
        out.append({"lr": lr, "beta": beta, "U_L1": a["median"]["work_units"], "U_L8": b["median"]["work_units"],
                    "U_ratio": _ratio(a["median"]["work_units"], b["median"]["work_units"]),
                    "seconds_ratio": _ratio(a["median"]["seconds"], b["median"]["seconds"]),
                    "U_ratio_per_seed": [_ratio(x["work_units"], y["work_units"]) for x, y in zip(a["runs"], b["runs"])],
                    "all_reached": a["median"]["reached"] == a["median"]["n"] and b["median"]["reached"] == b["median"]["n"]})
    ratios = [c["U_ratio"] for c in out if c["U_ratio"] is not None]
    secs = [c["seconds_ratio"] for c in out if c["seconds_ratio"] is not None]
    mean = statistics.fmean(ratios) if ratios else None
    rsd = 100 * statistics.stdev(ratios) / mean if len(ratios) > 1 and mean else None
    reached = [c["U_ratio"] for c in out if c["all_reached"] and c["U_ratio"] is not None]
    mean_r = statistics.fmean(reached) if reached else None
    return {"cells": out, "mean_U_ratio": mean, "rsd_percent": rsd,
            "mean_seconds_ratio": statistics.fmean(secs) if secs else None,
            "cells_all_reached": len(reached), "mean_U_ratio_reached_cells": mean_r,
            "rsd_percent_reached_cells": (100 * statistics.stdev(reached) / mean_r
                                          if len(reached) > 1 and mean_r else None),
            "rsd_definition": "sample standard deviation (n-1) / mean of the per-cell ratios",
            "paper": {"mean_U_ratio": PAPER_SENSITIVITY["mean_ratio"], "rsd_percent": PAPER_SENSITIVITY["rsd_percent"]}}


# --- output -----------------------------------------------------------------------------------------

def _f(x, fmt, dash="–"):
    return dash if x is None else format(x, fmt)


TITLES = {"table1": "Table 1", "table2": "Table 2", "sensitivity": "§4.5 sensitivity to lr and β"}
HEADER = ("| L / setup | paper V-cycles | paper U_c | paper U | parml V-cycles (median, min–max) | parml U_c "
          "| parml U (median) | seconds (median) | final val acc |")


def render_markdown(results: dict, command: str = "") -> str:
    plan: Plan = results["plan"]
    task = "co-centric circles" if plan.task == "circles" else "MNIST"
    b = plan.base
    lines = [f"# {TITLES[plan.mode]}, {task}: parml vs. Gaedke-Merzhäuser et al.", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    reused = sum(bool(run.get("reused")) for r in results["rows"] for run in r["runs"])
    lrs = sorted({r.lr for r in plan.rows})
    betas = sorted({r.beta for r in plan.rows})
    batch = "full-batch GD" if b.get("batch_size") is None else f"mini-batches of {b['batch_size']}"
    lines += [f"K = {b['blocks']}, width {b['width']}, lr {', '.join(f'{x:g}' for x in lrs)}, "
              f"β {', '.join(_fmt_beta(x) for x in betas)}, {batch}, target validation accuracy "
              f"{b['target_accuracy']:g}, at most {b['max_cycles']} V-cycles; seeds "
              f"{', '.join(map(str, plan.seeds))} (the seed sets the initialization, the data draw/split and "
              f"the batch order). {results['world_size']} rank(s) [{results['backend']}], {results['device']}, "
              f"torch {_torch_version()}. Wall time of the whole table: {results['elapsed_s']:.0f} s"
              + (f" ({reused} run(s) reused from an earlier invocation: their own seconds are in their rows, "
                 f"not in this total)." if reused else "."), ""]
    lines += [f"- {n}" for n in plan.notes]
    if plan.notes:
        lines.append("")
    lines += [HEADER, "|" + "---|" * 9]
    flags = set()
    for r in results["rows"]:
        row, m = r["row"], r["median"]
        mark = ""
        if m["diverged"]:
            mark += " ‡"
            flags.add("‡")
        if m["reached"] < m["n"]:
            mark += f" † ({m['reached']}/{m['n']} reached)"
            flags.add("†")
        puc = _f(row.paper_uc, ".2f") + (f" {row.note}" if row.note else "")
        lines.append(f"| {row.label} | {_f(row.paper_cycles, 'd')} | {puc} | {_f(row.paper_u, 'g')} "
                     f"| {_f(m['cycles'], 'g')} ({m['cycles_min']}–{m['cycles_max']}){mark} | {_f(m['uc'], '.2f')} "
                     f"| {_f(m['work_units'], '.1f')} | {_f(m['seconds'], '.1f')} | {_f(m['val_acc'], '.4f')} |")
    lines.append("")
    if "†" in flags:
        lines.append("† not every seed reached the target within the V-cycle budget: those counts are lower bounds.")
    if "‡" in flags:
        lines.append("‡ at least one seed diverged (non-finite loss); its counts are where it stopped.")
    if plan.mode == "table2":
        lines.append("[a] eq. (10) gives U_c = 5.96 for [1,1,1,1,1,1,1,{1}] and 5.97 for [1,1,1,1,1,1,1,{2}]; "
                     "the paper's Table 2 prints them swapped (5.97, 5.96). The paper column shows eq. (10)'s "
                     "values; U (42 for both) is the same either way.")
    lines.append("U_c (parml) is measured: work units counted by the trainer / V-cycles. Seconds include the "
                 "validation after every V-cycle.")
    lines.append("")
    rel = relative_u(results)
    if rel:
        ref = rel["reference"]
        short = any(r["median"]["reached"] < r["median"]["n"] for r in results["rows"])
        lines.append(f"U / U({ref}), medians, row by row: paper "
                     f"{', '.join(_f(x, '.2f') for x in rel['paper'])}; parml {', '.join(_f(x, '.2f') for x in rel['parml'])}"
                     + (" († rows stopped at the budget, so these are not cost ratios)." if short else "."))
        lines.append("")
    if plan.mode == "table1":
        ratio = table1_ratio(results)
        if ratio:
            hi = ratio["levels"][1]
            paper = ratio.get("paper")
            ptxt = f" (paper {paper['U_L1']:g}/{paper['U_Lmax']:g} = {paper['U']:.2f})" if paper else ""
            lines.append(f"**U(L=1)/U(L={hi})**, medians over seeds: parml {_f(ratio['U'], '.2f')}{ptxt}; "
                         f"V-cycle ratio {_f(ratio['cycles'], '.1f')}; wall-clock ratio (median seconds) "
                         f"{_f(ratio['seconds'], '.2f')}, training compute only {_f(ratio['compute_seconds'], '.2f')}."
                         + ("" if ratio["all_reached"] else " Not every run reached the target: a bound, not a ratio."))
            lines.append("")
        reach = reach_table(results)
        if reach and any(run.get("first_reach") for r in results["rows"] for run in r["runs"]):
            ts = reach["thresholds"]
            lines += ["Work units (median over seeds) when the validation accuracy first reached each level, read from "
                      "the runs' logs (– : not reached by every seed within the budget):", "",
                      "| L / setup | " + " | ".join(f"val acc ≥ {t}" for t in ts) + " |",
                      "|---|" + "---|" * len(ts)]
            for x in reach["rows"]:
                lines.append(f"| {x['label']} | " + " | ".join(
                    f"{_f(x['cells'][t]['U'], '.1f')} ({_f(x['cells'][t]['cycles'], 'g')} cyc.)"
                    if x["cells"][t]["U"] is not None else "–" for t in ts) + " |")
            if reach["ratio"]:
                hi = reach["ratio"]["levels"][1]
                lines.append(f"| U(L=1)/U(L={hi}) | " + " | ".join(_f(reach["ratio"]["U"][t], ".2f") for t in ts) + " |")
            lines.append("")
    if plan.mode == "sensitivity":
        s = sensitivity_summary(results)
        lines += ["| α (lr) | β | parml U(L=1) | parml U(L=8) | U ratio | wall-clock ratio |", "|---|---|---|---|---|---|"]
        for c in s["cells"]:
            lines.append(f"| {c['lr']:g} | {_fmt_beta(c['beta'])} | {_f(c['U_L1'], '.1f')} | {_f(c['U_L8'], '.1f')} "
                         f"| {_f(c['U_ratio'], '.2f')}{'' if c['all_reached'] else ' †'} "
                         f"| {_f(c['seconds_ratio'], '.2f')} |")
        lines += ["", f"**Mean U(L=1)/U(L=8)** over the {len(s['cells'])} cells: parml {_f(s['mean_U_ratio'], '.2f')}, "
                  f"relative standard deviation {_f(s['rsd_percent'], '.2f')} % (paper: "
                  f"{PAPER_SENSITIVITY['mean_ratio']}, {PAPER_SENSITIVITY['rsd_percent']} %); mean wall-clock ratio "
                  f"{_f(s['mean_seconds_ratio'], '.2f')}. Over the {s['cells_all_reached']} cells where every run "
                  f"reached the target: {_f(s['mean_U_ratio_reached_cells'], '.2f')}, "
                  f"{_f(s['rsd_percent_reached_cells'], '.2f')} %. ({s['rsd_definition']}.)", ""]
    lines.append(f"Curves (first seed): `{plan.name}-cycles.png`, `{plan.name}-work-units.png`; "
                 f"every number per seed: `{plan.name}.json`; run folders: `runs/`.")
    return "\n".join(lines) + "\n"


def _torch_version() -> str:
    import torch
    return torch.__version__


def to_json(results: dict, command: str = "") -> dict:
    plan: Plan = results["plan"]
    rows = []
    for r in results["rows"]:
        row = r["row"]
        rows.append({"key": row.key, "label": row.label, "levels": row.levels, "cycle": row.cycle, "lr": row.lr,
                     "beta": row.beta, "eq10_uc": row.eq10,
                     "paper": {"v_cycles": row.paper_cycles, "uc": row.paper_uc, "uc_printed": row.paper_uc_printed,
                               "U": row.paper_u},
                     "median": r["median"], "runs": r["runs"]})
    out = {"mode": plan.mode, "task": plan.task, "name": plan.name, "quick": plan.quick, "command": command,
           "max_work_units": plan.max_work_units,
           "seeds": plan.seeds, "config": plan.base, "notes": plan.notes, "rows": rows,
           "elapsed_s": results["elapsed_s"], "world_size": results["world_size"], "backend": results["backend"],
           "device": results["device"], "torch": _torch_version(), "python": platform.python_version(),
           "cpu_count": os.cpu_count(), "torch_threads": _threads()}
    if plan.mode == "table1":
        out["ratio"] = table1_ratio(results)
    if plan.mode in ("table1", "table2"):
        out["relative_U"] = relative_u(results)
    if plan.mode == "table1":
        out["first_reach"] = reach_table(results)
    if plan.mode == "sensitivity":
        out["sensitivity"] = sensitivity_summary(results)
    return out


def _threads() -> int:
    import torch
    return torch.get_num_threads()


def plot_curves(results: dict, out: str) -> list[str]:
    """Loss (solid, log scale) and validation accuracy (dashed) of the first seed, one curve per setup,
    against V-cycles and against work units (paper Fig. 5). Sensitivity: one panel per (lr, β).
    The loss is drawn where it was evaluated (before the cycle), the accuracy after the cycle."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .report import read_metrics

    plan: Plan = results["plan"]
    curves = []
    for r in results["rows"]:
        folder = r["runs"][0]["folder"]
        try:
            recs = read_metrics(folder)
        except OSError:
            recs = []
        curves.append((r["row"], recs))
    if plan.mode == "sensitivity":
        panels = {}
        for row, recs in curves:
            panels.setdefault(f"α={row.lr:g}, β={_fmt_beta(row.beta)}", []).append((f"L={row.levels}", recs))
        panels = list(panels.items())
    else:
        label = (lambda row: f"L={row.levels}") if plan.mode == "table1" else (lambda row: row.cycle)
        task = "co-centric circles" if plan.task == "circles" else "MNIST"
        panels = [(f"{TITLES[plan.mode]}, {task}, K={plan.base['blocks']}", [(label(row), recs) for row, recs in curves])]
    paths = []
    for xkey, xlabel, suffix in (("cycle", "V-cycles", "cycles"), ("work_units", "work units", "work-units")):
        cols = min(len(panels), 3)
        nrows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols if cols == 1 else 5 * cols, 4.2 * nrows),
                                 squeeze=False)
        for ax, (title, group) in zip(axes.flat, panels):
            twin = ax.twinx()
            for i, (name, recs) in enumerate(group):
                if not recs:
                    continue
                # a record's loss is the objective at the start of its cycle, its cycle / work units are
                # counted at the end: plot the loss at the previous record's x (0 before the first cycle)
                xs = [0.0] + [x[xkey] for x in recs[:-1]]
                ax.semilogy(xs, [x["loss"] for x in recs], color=f"C{i}", label=name)
                acc = [(x[xkey], x["val_acc"]) for x in recs if x.get("val_acc") is not None]
                if acc:
                    twin.plot(*zip(*acc), "--", color=f"C{i}")
            twin.set_ylim(0, 1.02)
            twin.set_ylabel("validation accuracy (dashed)")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("loss (solid)")
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=7, loc="center right")
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.tight_layout()
        path = os.path.join(out, f"{plan.name}-{suffix}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def write_outputs(results: dict, out: str, command: str = "") -> dict:
    """Write the markdown, JSON and PNGs (call on rank 0 only); returns their paths and the table."""
    plan: Plan = results["plan"]
    os.makedirs(out, exist_ok=True)
    md = render_markdown(results, command)
    paths = {"md": os.path.join(out, f"{plan.name}.md"), "json": os.path.join(out, f"{plan.name}.json")}
    with open(paths["md"], "w") as f:
        f.write(md)
    with open(paths["json"], "w") as f:
        json.dump(to_json(results, command), f, indent=2, default=str)
    paths["png"] = plot_curves(results, out)
    paths["table"] = md
    return paths


def load_results(path: str) -> dict:
    """The results of an earlier run back from its JSON (to render the table again without training)."""
    with open(path) as f:
        d = json.load(f)
    plan = Plan(d["mode"], d["task"], [], d["seeds"], d["config"], d["quick"], d["notes"], d.get("max_work_units"))
    rows = []
    for r in d["rows"]:
        p = r["paper"]
        note = "[a]" if p["uc_printed"] is not None and p["uc"] is not None and round(p["uc"], 2) != round(p["uc_printed"], 2) else ""
        row = Row(r["key"], r["label"], r["levels"], r["cycle"], r["lr"], r["beta"], p["v_cycles"], p["uc"], p["U"],
                  p["uc_printed"], note)
        plan.rows.append(row)
        for run in r["runs"]:
            if "first_reach" not in run and run.get("folder") and os.path.isdir(run["folder"]):
                run["first_reach"] = first_reach(run["folder"], THRESHOLDS[plan.task])
        rows.append({"row": row, "runs": r["runs"], "median": r["median"]})
    return {"plan": plan, "rows": rows, "elapsed_s": d["elapsed_s"], "world_size": d["world_size"],
            "backend": d["backend"], "device": d["device"], "command": d.get("command", "")}


def reproduce(mode: str, task: str = "circles", seeds: int | None = None, quick: bool = False,
              out: str = os.path.join("benchmarks", "results", "reproduce"), data_dir: str | None = None,
              max_cycles: int | None = None, target_accuracy: float | None = None, progress: bool = True,
              levels=None, comm=None, command: str = "", max_work_units: float | None = None,
              reuse: bool = False) -> dict:
    """Plan, run on `comm` (default: ``make_communicator("auto")``, closed at the end), write on rank 0."""
    plan = build_plan(mode, task, seeds, quick, max_cycles, target_accuracy, data_dir, levels,
                      max_work_units=max_work_units)
    own = comm is None
    if own:
        from .comm import make_communicator
        comm = make_communicator("auto")
    try:
        if comm.rank == 0 and progress:
            print(f"parml reproduce {plan.name}: {len(plan.rows)} setups x {len(plan.seeds)} seeds, "
                  f"K={plan.base['blocks']}, {comm.size} rank(s) [{comm.backend}] -> {out}", flush=True)
        results = run_plan(plan, comm, out, progress, echo=lambda s: print(s, flush=True), reuse=reuse)
        if comm.rank == 0:
            results["files"] = write_outputs(results, out, command)
        return results
    finally:
        if own:
            comm.close()


__all__ = ["PAPER_TABLE1", "PAPER_TABLE2", "PAPER_SENSITIVITY", "TASK_SETUP", "ReproduceError", "Row", "Plan",
           "build_plan", "run_plan", "reproduce", "render_markdown", "to_json", "write_outputs",
           "table1_rows", "table2_rows", "sensitivity_rows", "table1_ratio", "sensitivity_summary",
           "relative_u", "load_results", "reach_table", "first_reach", "THRESHOLDS"]
