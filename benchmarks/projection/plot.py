"""projection.png: per workload a strong- and a weak-scaling panel, efficiency of the best layout
(thin) and of pure data parallelism (wide, faint) against N, per profile and method; rows of five
workloads."""
from __future__ import annotations

import math

from matplotlib.ticker import NullFormatter

from ..harness import pyplot, save
from .analyse import efficiency, t
from .records import ProjectionResults

STYLES = {("cpu", 1): ("tab:blue", "-"), ("cpu", 8): ("tab:blue", "--"), ("gpu", 1): ("tab:green", "-"),
          ("gpu", 8): ("tab:green", "--")}
PER_ROW = 5


def _panel(ax, res: ProjectionResults, name: str, scaling: str) -> None:
    for s in res.series:
        pts = s.planned() if (s.workload, s.scaling) == (name, scaling) else []
        if not pts:
            continue
        c, ls = STYLES.get((s.profile, s.levels), ("black", "-."))
        t1 = t(pts[0].best, s.levels)
        ax.plot([p.n for p in pts], [efficiency(t1, t(p.best, s.levels), p.n, scaling) for p in pts], ls, color=c,
                label=f"{s.profile} {'GD' if s.levels == 1 else 'V-cycle'}")
        dp = [(p.n, efficiency(t1, t(p.dp, s.levels), p.n, scaling)) for p in pts if p.dp]
        if dp:
            ax.plot(*zip(*dp), ls, color=c, alpha=0.35, lw=3)
    ax.set(xscale="log", yscale="log", title=f"{name}, {scaling} scaling", xlabel="ranks N")
    ticks = [n for n in (1, 8, 64, 512) if n <= max(res.ranks)] if max(res.ranks) >= 64 else res.ranks
    ax.set_xticks(ticks, [str(n) for n in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot(res: ProjectionResults, path) -> None:
    plt = pyplot()
    names = sorted({s.workload for s in res.series}, key=lambda w: (w.startswith("conv"), w))
    ncol = min(PER_ROW, len(names))              # rows of workloads, each a strong and a weak row
    nrow = 2 * math.ceil(len(names) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.8 * nrow), squeeze=False, sharey="row")
    for k, name in enumerate(names):
        j, row = k % ncol, 2 * (k // ncol)
        for i, scaling in enumerate(("strong", "weak")):
            _panel(axes[row + i][j], res, name, scaling)
            if j == 0:
                axes[row + i][j].set_ylabel("efficiency (best layout)")
    for k in range(len(names), nrow // 2 * ncol):     # empty places of the last row of workloads
        for i in range(2):
            axes[2 * (k // ncol) + i][k % ncol].set_visible(False)
    axes[0][0].legend()
    wide = ncol >= 3                                  # else the title takes two lines
    fig.suptitle("Projected efficiency of the best layout (thin)" + (" " if wide else "\n") +
                 "and of pure data parallelism (wide, faint)")
    fig.tight_layout(rect=(0, 0, 1, 0.97 if wide else 0.93))
    save(fig, path)
