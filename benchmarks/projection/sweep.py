"""The projection's simulation: at each rank count the planner's ranked layouts for one workload,
profile and method, reduced to the fastest that fit (overall, pure data parallel, pure layer
parallel, gathered and replicated coarse levels)."""
from __future__ import annotations

import time

from parml.multilevel.mgopt import CycleSetup
from parml.parallel.layout import LayoutError
from parml.plan.planner import plan
from parml.plan.simulate import Workload

from .records import Pick, Point

PICK_KEYS = ("data_parallel", "layer_ranks", "microbatches", "coarse_layout", "predicted_step_seconds",
             "predicted_cycle_seconds", "memory_bytes_per_rank")
GREEDY_ABOVE = 4              # rank counts beyond this search micro-batches greedily


def pick(recs: list[dict], key: str, where=lambda r: True) -> Pick | None:
    ok = [r for r in recs if r["fits_memory"] and where(r)]
    if not ok:
        return None
    best = min(ok, key=lambda r: r[key])
    return Pick(**{k: best[k] for k in PICK_KEYS})


def point(spec, batch: int, prof, backend: str, n: int, levels: int) -> Point:
    """The best layouts at n ranks (1F1B, min-blocks-per-rank 16, up to 64 micro-batches)."""
    work = Workload(spec, batch, levels, CycleSetup.default(levels))
    try:
        recs = plan(work, n, prof, backend, search="greedy" if n > GREEDY_ABOVE else "all", schedules=["1f1b"],
                    min_blocks=[16], coarse_layouts=["gather", "replicate"] if levels > 1 else None,
                    max_microbatches=64)
    except LayoutError as e:
        return Point(n, error=str(e))
    key = "predicted_cycle_seconds" if levels > 1 else "predicted_step_seconds"
    p = Point(n, len(recs), pick(recs, key), pick(recs, key, lambda r: r["layer_ranks"] == 1),
              pick(recs, key, lambda r: r["data_parallel"] == 1),
              max((r["layer_ranks"] for r in recs if r["fits_memory"]), default=None))
    if levels > 1:
        p.gather = pick(recs, key, lambda r: r["coarse_layout"] == "gather")
        p.replicate = pick(recs, key, lambda r: r["coarse_layout"] == "replicate")
    return p


def describe(p: Point, levels: int) -> str:
    b = p.best
    if b is None:
        return "nothing fits"
    s = f"best {b.data_parallel}x{b.layer_ranks} M={b.microbatches} {b.seconds(levels):.4g} s"
    return s + (f", DP {p.dp.seconds(levels):.4g} s" if p.dp else ", DP does not fit")


def series(spec, batch_at, prof, backend: str, levels: int, ranks: list[int], log=print) -> list[Point]:
    """Points for every rank count until no layout exists; `batch_at(n)` is the batch at n ranks."""
    out = []
    for n in ranks:
        t0 = time.perf_counter()
        p = point(spec, batch_at(n), prof, backend, n, levels)
        p.seconds_to_plan = time.perf_counter() - t0
        out.append(p)
        if p.error is not None:
            break
        log(f"    N={n:5d}: {describe(p, levels)} ({p.seconds_to_plan:.1f} s)")
    return out
