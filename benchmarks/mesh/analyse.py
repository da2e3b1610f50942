"""The mesh study's analysis: medians per (workload, layout) and efficiency against one process.

Wall efficiency E = t(1, 1) / (N t(D, P)) from medians (N: the launch's ranks; (1, 1) counts
one); CPU efficiency = CPU(1, 1) / Σ_ranks CPU(D, P) (the parallel run's extra work, unaffected by
other processes' load); idle fraction of a rank = blocked seconds / step seconds. Speedups and
efficiencies need the (1, 1) layout in the same launch: the 4-rank launch (oversubscribed on 2
cores) has none and reports seconds and idle fractions only.
"""
from __future__ import annotations

from ..harness import median
from .records import Layout, LayoutRow, MeshResults, Sample, Target, TargetRow, World

ONE = Layout(1, 1, "gather")


def layout_rows(samples: list[Sample]) -> list[LayoutRow]:
    """Per (workload, layout), in the order first measured: medians over repeats and steps."""
    groups: dict = {}
    for s in samples:
        groups.setdefault((s.workload, s.layout.D, s.layout.P, s.layout.label), []).append(s)
    rows = []
    for group in groups.values():
        first, n = group[0], len(group[0].ranks)
        wall, cpu, load, idle, levels = [], [], [], [[] for _ in range(n)], []
        for s in group:
            mine = s.ranks[0]
            for k, row in enumerate(mine):
                used = [r[k] for r in s.ranks if r is not None]
                wall.append(row.wall)
                load.append(row.load)
                cpu.append(sum(u.cpu for u in used))
                for i, r in enumerate(s.ranks):
                    if r is not None:
                        idle[i].append(r[k].blocked / r[k].wall if r[k].wall > 0 else 0.0)
                levels.append([max(u.levels[lv] for u in used) for lv in range(len(row.levels))])
        rows.append(LayoutRow(first.workload, first.layout, median(wall), median(cpu), len(wall),
                              [median(x) if x else None for x in idle], median(load),
                              [median(lv[i] for lv in levels) for i in range(len(levels[0]))] if levels else []))
    return rows


def efficiencies(rows: list[LayoutRow], world: int) -> None:
    """Speedup, wall and CPU efficiency of each row against its workload's (1, 1) row."""
    for r in rows:
        base = next((b for b in rows if b.workload == r.workload and b.layout == ONE), None)
        if base is None or r.wall <= 0 or r.cpu <= 0:
            continue
        n = 1 if r.layout == ONE else world
        r.speedup, r.wall_eff, r.cpu_eff = base.wall / r.wall, base.wall / (n * r.wall), base.cpu / r.cpu


def target_rows(targets: list[Target]) -> list[TargetRow]:
    groups: dict = {}
    for t in targets:
        groups.setdefault((t.layout.D, t.layout.P, t.layout.label), []).append(t)
    rows = [TargetRow(g[0].layout, median(t.seconds for t in g), [t.seconds for t in g], [t.cycles for t in g],
                      all(t.reached for t in g), median(t.load for t in g)) for g in groups.values()]
    one = next((r for r in rows if r.layout == ONE), None)
    for r in rows:
        r.speedup = one.seconds / r.seconds if one is not None and r.seconds > 0 else None
    return rows


def analyse(res: MeshResults) -> list[World]:
    """The analysis per launch size from the samples; results without samples (written before the
    harness) keep the analysis they carry."""
    if not res.samples:
        return res.worlds
    worlds = []
    for ranks in sorted({s.world for s in res.samples}):
        rows = layout_rows([s for s in res.samples if s.world == ranks])
        efficiencies(rows, ranks)
        targets = target_rows([t for t in res.targets if t.world == ranks])
        worlds.append(World(ranks, rows, targets))
    return worlds
