"""The scaling model against measurement on this machine, in one session with a fresh calibration.

    python benchmarks/plan_validation.py [--quick] [--out benchmarks/results/validation] [--profile P.json]
    python benchmarks/plan_validation.py --report-only      # re-predict and redraw from OUT/results.json

1. ``parml calibrate`` (full grid, the backend measured; ``--quick``: the quick grid) writes
   ``OUT/profile_cpu.json``, unless ``--profile`` names one (``scaling_projection.py --cpu-profile``
   takes the same file).
2. Measured (``validation/ranks.py``, ranks started through the harness — gloo, or MPI with
   ``--backend mpi`` — or sub-meshes of a torchrun / mpirun allocation, on its backend): both
   pipeline benchmark models (overhead-bound K=1024 width 32 batch 256; compute-bound K=256 width
   128 batch 512), the paper's circles setup (K=2048 width 3, full batch 2000) and its MNIST setup
   (K=2048 width 10, mini-batch 1000 of the t10k split); one GD step (L = 1) of each, one 8-level
   V-cycle of circles and MNIST; on 1, 2 and 4 ranks (4 share the 2 cores: the profile knows it),
   M = 1, 2, 4, 8, layouts (D, P) on parml's data x layer mesh (gathered, replicated and redundant
   coarse levels).
3. Predicted by ``parml.plan`` for each configuration with the load measured while it ran (the
   machine is shared: before every timed step all ranks spin for a moment and record the share of
   a core they got, giving the number of other busy processes B = cores / share - ranks), and the
   ``--layout auto`` choice at 2 ranks, measured too.

Outputs in --out: ``results.json`` (``validation.json`` of older runs is read too), ``validation.md``
(tables), ``validation.png`` (predicted against measured). ``--quick``: the overhead-bound model and
circles only, M in {1, 4}, the quick calibration grid.
Plan here; rank code, analysis and outputs in ``validation/``; launching in ``harness``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parml.config import TrainConfig  # noqa: E402
from parml.data import default_mnist_dir  # noqa: E402
from parml.plan.calibrate import calibrate  # noqa: E402
from parml.plan.profile import Profile  # noqa: E402
from parml.reproduce.paper import TASK_SETUP  # noqa: E402

from benchmarks.harness import (DataFolder, Job, Launcher, Machine, command_line, from_json,  # noqa: E402
                                write_outputs)
from benchmarks.pipeline_scaling import MODELS  # noqa: E402
from benchmarks.validation.analyse import VCYCLE_LEVELS, auto_choices, evaluate, unmeasured  # noqa: E402
from benchmarks.validation.markdown import markdown  # noqa: E402
from benchmarks.validation.plot import plot  # noqa: E402
from benchmarks.validation.records import Case, Conf, Measured, ValJob, ValResults  # noqa: E402

HERE = Path(__file__).resolve().parent
STEM = "validation"
CIRCLES_TRAIN = 2000                  # the circles train split: its full batch
CASES = {name: Case("random", m.in_features, m.classes, m.blocks, m.width, m.batch) for name, m in MODELS.items()}
CASES.update({task: Case(s["dataset"], in_features, classes, TrainConfig().blocks, s["width"],
                         s["batch_size"] or CIRCLES_TRAIN, s["lr"])
              for task, s, in_features, classes in (("circles", TASK_SETUP["circles"], 2, 2),
                                                    ("mnist", TASK_SETUP["mnist"], 784, 10))})
VCYCLE_CASES = ("circles", "mnist")
LAUNCHER_KINDS = {"gloo": "torch", "mpi": "mpi"}       # transport -> the harness's launcher kind (Job.backend)
FULL = {"cases": list(CASES), "worlds": [1, 2, 4], "M": [1, 2, 4, 8], "M_short": [1, 4, 8], "M_data": [1, 4],
        "steps": {1: 5, VCYCLE_LEVELS: 3}, "warmup": 1, "sizes": {}, "launch_timeout": 6 * 3600}
QUICK = {**FULL, "cases": ["overhead", "circles"], "M": [1, 4], "M_short": [1, 4], "launch_timeout": 3600}


def conf(case, levels, D, M, base, schedule="1f1b", mbpr=16, coarse="gather") -> Conf:
    return Conf(case, levels, D, M, schedule, mbpr, coarse, base["steps"][levels], base["warmup"])


def build_jobs(base: dict) -> dict[int, list[Conf]]:
    """Configurations per world size, each case's in a row."""
    L8, c = VCYCLE_LEVELS, lambda *a, **k: conf(*a, base=base, **k)
    jobs = {1: [], 2: [], 4: []}
    for case in base["cases"]:
        jobs[1] += [c(case, 1, 1, m) for m in base["M_short"]]
        jobs[2] += [c(case, 1, 1, m) for m in base["M"]] + [c(case, 1, 2, m) for m in base["M_data"]]
        jobs[4] += [c(case, 1, 1, m) for m in base["M"]] + [c(case, 1, 4, 1)]
        if case in VCYCLE_CASES:
            jobs[1] += [c(case, L8, 1, 1)]
            jobs[2] += [c(case, L8, 1, m) for m in base["M"]] + [c(case, L8, 1, 1, mbpr=1)] + \
                [c(case, L8, 2, 1), c(case, L8, 2, 1, mbpr=256, coarse="redundant"),
                 c(case, L8, 1, 1, coarse="replicate")]
            jobs[4] += [c(case, L8, 1, m) for m in base["M_short"]]
    return {n: cs for n, cs in jobs.items() if n in base["worlds"]}


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(HERE / "results" / "validation"))
    ap.add_argument("--quick", action="store_true", help="overhead-bound and circles only, M in {1, 4}, quick grid")
    ap.add_argument("--report-only", action="store_true",
                    help="predict again from OUT/results.json with the profile and rewrite the outputs")
    ap.add_argument("--profile", default=None,
                    help="use this profile instead of calibrating (default: calibrate into OUT/profile_cpu.json)")
    ap.add_argument("--data-dir", default=default_mnist_dir(), help="MNIST files (the mnist case)")
    ap.add_argument("--backend", choices=["gloo", "mpi"], default=None,
                    help="transport of the measured ranks (default: gloo; inside an allocation, its own)")
    args = ap.parse_args(argv)
    args.out = Path(args.out)
    return ap, args


def launch(launcher: Launcher, cases: dict, configs: list[Conf], n: int, data_dir, timeout: float, res: ValResults):
    got = launcher.run(Job(f"val{n}-{len(res.results)}", "benchmarks.validation.ranks:run_configs",
                           ValJob(cases, configs, data_dir), n, "self" if n == 1 else LAUNCHER_KINDS[res.backend],
                           timeout=timeout, comm_timeout=600.0))
    if launcher.rank == 0 and (got.error or got.skipped):
        print(got.error or got.skipped, file=sys.stderr, flush=True)
    res.failures += [got.error] if got.error else []
    res.results += got.of(Measured)


def measure(args, prof_path: Path, argv) -> ValResults | None:
    """Calibrate (unless given a profile), then every launch, then the auto choices not yet measured;
    None on the ranks other than 0 inside an allocation."""
    base = dict(QUICK if args.quick else FULL)
    if "mnist" in base["cases"] and not (args.data_dir and Path(args.data_dir).is_dir()):
        print(f"skipping the mnist case: no MNIST folder (--data-dir {args.data_dir})", flush=True)
        base["cases"] = [c for c in base["cases"] if c != "mnist"]
    cases = {k: Case(**{**vars(CASES[k]), **base["sizes"].get(k, {})}) for k in base["cases"]}
    res = ValResults(cases, started=time.strftime("%Y-%m-%d %H:%M", time.gmtime()), quick=args.quick,
                     meta=Machine.now(command_line("plan_validation.py", argv)),
                     data=DataFolder.of(args.data_dir) if "mnist" in cases else None)
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="parml-val-") as tmp:
        launcher = Launcher(Path(tmp))
        inside = next((t for t, k in LAUNCHER_KINDS.items() if k == launcher.kind), None)
        if args.backend and inside and args.backend != inside:
            raise SystemExit(f"plan_validation.py: error: --backend {args.backend} inside a {inside} allocation: "
                             f"leave it out, or start the script alone")
        res.backend = inside or args.backend or "gloo"
        if not args.profile and launcher.rank == 0:
            t0 = time.perf_counter()
            calibrate("cpu", [res.backend], str(prof_path), quick=args.quick)
            res.profile_note = f"parml calibrate, {time.perf_counter() - t0:.0f} s"
        elif args.profile:
            res.profile_note = f"given profile {prof_path.name}"
        if launcher.inside:
            launcher.comm.barrier()              # the profile is written before any rank reads it
        for n, configs in build_jobs(base).items():
            launch(launcher, cases, configs, n, args.data_dir, base["launch_timeout"], res)
            loads.append(os.getloadavg()[0])
        prof = Profile.load(str(prof_path), device="cpu")
        extra = unmeasured(auto_choices(res.results, prof, cases, res.backend), res.results, base["steps"],
                           base["warmup"])
        if launcher.inside:                      # rank 0 holds the results: every rank launches its list
            extra = launcher.comm.allgather_object(extra)[0]
        if extra:                                # measure what --layout auto picked, if not yet measured
            launch(launcher, cases, extra, 2, args.data_dir, base["launch_timeout"], res)
        launcher.close()
    if launcher.rank != 0:
        return None
    loads += [x for m in res.results for x in m.loadavg]
    res.finished = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    res.load_range, res.cores = [min(loads), max(loads)], prof.cores
    res.meta.finish()
    return res


def load(out: Path) -> ValResults:
    """OUT/results.json, or OUT/validation.json of a run before the harness."""
    path = out / "results.json" if (out / "results.json").is_file() else out / "validation.json"
    return from_json(ValResults, json.loads(path.read_text()))


def main(argv=None) -> int:
    ap, args = parse(argv)
    prof_path = Path(args.profile) if args.profile else args.out / "profile_cpu.json"
    args.out.mkdir(parents=True, exist_ok=True)
    res = load(args.out) if args.report_only else measure(args, prof_path, argv)
    if res is None:
        return 0
    evaluate(res, Profile.load(str(prof_path), device="cpu"))
    write_outputs(args.out, STEM, res, markdown, plot)
    print("\n".join(markdown(res)), flush=True)
    return 1 if res.failures else 0


if __name__ == "__main__":
    sys.exit(main())
