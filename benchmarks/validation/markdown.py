"""validation.md: the errors, ``--layout auto`` at 2 ranks, and every configuration."""
from __future__ import annotations

from ..harness import fmt, table
from .analyse import TARGET_MAX, TARGET_MEDIAN, errors
from .records import AutoChoice, ValResults


def ms(x) -> str:
    return "—" if x is None else f"{1e3 * x:.1f} ms"


def pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def header(res: ValResults) -> list[str]:
    err, n = res.errors, len(res.results)
    lo, hi = (res.load_range or [float("nan")] * 2)[:2]
    lines = ["# The scaling model against measurement", "",
             f"One session: calibration ({res.profile_note}) then {n} measured configurations, "
             f"{res.started} to {res.finished} (UTC), 1-minute load average {lo:.1f}-{hi:.1f} on {res.cores} cores. "
             f"{res.backend} ranks; ranks beyond the cores (marked *) share them. Step = one GD step (L = 1) "
             "or one 8-level V-cycle, the slowest rank's time after a barrier, median of the timed steps. D > 1: "
             "parml's data x layer mesh.", "",
             "B: other busy processes on the machine while the configuration ran, from the share of a core all its "
             "ranks got while spinning before each timed step; the prediction uses it (processor sharing).", "",
             f"**Errors**: median {pct(err.median)}, max {pct(err.max)} over {err.n} configurations ({err.within_15} "
             f"within 15 %, {err.within_30} within 30 %); targets {100 * TARGET_MEDIAN:.0f} % / "
             f"{100 * TARGET_MAX:.0f} %.", ""]
    if res.meta is not None and res.meta.command:
        lines[2:2] = [f"Command: `{res.meta.command}` ({res.meta.elapsed_s:.0f} s).", ""]
    for world in sorted({m.world for m in res.results}):
        e = errors([m for m in res.results if m.world == world])
        lines.append(f"- {world} rank(s): median {pct(e.median)}, max {pct(e.max)} ({e.n})")
    for f in res.failures:
        lines += ["", f"**Failed:** {f.splitlines()[0]}"]
    return lines


def _auto_row(c: AutoChoice) -> list:
    f1, fa = c.fastest_D1, c.fastest_any
    blk = f", min-blk {c.mbpr}, {c.coarse}" if c.levels > 1 else ""
    return [c.case, c.levels, f"{c.D} x {2 // c.D}, M = {c.M}, {c.schedule}{blk}", ms(c.predicted_s),
            ms(c.measured_s),
            "—" if f1 is None else f"{f1.D} x {2 // f1.D} M = {f1.M} {f1.schedule}: {ms(f1.step_s)}",
            fmt(c.over_fastest_D1, ".2f"), f"{fa.D} x {2 // fa.D} M = {fa.M}: {ms(fa.step_s)}",
            fmt(c.over_fastest_any, ".2f")]


def markdown(res: ValResults, cores: int | None = None) -> list[str]:
    cores = cores or res.cores
    lines = header(res) + ["", "## --layout auto at 2 ranks", ""]
    lines += table(["case", "L", "auto picks", "predicted", "measured", "fastest measured D = 1", "ratio",
                    "fastest measured (any D)", "ratio"], [_auto_row(c) for c in res.auto])
    rows = [[m.case, m.levels, f"{m.world}{'*' if m.world > cores else ''}", f"{m.D} x {m.world // m.D}", m.M,
             m.schedule, m.mbpr if m.levels > 1 else "-",
             f"{m.coarse}" if m.levels > 1 else "-", fmt(m.background), ms(m.step_s), ms(m.predicted_s),
             "—" if m.predicted_s is None else f"{100 * (m.predicted_s / m.step_s - 1):+.1f} %"]
            for m in res.results]
    return lines + ["", "## Every configuration", ""] + table(
        ["case", "L", "ranks", "D x P", "M", "sched", "min-blk", "coarse", "B (busy others)", "measured", "predicted",
         "error"], rows)
