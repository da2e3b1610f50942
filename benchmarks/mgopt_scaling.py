"""MG/OPT vs plain gradient descent, serial and layer-parallel: cycles, work units, wall time, efficiency.

    python benchmarks/mgopt_scaling.py [--quick] [--out benchmarks/results/mgopt] [--seeds 10]

Trains ODE ResNets with K = 2048 blocks on

* co-centric circles (width 3, lr 0.1, β 1e-4, full-batch GD, target validation accuracy 1.0), and
* MNIST (t10k split 8000/2000, width 10, lr 0.01, β 1e-5, mini-batches of 1000, target 0.93;
  runs stop at an equal work budget for L = 1 and L = 8),

with L = 1 (plain GD / SGD) and L = 8 levels (the paper's cycle [(1),1,1,1,2,2,2,{2}]), on P = 1
and P = 2 processes. P = 2 runs are real processes (torchrun-style environment with gloo, or
``mpirun`` with ``--backend mpi``); one launch per P runs every configuration in turn, with L = 1
and L = 8 of a seed back to back so that both see the same machine load. Rank 0 prints one line
per run.

Every run is ``parml.training.trainer.train`` on the launch's communicator. Per run: V-cycles to the target,
work units, wall time (``summary["seconds"]``: training and the validation after every cycle),
training time (time inside the V-cycle / GD-step calls only), time per level
(``summary["level_seconds"]``), and per rank the compute / wait time of every level's
``LayerParallel.forward_backward`` (``LayerParallel.times``, accumulated over the run).
Parallel efficiency = busiest rank's compute / training wall time (the slowest rank's time in
V-cycle calls); with M = 1 micro-batch on P = 2 ranks the pipeline bound is M / (M + P - 1) = 0.5.

Also: for every circles seed a P = 2 run with ``--min-blocks-per-rank 1`` (every level on both
ranks) right after the one with the default 16 (coarse levels gathered onto rank 0), and the
exactness of P = 2 against P = 1 (cycles, work units, validation accuracy, final loss).

Outputs in ``--out``: ``results.json`` (every number and the curves), ``mgopt_scaling.md``
(tables), ``mgopt_scaling.png`` (validation accuracy against work units and against seconds).
``--quick``: K = 128, one seed, circles only, P = 1 and 2 (under 90 s).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from parml.data import default_mnist_dir
from parml.launch import clean_env, run_local

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCRIPT = Path(__file__).resolve()

CYCLE_L8 = "[(1),1,1,1,2,2,2,{2}]"
DATASETS = {
    "circles": {"dataset": "circles", "width": 3, "lr": 0.1, "beta": 1e-4, "batch_size": None,
                "target_accuracy": 1.0, "thresholds": [0.9, 0.95, 0.99, 1.0]},
    "mnist": {"dataset": "mnist", "width": 10, "lr": 0.01, "beta": 1e-5, "batch_size": 1000,
              "target_accuracy": 0.93, "thresholds": [0.7, 0.75, 0.8, 0.82, 0.85, 0.88, 0.9, 0.93]},
}
FULL = {"blocks": 2048, "seeds": 10, "mnist_seeds": 1, "datasets": ["circles", "mnist"], "P": [1, 2],
        "circles_max_cycles": {1: 2000, 8: 400},
        # MNIST: equal work budget (work units) for L = 1 and L = 8; validation every ~5 work units
        "mnist_work_budget": 600, "mnist_eval_every": {1: 5, 8: 1},
        "launch_timeout": 4 * 3600}
QUICK = {**FULL, "blocks": 128, "seeds": 1, "datasets": ["circles"], "launch_timeout": 80}
GOAL_WORK, GOAL_WALL = 4.0, 3.5


# ------------------------------------------------------------------------------------------------
# the plan
# ------------------------------------------------------------------------------------------------

def build_plan(cfg: dict) -> dict[int, list[dict]]:
    """Run specs per world size P, in execution order (L = 1 and L = 8 of a seed back to back)."""
    plan = {}
    for P in cfg["P"]:
        runs = []
        for name in cfg["datasets"]:
            d = DATASETS[name]
            seeds = range(cfg["seeds"] if name == "circles" else cfg["mnist_seeds"])
            for seed in seeds:
                for L in (1, 8):
                    spec = {"dataset": name, "seed": seed, "levels": L, "cycle": None if L == 1 else CYCLE_L8,
                            "blocks": cfg["blocks"], "width": d["width"], "lr": d["lr"], "beta": d["beta"],
                            "batch_size": d["batch_size"], "target_accuracy": d["target_accuracy"],
                            "metric": cfg["metric"], "microbatches": cfg["microbatches"],
                            "min_blocks_per_rank": 16, "P": P, "variant": "default"}
                    if name == "circles":
                        spec.update(max_cycles=cfg["circles_max_cycles"][L], eval_every=1)
                    else:
                        uc = 1.0 if L == 1 else 5.1875
                        spec.update(max_cycles=int(math.ceil(cfg["mnist_work_budget"] / uc)),
                                    eval_every=cfg["mnist_eval_every"][L])
                    runs.append(spec)
                    if P == 2 and name == "circles" and L == 8:
                        runs.append({**spec, "min_blocks_per_rank": 1, "variant": "min1"})
        for r in runs:
            r["key"] = run_key(r)
        plan[P] = runs
    return plan


def run_key(r: dict) -> str:
    return (f"{r['dataset']}-L{r['levels']}-K{r['blocks']}-P{r['P']}-s{r['seed']}"
            f"{'-min1' if r['variant'] == 'min1' else ''}")


# ------------------------------------------------------------------------------------------------
# worker: one launch (one world size), every run of the plan in turn
# ------------------------------------------------------------------------------------------------

_VC = {"seconds": 0.0, "calls": 0, "comm_wait": 0.0, "world": None}


def _instrument():
    """Accumulate LayerParallel.times per executor and the wall time of V-cycle calls."""
    from parml.multilevel.mgopt import VCycle
    from parml.parallel.executor import LayerParallel

    fb = LayerParallel.forward_backward
    call = VCycle.__call__

    def forward_backward(self, x, y):
        value = fb(self, x, y)
        acc = self.__dict__.setdefault("_bench", [0, 0.0, 0.0, 0.0])
        t = self.times
        acc[0] += 1
        acc[1] += t.step
        acc[2] += t.compute
        acc[3] += t.wait
        return value

    def vcycle_call(self, *a, **k):
        comms = {id(c): c for c in [_VC["world"]] + [lev.executor.comm for lev in self.levels if lev is not None]
                 if c is not None}
        w0 = sum(c.wait_seconds for c in comms.values())
        t0 = time.perf_counter()
        try:
            return call(self, *a, **k)
        finally:
            _VC["seconds"] += time.perf_counter() - t0
            _VC["calls"] += 1
            _VC["comm_wait"] += sum(c.wait_seconds for c in comms.values()) - w0

    LayerParallel.forward_backward = forward_backward
    VCycle.__call__ = vcycle_call


def _curve(folder: str) -> dict:
    rows = []
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                if r.get("phase", "train") == "train":
                    rows.append(r)
    return {"cycle": [r["cycle"] for r in rows],
            "work_units": [round(r["work_units"], 5) for r in rows],
            "seconds": [round(r["seconds"], 4) for r in rows],
            "loss": [float(f"{r['loss']:.6g}") for r in rows],
            "val_acc": [r.get("val_acc") for r in rows]}


def run_worker(job_path: str, result_path: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    torch.set_num_threads(1)
    from parml.comm import make_communicator
    from parml.config import TrainConfig
    from parml.data import load_dataset
    from parml.training.loop import TrainingError
    from parml.training.trainer import train

    job = json.loads(Path(job_path).read_text())
    _instrument()
    comm = make_communicator(job["backend"], timeout=job["comm_timeout"], device="cpu")
    _VC["world"] = comm
    rank, P = comm.rank, comm.size
    results, cache = [], {}
    # warm-up (untimed): the first training in a process pays one-off costs (lazy imports, first
    # kernels, process-group setup) of a few seconds that would otherwise land on the first run
    warm = {}
    for spec in job["runs"]:
        warm.setdefault(spec["dataset"], spec)
    for name, spec in warm.items():
        data = load_dataset(name, job["data_dir"], seed=spec["seed"])
        for levels in (1, 8):
            cfg = TrainConfig(overwrite=True, dataset=name, data_dir=job["data_dir"], blocks=128, width=spec["width"], levels=levels,
                              lr=spec["lr"], beta=spec["beta"], batch_size=spec["batch_size"], seed=spec["seed"],
                              target_accuracy=None, max_cycles=2, microbatches=spec["microbatches"],
                              out=os.path.join(job["runs_dir"], "warm-up"), run_name=f"{name}-L{levels}-P{P}",
                              backend=job["backend"], comm_timeout=job["comm_timeout"], progress=False)
            with contextlib.redirect_stdout(io.StringIO()):
                train(cfg, comm, data).pop("levels", None)
    for spec in job["runs"]:
        cfg = TrainConfig(overwrite=True, dataset=spec["dataset"], data_dir=job["data_dir"], blocks=spec["blocks"],
                          width=spec["width"], levels=spec["levels"], cycle=spec["cycle"], lr=spec["lr"],
                          beta=spec["beta"], metric=spec["metric"], batch_size=spec["batch_size"],
                          seed=spec["seed"], target_accuracy=spec["target_accuracy"],
                          max_cycles=spec["max_cycles"], eval_every=spec["eval_every"],
                          microbatches=spec["microbatches"], min_blocks_per_rank=spec["min_blocks_per_rank"],
                          out=job["runs_dir"], run_name=spec["key"], backend=job["backend"],
                          comm_timeout=job["comm_timeout"], progress=False)
        key = (spec["dataset"], spec["seed"])
        if key not in cache:
            cache[key] = load_dataset(spec["dataset"], job["data_dir"], seed=spec["seed"])
        gc.collect()
        _VC.update(seconds=0.0, calls=0, comm_wait=0.0)
        comm.barrier()
        status, summary, error = "reached", None, None
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                summary = train(cfg, comm, cache[key])
            except TrainingError as e:       # raised on every rank together (non-finite loss)
                status, error = "diverged", str(e)
        levels = summary.pop("levels") if summary else []
        per_level = []
        for lev in levels:
            if lev is None:
                per_level.append(None)
                continue
            b = lev.executor.__dict__.get("_bench", [0, 0.0, 0.0, 0.0])
            per_level.append({"ranks": lev.executor.comm.size, "fb_calls": b[0], "fb_s": b[1], "compute_s": b[2],
                              "wait_s": b[3], "level_s": lev.stats.seconds, "gradients": lev.stats.gradients})
        mine = {"rank": rank, "train_s": _VC["seconds"], "calls": _VC["calls"], "comm_wait_s": _VC["comm_wait"],
                "levels": per_level}
        del levels
        gathered = comm.allgather_object(mine)
        if rank == 0:
            entry = dict(spec, P=P, backend=comm.backend, status=status, error=error)
            if summary is not None:
                if not summary["reached_target"]:
                    entry["status"] = "budget"
                entry.update({k: summary[k] for k in ("cycles", "epochs", "work_units", "seconds",
                                                      "reached_target", "final_loss", "val_acc", "val_loss",
                                                      "level_seconds", "level_gradients")})
                folder = summary["folder"]
                entry["curve"] = _curve(folder)
                with open(os.path.join(folder, "config.json")) as f:
                    entry["plan"] = [p["ranks"] for p in json.load(f)["plan"]]
                entry.update(parallel_stats(gathered, P, spec["microbatches"]))
            results.append(entry)
            tmp = result_path + ".part"
            Path(tmp).write_text(json.dumps({"P": P, "backend": comm.backend, "runs": results}))
            os.replace(tmp, result_path)
            print(progress_line(entry), flush=True)
    comm.barrier()
    comm.close()
    from parml.comm import exit_process
    exit_process(0)       # skip gloo's teardown, which can abort after all work is written


def parallel_stats(gathered: list[dict], P: int, M: int) -> dict:
    per_rank = []
    for g in gathered:
        levs = [lv for lv in g["levels"] if lv is not None]
        comp = sum(lv["compute_s"] for lv in levs)
        wait = sum(lv["wait_s"] for lv in levs)
        per_rank.append({"rank": g["rank"], "train_s": g["train_s"], "calls": g["calls"], "compute_s": comp,
                         "wait_s": wait, "other_s": max(g["train_s"] - comp - wait, 0.0),
                         "comm_wait_s": g["comm_wait_s"],
                         "rest_s": max(g["train_s"] - comp - g["comm_wait_s"], 0.0), "levels": g["levels"]})
    wall = max(r["train_s"] for r in per_rank)
    busiest = max(r["compute_s"] for r in per_rank)
    # per level (coarsest first): busiest rank's compute / slowest rank's forward-backward time
    nlev = len(gathered[0]["levels"])
    level_eff = []
    for i in range(nlev):
        have = [g["levels"][i] for g in gathered if g["levels"][i] is not None]
        fb = max(lv["fb_s"] for lv in have)
        level_eff.append({"ranks": have[0]["ranks"], "fb_s": fb,
                          "compute_s": [g["levels"][i]["compute_s"] if g["levels"][i] else 0.0 for g in gathered],
                          "wait_s": [g["levels"][i]["wait_s"] if g["levels"][i] else 0.0 for g in gathered],
                          "efficiency": max(lv["compute_s"] for lv in have) / fb if fb > 0 else None})
    return {"train_s": wall, "per_rank": per_rank, "busiest_compute_s": busiest,
            "efficiency": busiest / wall if wall > 0 else None, "bound": M / (M + P - 1),
            "level_efficiency": level_eff}


def progress_line(e: dict) -> str:
    head = (f"[P={e['P']} {e['backend']}] {e['dataset']:7s} K={e['blocks']} L={e['levels']} seed {e['seed']}"
            f"{' min-blocks 1' if e['variant'] == 'min1' else ''}:")
    if e.get("cycles") is None:
        return f"{head} {e['status']}: {e.get('error')}"
    return (f"{head} {e['status']:7s} {e['cycles']:5d} cycles {e['work_units']:8.1f} U  "
            f"{e['seconds']:7.1f} s (train {e['train_s']:6.1f} s)  val acc {e['val_acc']:.4f}  "
            f"eff {e['efficiency']:.3f}")


# ------------------------------------------------------------------------------------------------
# launching
# ------------------------------------------------------------------------------------------------

def base_env() -> dict:
    return clean_env([str(ROOT)])


def launch(job: dict, nprocs: int, timeout: float, tmp: Path, label: str) -> tuple[dict | None, str | None]:
    """One launch of the worker on `nprocs` processes; (rank 0's results, error text or None).
    Results of the runs finished before a failure or timeout are kept."""
    job_path, result_path = tmp / f"{label}.job.json", tmp / f"{label}.result.json"
    job_path.write_text(json.dumps(job))
    cmd = [sys.executable, str(SCRIPT), "--worker", str(job_path), str(result_path)]
    backend = job["backend"] if nprocs > 1 else "self"   # one plain process
    run = run_local(cmd, nprocs, backend, timeout, tmp, label, base_env(), cwd=ROOT, poll=0.1)
    res = json.loads(result_path.read_text()) if result_path.exists() else None
    if run.timed_out:
        return res, f"{label}: timed out after {timeout:g} s\n" + run.tails()
    if not run.ok or res is None:
        return res, f"{label}: exit codes {run.returncodes}\n" + run.tails()
    return res, None


# ------------------------------------------------------------------------------------------------
# analysis
# ------------------------------------------------------------------------------------------------

def mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def ratio_of_means_interval(pairs, draws: int = 20000, level: float = 0.95, seed: int = 0):
    """Percentile bootstrap interval of mean(a) / mean(b) over (a, b) pairs resampled by seed: how
    far the ratio of a handful of seeds can be from the ratio the method has on average."""
    import random
    rng, n = random.Random(seed), len(pairs)
    if n < 2:
        return None
    rs = sorted(sum(a for a, _ in draw) / sum(b for _, b in draw)
                for draw in ([pairs[rng.randrange(n)] for _ in range(n)] for _ in range(draws)))
    lo = int((1 - level) / 2 * draws)
    return [rs[lo], rs[draws - 1 - lo]]


def first_reaching(curve: dict, thr: float, key: str):
    for acc, x in zip(curve["val_acc"], curve[key]):
        if acc is not None and acc >= thr - 1e-12:
            return x
    return None


def find(runs, **kw):
    return [r for r in runs if all(r.get(k) == v for k, v in kw.items())]


def analyse(res: dict) -> dict:
    runs = [r for r in res["runs"] if r.get("cycles") is not None]
    out = {"ratios": {}, "exactness": [], "efficiency": {}, "min_blocks": None}
    for name in res["config"]["datasets"]:
        for P in res["config"]["P"]:
            l1 = find(runs, dataset=name, P=P, levels=1, variant="default")
            l8 = find(runs, dataset=name, P=P, levels=8, variant="default")
            if not l1 or not l8:
                continue
            m = {k: (mean([r[k] for r in l1]), mean([r[k] for r in l8])) for k in ("work_units", "seconds", "train_s", "cycles")}
            entry = {"seeds": sorted({r["seed"] for r in l1} & {r["seed"] for r in l8}),
                     "all_reached": all(r["reached_target"] for r in l1 + l8),
                     "mean_L1": {k: v[0] for k, v in m.items()}, "mean_L8": {k: v[1] for k, v in m.items()},
                     "work_ratio": m["work_units"][0] / m["work_units"][1],
                     "wall_ratio": m["seconds"][0] / m["seconds"][1],
                     "train_ratio": m["train_s"][0] / m["train_s"][1],
                     "per_seed": []}
            pairs = []          # (U of L = 1, U of L = 8) per seed, for the interval below
            for a in l1:
                b = find(l8, seed=a["seed"])
                if b:
                    b = b[0]
                    entry["per_seed"].append({"seed": a["seed"], "work_ratio": a["work_units"] / b["work_units"],
                                              "wall_ratio": a["seconds"] / b["seconds"],
                                              "train_ratio": a["train_s"] / b["train_s"]})
                    pairs.append((a["work_units"], b["work_units"]))
            entry["work_ratio_ci95"] = ratio_of_means_interval(pairs)
            if len(pairs) > 3:          # the issue's 3 seeds: the first three of this run
                entry["work_ratio_first3"] = sum(a for a, _ in pairs[:3]) / sum(b for _, b in pairs[:3])
            thr = {}
            for t in DATASETS[name]["thresholds"]:
                u1 = [first_reaching(r["curve"], t, "work_units") for r in l1]
                u8 = [first_reaching(r["curve"], t, "work_units") for r in l8]
                s1 = [first_reaching(r["curve"], t, "seconds") for r in l1]
                s8 = [first_reaching(r["curve"], t, "seconds") for r in l8]
                # means over the runs that reached the threshold; ratios only where every run did
                thr[str(t)] = {"work_L1": mean(u1), "work_L8": mean(u8), "seconds_L1": mean(s1), "seconds_L8": mean(s8),
                               "reached_L1": sum(u is not None for u in u1), "reached_L8": sum(u is not None for u in u8),
                               "n": len(u1), "all_reached": None not in u1 + u8,
                               "budget_L1": max(r["work_units"] for r in l1), "budget_L8": max(r["work_units"] for r in l8)}
            entry["thresholds"] = thr
            if name == "circles":
                entry["goal_work_met"] = entry["all_reached"] and entry["work_ratio"] >= GOAL_WORK
                entry["goal_wall_met"] = entry["all_reached"] and entry["wall_ratio"] >= GOAL_WALL
            out["ratios"][f"{name}-P{P}"] = entry
    # exactness: P = 2 against P = 1, same configuration
    for r2 in find(runs, P=2, variant="default"):
        r1 = find(runs, P=1, dataset=r2["dataset"], levels=r2["levels"], seed=r2["seed"], variant="default")
        if r1:
            r1 = r1[0]
            out["exactness"].append({"dataset": r2["dataset"], "levels": r2["levels"], "seed": r2["seed"],
                                     "cycles": [r1["cycles"], r2["cycles"]],
                                     "work_units": [r1["work_units"], r2["work_units"]],
                                     "val_acc": [r1["val_acc"], r2["val_acc"]],
                                     "final_loss_rel_diff": abs(r1["final_loss"] - r2["final_loss"]) / abs(r1["final_loss"]),
                                     "equal": r1["cycles"] == r2["cycles"] and r1["work_units"] == r2["work_units"]
                                     and r1["val_acc"] == r2["val_acc"],
                                     "speedup_train": r1["train_s"] / r2["train_s"],
                                     "speedup_wall": r1["seconds"] / r2["seconds"]})
    # efficiency at P = 2 (means over seeds), with P = 1's compute fraction for reference
    for name in res["config"]["datasets"]:
        for L in (1, 8):
            row = {}
            for P in res["config"]["P"]:
                rs = find(runs, dataset=name, P=P, levels=L, variant="default")
                if not rs:
                    continue
                row[f"P{P}"] = {"efficiency": mean([r["efficiency"] for r in rs]), "bound": rs[0]["bound"],
                                "train_s": mean([r["train_s"] for r in rs]),
                                "per_call_ms": mean([1e3 * r["train_s"] / r["cycles"] for r in rs]),
                                "compute_s": [mean([r["per_rank"][i]["compute_s"] for r in rs]) for i in range(P)],
                                "wait_s": [mean([r["per_rank"][i]["wait_s"] for r in rs]) for i in range(P)],
                                "other_s": [mean([r["per_rank"][i]["other_s"] for r in rs]) for i in range(P)],
                                "comm_wait_s": [mean([r["per_rank"][i]["comm_wait_s"] for r in rs]) for i in range(P)],
                                "rest_s": [mean([r["per_rank"][i]["rest_s"] for r in rs]) for i in range(P)],
                                "n": len(rs)}
            if row:
                out["efficiency"][f"{name}-L{L}"] = row
    pairs = []
    for b in find(runs, P=2, dataset="circles", levels=8, variant="min1"):
        a = find(runs, P=2, dataset="circles", levels=8, seed=b["seed"], variant="default")
        if a:
            pairs.append({str(r["min_blocks_per_rank"]): {k: r[k] for k in ("seed", "cycles", "work_units", "seconds",
                                                                            "train_s", "efficiency", "plan",
                                                                            "level_seconds", "val_acc")}
                          for r in (a[0], b)})
    if pairs:
        out["min_blocks"] = {"pairs": pairs, "mean": {
            k: {q: mean([p[k][q] for p in pairs]) for q in ("cycles", "work_units", "seconds", "train_s", "efficiency")}
            for k in ("16", "1")}}
        out["min_blocks"]["train_ratio_1_over_16"] = out["min_blocks"]["mean"]["1"]["train_s"] / \
            out["min_blocks"]["mean"]["16"]["train_s"]
    return out


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------

def f1(x, nd=1):
    return "—" if x is None else f"{x:.{nd}f}"


def write_markdown(res: dict, path: Path) -> None:
    cfg, an = res["config"], res["analysis"]
    runs = [r for r in res["runs"] if r.get("cycles") is not None]
    K = cfg["blocks"]
    L = [f"# MG/OPT scaling: V-cycles vs gradient descent, serial and layer-parallel (K = {K})", ""]
    if cfg["quick"]:
        L += ["**Quick run** (K = 128, one seed, circles only): a smoke test, not a measurement.", ""]
    L += [f"Command: `{res['meta']['command']}`", "",
          f"Machine: {res['meta']['cpu_count']} CPU cores shared with other jobs, torch {res['meta']['torch']}, "
          f"float32, one thread per rank. Load average before/after: {res['meta']['loadavg_start']} / "
          f"{res['meta']['loadavg_end']}. Total time {res['meta']['elapsed_s']:.0f} s. "
          f"P = 2 ranks: {cfg['p2_backend']} backend, real processes; M = {cfg['microbatches']} micro-batch(es), "
          f"1F1B schedule; metric `{cfg['metric']}`.",
          "",
          "One launch per P runs every configuration; L = 1 and L = 8 of the same seed run back to back, so "
          "ratios compare runs under the same machine load (the machine is shared: absolute times vary "
          "between launches by up to 2x).",
          "",
          "*wall s*: `summary[\"seconds\"]` (training plus validation after every cycle, as a user sees it); "
          "*train s*: time inside the V-cycle (L = 8) or GD-step (L = 1) calls only (slowest rank). "
          "*U*: work units (one finest-level gradient = 1; level l costs K_l/K).",
          ""]
    for name in cfg["datasets"]:
        d = DATASETS[name]
        L += [f"## {name}", ""]
        if name == "circles":
            L += [f"Width {d['width']}, lr {d['lr']}, β {d['beta']:g}, full-batch GD, target validation accuracy "
                  f"{d['target_accuracy']}; at most {cfg['circles_max_cycles'][1]} steps (L = 1) / "
                  f"{cfg['circles_max_cycles'][8]} V-cycles (L = 8).", ""]
        else:
            L += [f"MNIST t10k split 8000/2000, width {d['width']}, lr {d['lr']}, β {d['beta']:g}, mini-batches of "
                  f"{d['batch_size']}, target {d['target_accuracy']}; equal work budget of {cfg['mnist_work_budget']} "
                  f"work units for L = 1 and L = 8 (validation every {cfg['mnist_eval_every'][1]} steps for L = 1, "
                  f"every V-cycle for L = 8, i.e. about every 5 work units for both).", ""]
        L += ["| P | L | seed | status | cycles | U | wall s | train s | final val acc | efficiency |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(find(runs, dataset=name, variant="default"), key=lambda r: (r["P"], r["levels"], r["seed"])):
            L.append(f"| {r['P']} | {r['levels']} | {r['seed']} | {r['status']} | {r['cycles']} | {r['work_units']:.1f} | "
                     f"{r['seconds']:.1f} | {r['train_s']:.1f} | {r['val_acc']:.4f} | {r['efficiency']:.3f} |")
        L.append("")
        ratios = [an["ratios"][f"{name}-P{P}"] for P in cfg["P"] if f"{name}-P{P}" in an["ratios"]]
        if ratios and all(e["all_reached"] for e in ratios):
            L += ["| P | mean U L=1 | mean U L=8 | **U ratio** | mean wall s L=1 | mean wall s L=8 | **wall ratio** | "
                  "train ratio | per-seed U ratios | per-seed wall ratios |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
            for P in cfg["P"]:
                e = an["ratios"].get(f"{name}-P{P}")
                if not e:
                    continue
                L.append(f"| {P} | {e['mean_L1']['work_units']:.1f} | {e['mean_L8']['work_units']:.1f} | "
                         f"**{e['work_ratio']:.2f}** | {e['mean_L1']['seconds']:.1f} | {e['mean_L8']['seconds']:.1f} | "
                         f"**{e['wall_ratio']:.2f}** | {e['train_ratio']:.2f} | "
                         + ", ".join(f"{s['work_ratio']:.2f}" for s in e["per_seed"]) + " | "
                         + ", ".join(f"{s['wall_ratio']:.2f}" for s in e["per_seed"]) + " |")
            L.append("")
        elif ratios:
            L += [f"Not every run reached the target {d['target_accuracy']}: runs stopped at the budget, so work "
                  "units to the target cannot be compared (at an equal work budget their ratio is 1 by construction). "
                  "Validation accuracy at the budget (mean over seeds):", "",
                  "| P | U L=1 | val acc L=1 | wall s L=1 | U L=8 | val acc L=8 | wall s L=8 |", "|---|---|---|---|---|---|---|"]
            for P in cfg["P"]:
                l1 = find(runs, dataset=name, P=P, levels=1, variant="default")
                l8 = find(runs, dataset=name, P=P, levels=8, variant="default")
                if l1 and l8:
                    L.append(f"| {P} | {mean([r['work_units'] for r in l1]):.1f} | {mean([r['val_acc'] for r in l1]):.4f} | "
                             f"{mean([r['seconds'] for r in l1]):.1f} | {mean([r['work_units'] for r in l8]):.1f} | "
                             f"{mean([r['val_acc'] for r in l8]):.4f} | {mean([r['seconds'] for r in l8]):.1f} |")
            L.append("")
        e1 = an["ratios"].get(f"{name}-P1") or {}
        if e1.get("thresholds"):
            L += ["Work units and wall seconds to first reach a validation accuracy (P = 1; mean over the runs that "
                  "reached it, *> U* where none did within the budget U; ratios where every run reached it):", "",
                  "| val acc ≥ | U L=1 | U L=8 | U ratio | wall s L=1 | wall s L=8 | wall ratio | reached L=1 / L=8 |",
                  "|---|---|---|---|---|---|---|---|"]
            for t, v in e1["thresholds"].items():
                ok = v["all_reached"]
                ur = v["work_L1"] / v["work_L8"] if ok else None
                sr = v["seconds_L1"] / v["seconds_L8"] if ok else None
                u1 = f1(v["work_L1"]) if v["work_L1"] is not None else f"> {v['budget_L1']:.0f}"
                u8 = f1(v["work_L8"]) if v["work_L8"] is not None else f"> {v['budget_L8']:.0f}"
                L.append(f"| {t} | {u1} | {u8} | {f1(ur, 2)} | {f1(v['seconds_L1'])} | "
                         f"{f1(v['seconds_L8'])} | {f1(sr, 2)} | {v['reached_L1']}/{v['n']} / {v['reached_L8']}/{v['n']} |")
            L.append("")
    # goals
    L += ["## Goal (circles, K = %d, %d seed(s))" % (K, cfg["seeds"]), "",
          f"L = 8 needs ≥ {GOAL_WORK:g}x fewer work units (mean) and ≥ {GOAL_WALL:g}x less wall time than L = 1 to "
          "reach validation accuracy 1.0 on the same ranks (paper: 95 / 26 = 3.65x in work units).", ""]
    for P in cfg["P"]:
        e = an["ratios"].get(f"circles-P{P}")
        if e:
            ci = e.get("work_ratio_ci95")
            L.append(f"* P = {P}: work units {e['work_ratio']:.2f}x (**{'met' if e['goal_work_met'] else 'not met'}**"
                     + (f"; 95 % bootstrap interval over seeds {ci[0]:.2f}–{ci[1]:.2f}" if ci else "")
                     + (f"; seeds 0–2 alone {e['work_ratio_first3']:.2f}x" if e.get("work_ratio_first3") else "")
                     + f"), wall time {e['wall_ratio']:.2f}x (**{'met' if e['goal_wall_met'] else 'not met'}**), "
                     f"training time only {e['train_ratio']:.2f}x"
                     + ("" if e["all_reached"] else "; not every run reached the target"))
    other = path.parent / "euclidean" / "results.json"
    if cfg["metric"] == "l2" and other.is_file():
        e = json.loads(other.read_text()).get("analysis", {}).get("ratios", {}).get("circles-P1")
        if e:
            L.append(f"* For comparison, `--metric euclidean` (plain steps on the raw parameters, Tikhonov weight "
                     f"2^(L−l) as in the paper; `euclidean/`, P = 1, seeds {', '.join(map(str, e['seeds']))}): mean {e['mean_L1']['work_units']:.1f} vs "
                     f"{e['mean_L8']['work_units']:.1f} work units = {e['work_ratio']:.2f}x, wall time "
                     f"{e['wall_ratio']:.2f}x, training time only {e['train_ratio']:.2f}x.")
    L.append("")
    # exactness
    if an["exactness"]:
        L += ["## P = 2 against P = 1 (same configuration and seed)", "",
              f"Speed-up = P = 1 time / P = 2 time, from two different launches (different machine load). With "
              f"M = {cfg['microbatches']} micro-batch(es) on 2 ranks the pipeline bound is "
              f"{cfg['microbatches'] / (cfg['microbatches'] + 1):.2f}: "
              + ("the ranks run one after the other within every forward and backward, so no speed-up over one "
                 "process is possible (P = 2 halves the parameters and activations per rank); a speed-up needs "
                 "M > 1 micro-batches in flight (`--microbatches`)." if cfg["microbatches"] == 1 else
                 "speed-up is at most 2 x the bound."), "",
              "| dataset | L | seed | cycles P=1 / P=2 | U P=1 / P=2 | val acc P=1 / P=2 | final loss rel. diff | equal | "
              "speed-up train | speed-up wall |", "|---|---|---|---|---|---|---|---|---|---|"]
        for x in an["exactness"]:
            L.append(f"| {x['dataset']} | {x['levels']} | {x['seed']} | {x['cycles'][0]} / {x['cycles'][1]} | "
                     f"{x['work_units'][0]:.4f} / {x['work_units'][1]:.4f} | {x['val_acc'][0]:.4f} / {x['val_acc'][1]:.4f} | "
                     f"{x['final_loss_rel_diff']:.1e} | {'yes' if x['equal'] else 'no'} | {x['speedup_train']:.2f} | "
                     f"{x['speedup_wall']:.2f} |")
        L.append("")
    # efficiency
    if an["efficiency"]:
        L += ["## Parallel efficiency: GD step (L = 1) vs V-cycle (L = 8)", "",
              "Per rank, accumulated over the run (means over seeds): *compute* and *wait* from `LayerParallel.times` "
              "of every level's executor; *other* = training time − compute − wait (restriction, prolongation, "
              "optimizer steps, moving tensors between layouts, and on rank 1 the blocking wait while a gathered "
              "coarse level runs on rank 0). *efficiency* = busiest rank's compute / training wall time; for P = 1 "
              "it is the fraction of the time spent in forward/backward. *bound* = M / (M + P − 1). "
              "*all comm. wait*: time in every blocking communication during the V-cycle / GD-step calls "
              "(`Communicator.wait_seconds` of the world and the level groups: pipeline receives, the loss "
              "broadcast and regularization allreduce of every gradient, transfers to and from gathered levels); "
              "*rest* = training time − compute − all comm. wait (local work: restriction, prolongation, "
              "optimizer steps, Python overhead).", "",
              "| dataset | L | P | ms per step / V-cycle | compute s (per rank) | pipeline wait s | other s | "
              "all comm. wait s | rest s | efficiency | bound |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
        for key, row in an["efficiency"].items():
            name, lv = key.rsplit("-L", 1)
            for P in cfg["P"]:
                v = row.get(f"P{P}")
                if v:
                    L.append(f"| {name} | {lv} | {P} | {v['per_call_ms']:.1f} | "
                             + " / ".join(f"{x:.1f}" for x in v["compute_s"]) + " | "
                             + " / ".join(f"{x:.1f}" for x in v["wait_s"]) + " | "
                             + " / ".join(f"{x:.1f}" for x in v["other_s"]) + " | "
                             + " / ".join(f"{x:.1f}" for x in v["comm_wait_s"]) + " | "
                             + " / ".join(f"{x:.1f}" for x in v["rest_s"]) + f" | **{v['efficiency']:.3f}** | {v['bound']:.2f} |")
        L.append("")
    # time per level
    l8 = [r for r in runs if r["levels"] == 8 and r["dataset"] == "circles"]
    if l8:
        L += ["## Time per level (circles, L = 8, seed 0)", "",
              "`summary[\"level_seconds\"]` (rank 0: gradient evaluations and smoothing steps of the level), the "
              "ranks a level runs on, and the level's forward/backward efficiency (busiest rank's compute / slowest "
              "rank's forward-backward time).", ""]
        cols = [r for r in sorted(l8, key=lambda r: (r["P"], -r["min_blocks_per_rank"])) if r["seed"] == 0]
        L += ["| level | blocks | " + " | ".join(
            f"P={r['P']}{' min1' if r['variant'] == 'min1' else ''}: ranks / s / eff" for r in cols) + " |",
            "|---|---|" + "---|" * len(cols)]
        for i in range(8):
            cells = []
            for r in cols:
                le = r["level_efficiency"][i]
                cells.append(f"{r['plan'][i]} / {r['level_seconds'][i]:.2f} / "
                             + (f"{le['efficiency']:.2f}" if le["efficiency"] is not None else "—"))
            L.append(f"| {i + 1} | {K >> (7 - i)} | " + " | ".join(cells) + " |")
        L.append("")
    mb = an.get("min_blocks")
    if mb:
        L += ["## Coarse levels gathered (min blocks per rank 16) vs every level on both ranks (1)", "",
              "circles, L = 8, P = 2; the two runs of a seed back to back in one launch.", "",
              "| seed | min blocks per rank | ranks per level (coarsest first) | cycles | U | wall s | train s | efficiency |",
              "|---|---|---|---|---|---|---|---|"]
        for p in mb["pairs"]:
            for k in ("16", "1"):
                v = p[k]
                L.append(f"| {v['seed']} | {k} | {v['plan']} | {v['cycles']} | {v['work_units']:.2f} | {v['seconds']:.1f} | "
                         f"{v['train_s']:.1f} | {v['efficiency']:.3f} |")
        for k in ("16", "1"):
            v = mb["mean"][k]
            L.append(f"| mean | {k} | | {v['cycles']:.1f} | {v['work_units']:.2f} | {v['seconds']:.1f} | "
                     f"{v['train_s']:.1f} | {v['efficiency']:.3f} |")
        L += ["", f"Training time with every level on both ranks / with coarse levels gathered: "
                  f"{mb['train_ratio_1_over_16']:.2f}.", ""]
    if res.get("failures"):
        L += ["## Failures", ""] + [f"* `{f.splitlines()[0]}`" for f in res["failures"]] + [""]
    L += ["Curves: `mgopt_scaling.png`; every number and curve: `results.json`."]
    path.write_text("\n".join(L) + "\n")


def write_plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = res["config"]
    runs = [r for r in res["runs"] if r.get("cycles") is not None and r["variant"] == "default" and r["seed"] == 0]
    names = cfg["datasets"]
    fig, axes = plt.subplots(len(names), 2, figsize=(12, 4.2 * len(names)), squeeze=False)
    colors = {1: "tab:blue", 8: "tab:red"}
    styles = {1: "-", 2: "--"}
    for i, name in enumerate(names):
        for j, key in enumerate(("work_units", "seconds")):
            ax = axes[i][j]
            for r in sorted(find(runs, dataset=name), key=lambda r: (r["levels"], r["P"])):
                c = r["curve"]
                pts = [(x, a) for x, a in zip(c[key], c["val_acc"]) if a is not None]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], styles.get(r["P"], ":"), color=colors[r["levels"]],
                        label=f"L={r['levels']}, P={r['P']}", alpha=0.85)
            ax.set_xscale("log")
            ax.set_xlabel("work units" if key == "work_units" else "seconds (wall, incl. validation)")
            ax.set_ylabel("validation accuracy")
            ax.axhline(DATASETS[name]["target_accuracy"], color="k", lw=0.8, ls=":")
            lo = 0.8 if name == "circles" else 0.5
            ax.set_ylim(lo, 1.005)
            ax.grid(alpha=0.3)
            ax.set_title(f"{name}, K={cfg['blocks']}, seed 0", fontsize=9)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="K=128, one seed, circles only (< 90 s)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mgopt"))
    ap.add_argument("--seeds", type=int, default=None, help="circles seeds (default 10; quick 1)")
    ap.add_argument("--mnist-seeds", type=int, default=None, help="MNIST seeds (default 1)")
    ap.add_argument("--datasets", default=None, help="comma-separated: circles,mnist")
    ap.add_argument("--backend", choices=("torch", "mpi"), default="torch",
                    help="P = 2 launches: torch (gloo, torchrun-style environment) or mpi (mpirun)")
    ap.add_argument("--P", default="1,2", help="world sizes to launch, comma-separated (default 1,2)")
    ap.add_argument("--microbatches", type=int, default=1)
    ap.add_argument("--metric", choices=("l2", "euclidean"), default="l2")
    ap.add_argument("--data-dir", default=default_mnist_dir())
    ap.add_argument("--keep-runs", action="store_true", help="keep the run folders under OUT/runs")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite the tables and the plot from OUT/results.json (no training)")
    ap.add_argument("--worker", nargs=2, metavar=("JOB", "RESULT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        run_worker(*args.worker)
        return 0
    if args.render:
        out = Path(args.out)
        result = json.loads((out / "results.json").read_text())
        for k in ("circles_max_cycles", "mnist_eval_every"):      # JSON turned the int keys into strings
            result["config"][k] = {int(a): b for a, b in result["config"][k].items()}
        result["analysis"] = analyse(result)
        (out / "results.json").write_text(json.dumps(result, indent=1))
        write_markdown(result, out / "mgopt_scaling.md")
        write_plot(result, out / "mgopt_scaling.png")
        print(f"wrote {out / 'mgopt_scaling.md'}")
        return 0

    cfg = dict(QUICK if args.quick else FULL)
    if args.seeds is not None:
        cfg["seeds"] = args.seeds
    if args.mnist_seeds is not None:
        cfg["mnist_seeds"] = args.mnist_seeds
    if args.datasets:
        cfg["datasets"] = [d.strip() for d in args.datasets.split(",") if d.strip()]
        bad = [d for d in cfg["datasets"] if d not in DATASETS]
        if bad:
            ap.error(f"unknown dataset {bad[0]!r} (valid: {', '.join(DATASETS)})")
    if "mnist" in cfg["datasets"] and not args.data_dir:
        ap.error("MNIST needs --data-dir (default ../shared/data/mnist not found)")
    cfg["P"] = sorted({int(p) for p in args.P.split(",") if p.strip()})
    if not cfg["P"] or any(p not in (1, 2) for p in cfg["P"]):
        ap.error("--P: 1 and/or 2")
    cfg.update(quick=args.quick, microbatches=args.microbatches, metric=args.metric, p2_backend=args.backend)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="parml-mgopt-"))
    runs_dir = out / "runs" if args.keep_runs else tmp / "runs"
    import torch
    meta = {"command": " ".join(["python", "benchmarks/mgopt_scaling.py"] + (argv if argv is not None else sys.argv[1:])),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    t0 = time.perf_counter()
    plan = build_plan(cfg)
    all_runs, failures = [], []
    print(f"mgopt_scaling: K={cfg['blocks']}, datasets {cfg['datasets']}, P {cfg['P']}, "
          f"{sum(len(v) for v in plan.values())} runs", flush=True)
    try:
        for P, runs in plan.items():
            job = {"runs": runs, "data_dir": args.data_dir, "runs_dir": str(runs_dir),
                   "backend": "self" if P == 1 else args.backend, "comm_timeout": 600.0}
            res, err = launch(job, P, cfg["launch_timeout"], tmp, f"P{P}")
            if res:
                all_runs += res["runs"]
            if err:
                failures.append(err)
                print(err, file=sys.stderr, flush=True)
    finally:
        meta["elapsed_s"] = time.perf_counter() - t0
        meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        result = {"config": cfg, "meta": meta, "runs": all_runs, "failures": failures}
        result["analysis"] = analyse(result)
        (out / "results.json").write_text(json.dumps(result, indent=1))
        write_markdown(result, out / "mgopt_scaling.md")
        write_plot(result, out / "mgopt_scaling.png")
        shutil.rmtree(tmp, ignore_errors=True)
    for key, e in result["analysis"]["ratios"].items():
        print(f"{key}: U ratio L1/L8 {e['work_ratio']:.2f}, wall ratio {e['wall_ratio']:.2f}, "
              f"train ratio {e['train_ratio']:.2f}", flush=True)
    print(f"wrote {out / 'mgopt_scaling.md'} ({meta['elapsed_s']:.0f} s)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
