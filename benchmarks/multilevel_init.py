"""Shared by ``cascade.py`` and ``chang_multilevel.py``: a deep network trained directly vs through
parml's cascade (Chang et al.'s multilevel initialization) with the same step budget, both timed
through ``train``'s ``around_cycle`` hook (median step time per depth)."""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from benchmarks.harness import Curve, TrainRun, median, timed_train

DOUBLINGS = 2
EQUAL_ACC = 0.005          # |accuracy difference| counted as equal


@dataclass(kw_only=True)
class CascadeRun(TrainRun):
    """One run of a pair: *mode* "direct" (B steps at depth K) or the cascade (B/3 at K/4, K/2, K)."""
    dataset: str
    mode: str
    seed: int
    blocks: int
    budget: int
    step_ms: dict[int, float] = field(default_factory=dict)     # depth -> median ms per step


def budget_options(mode: str, budget: int) -> dict:
    """TrainConfig options of a run with `budget` steps in all: direct, or the cascade's equal thirds."""
    if mode == "direct":
        return {"max_cycles": budget}
    third = budget // (DOUBLINGS + 1)
    return {"cascade": DOUBLINGS, "cascade_cycles": third, "max_cycles": third}


def pair_run(cfg, data, **fields) -> CascadeRun:
    """Train `cfg` on one process; the record with the validation curve and step times per depth."""
    from parml.comm import SelfComm
    run, _, timer = timed_train(cfg, SelfComm(), data, kind=CascadeRun,
                                curve=lambda folder: Curve.read(folder, validated=True), **fields)
    run.step_ms = {d: 1e3 * median(v) for d, v in timer.by_depth(run.blocks).items()}
    return run


def saved(before: float, after: float) -> float:
    return 1 - after / before


def stage_ends(curve: Curve, key: str) -> list[float]:
    """The x (`key`) of the last row of every stage but the last: where a prolongation happened."""
    ends = {}
    for phase, x in zip(curve.phase, getattr(curve, key)):
        ends[phase] = x
    return list(ends.values())[:-1]


def stage_ms(run: CascadeRun) -> list[tuple[int, float]]:
    """(depth, ms per step) of every stage from its validation rows (stage time: from the end of the
    previous stage to its last row, validations included)."""
    c, ends, order = run.curve, {}, []
    for ph, t in zip(c.phase, c.seconds):
        if ph not in ends:
            order.append(ph)
        ends[ph] = t
    depths = [st.blocks for st in run.stages] + [run.blocks]
    steps = [st.cycles for st in run.stages] + [run.cycles]
    if len(order) != len(depths):
        return []
    out, start = [], 0.0
    for ph, d, n in zip(order, depths, steps):
        out.append((d, 1e3 * (ends[ph] - start) / n))
        start = ends[ph]
    return out


def depth_fit(points: list[tuple[int, float]], full: int) -> dict:
    """t(depth) = a + b depth through (depth, ms) points, and the saving it predicts for the
    cascade's equal thirds: 1 - sum t(depth_i) / (n t(K)). A step cost that does not shrink with
    the depth (data, opening, head) lowers the saving below Chang's formula."""
    xs, ys = [d for d, _ in points], [t for _, t in points]
    xm, ym = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - xm) * (y - ym) for x, y in zip(xs, ys)) / sum((x - xm) ** 2 for x in xs)
    a = ym - b * xm
    t_full = a + b * full
    return {"fit_a_ms": a, "fit_b_ms": b, "fixed_share": a / t_full if t_full > 0 else None,
            "predicted_saving": 1 - sum(a + b * x for x in xs) / (len(xs) * t_full) if t_full > 0 else None}


def steps_text(r: CascadeRun) -> str:
    """"B (K)" for a direct run, "n + n + n (K/4, K/2, K)" for a cascade."""
    if not r.stages:
        return f"{r.cycles} ({r.blocks})"
    return (" + ".join(str(st.cycles) for st in r.stages) + f" + {r.cycles} ("
            + ", ".join(str(st.blocks) for st in r.stages) + f", {r.blocks})")


def plot_curves(ax, runs: list[CascadeRun], x: str, markers: bool = False) -> None:
    """Validation accuracy against `x` (work_units or seconds); the first seed bold, stage ends dotted."""
    first = min((r.seed for r in runs), default=0)
    for r in runs:
        c, lead = r.curve, r.seed == first
        color = "tab:blue" if r.mode == "direct" else "tab:red"
        ax.plot(getattr(c, x), c.val_acc, "o-" if markers and lead else "-", ms=3, color=color,
                alpha=0.9 if lead else 0.35, label=f"{r.mode} (seed {r.seed})" if lead else None)
        if r.mode != "direct" and lead:
            for t in stage_ends(c, x):
                ax.axvline(t, color="tab:red", lw=0.8, ls=":")
    ax.set_xlabel("work units (one depth-K gradient = 1)" if x == "work_units" else "seconds (wall, incl. validation)")
    ax.grid(alpha=0.3)
