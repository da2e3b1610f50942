"""Mesh layouts (D data replicas x P layer ranks) on parml's own workloads, timed inside one run.

    python benchmarks/mesh_scaling.py [--quick] [--repeats 3] [--out benchmarks/results/mesh]
    python benchmarks/mesh_scaling.py --report-only      # redraw md and PNG from OUT/results.json
    torchrun --nproc-per-node 4 benchmarks/mesh_scaling.py   # inside an allocation: on sub-meshes

Launch A, 2 ranks (gloo): the layouts (D, P) = (1, 1) (rank 0 alone on a SelfComm while rank 1
waits in a barrier: one process), (2, 1), (2, 1) with ``--coarse-layout redundant
--min-blocks-per-rank 256``, (1, 2) and (1, 2) with ``--coarse-layout replicate``, interleaved in
rounds (each round runs every layout for one untimed step and up to 5 timed ones, on the same
batches, in an order rotated every repeat), on

* ``circles-gd``: the paper's circles setup (K = 2048, width 3, full batch 2000, lr 0.1, β 1e-4), one GD step;
* ``circles-vcycle``: the same with the default 8-level V-cycle [(1),1,1,1,2,2,2,{2}];
* ``mnist-sgd``: the paper's MNIST setup (t10k split 8000/2000, width 10, lr 0.01, β 1e-5,
  mini-batches of 1000), 8 levels: multilevel SGD, one V-cycle per mini-batch (needs --data-dir);

then circles-vcycle trained to validation accuracy 1.0 with every layout: wall seconds to the
target (``train``'s in-run clock). Launch B, 4 ranks (oversubscribed on a 2-core machine):
circles-vcycle on (1, 4) and (2, 2), gather vs replicate, and (2, 2) redundant <256.

In-run timers per step / V-cycle: wall seconds on rank 0, CPU seconds on every rank, the seconds
each rank was blocked in communication, seconds per level; the load average at every step.
Efficiencies: ``mesh/analyse.py``. Outputs in ``--out``: ``results.json``, ``mesh_scaling.md``,
``mesh_scaling.png``. ``--quick``: K = 128, 1 repeat, a few steps (about a minute).
Plan here; rank code, analysis and outputs in ``mesh/``; launching in ``harness``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parml.config import TrainConfig  # noqa: E402
from parml.data import default_mnist_dir  # noqa: E402

from benchmarks.harness import (DataFolder, Job, Launcher, Machine, add_kernel_option, command_line,  # noqa: E402
                                from_json, write_outputs, write_report)
from benchmarks.mesh.analyse import analyse  # noqa: E402
from benchmarks.mesh.markdown import markdown  # noqa: E402
from benchmarks.mesh.plot import plot  # noqa: E402
from benchmarks.mesh.ranks import WORKLOADS  # noqa: E402
from benchmarks.mesh.records import Layout, MeshConfig, MeshJob, MeshResults, Sample, Target  # noqa: E402

HERE = Path(__file__).resolve().parent
STEM = "mesh_scaling"
#: redundant <256: the levels under 256 blocks (the V-cycle's four coarsest at K = 2048) run the whole
#: batch on both replicas, with no gradient all-reduce
LAYOUTS = {2: [Layout(1, 1), Layout(2, 1), Layout(2, 1, "redundant", 256), Layout(1, 2), Layout(1, 2, "replicate")],
           4: [Layout(1, 4), Layout(1, 4, "replicate"), Layout(2, 2), Layout(2, 2, "replicate"),
               Layout(2, 2, "redundant", 256)]}
FOUR_RANK_WORKLOADS = ["circles-vcycle"]          # launch B: the coarse layouts on the V-cycle
FULL = {"blocks": TrainConfig().blocks, "repeats": 3, "steps": {"circles-gd": 10, "circles-vcycle": 10, "mnist-sgd": 3},
        "warm": 2, "target_runs": True, "max_cycles": 60, "launch_timeout": 3 * 3600}
QUICK = {**FULL, "blocks": 128, "repeats": 1, "steps": {"circles-gd": 4, "circles-vcycle": 2, "mnist-sgd": 2},
         "max_cycles": 40, "launch_timeout": 900}


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="K = 128, 1 repeat, a few steps")
    ap.add_argument("--repeats", type=int, default=None, help="repeats of every layout (default 3; quick 1)")
    ap.add_argument("--out", default=str(HERE / "results" / "mesh"))
    ap.add_argument("--data-dir", default=default_mnist_dir(), help="MNIST files (mnist-sgd runs only with them)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated subset of {','.join(WORKLOADS)}")
    ap.add_argument("--no-four", action="store_true", help="skip the 4-rank launch")
    add_kernel_option(ap)
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the markdown and the plot from an existing OUT/results.json")
    args = ap.parse_args(argv)
    args.out = Path(args.out)
    return ap, args


def plan(ap, args) -> MeshConfig:
    """The configuration the options ask for (MNIST only with its files)."""
    base = dict(QUICK if args.quick else FULL)
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    bad = [n for n in names if n not in WORKLOADS]
    if bad or not names:
        ap.error(f"--workloads {args.workloads!r}: valid: {','.join(WORKLOADS)}")
    if "mnist-sgd" in names and not (args.data_dir and Path(args.data_dir).is_dir()):
        print(f"skipping mnist-sgd: no MNIST folder (--data-dir {args.data_dir})", flush=True)
        names.remove("mnist-sgd")
    layouts = {2: LAYOUTS[2]}
    if not args.no_four and any(n in names for n in FOUR_RANK_WORKLOADS):
        layouts[4] = LAYOUTS[4]
    return MeshConfig(base["blocks"], args.repeats or base["repeats"], {n: base["steps"][n] for n in names},
                      base["warm"], names, layouts, base["target_runs"], base["max_cycles"], base["launch_timeout"],
                      quick=args.quick, kernel=args.kernel,
                      data=DataFolder.of(args.data_dir) if "mnist-sgd" in names else None)


def jobs(cfg: MeshConfig, data_dir: str | None, runs_dir: str, backend: str = "torch") -> list[Job]:
    """Launch A (2 ranks: every workload, then the target runs), launch B (4 ranks); `backend`:
    "torch" (gloo ranks) started here, or the backend of the allocation it runs in."""
    out = []
    for ranks, layouts in cfg.layouts.items():
        names = cfg.workloads if ranks == 2 else [n for n in cfg.workloads if n in FOUR_RANK_WORKLOADS]
        payload = MeshJob(names, layouts, cfg.blocks, cfg.repeats, cfg.steps, cfg.warm, cfg.target_runs and ranks == 2,
                          cfg.max_cycles, cfg.kernel or "auto", data_dir, runs_dir)
        out.append(Job(f"mesh{ranks}", "benchmarks.mesh.ranks:run_launch", payload, ranks, backend,
                       timeout=cfg.launch_timeout, comm_timeout=900.0))
    return out


def run(cfg: MeshConfig, data_dir: str | None, argv) -> MeshResults | None:
    """Every launch; None on the ranks other than 0 inside an allocation."""
    res = MeshResults(cfg, Machine.now(command_line("mesh_scaling.py", argv)))
    tmp = Path(tempfile.mkdtemp(prefix="parml-mesh-"))
    try:
        launcher = Launcher(tmp)
        for job in jobs(cfg, data_dir, str(tmp / "runs"), launcher.kind or "torch"):
            if launcher.rank == 0:
                print(f"== {job.label}: {job.ranks} ranks", flush=True)
            got = launcher.run(job)
            if launcher.rank == 0 and (got.error or got.skipped):
                print(got.error or got.skipped, file=sys.stderr, flush=True)
            res.failures += [got.error] if got.error else []
            res.samples += got.of(Sample)
            res.targets += got.of(Target)
        launcher.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if launcher.rank != 0:
        return None
    res.meta.finish()
    res.worlds = analyse(res)
    return res


def load(out: Path) -> MeshResults:
    """OUT/results.json, analysed."""
    res = from_json(MeshResults, json.loads((out / "results.json").read_text()))
    res.worlds = analyse(res)
    return res


def main(argv=None) -> int:
    ap, args = parse(argv)
    if args.report_only:
        write_report(args.out, STEM, load(args.out), markdown, plot)
        print(f"wrote {args.out / (STEM + '.md')} and {STEM}.png", flush=True)
        return 0
    res = run(plan(ap, args), args.data_dir, argv)
    if res is None:
        return 0
    if not res.samples:
        print(f"mesh_scaling.py: error: no layout ran ({'; '.join(res.failures) or 'every launch skipped'})",
              file=sys.stderr)
        return 1
    write_outputs(args.out, STEM, res, markdown, plot)
    print("\n".join(markdown(res)), flush=True)
    return 1 if res.failures else 0


if __name__ == "__main__":
    sys.exit(main())
