"""validation.png: predicted against measured seconds per step, by case, rank count and method,
with the ±15 % and ±30 % bands of the targets."""
from __future__ import annotations

from matplotlib.lines import Line2D

from ..harness import pyplot, save
from .analyse import TARGET_MAX, TARGET_MEDIAN
from .records import ValResults

MARKS = {"overhead": "o", "compute": "s", "circles": "^", "mnist": "D"}
COLORS = {1: "tab:blue", 2: "tab:orange", 4: "tab:red", 8: "tab:purple"}


def plot(res: ValResults, path) -> None:
    plt = pyplot()
    pts = [m for m in res.results if m.predicted_s is not None]
    fig, ax = plt.subplots(figsize=(7, 6.5), layout="constrained")
    for m in pts:
        color = COLORS.get(m.world, "black")
        ax.scatter(m.step_s, m.predicted_s, marker=MARKS.get(m.case, "x"), s=40, edgecolors=color,
                   facecolors="none" if m.levels > 1 else color)
    xs = [v for m in pts for v in (m.step_s, m.predicted_s)] or [1e-3, 1.0]
    lo, hi = min(xs) / 1.5, max(xs) * 1.5
    ax.plot([lo, hi], [lo, hi], "k-", lw=1)
    for f, ls in ((TARGET_MEDIAN, "--"), (TARGET_MAX, ":")):
        for sign in (1, -1):
            ax.plot([lo, hi], [lo * (1 + sign * f), hi * (1 + sign * f)], "k" + ls, lw=0.8)
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), xlabel="measured seconds per step",
           ylabel="predicted seconds per step", title="parml plan: predicted against measured")
    ax.grid(alpha=0.3, which="both")
    cases = [c for c in MARKS if any(m.case == c for m in pts)]
    worlds = sorted({m.world for m in pts})
    handles = [Line2D([], [], marker=MARKS[c], ls="", color="gray", label=c) for c in cases]
    handles += [Line2D([], [], marker="o", ls="", color=COLORS.get(n, "black"), label=f"{n} rank(s)") for n in worlds]
    handles += [Line2D([], [], marker="o", ls="", color="gray", markerfacecolor="none", label="V-cycle (L = 8)"),
                Line2D([], [], color="k", ls="--", lw=0.8, label=f"±{100 * TARGET_MEDIAN:.0f} %"),
                Line2D([], [], color="k", ls=":", lw=0.8, label=f"±{100 * TARGET_MAX:.0f} %")]
    ax.legend(handles=handles, loc="upper left")
    e = res.errors
    if e.median is not None:
        ax.text(0.98, 0.02, f"error: median {100 * e.median:.1f} %, max {100 * e.max:.1f} % ({e.n} configurations)",
                transform=ax.transAxes, ha="right", va="bottom")
    save(fig, path)
