"""projection.md: one row per series at its largest rank count, and gathered against replicated
coarse levels of the V-cycles at 16, 128 and 1,024 ranks."""
from __future__ import annotations

import math

from ..harness import table
from .analyse import summary_rows, t
from .records import ProjectionResults

COARSE_AT = (16, 128, 1024)          # rank counts of the gather / replicate table

INTRO = [
    "# Projections to 1,024 ranks (scaling model)", "",
    "Predicted by `parml.plan` (discrete-event replay of parml's schedules, mesh and V-cycle on a profile's "
    "costs). **cpu**: this machine's fresh calibration (`profile_cpu.json`), nodes of its cores, links between "
    "nodes assumed as fast as between its local ranks. **gpu**: `profile_gpu_estimate.json`, an H100-node "
    "profile ESTIMATED from published numbers (no GPU measured; sources in `benchmarks/gpu_profile.py`).",
    "", "Efficiency: strong scaling T1 / (N·T_N); weak scaling T1 / T_N (batch per rank fixed). "
    "*LP beats DP*: rank counts where the fastest layout has P > 1, with the pure data-parallel time over it "
    "(∞: pure data parallelism does not fit in memory or the batch is smaller than N).", ""]


def seconds(s) -> str:
    return "—" if s is None or math.isnan(s) else (f"{s:.3g} s" if s >= 1 else f"{1e3 * s:.3g} ms")


def _wins(gains) -> str:
    return ", ".join(f"{n}: {'∞' if math.isinf(g) else f'{g:.2f}x'}" for n, g in gains) or "never"


def markdown(res: ProjectionResults) -> list[str]:
    rows = [[r.series.profile, r.series.workload, r.series.scaling, "GD" if r.series.levels == 1 else "V-cycle", r.n,
             f"{r.best.data_parallel} x {r.best.layer_ranks}, {r.best.microbatches}", r.best.coarse_layout or "-",
             seconds(r.t1), seconds(r.tn), "" if r.speedup is None else f"{r.speedup:.0f}", f"{r.efficiency:.2f}",
             _wins(r.lp_wins)] for r in summary_rows(res)]
    lines = INTRO + table(["profile", "workload", "scaling", "method", "N", "best D x P, M", "coarse", "T_1", "T_N",
                           "speedup", "eff.", "LP beats DP at N (DP / best)"], rows)
    coarse = []
    for s in res.series:
        if s.levels == 1 or s.scaling != "strong":
            continue
        for p in s.points:
            if p.gather and p.replicate and p.n in COARSE_AT:
                g, rp = t(p.gather, s.levels), t(p.replicate, s.levels)
                coarse.append([s.profile, s.workload, p.n, seconds(g), seconds(rp), f"{rp / g:.2f}"])
    return lines + ["", "## Gathered against replicated coarse levels (V-cycles, strong scaling)", ""] + \
        table(["profile", "workload", "N", "gather", "replicate", "replicate / gather"], coarse)
