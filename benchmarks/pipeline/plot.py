"""pipeline_scaling.png: per model, one panel per P (step time, then efficiency against M), the
parml / torch.distributed.pipelining throughput ratio, and peak activation memory against P."""
from __future__ import annotations

from matplotlib.lines import Line2D

from ..harness import pyplot, save
from .analyse import GOAL_RATIO, torch_backend
from .records import PipelineResults

SCHEDULE_COLOR = {"gpipe": "tab:blue", "1f1b": "tab:orange"}
MARKER = {"gpipe": "o", "1f1b": "s"}
BACKEND_STYLE = {"gloo": "-", "nccl": "-", "mpi": ":"}
P_COLOR = {1: "tab:gray", 2: "tab:green", 4: "tab:red", 8: "tab:purple"}


def _x_axis(ax, Ms) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(Ms, [str(m) for m in Ms])
    ax.minorticks_off()
    ax.set_xlabel("micro-batches M")
    ax.grid(alpha=0.3)


def _per_p(res: PipelineResults, name: str, P: int, ax_t, ax_e) -> None:
    """Step time and efficiency of every parml configuration at this P, torch pipelining, serial."""
    cfg, tb = res.config, torch_backend(res)
    rows = [e for e in res.entries if e.model == name and e.P == P]
    for b in cfg.backends:
        for s in cfg.schedules:
            pts = sorted((e for e in rows if e.backend == b and e.schedule == s), key=lambda e: e.M)
            if not pts:
                continue
            style = dict(ls=BACKEND_STYLE.get(b, "-"), marker=MARKER[s], color=SCHEDULE_COLOR[s], lw=1.6)
            ax_t.plot([e.M for e in pts], [1e3 * e.step_s for e in pts], **style)
            ax_e.plot([e.M for e in pts], [e.efficiency for e in pts], **style)
            tp = [e for e in pts if b == tb and e.torch and e.torch.step_s is not None]
            if tp:
                ax_t.plot([e.M for e in tp], [1e3 * e.torch.step_s for e in tp], ls="--", marker=MARKER[s],
                          mfc="white", color=SCHEDULE_COLOR[s], lw=1.4)
    serial = res.serial.models.get(name) if res.serial else None
    if serial and serial.by_M:
        ax_t.plot(list(serial.by_M), [1e3 * v.step_s for v in serial.by_M.values()], "-", color="black", lw=2.2)
    Ms = sorted(cfg.microbatches)
    ax_e.plot(Ms, [m / (m + P - 1) for m in Ms], "--", color="0.45", lw=1.5)
    ax_e.set_ylim(0, 1.08)
    over = any(e.oversubscribed for e in rows)
    for ax, what in ((ax_t, "step time"), (ax_e, "pipeline efficiency")):
        _x_axis(ax, Ms)
        ax.set_title(f"P = {P}{' (oversubscribed)' if over else ''}: {what}")
    ax_t.set_ylim(bottom=0)


def _ratio_panel(res: PipelineResults, name: str, ax) -> None:
    """parml / torch pipelining throughput per (P, schedule), the numbers written at the points."""
    rows = [r for r in res.goals.torch_ratio if r.model == name]
    handles = []
    for P in sorted({r.P for r in rows}):
        over = any(r.oversubscribed for r in rows if r.P == P)
        color, ls = P_COLOR.get(P, "black"), ":" if over else "-"
        handles.append(Line2D([], [], color=color, ls=ls, label=f"P = {P}{' (oversub.)' if over else ''}"))
        for s in res.config.schedules:
            pts = sorted((r for r in rows if r.P == P and r.schedule == s), key=lambda r: r.M)
            ax.plot([r.M for r in pts], [r.ratio for r in pts], ls, marker=MARKER[s], color=color)
            up = s == res.config.schedules[0]      # first schedule's numbers above, the other's below
            for r in pts if P > 1 and not over else []:
                ax.annotate(f"{r.ratio:.2f}", (r.M, r.ratio), xytext=(-3, 5) if up else (3, -13),
                            textcoords="offset points", ha="right" if up else "left", fontsize=9, color=color)
    handles += [Line2D([], [], ls="", marker=MARKER[s], color="0.3", label=s) for s in res.config.schedules]
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(GOAL_RATIO, color="tab:red", lw=1.2, ls="--")
    handles.append(Line2D([], [], color="tab:red", lw=1.2, ls="--", label=f"goal {GOAL_RATIO:g}×"))
    _x_axis(ax, sorted(res.config.microbatches))
    ax.margins(x=0.15)
    ax.set_ylabel("parml / torch throughput")
    ax.set_title(f"parml vs torch pipelining ({torch_backend(res)})")
    if rows:
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)


def _memory_panel(res: PipelineResults, name: str, ax) -> None:
    """Peak activation memory of the largest rank at the largest M against P."""
    cfg, tb, top = res.config, torch_backend(res), max(res.config.microbatches)
    for s in cfg.schedules:
        pts = sorted((e for e in res.entries if e.model == name and e.M == top and e.schedule == s
                      and e.backend == tb), key=lambda e: e.P)
        if pts:
            ax.plot([e.P for e in pts], [e.peak_saved_bytes_max / 2**20 for e in pts], "-", marker=MARKER[s],
                    color=SCHEDULE_COLOR[s], label=f"parml {s}")
            tp = [e for e in pts if e.torch and e.torch.peak_saved_bytes_max]
            if tp:
                ax.plot([e.P for e in tp], [e.torch.peak_saved_bytes_max / 2**20 for e in tp], "--",
                        marker=MARKER[s], ms=10, mfc="none", color=SCHEDULE_COLOR[s], label=f"torch {s}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(cfg.P, [str(p) for p in cfg.P])
    ax.minorticks_off()
    ax.set_xlabel("ranks P")
    ax.set_ylabel("MiB (largest rank)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_title(f"peak activation memory, M = {top}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best")


def legend_handles(res: PipelineResults) -> list:
    """The line styles of the per-P panels, once for the whole figure."""
    cfg, tb = res.config, torch_backend(res)
    h = [Line2D([], [], ls=BACKEND_STYLE.get(b, "-"), marker=MARKER[s], color=SCHEDULE_COLOR[s], lw=1.6,
                label=f"parml {s}, {b}") for b in cfg.backends for s in cfg.schedules]
    h += [Line2D([], [], ls="--", marker=MARKER[s], mfc="white", color=SCHEDULE_COLOR[s], lw=1.4,
                 label=f"torch pipelining {s}, {tb}") for s in cfg.schedules]
    return h + [Line2D([], [], color="black", lw=2.2, label="serial (1 process, no messages)"),
                Line2D([], [], ls="--", color="0.45", lw=1.5, label="efficiency bound M/(M+P−1)")]


def plot(res: PipelineResults, path) -> None:
    plt = pyplot()
    names, Ps = list(res.config.models), res.config.P
    ncols = len(Ps) + 1
    fig = plt.figure(figsize=(4.3 * ncols, 7.4 * len(names) + 1.2), layout="constrained")
    subs = fig.subfigures(len(names), 1, squeeze=False)[:, 0]
    for sub, name in zip(subs, names):
        axes = sub.subplots(2, ncols, squeeze=False)
        for j, P in enumerate(Ps):
            _per_p(res, name, P, axes[0][j], axes[1][j])
        axes[0][0].set_ylabel("step time (ms)")
        axes[1][0].set_ylabel("busiest compute / step")
        _ratio_panel(res, name, axes[0][-1])
        _memory_panel(res, name, axes[1][-1])
        sub.suptitle(res.config.models[name].label, fontweight="bold")
    fig.legend(handles=legend_handles(res), loc="outside lower center", ncol=4, fontsize=10)
    save(fig, path)
