"""Projections of parml's scaling to 1,024 ranks with the scaling model (``parml.plan``).

    python benchmarks/scaling_projection.py [--quick] [--out benchmarks/results/projection]
    python benchmarks/scaling_projection.py --report-only

For each workload, profile and rank count N = 1, 2, 4, ..., 1024 the planner searches the
layouts D × P = N (micro-batches M greedily, 1F1B, min-blocks-per-rank 16; coarse levels
gathered or replicated) and keeps the fastest that fits in memory, the fastest pure data-parallel
(P = 1) and the fastest pure layer-parallel (D = 1) layout.

* workloads: dense ODE-ResNets with K ∈ {2048, 16384} blocks of width 3 / 32 / 128 / 512 (64
  inputs, 10 classes), and conv stages at the MNIST (1×28×28, channels 16, 32) and CIFAR
  (3×32×32, channels 32, 64) shapes with 1024 blocks per stage;
* strong scaling: one batch (1024 samples dense, 256 conv) on N ranks; weak scaling: 32 (dense)
  or 8 (conv) samples per rank;
* GD (L = 1, one step) and 8-level V-cycles (the paper's cycle), gathered against replicated
  coarse levels;
* profiles: (a) this machine's calibration (``profile_cpu.json``, nodes of its cores, links
  between nodes as measured between its local ranks), (b) a GPU node estimated from published
  numbers (``gpu_profile.py``: 8 × H100 per node, NVLink inside, InfiniBand NDR between nodes).

Outputs in --out: ``projection.md``, ``results.json``, ``projection.png``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

from gpu_profile import gpu_node_profile  # noqa: E402

from parml.model import ModelSpec, StageSpec  # noqa: E402
from parml.multilevel.mgopt import CycleSetup  # noqa: E402
from parml.parallel.layout import LayoutError  # noqa: E402
from parml.plan.planner import plan  # noqa: E402
from parml.plan.profile import Profile  # noqa: E402
from parml.plan.simulate import Workload  # noqa: E402

RANKS = [2 ** k for k in range(11)]
DENSE_BATCH, CONV_BATCH, DENSE_PER_RANK, CONV_PER_RANK = 1024, 256, 32, 8


def workloads(quick: bool) -> dict:
    out = {}
    for K in (2048,) if quick else (2048, 16384):
        for v in (3, 32) if quick else (3, 32, 128, 512):
            out[f"dense K={K} w={v}"] = ModelSpec(64, 10, (StageSpec(v, K),))
    if not quick:
        out["conv MNIST"] = ModelSpec(784, 10, (StageSpec(16, 1024, "conv"), StageSpec(32, 1024, "conv", 2)),
                                      input_shape=(1, 28, 28))
        out["conv CIFAR"] = ModelSpec(3072, 10, (StageSpec(32, 1024, "conv"), StageSpec(64, 1024, "conv", 2)),
                                      input_shape=(3, 32, 32))
    return out


def batch(spec: ModelSpec, scaling: str, n: int) -> int:
    if scaling == "strong":
        return CONV_BATCH if spec.conv else DENSE_BATCH
    return (CONV_PER_RANK if spec.conv else DENSE_PER_RANK) * n


def _pick(recs, key, where=lambda r: True):
    ok = [r for r in recs if r["fits_memory"] and where(r)]
    if not ok:
        return None
    r = min(ok, key=lambda r: r[key])
    return {k: r[k] for k in ("data_parallel", "layer_ranks", "microbatches", "coarse_layout",
                              "predicted_step_seconds", "predicted_cycle_seconds", "memory_bytes_per_rank")}


def point(spec, prof, backend, scaling, n, levels) -> dict:
    """The best layouts at n ranks (None where nothing fits)."""
    work = Workload(spec, batch(spec, scaling, n), levels, CycleSetup.default(levels))
    coarse = ["gather", "replicate"] if levels > 1 else None
    try:
        recs = plan(work, n, prof, backend, search="greedy" if n > 4 else "all", schedules=["1f1b"],
                    min_blocks=[16], coarse_layouts=coarse, max_microbatches=64)
    except LayoutError as e:
        return {"error": str(e)}
    key = "predicted_cycle_seconds" if levels > 1 else "predicted_step_seconds"
    out = {"candidates": len(recs), "best": _pick(recs, key), "dp": _pick(recs, key, lambda r: r["layer_ranks"] == 1),
           "lp": _pick(recs, key, lambda r: r["data_parallel"] == 1),
           "largest_fitting_replica": max((r["layer_ranks"] for r in recs if r["fits_memory"]), default=None)}
    if levels > 1:
        for cl in ("gather", "replicate"):
            out[cl] = _pick(recs, key, lambda r, cl=cl: r["coarse_layout"] == cl)
    return out


def series(spec, prof, backend, scaling, levels, ranks, log) -> list:
    rows = []
    for n in ranks:
        t0 = time.perf_counter()
        p = point(spec, prof, backend, scaling, n, levels)
        p["n"], p["seconds_to_plan"] = n, time.perf_counter() - t0
        rows.append(p)
        if "error" in p:
            break
        log(f"    N={n:5d}: {_describe(p, levels)} ({p['seconds_to_plan']:.1f} s)")
    return rows


def _t(sel, levels):
    if sel is None:
        return math.nan
    return sel["predicted_cycle_seconds"] if levels > 1 else sel["predicted_step_seconds"]


def _describe(p, levels) -> str:
    b = p.get("best")
    if b is None:
        return "nothing fits"
    s = f"best {b['data_parallel']}x{b['layer_ranks']} M={b['microbatches']} {_t(b, levels):.4g} s"
    if p.get("dp"):
        s += f", DP {_t(p['dp'], levels):.4g} s"
    else:
        s += ", DP does not fit"
    return s


def run(profiles: dict, quick: bool, log=print) -> dict:
    ranks = RANKS[:7] if quick else RANKS
    out = {"ranks": ranks, "series": []}
    for pname, (prof, backend) in profiles.items():
        for wname, spec in workloads(quick).items():
            for scaling in ("strong", "weak"):
                for levels in (1, 8):
                    log(f"{pname} | {wname} | {scaling} | {'GD' if levels == 1 else 'V-cycle L=8'}")
                    out["series"].append({"profile": pname, "workload": wname, "scaling": scaling, "levels": levels,
                                          "points": series(spec, prof, backend, scaling, levels, ranks, log)})
    return out


# --- report ----------------------------------------------------------------------------------------

def summary_rows(res) -> list[dict]:
    """Per series: speedup / efficiency of the best layout at the largest N, and where layer
    parallelism (P > 1) beats pure data parallelism."""
    rows = []
    for s in res["series"]:
        pts = [p for p in s["points"] if "error" not in p and p.get("best")]
        if not pts:
            continue
        L = s["levels"]
        t1 = _t(pts[0]["best"], L)
        last = pts[-1]
        wins = [p for p in pts if p["best"]["layer_ranks"] > 1]
        gains = [(p["n"], _t(p["dp"], L) / _t(p["best"], L) if p.get("dp") else math.inf) for p in wins]
        rows.append({"profile": s["profile"], "workload": s["workload"], "scaling": s["scaling"], "levels": L,
                     "n": last["n"], "best": last["best"], "t1": t1, "tn": _t(last["best"], L),
                     "speedup": t1 / _t(last["best"], L) if s["scaling"] == "strong" else None,
                     "efficiency": (t1 / (last["n"] * _t(last["best"], L)) if s["scaling"] == "strong"
                                    else t1 / _t(last["best"], L)),
                     "lp_wins": gains, "dp_fits_at": [p["n"] for p in pts if p.get("dp")]})
    return rows


def write_markdown(res, out: Path) -> None:
    L = ["# Projections to 1,024 ranks (scaling model)", "",
         "Predicted by `parml.plan` (discrete-event replay of parml's schedules, mesh and V-cycle on a profile's "
         "costs). **cpu**: this machine's fresh calibration (`profile_cpu.json`), nodes of its cores, links between "
         "nodes assumed as fast as between its local ranks. **gpu**: `profile_gpu_estimate.json`, an H100-node "
         "profile ESTIMATED from published numbers (no GPU measured; sources in `benchmarks/gpu_profile.py`).",
         "", "Efficiency: strong scaling T1 / (N·T_N); weak scaling T1 / T_N (batch per rank fixed). "
         "*LP beats DP*: rank counts where the fastest layout has P > 1, with the pure data-parallel time over it "
         "(∞: pure data parallelism does not fit in memory or the batch is smaller than N).", "",
         "| profile | workload | scaling | method | N | best D x P, M | coarse | T_1 | T_N | speedup | eff. | "
         "LP beats DP at N (DP / best) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary_rows(res):
        b = r["best"]
        wins = ", ".join(f"{n}: {'∞' if math.isinf(g) else f'{g:.2f}x'}" for n, g in r["lp_wins"]) or "never"
        speedup = "" if r["speedup"] is None else f"{r['speedup']:.0f}"
        L.append(f"| {r['profile']} | {r['workload']} | {r['scaling']} | {'GD' if r['levels'] == 1 else 'V-cycle'} | "
                 f"{r['n']} | {b['data_parallel']} x {b['layer_ranks']}, {b['microbatches']} | "
                 f"{b['coarse_layout'] or '-'} | {_fmt(r['t1'])} | {_fmt(r['tn'])} | "
                 f"{speedup} | {r['efficiency']:.2f} | {wins} |")
    L += ["", "## Gathered against replicated coarse levels (V-cycles, strong scaling)", "",
          "| profile | workload | N | gather | replicate | replicate / gather |", "|---|---|---|---|---|---|"]
    for s in res["series"]:
        if s["levels"] == 1 or s["scaling"] != "strong":
            continue
        for p in s["points"]:
            if p.get("gather") and p.get("replicate") and p["n"] in (16, 128, 1024):
                g, rp = _t(p["gather"], 8), _t(p["replicate"], 8)
                L.append(f"| {s['profile']} | {s['workload']} | {p['n']} | {_fmt(g)} | {_fmt(rp)} | {rp / g:.2f} |")
    (out / "projection.md").write_text("\n".join(L) + "\n")


def _fmt(s):
    return "—" if s is None or math.isnan(s) else (f"{s:.3g} s" if s >= 1 else f"{1e3 * s:.3g} ms")


def plot(res, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = sorted({s["workload"] for s in res["series"]}, key=lambda w: (w.startswith("conv"), w))
    ncol = min(5, len(names))                     # rows of 5 workloads, each a strong and a weak row
    nrow = 2 * math.ceil(len(names) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.8 * nrow), squeeze=False, sharey="row")
    styles = {("cpu", 1): ("tab:blue", "-"), ("cpu", 8): ("tab:blue", "--"), ("gpu", 1): ("tab:green", "-"),
              ("gpu", 8): ("tab:green", "--")}
    for k, name in enumerate(names):
        j, row = k % ncol, 2 * (k // ncol)
        for i, scaling in enumerate(("strong", "weak")):
            ax = axes[row + i][j]
            for s in res["series"]:
                if s["workload"] != name or s["scaling"] != scaling:
                    continue
                pts = [p for p in s["points"] if "error" not in p and p.get("best")]
                if not pts:
                    continue
                c, ls = styles[(s["profile"], s["levels"])]
                t1 = _t(pts[0]["best"], s["levels"])
                ns = [p["n"] for p in pts]
                eff = [t1 / ((p["n"] if scaling == "strong" else 1) * _t(p["best"], s["levels"])) for p in pts]
                ax.plot(ns, eff, ls, color=c, label=f"{s['profile']} {'GD' if s['levels'] == 1 else 'V-cycle'}")
                dp = [(p["n"], t1 / ((p["n"] if scaling == "strong" else 1) * _t(p["dp"], s["levels"])))
                      for p in pts if p.get("dp")]
                if dp:
                    ax.plot(*zip(*dp), ls, color=c, alpha=0.35, lw=3)
            ax.set(xscale="log", yscale="log", title=f"{name}, {scaling} scaling", xlabel="ranks N")
            ax.set_xticks([1, 8, 64, 512])
            ax.set_xticklabels(["1", "8", "64", "512"])
            if j == 0:
                ax.set_ylabel("efficiency (best layout)")
    for k in range(len(names), nrow // 2 * ncol):     # empty places of the last row of workloads
        for i in range(2):
            axes[2 * (k // ncol) + i][k % ncol].set_visible(False)
    axes[0][0].legend(fontsize=9)
    fig.suptitle("Projected efficiency of the best layout (thin) and of pure data parallelism (wide, faint)")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(HERE / "results" / "projection"))
    ap.add_argument("--cpu-profile", default=None, help="default: OUT/profile_cpu.json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.report_only:
        res = json.loads((out / "results.json").read_text())
    else:
        gpu = gpu_node_profile()
        gpu.save(out / "profile_gpu_estimate.json")
        cpu = Profile.load(a.cpu_profile or str(out / "profile_cpu.json"), device="cpu")
        t0 = time.perf_counter()
        res = run({"cpu": (cpu, "gloo"), "gpu": (gpu, "nccl")}, a.quick)
        res["seconds"] = time.perf_counter() - t0
        (out / "results.json").write_text(json.dumps(res, indent=1))
    write_markdown(res, out)
    plot(res, out / "projection.png")
    print((out / "projection.md").read_text())


if __name__ == "__main__":
    main()
