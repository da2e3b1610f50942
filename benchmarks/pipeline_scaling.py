"""Pipeline scaling of layer-parallel training: parml's LayerParallel vs torch.distributed.pipelining.

    python benchmarks/pipeline_scaling.py [--quick] [--out benchmarks/results/pipeline] [--report-only]
    python benchmarks/pipeline_scaling.py --device cuda     # GPU node: NCCL and MPI (staged) rows
    torchrun --nproc-per-node 4 benchmarks/pipeline_scaling.py   # inside an allocation: P = 1, 2, 4 on sub-meshes

Times one training step (forward + backward, ``LayerParallel.forward_backward``) of two ODE
ResNets for P = 1, 2, 4 processes, M = 1, 2, 4, 8 micro-batches, the "gpipe" and "1f1b"
schedules and the gloo (torchrun-style environment) and MPI (``mpirun``) backends:

* overhead-bound: K = 1024 blocks of width 32, batch 256 (each op is tiny: per-op cost dominates);
* compute-bound:  K = 256 blocks of width 128, batch 512.

Per rank: compute, wait and other time from ``LayerParallel.times``; pipeline efficiency =
busiest rank's compute / step time, next to the bound 1 - ``bubble_fraction(P, M)`` = M/(M+P-1);
peak activation memory per rank (``saved_tensors_hooks``). In the same launches (gloo) the
identical shards run under ``torch.distributed.pipelining``, alternating step by step with parml;
one serial process gives the reference. ``--device cuda``: NCCL (a GPU per rank) and MPI; results
go to ``results/pipeline_cuda`` unless ``--out`` says otherwise.

Outputs in ``--out``: ``results.json`` (every number), ``pipeline_scaling.md`` (tables) and
``pipeline_scaling.png`` (one panel per P, parml vs torch pipelining, memory).
Plan here, rank code in ``pipeline/ranks.py``, goals in ``pipeline/analyse.py``, outputs in
``pipeline/markdown.py`` and ``pipeline/plot.py``; launching in ``harness``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import (Job, Launcher, Machine, add_kernel_option, command_line, from_json,  # noqa: E402
                                write_outputs)
from benchmarks.pipeline.analyse import goals  # noqa: E402
from benchmarks.pipeline.markdown import markdown  # noqa: E402
from benchmarks.pipeline.plot import plot  # noqa: E402
from benchmarks.pipeline.records import (Entry, Latency, ModelSize, PipelineConfig, PipelineResults,  # noqa: E402
                                         Serial, StepJob, migrate)

HERE = Path(__file__).resolve().parent
MODELS = {"overhead": ModelSize(32, 1024, 256, "overhead-bound (K=1024, width 32, batch 256)"),
          "compute": ModelSize(128, 256, 512, "compute-bound (K=256, width 128, batch 512)")}
FULL = {"P": [1, 2, 4], "microbatches": [1, 2, 4, 8], "warmup": 2, "steps": 7, "serial_steps": 5,
        "launch_timeout": {1: 300, 2: 420, 4: 600}, "latency_reps": 200}
QUICK = {"P": [1, 2], "microbatches": [1, 4], "warmup": 1, "steps": 2, "serial_steps": 2,
         "launch_timeout": {1: 60, 2: 60, 4: 90}, "latency_reps": 30}
STEM = "pipeline_scaling"


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="reduced sizes (K/8, batch/4, M in {1,4}, P in {1,2})")
    ap.add_argument("--out", default=None,
                    help="output folder (default benchmarks/results/pipeline, or pipeline_cuda with --device cuda)")
    ap.add_argument("--only", default=None, metavar="MODEL[:P]",
                    help="run one model (overhead or compute), optionally one world size, e.g. compute:2")
    ap.add_argument("--backends", default=None, help="comma-separated subset of gloo,mpi (nccl,mpi with --device cuda)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="cpu (gloo and MPI) or cuda (NCCL and MPI with staged or CUDA-aware buffers)")
    add_kernel_option(ap)
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the markdown and the plot from an existing OUT/results.json")
    args = ap.parse_args(argv)
    args.out = Path(args.out or HERE / "results" / ("pipeline_cuda" if args.device == "cuda" else "pipeline"))
    return ap, args


def plan(ap, args) -> tuple[PipelineConfig, dict]:
    """The configuration (models, P, M, schedules, backends) the options ask for."""
    import torch
    from parml.launch import mpi_unavailable
    base = QUICK if args.quick else FULL
    models = {}
    for name, m in MODELS.items():
        if args.quick:
            m = ModelSize(m.width, m.blocks // 8, m.batch // 4)
            m.label = f"{name}-bound (quick: K={m.blocks}, width {m.width}, batch {m.batch})"
        models[name] = m
    Ps = list(base["P"])
    if args.only:
        name, _, p = args.only.partition(":")
        if name not in models or (p and not p.isdigit()):
            ap.error(f"--only {args.only!r}: expected MODEL[:P] with MODEL in {', '.join(models)}")
        models, Ps = {name: models[name]}, ([int(p)] if p else Ps)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device cuda: CUDA is not available on this machine (torch {torch.__version__}); use --device cpu")
    all_backends = ["nccl" if args.device == "cuda" else "gloo", "mpi"]
    backends = list(all_backends)
    if args.backends:
        wanted = args.backends.split(",")
        if any(b not in all_backends for b in wanted):
            ap.error(f"--backends {args.backends!r}: valid with --device {args.device}: {','.join(all_backends)}")
        backends = [b for b in all_backends if b in wanted]
    why = mpi_unavailable()
    if why and "mpi" in backends:
        print(f"skipping the mpi backend: {why}", flush=True)
        backends.remove("mpi")
    cfg = PipelineConfig(models, Ps, base["microbatches"], ["gpipe", "1f1b"], backends, base["warmup"], base["steps"],
                         base["serial_steps"], quick=args.quick, device=args.device, mpi_skipped=why,
                         kernel=args.kernel)
    return cfg, base


def jobs(cfg: PipelineConfig, base: dict) -> list[Job]:
    """The serial reference, then one launch per (P, backend)."""
    gpus = __import__("torch").cuda.device_count() if cfg.device == "cuda" else 0
    common = dict(models=cfg.models, microbatches=cfg.microbatches, schedules=cfg.schedules, warmup=cfg.warmup,
                  device=cfg.device, inline_ablation=cfg.inline_ablation, kernel=cfg.kernel or "auto")
    out = [Job("serial", "benchmarks.pipeline.ranks:run_serial", StepJob("serial", steps=cfg.serial_steps, **common),
               1, "self", cfg.device, base["launch_timeout"][1])]
    sizes = sorted({m.batch // M * m.width * 4 for m in cfg.models.values() for M in cfg.microbatches})
    for P in cfg.P:
        for b in cfg.backends:
            if b == "nccl" and P > gpus:
                print(f"== nccl P={P}: skipped (NCCL needs a GPU per rank; {gpus} here)", flush=True)
                continue
            payload = StepJob(b, steps=cfg.steps, torch_pipelining=b != "mpi", latency_bytes=sizes if P == 2 else [],
                              latency_reps=base["latency_reps"], **common)
            out.append(Job(f"{b}-P{P}", "benchmarks.pipeline.ranks:run_parallel", payload, P,
                           "mpi" if b == "mpi" else "torch", cfg.device, base["launch_timeout"].get(P, 420)))
    return out


def run(cfg: PipelineConfig, base: dict, argv) -> PipelineResults | None:
    res = PipelineResults(cfg, Machine.now(command_line("pipeline_scaling.py", argv)))
    units, what = (res.meta.gpu_count, "GPUs") if cfg.device == "cuda" else (os.cpu_count() or 1, "cores")
    with tempfile.TemporaryDirectory(prefix="parml-pipe-") as tmp:
        launcher = Launcher(Path(tmp), cfg.device)
        for job in jobs(cfg, base):
            over = f" (oversubscribed: more ranks than {what})" if job.ranks > units else ""
            if launcher.rank == 0:
                print(f"== {job.label}{over}", flush=True)
            got = launcher.run(job)
            if launcher.rank == 0 and (got.skipped or got.error):
                print(got.skipped or got.error, flush=True)
            res.failures += [got.error] if got.error else []
            res.serial = (got.of(Serial) or [res.serial])[0]
            res.entries += got.of(Entry)
            res.latency.update({lat.backend: lat.seconds for lat in got.of(Latency)})
        launcher.close()
        if launcher.rank != 0:
            return None
    res.meta.finish()
    res.goals = goals(res)
    return res


def main(argv=None) -> int:
    ap, args = parse(argv)
    if args.report_only:
        res = from_json(PipelineResults, migrate(json.loads((args.out / "results.json").read_text())))
        res.goals = goals(res)
        write_outputs(args.out, STEM, res, markdown, plot)
        return 0
    res = run(*plan(ap, args), argv)
    if res is None:
        return 0
    write_outputs(args.out, STEM, res, markdown, plot)
    g = res.goals
    print(f"done in {res.meta.elapsed_s:.0f} s -> {args.out}", flush=True)
    if g.torch_ratio:
        print("parml/torch throughput, smallest per M (P>=2, a core per rank): " +
              ", ".join(f"M={m}: {v:.2f}" for m, v in g.torch_ratio_min_by_M_pipelined.items()) +
              f"  goal >= 1.1: {'met' if g.torch_ratio_goal_met else 'not met'}", flush=True)
    for r in g.efficiency:
        print(f"compute-bound P=2 M={max(res.config.microbatches)} {r.schedule}/{r.backend}: efficiency "
              f"{r.efficiency:.3f}, bound {r.bound:.3f}, ratio {r.eff_over_bound:.2f} (goal >= 0.9)", flush=True)
    return 1 if res.failures else 0


if __name__ == "__main__":
    sys.exit(main())
