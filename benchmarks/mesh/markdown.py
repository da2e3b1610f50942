"""mesh_scaling.md: seconds and efficiency per layout, time to the target, coarse layouts per level."""
from __future__ import annotations

from ..harness import fmt, table
from .records import LayoutRow, MeshResults, World

COARSE_CYCLE = "circles-vcycle"       # the workload whose levels the gather / replicate tables show


def _idle(xs) -> str:
    return " / ".join(fmt(x, ".2f") for x in xs)


def _kernel(kernel: str | None) -> str:
    if kernel is None:
        return "dense chunks: `--kernel` not recorded (the training default, `auto`)"
    return f"dense chunks: `--kernel {kernel}`"


def header(res: MeshResults) -> list[str]:
    cfg, meta = res.config, res.meta
    load = (f"load average {fmt((meta.loadavg_start or [None])[0])} before, "
            f"{fmt((meta.loadavg_end or [None])[0])} after")
    lines = [f"# Mesh layouts on parml's workloads ({'quick' if cfg.quick else 'full'}, K = {cfg.blocks}, "
             f"{cfg.repeats} repeat(s))", "",
             f"Machine: {meta.cpu_count} CPU(s); {load}; {_kernel(cfg.kernel)}. Medians of in-run timers "
             "(wall seconds on rank 0, CPU seconds summed over the ranks, blocked seconds per rank)."]
    if meta.command:
        lines += ["", f"Command: `{meta.command}` ({meta.elapsed_s:.0f} s)."]
    for f in res.failures:
        lines += ["", f"**Failed:** {f.splitlines()[0]}"]
    return lines


def _efficiency_table(w: World) -> list[str]:
    rows = [[r.workload, r.layout.shape, r.layout.label, f"{r.wall:.3f}", fmt(r.speedup, ".2f"),
             fmt(r.wall_eff, ".2f"), fmt(r.cpu_eff, ".2f"), _idle(r.idle), fmt(r.load)] for r in w.rows]
    return (["", f"## {w.ranks} ranks: seconds per step / V-cycle, efficiency", ""] +
            table(["workload", "(D, P)", "coarse", "s/step", "speedup", "wall eff.", "CPU eff.", "idle per rank",
                   "load"], rows))


def _targets_table(w: World) -> list[str]:
    rows = [[t.layout.shape, t.layout.label, f"{t.seconds:.2f}", ", ".join(f"{x:.1f}" for x in t.all_seconds),
             ", ".join(str(c) for c in t.cycles) + ("" if t.reached else " (not reached)"),
             fmt(t.speedup, ".2f") + "x", fmt(t.load)] for t in w.targets]
    return (["", f"## circles V-cycle to val acc 1.0 ({w.ranks} ranks)", ""] +
            table(["(D, P)", "coarse", "seconds (median)", "all", "cycles", "vs one process", "load"], rows))


def _levels_table(w: World, rows: list[LayoutRow], cores: int | None) -> list[str]:
    cells = [[r.layout.shape, r.layout.label, f"{r.wall:.3f}", " ".join(f"{x:.3f}" for x in r.levels),
              _idle(r.idle)] for r in rows]
    over = " (oversubscribed: more ranks than cores)" if cores and w.ranks > cores else ""
    return (["", f"## coarse layouts, circles V-cycle, {w.ranks} ranks{over}: seconds per level (coarsest "
             "first) and idle fraction per rank", ""] +
            table(["(D, P)", "coarse", "s/cycle", "level seconds", "idle per rank"], cells))


def markdown(res: MeshResults) -> list[str]:
    lines = header(res)
    for w in res.worlds:
        if any(r.speedup is not None for r in w.rows):
            lines += _efficiency_table(w)
        if w.targets:
            lines += _targets_table(w)
    for w in res.worlds:
        rows = [r for r in w.rows if r.workload == COARSE_CYCLE]
        if rows:
            lines += _levels_table(w, rows, res.meta.cpu_count)
    return lines
