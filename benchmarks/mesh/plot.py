"""mesh_scaling.png: per workload, speedup over one process and wall / CPU efficiency of every
2-rank layout; time to the target per layout; at 4 ranks, the coarse layouts (gathered, replicated, redundant)."""
from __future__ import annotations

import math

from ..harness import pyplot, save
from .markdown import COARSE_CYCLE
from .records import Layout, MeshResults, World

BARS = (("speedup", "speedup vs one process", "tab:blue"), ("wall_eff", "wall efficiency", "tab:orange"),
        ("cpu_eff", "CPU efficiency", "tab:green"))
COARSE_COLOR = {"gather": "tab:purple", "replicate": "tab:olive", "redundant": "tab:cyan"}


def label(lay: Layout) -> str:
    return f"{lay.shape}\n{lay.label}" if lay.P > 1 or lay.coarse != "gather" else lay.shape


def _bars(ax, labels, series, width=0.26) -> None:
    """Grouped bars: `series` is [(values, legend label, colour)], one group per label."""
    k = len(series)
    for j, (values, name, color) in enumerate(series):
        xs = [i + (j - (k - 1) / 2) * width for i in range(len(labels))]
        bars = ax.bar(xs, [0 if v is None else v for v in values], width, color=color, label=name)
        for b, v in zip(bars, values):
            if v is not None:
                ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()), xytext=(0, 2),
                            textcoords="offset points", ha="center", fontsize=9, rotation=90 if k > 2 else 0)
    ax.set_xticks(range(len(labels)), labels)
    ax.grid(axis="y", alpha=0.3)


def _workload(ax, w: World, name: str) -> None:
    rows = [r for r in w.rows if r.workload == name]
    _bars(ax, [label(r.layout) for r in rows], [([getattr(r, key) for r in rows], text, c) for key, text, c in BARS])
    ax.axhline(1.0, color="black", lw=0.8)
    one = next((r for r in rows if r.layout == Layout(1, 1)), rows[0])
    ax.set_title(f"{name}, {w.ranks} ranks ({one.wall:.3f} s/step on one process)")
    ax.set_ylim(0, 1.45 * max(1.0, *(r.speedup or 0 for r in rows)))
    ax.set_ylabel("speedup / efficiency")
    ax.set_xlabel("layout (D data replicas, P layer ranks)")
    ax.legend(loc="upper center", ncol=3)


def _targets(ax, w: World) -> None:
    ts = w.targets
    _bars(ax, [label(t.layout) for t in ts], [([t.speedup for t in ts], "speedup vs one process", "tab:blue")],
          width=0.6)
    for i, t in enumerate(ts):
        ax.annotate(f"{t.seconds:.2f} s" + ("" if t.reached else "\n(not reached)"), (i, 0.05), ha="center",
                    va="bottom", fontsize=9, color="white")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_ylim(0, 1.45 * max(1.0, *(t.speedup or 0 for t in ts)))
    ax.set_ylabel("speedup vs one process")
    ax.set_title(f"circles V-cycles to val acc 1.0, {w.ranks} ranks (median seconds in the bars)")
    ax.set_xlabel("layout (D data replicas, P layer ranks)")
    ax.legend(loc="upper center")


def _coarse(ax, w: World, cores: int | None) -> None:
    rows = [r for r in w.rows if r.workload == COARSE_CYCLE]
    shapes = list(dict.fromkeys((r.layout.D, r.layout.P) for r in rows))
    present = [c for c in COARSE_COLOR if any(r.layout.coarse == c for r in rows)]
    width = 0.72 / len(present)
    series = []
    for coarse in present:
        by = {(r.layout.D, r.layout.P): r for r in rows if r.layout.coarse == coarse}
        name = next(r.layout.label for r in rows if r.layout.coarse == coarse)
        series.append(([by[s].wall if s in by else None for s in shapes], name, COARSE_COLOR[coarse]))
    _bars(ax, [f"({d}, {p})" for d, p in shapes], series, width=width)
    for j, coarse in enumerate(present):
        for i, s in enumerate(shapes):
            r = next((r for r in rows if (r.layout.D, r.layout.P) == s and r.layout.coarse == coarse), None)
            idle = [x for x in (r.idle if r else []) if x is not None]
            if idle:
                ax.annotate(f"idle\n{sum(idle) / len(idle):.2f}", (i + (j - (len(present) - 1) / 2) * width, 0.01),
                            ha="center", va="bottom", fontsize=9, color="white", xycoords=("data", "axes fraction"))
    top = max((r.wall for r in rows), default=1.0)
    ax.set_ylim(0, top * 1.45)
    ax.set_ylabel("seconds per V-cycle")
    ax.set_xlabel("layout (D data replicas, P layer ranks); idle: mean fraction per rank")
    over = " (oversubscribed)" if cores and w.ranks > cores else ""
    ax.set_title(f"{COARSE_CYCLE}, {w.ranks} ranks{over}: coarse layouts")
    ax.legend(loc="upper center", ncol=len(present), title="coarse levels")


def panels(res: MeshResults) -> list:
    """The figure's panels as (draw, World, workload or cores)."""
    out = []
    for w in res.worlds:
        if any(r.speedup is not None for r in w.rows):
            out += [(_workload, w, name) for name in dict.fromkeys(r.workload for r in w.rows)]
        if w.targets:
            out.append((_targets, w))
    out += [(_coarse, w, res.meta.cpu_count) for w in res.worlds
            if w.ranks > 2 and any(r.workload == COARSE_CYCLE for r in w.rows)]
    return out


def plot(res: MeshResults, path) -> None:
    plt = pyplot()
    todo = panels(res)
    ncol = min(3, len(todo))
    nrow = math.ceil(len(todo) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.2 * ncol, 4.9 * nrow), squeeze=False, layout="constrained")
    for ax, (draw, w, *more) in zip(axes.flat, todo):
        draw(ax, w, *more)
    for ax in list(axes.flat)[len(todo):]:
        ax.set_visible(False)
    cfg = res.config
    fig.suptitle(f"Data x layer mesh layouts, K = {cfg.blocks}, {cfg.repeats} repeat(s), medians of in-run timers"
                 f" ({res.meta.cpu_count} cores)")
    save(fig, path)
