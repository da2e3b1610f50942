"""MG/OPT vs plain gradient descent, serial and layer-parallel: cycles, work units, wall time, efficiency.

    python benchmarks/mgopt_scaling.py [--quick] [--out benchmarks/results/mgopt] [--seeds 10]

Trains ODE ResNets with K = 2048 blocks on

* co-centric circles (width 3, lr 0.1, β 1e-4, full-batch GD, target validation accuracy 1.0), and
* MNIST (t10k split 8000/2000, width 10, lr 0.01, β 1e-5, mini-batches of 1000, target 0.93;
  runs stop at an equal work budget for L = 1 and L = 8, V-cycles costing ``CycleSetup.cost()``),

with L = 1 (plain GD / SGD) and L = 8 levels (the paper's cycle [(1),1,1,1,2,2,2,{2}]), on P = 1
and P = 2 processes (gloo with torchrun's variables, or ``mpirun`` with ``--backend mpi``); one
launch per P runs every configuration, L = 1 and L = 8 of a seed back to back. For every circles
seed a P = 2 run with ``--min-blocks-per-rank 1`` follows the default one (16: coarse levels
gathered onto rank 0). Per run: V-cycles to the target, work units, wall time, training time
(``train``'s ``around_cycle`` hook), time per level and per rank the compute / wait of every
level's executor (``LayerParallel.total``); the exactness of P = 2 against P = 1.

Outputs in ``--out``: ``results.json``, ``mgopt_scaling.md``, ``mgopt_scaling.png`` (validation
accuracy against work units and seconds). ``--quick``: K = 128, one seed, circles only.
Plan here; rank code, analysis and outputs in ``mgopt/``; launching in ``harness``.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parml.data import default_mnist_dir  # noqa: E402
from parml.multilevel.mgopt import CycleSetup  # noqa: E402

from benchmarks.harness import (DataFolder, Job, Launcher, Machine, add_kernel_option, command_line,  # noqa: E402
                                from_json, read_json, write_outputs)
from benchmarks.mgopt.analyse import CYCLE_L8, SETUPS, analyse, ratio_of_means_interval  # noqa: E402, F401
from benchmarks.mgopt.markdown import markdown  # noqa: E402
from benchmarks.mgopt.plot import plot  # noqa: E402
from benchmarks.mgopt.records import MgConfig, MgJob, MgResults, MgRun, RunSpec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FULL = {"blocks": 2048, "seeds": 10, "mnist_seeds": 1, "datasets": ["circles", "mnist"],
        "circles_max_cycles": {1: 2000, 8: 400},
        # MNIST: equal work budget (work units) for L = 1 and L = 8; validation every ~5 work units
        "mnist_work_budget": 600, "mnist_eval_every": {1: 5, 8: 1}, "launch_timeout": 4 * 3600}
QUICK = {**FULL, "blocks": 128, "seeds": 1, "datasets": ["circles"], "launch_timeout": 150}
STEM = "mgopt_scaling"


def build_plan(cfg: MgConfig) -> dict[int, list[RunSpec]]:
    """Run specs per world size P, in execution order (L = 1 and L = 8 of a seed back to back)."""
    plan = {}
    for P in cfg.P:
        runs = []
        for name in cfg.datasets:
            d = SETUPS[name]
            for seed in range(cfg.seeds if name == "circles" else cfg.mnist_seeds):
                for L in (1, 8):
                    setup = CycleSetup.parse(CYCLE_L8) if L == 8 else CycleSetup.default(1)
                    if name == "circles":
                        budget = dict(max_cycles=cfg.circles_max_cycles[L], eval_every=1)
                    else:
                        budget = dict(max_cycles=int(math.ceil(cfg.mnist_work_budget / setup.cost())),
                                      eval_every=cfg.mnist_eval_every[L])
                    spec = RunSpec(dataset=name, seed=seed, levels=L, cycle=None if L == 1 else CYCLE_L8,
                                   blocks=cfg.blocks, width=d.width, lr=d.lr, beta=d.beta, batch_size=d.batch_size,
                                   target_accuracy=d.target_accuracy, metric=cfg.metric, microbatches=cfg.microbatches,
                                   min_blocks_per_rank=16, P=P, variant="default",
                                   kernel=cfg.kernel or "auto", **budget)
                    runs.append(spec)
                    if P == 2 and name == "circles" and L == 8:
                        runs.append(RunSpec(**{**vars(spec), "min_blocks_per_rank": 1, "variant": "min1"}))
        for r in runs:
            r.key = (f"{r.dataset}-L{r.levels}-K{r.blocks}-P{r.P}-s{r.seed}"
                     f"{'-min1' if r.variant == 'min1' else ''}")
        plan[P] = runs
    return plan


def parse(argv):
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
    add_kernel_option(ap)
    ap.add_argument("--keep-runs", action="store_true", help="keep the run folders under OUT/runs")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite the tables and the plot from OUT/results.json (no training)")
    args = ap.parse_args(argv)
    args.out = Path(args.out)
    base = dict(QUICK if args.quick else FULL)
    for key in ("seeds", "mnist_seeds"):
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    if args.datasets:
        base["datasets"] = [d.strip() for d in args.datasets.split(",") if d.strip()]
        bad = [d for d in base["datasets"] if d not in SETUPS]
        if bad:
            ap.error(f"unknown dataset {bad[0]!r} (valid: {', '.join(SETUPS)})")
    if "mnist" in base["datasets"] and not args.data_dir and not args.render:
        ap.error("MNIST needs --data-dir (default ../shared/data/mnist not found)")
    Ps = sorted({int(p) for p in args.P.split(",") if p.strip()})
    if not Ps or any(p not in (1, 2) for p in Ps):
        ap.error("--P: 1 and/or 2")
    cfg = MgConfig(P=Ps, quick=args.quick, microbatches=args.microbatches, metric=args.metric, p2_backend=args.backend,
                   kernel=args.kernel,
                   data=DataFolder.of(args.data_dir) if "mnist" in base["datasets"] else None, **base)
    return args, cfg


def run(args, cfg: MgConfig, argv) -> MgResults | None:
    """Every launch of the plan; None on the ranks other than 0 inside an allocation."""
    res = MgResults(cfg, Machine.now(command_line("mgopt_scaling.py", argv)))
    plan = build_plan(cfg)
    print(f"mgopt_scaling: K={cfg.blocks}, datasets {cfg.datasets}, P {cfg.P}, "
          f"{sum(len(v) for v in plan.values())} runs", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="parml-mgopt-"))
    runs_dir = args.out / "runs" if args.keep_runs else tmp / "runs"
    try:
        launcher = Launcher(tmp)
        for P, runs in plan.items():
            backend = "self" if P == 1 else args.backend
            job = Job(f"P{P}", "benchmarks.mgopt.ranks:run_launch", MgJob(runs, args.data_dir, str(runs_dir), backend),
                      P, backend, timeout=cfg.launch_timeout, comm_timeout=600.0)
            got = launcher.run(job)
            res.runs += got.of(MgRun)
            if launcher.rank == 0 and (got.error or got.skipped):
                print(got.error or got.skipped, file=sys.stderr, flush=True)
            res.failures += [got.error] if got.error else []
        launcher.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res.meta.finish()
    return res if launcher.rank == 0 else None


def render(res: MgResults, out: Path) -> None:
    res.analysis = analyse(res)
    other = out / "euclidean" / "results.json"
    euclid = None
    if res.config.metric == "l2" and other.is_file():
        euclid = read_json(other, MgResults).analysis.ratios.get("circles-P1")
    write_outputs(out, STEM, res, lambda r: markdown(r, euclid), plot)


def main(argv=None) -> int:
    args, cfg = parse(argv)
    if args.render:
        render(from_json(MgResults, json.loads((args.out / "results.json").read_text())), args.out)
        print(f"wrote {args.out / 'mgopt_scaling.md'}")
        return 0
    res = run(args, cfg, argv)
    if res is None:
        return 0
    render(res, args.out)
    for key, e in res.analysis.ratios.items():
        print(f"{key}: U ratio L1/L8 {e.work_ratio:.2f}, wall ratio {e.wall_ratio:.2f}, "
              f"train ratio {e.train_ratio:.2f}", flush=True)
    print(f"wrote {args.out / 'mgopt_scaling.md'} ({res.meta.elapsed_s:.0f} s)", flush=True)
    return 1 if res.failures else 0


if __name__ == "__main__":
    sys.exit(main())
