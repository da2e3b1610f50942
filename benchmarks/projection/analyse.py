"""The projection's summary: per series, the best layout's speedup and efficiency at the largest
rank count, and the rank counts where layer parallelism beats pure data parallelism."""
from __future__ import annotations

import math

from .records import Pick, ProjectionResults, Summary


def t(sel: Pick | None, levels: int) -> float:
    return math.nan if sel is None else sel.seconds(levels)


def efficiency(t1: float, tn: float, n: int, scaling: str) -> float:
    """Strong scaling T1 / (N T_N); weak scaling (fixed batch per rank) T1 / T_N."""
    return t1 / ((n if scaling == "strong" else 1) * tn)


def summary_rows(res: ProjectionResults) -> list[Summary]:
    rows = []
    for s in res.series:
        pts = s.planned()
        if not pts:
            continue
        L, last = s.levels, pts[-1]
        t1, tn = t(pts[0].best, L), t(last.best, L)
        gains = [(p.n, t(p.dp, L) / t(p.best, L) if p.dp else math.inf) for p in pts if p.best.layer_ranks > 1]
        rows.append(Summary(s, last.n, last.best, t1, tn, t1 / tn if s.scaling == "strong" else None,
                            efficiency(t1, tn, last.n, s.scaling), gains, [p.n for p in pts if p.dp]))
    return rows
