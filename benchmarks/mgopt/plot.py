"""mgopt_scaling.png: validation accuracy against work units and against seconds, seed 0."""
from __future__ import annotations

from ..harness import pyplot, save
from .analyse import SETUPS, find
from .records import MgResults

COLORS = {1: "tab:blue", 8: "tab:red"}
STYLES = {1: "-", 2: "--"}


def plot(res: MgResults, path) -> None:
    plt = pyplot()
    runs = [r for r in res.runs if r.status != "diverged" and r.variant == "default" and r.seed == 0]
    names = res.config.datasets
    fig, axes = plt.subplots(len(names), 2, figsize=(12, 4.4 * len(names)), squeeze=False, layout="constrained")
    for i, name in enumerate(names):
        for j, key in enumerate(("work_units", "seconds")):
            ax = axes[i][j]
            for r in sorted(find(runs, dataset=name), key=lambda r: (r.levels, r.P)):
                pts = [(x, a) for x, a in zip(getattr(r.curve, key), r.curve.val_acc) if a is not None]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], STYLES.get(r.P, ":"), color=COLORS[r.levels],
                        label=f"L = {r.levels}, P = {r.P}", alpha=0.85)
            target = SETUPS[name].target_accuracy
            ax.axhline(target, color="black", lw=0.8, ls=":", label=f"target {target:g}")
            ax.set_xscale("log")
            ax.set_xlabel("work units" if key == "work_units" else "seconds (wall, incl. validation)")
            ax.set_ylabel("validation accuracy")
            ax.set_ylim(0.8 if name == "circles" else 0.5, 1.005)
            ax.grid(alpha=0.3)
            ax.set_title(f"{name}, K = {res.config.blocks}, seed 0")
            ax.legend(loc="lower right")
    save(fig, path)
