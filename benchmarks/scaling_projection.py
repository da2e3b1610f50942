"""Projections of parml's scaling to 1,024 ranks with the scaling model (``parml.plan``).

    python benchmarks/scaling_projection.py [--quick] [--out benchmarks/results/projection]
    python benchmarks/scaling_projection.py --report-only     # redraw md and PNG from OUT/results.json

For each workload, profile and rank count N = 1, 2, 4, ..., 1024 the planner searches the
layouts D × P = N (micro-batches M greedily, 1F1B, min-blocks-per-rank 16; coarse levels
gathered or replicated) and keeps the fastest that fits in memory, the fastest pure data-parallel
(P = 1) and the fastest pure layer-parallel (D = 1) layout.

* workloads: dense ODE-ResNets with K ∈ {2048, 16384} blocks of width 3 / 32 / 128 / 512 (64
  inputs, 10 classes), and conv stages at the MNIST (1×28×28, channels 16, 32) and CIFAR
  (3×32×32, channels 32, 64) shapes with 1024 blocks per stage;
* strong scaling: one batch (1024 samples dense, 256 conv) on N ranks; weak scaling: 32 (dense)
  or 8 (conv) samples per rank;
* GD (L = 1, one step) and 8-level V-cycles (the paper's cycle), gathered against replicated
  coarse levels;
* profiles: (a) this machine's calibration (``profile_cpu.json``, nodes of its cores, links
  between nodes as measured between its local ranks), (b) a GPU node estimated from published
  numbers (``gpu_profile.py``: 8 × H100 per node, NVLink inside, InfiniBand NDR between nodes).

Outputs in --out: ``projection.md``, ``results.json``, ``projection.png`` (and the GPU profile,
``profile_gpu_estimate.json``). Simulation only: no ranks are started.
Plan here; the sweep, its summary and the outputs in ``projection/``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parml.model import ModelSpec, StageSpec  # noqa: E402
from parml.plan.profile import Profile  # noqa: E402

from benchmarks.gpu_profile import gpu_node_profile  # noqa: E402
from benchmarks.harness import Machine, command_line, read_json, write_outputs, write_report  # noqa: E402
from benchmarks.projection.markdown import markdown  # noqa: E402
from benchmarks.projection.plot import plot  # noqa: E402
from benchmarks.projection.records import ProjectionConfig, ProjectionResults, Series  # noqa: E402
from benchmarks.projection.sweep import series  # noqa: E402

HERE = Path(__file__).resolve().parent
STEM = "projection"
RANKS = [2 ** k for k in range(11)]
LEVELS = (1, 8)                                     # GD and the paper's 8-level V-cycle
DENSE_BATCH, CONV_BATCH, DENSE_PER_RANK, CONV_PER_RANK = 1024, 256, 32, 8
FULL = {"ranks": RANKS, "blocks": [2048, 16384], "widths": [3, 32, 128, 512], "conv": True}
QUICK = {"ranks": RANKS[:7], "blocks": [2048], "widths": [3, 32], "conv": False}


def workloads(cfg: ProjectionConfig) -> dict[str, ModelSpec]:
    out = {f"dense K={K} w={v}": ModelSpec(64, 10, (StageSpec(v, K),)) for K in cfg.blocks for v in cfg.widths}
    if cfg.conv:
        out["conv MNIST"] = ModelSpec(784, 10, (StageSpec(16, 1024, "conv"), StageSpec(32, 1024, "conv", 2)),
                                      input_shape=(1, 28, 28))
        out["conv CIFAR"] = ModelSpec(3072, 10, (StageSpec(32, 1024, "conv"), StageSpec(64, 1024, "conv", 2)),
                                      input_shape=(3, 32, 32))
    return out


def batch(spec: ModelSpec, scaling: str, n: int) -> int:
    """Strong scaling: one fixed batch; weak scaling: a fixed number of samples per rank."""
    if scaling == "strong":
        return CONV_BATCH if spec.conv else DENSE_BATCH
    return (CONV_PER_RANK if spec.conv else DENSE_PER_RANK) * n


def run(profiles: dict, cfg: ProjectionConfig, ranks: list[int], log=print) -> list[Series]:
    out = []
    for pname, (prof, backend) in profiles.items():
        for wname, spec in workloads(cfg).items():
            for scaling in ("strong", "weak"):
                for levels in LEVELS:
                    log(f"{pname} | {wname} | {scaling} | {'GD' if levels == 1 else f'V-cycle L={levels}'}")
                    pts = series(spec, lambda n: batch(spec, scaling, n), prof, backend, levels, ranks, log)
                    out.append(Series(pname, wname, scaling, levels, pts))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(HERE / "results" / "projection"))
    ap.add_argument("--cpu-profile", default=None, help="default: OUT/profile_cpu.json")
    ap.add_argument("--quick", action="store_true", help="N up to 64, dense K = 2048 of width 3 and 32 only")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the markdown and the plot from OUT/results.json")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if a.report_only:
        write_report(out, STEM, read_json(out / "results.json", ProjectionResults), markdown, plot)
        print(f"wrote {out / (STEM + '.md')} and {STEM}.png", flush=True)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    base = QUICK if a.quick else FULL
    cfg = ProjectionConfig(a.quick, list(base["blocks"]), list(base["widths"]), base["conv"])
    gpu = gpu_node_profile()
    gpu.save(out / "profile_gpu_estimate.json")
    cpu = Profile.load(a.cpu_profile or str(out / "profile_cpu.json"), device="cpu")
    meta = Machine.now(command_line("scaling_projection.py", argv))
    res = ProjectionResults(list(base["ranks"]), config=cfg, meta=meta)
    t0 = time.perf_counter()
    res.series = run({"cpu": (cpu, "gloo"), "gpu": (gpu, "nccl")}, cfg, res.ranks)
    res.seconds = time.perf_counter() - t0
    res.meta.finish()
    write_outputs(out, STEM, res, markdown, plot)
    print("\n".join(markdown(res)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
