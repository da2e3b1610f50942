"""Pipeline scaling of layer-parallel training: parml's LayerParallel vs torch.distributed.pipelining.

    python benchmarks/pipeline_scaling.py [--quick] [--out benchmarks/results/pipeline] [--report-only]
    python benchmarks/pipeline_scaling.py --device cuda     # GPU node: NCCL and MPI (staged) rows

Times one training step (forward + backward, ``LayerParallel.forward_backward``) of two ODE
ResNets for P = 1, 2, 4 processes, M = 1, 2, 4, 8 micro-batches, the "gpipe" and "1f1b"
schedules and the gloo (torchrun-style environment) and MPI (``mpirun``) backends:

* overhead-bound: K = 1024 blocks of width 32, batch 256 (each op is tiny: per-op cost dominates);
* compute-bound:  K = 256 blocks of width 128, batch 512.

Per rank it reports compute, communication + idle (wait) and other time from
``LayerParallel.times``; pipeline efficiency = busiest rank's compute / step time, next to the
bubble bound M / (M + P - 1).  Peak activation memory per rank is the peak of the bytes autograd
holds for backward (``saved_tensors_hooks``).  In the same launches (gloo) the identical shards
run under ``torch.distributed.pipelining`` (``PipelineStage`` + ``ScheduleGPipe`` /
``Schedule1F1B``), alternating step by step with parml; one serial process (no communicator)
gives the reference.  Every launch runs under a timeout; rank 0 prints one line per
configuration.

``--device cuda`` runs the same on GPUs: the torch backend becomes NCCL (one GPU per rank, so its
P is capped at the GPU count), MPI stages CUDA tensors through pinned host memory unless
``PARML_CUDA_AWARE_MPI=1`` (ranks beyond the GPU count share GPUs and are marked oversubscribed),
every timed step is bracketed by ``torch.cuda.synchronize``, and results go to
``results/pipeline_cuda`` unless ``--out`` says otherwise.

Outputs in ``--out``: ``results.json`` (every number), ``pipeline_scaling.md`` (tables) and
``pipeline_scaling.png`` (step time and efficiency against M).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from parml.launch import clean_env, mpi_unavailable, run_local

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "_pipeline_worker.py"

IN_FEATURES, CLASSES = 64, 10
FULL = {
    "models": {
        "overhead": {"width": 32, "blocks": 1024, "batch": 256,
                     "label": "overhead-bound (K=1024, width 32, batch 256)"},
        "compute": {"width": 128, "blocks": 256, "batch": 512,
                    "label": "compute-bound (K=256, width 128, batch 512)"},
    },
    "P": [1, 2, 4],
    "microbatches": [1, 2, 4, 8],
    "schedules": ["gpipe", "1f1b"],
    "backends": ["gloo", "mpi"],
    "warmup": 2,
    "steps": 7,
    "serial_steps": 5,
    "launch_timeout": {1: 300, 2: 420, 4: 600},
    "latency_reps": 200,
    "inline_ablation": True,
}
QUICK = {
    **FULL,
    "P": [1, 2],
    "microbatches": [1, 4],
    "warmup": 1,
    "steps": 2,
    "serial_steps": 2,
    "launch_timeout": {1: 60, 2: 60, 4: 90},
    "latency_reps": 30,
}


# --------------------------------------------------------------------------------------------
# launching
# --------------------------------------------------------------------------------------------

def base_env() -> dict:
    return clean_env([str(ROOT)])


def launch(job: dict, nprocs: int, timeout: float, tmp: Path, label: str) -> tuple[dict | None, str | None]:
    """Run one launch of the worker; (result of rank 0, error text or None)."""
    job_path, result_path = tmp / f"{label}.job.json", tmp / f"{label}.result.json"
    job_path.write_text(json.dumps(job))
    cmd = [sys.executable, str(WORKER), str(job_path), str(result_path)]
    how = "torch" if job["backend"] == "nccl" else job["backend"]     # torchrun-style environment
    run = run_local(cmd, nprocs, how, timeout, tmp, label, base_env(), cwd=ROOT)
    if run.timed_out:
        return None, f"{label}: timed out after {timeout:g} s\n" + run.tails()
    if not run.ok or not result_path.exists():
        return None, f"{label}: exit codes {run.returncodes}\n" + run.tails()
    return json.loads(result_path.read_text()), None


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------

STAR = "\\*"


def ms(x) -> str:
    return "—" if x is None else f"{1e3 * x:.1f}"


def mib(x) -> str:
    return f"{x / 2**20:.2f}"


def _ranks(e, key, fmt=ms) -> str:
    return " / ".join(fmt(p[key]) for p in e["per_rank"])


def torch_backend(res: dict) -> str:
    """The torch.distributed backend of this run: gloo on CPU, NCCL with ``--device cuda``."""
    return "nccl" if res["config"].get("device") == "cuda" else "gloo"


def goals(res: dict) -> dict:
    """The two goals, from the measured entries."""
    out = {"torch_ratio": [], "efficiency": []}
    for e in res["entries"]:
        t = e.get("torch")
        if e["backend"] == torch_backend(res) and t and "parml_over_torch_throughput" in t:
            out["torch_ratio"].append({k: e[k] for k in ("model", "P", "M", "schedule", "oversubscribed")}
                                      | {"ratio": t["parml_over_torch_throughput"],
                                         "paired_ratio": t["parml_over_torch_paired"]})
        if e["model"] == "compute" and e["P"] == 2 and e["M"] == max(res["config"]["microbatches"]):
            out["efficiency"].append({k: e[k] for k in ("backend", "schedule", "efficiency", "bound",
                                                          "eff_over_bound")})
    # the goal is judged where every rank has a core of its own (P = 2 here); oversubscribed rows
    # (ranks time-slicing, so a bubble is filled by another rank's work) are reported beside it
    pp = [r for r in out["torch_ratio"] if r["P"] > 1 and not r.get("oversubscribed")]
    over = [r for r in out["torch_ratio"] if r["P"] > 1 and r.get("oversubscribed")]
    by_m, over_by_m = {}, {}
    for rows, into in ((pp, by_m), (over, over_by_m)):
        for r in rows:
            into.setdefault(r["M"], []).append(r["ratio"])
    out["torch_ratio_min_by_M_pipelined"] = {str(m): min(v) for m, v in sorted(by_m.items())}
    out["torch_ratio_max_by_M_pipelined"] = {str(m): max(v) for m, v in sorted(by_m.items())}
    out["torch_ratio_min_by_M_oversubscribed"] = {str(m): min(v) for m, v in sorted(over_by_m.items())}
    out["torch_ratio_paired_median_pipelined"] = (
        sorted(r["paired_ratio"] for r in pp)[len(pp) // 2] if pp else None)
    out["torch_ratio_goal_met"] = bool(pp) and all(r["ratio"] >= 1.1 for r in pp)
    # where the margin comes from: deferred vs inline weight gradients, and inline vs torch
    abl = [e for e in res["entries"] if e.get("inline") and e["P"] > 1]
    out["deferred_over_inline_by_M"] = {str(m): sorted(e["inline"]["deferred_over_inline_paired"]
                                                       for e in abl if e["M"] == m)
                                        for m in sorted({e["M"] for e in abl})}
    out["inline_over_torch_by_M"] = {
        str(m): sorted(e["torch"]["step_s"] / e["inline"]["step_s"] for e in abl
                       if e["M"] == m and (e.get("torch") or {}).get("step_s"))
        for m in sorted({e["M"] for e in abl})}
    out["efficiency_goal_met"] = bool(out["efficiency"]) and all(r["eff_over_bound"] >= 0.9
                                                                 for r in out["efficiency"])
    return out


def _load_note(res: dict) -> list[str]:
    """A warning when other processes were competing for the cores during the run."""
    ncpu = res["meta"]["cpu_count"] or 1
    loads = [v for key in ("loadavg_start", "loadavg_end") for v in (res["meta"].get(key) or [])[:1]]
    if not loads or max(loads) <= ncpu:
        return []
    return [f"**The machine was shared** (1-minute load average up to {max(loads):g} on {ncpu} cores): "
            "step times of launches that ran minutes apart (e.g. gloo vs mpi rows, or different P) are "
            "confounded by the varying load; parml and torch pipelining are compared step by step in the "
            "same processes, so their ratio is the more robust number.", ""]


def write_markdown(res: dict, path: Path) -> None:
    cfg = res["config"]
    ncpu = res["meta"]["cpu_count"]
    tb = torch_backend(res)
    if tb == "nccl":
        machine = (f"Machine: {res['meta'].get('gpu_count')} × {res['meta'].get('gpu_name')}, torch "
                   f"{res['meta']['torch']}, float32; every timed step is bracketed by "
                   "`torch.cuda.synchronize`, so step times and the parml/torch ratio are device times; "
                   "compute / wait (and so efficiency) come from CUDA events on the compute stream "
                   "around each stage's kernels and communication waits (`parallel.timing`).")
        over = (f"**Rows marked \\* are oversubscribed**: more ranks than the {res['meta'].get('gpu_count')} "
                "GPU(s), so ranks share a GPU (MPI only; NCCL needs a GPU per rank).")
    else:
        machine = (f"Machine: {ncpu} CPU cores ({res['meta']['processor']}), torch {res['meta']['torch']}, "
                   f"float32, one thread per rank (OMP_NUM_THREADS=1, torch.set_num_threads(1)). "
                   f"Load average before/after: {res['meta']['loadavg_start']} / {res['meta']['loadavg_end']}.")
        over = (f"**P = 4 is oversubscribed** (marked 4\\*): 4 single-threaded ranks share {ncpu} cores, so "
                "ranks time-slice and per-rank compute includes time spent descheduled.")
    L = [f"# Pipeline scaling: parml LayerParallel vs torch.distributed.pipelining",
         "",
         f"{'Quick run (reduced sizes). ' if cfg['quick'] else ''}" + machine,
         f"Each configuration: {cfg['warmup']} warm-up steps, then the median of {cfg['steps']} timed "
         "steps; a barrier precedes every step and a step's time is the slowest rank's. parml and torch "
         f"pipelining steps alternate in the same processes ({tb}).",
         "",
         *(_load_note(res) if tb == "gloo" else []),
         over,
         "",
         "Columns: *compute / wait / other* are per rank (rank 0 / rank 1 / …) from `LayerParallel.times` "
         "(wait = blocked in receives and in completing sends; other = step − compute − wait). "
         "*eff* = busiest rank's compute / step time; *bound* = M/(M+P−1); *vs serial* = serial time "
         "(one process, no communicator, same M) / step time; *min* = fastest timed step; "
         f"*torch* = torch.distributed.pipelining step time ({tb} only); *parml/torch* = throughput ratio "
         "(torch median time / parml median time; > 1: parml faster; results.json also holds the median of "
         "the step-by-step paired ratios). "
         "*inline-W* = the same executor with `weight_grads=\"inline\"` (weight gradients inside each "
         f"backward, before its adjoint is sent, instead of one batched matmul per chunk after the send; {tb}, "
         "alternating in the same processes). "
         "*peak act.* = peak bytes autograd keeps saved for backward on each rank (parameters excluded), "
         "or, when larger, the states and adjoints the deferred weight gradients hold (a micro-batch's "
         "until its weight gradients are formed, right after its backward).",
         ""]
    serial = res.get("serial", {}).get("models", {})
    for name, m in cfg["models"].items():
        L += [f"## {m['label']}", ""]
        sm = serial.get(name, {}).get("by_M", {})
        if sm:
            L += ["Serial (one process, no communicator): " + ", ".join(
                f"M={k}: {ms(v['step_s'])} ms (peak act. {mib(v['peak_saved_bytes'])} MiB)" for k, v in sm.items()),
                ""]
        L += ["| P | M | schedule | backend | step ms | min ms | compute ms | wait ms | other ms | eff | bound | "
              "eff/bound | vs serial | torch ms | parml/torch | inline-W ms | peak act. MiB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        rows = [e for e in res["entries"] if e["model"] == name]
        rows.sort(key=lambda e: (e["P"], e["M"], cfg["schedules"].index(e["schedule"]),
                                 cfg["backends"].index(e["backend"])))
        for e in rows:
            t = e.get("torch") or {}
            ser = sm.get(str(e["M"]), {}).get("step_s")
            L.append("| " + " | ".join([
                str(e["P"]) + (STAR if e["oversubscribed"] else ""), str(e["M"]), e["schedule"], e["backend"],
                ms(e["step_s"]), ms(e["step_min_s"]), _ranks(e, "compute_s"), _ranks(e, "wait_s"), _ranks(e, "other_s"),
                f"{e['efficiency']:.3f}", f"{e['bound']:.3f}", f"{e['eff_over_bound']:.2f}",
                f"{ser / e['step_s']:.2f}" if ser else "—",
                ms(t.get("step_s")) if "step_s" in t else ("n/a" if t else "—"),
                f"{t['parml_over_torch_throughput']:.2f}" if "step_s" in t else "—",
                ms(e["inline"]["step_s"]) if e.get("inline") else "—",
                _ranks(e, "peak_saved_bytes", mib)]) + " |")
        L.append("")
        # memory summary
        Ms = cfg["microbatches"]
        L += [f"Peak activation memory (MiB, largest rank) vs P at M = {max(Ms)}, {tb}:", "",
              "| schedule | " + " | ".join(f"P={p}" for p in cfg["P"]) + " | " +
              " | ".join(f"P={p} / P=1" for p in cfg["P"][1:]) + " |",
              "|---|" + "---|" * (2 * len(cfg["P"]) - 1)]
        for s, wg in [(s, wg) for wg in ("deferred", "inline") for s in cfg["schedules"]]:
            vals = []
            for p in cfg["P"]:
                hit = [e for e in rows if e["P"] == p and e["M"] == max(Ms) and e["schedule"] == s
                       and e["backend"] == tb]
                src = hit[0] if hit and wg == "deferred" else (hit[0].get("inline") if hit else None)
                vals.append(src["peak_saved_bytes_max"] if src else None)
            if not any(vals):
                continue
            cells = [mib(v) if v else "—" for v in vals]
            cells += [f"{v / vals[0]:.2f}" if v and vals[0] else "—" for v in vals[1:]]
            L.append(f"| {s}, {wg} weight grads | " + " | ".join(cells) + " |")
        L.append("")
        failed = [e for e in rows if (e.get("torch") or {}).get("error")]
        if failed:
            reasons = sorted({e["torch"]["error"] for e in failed})
            L += ["torch pipelining not run: " + "; ".join(reasons), ""]
    # goals
    g = res["goals"]
    L += ["## Goals", ""]
    if g["torch_ratio"]:
        L += [f"* parml ≥ 1.1× torch pipelining throughput at every M (P ≥ 2 with a core per rank, {tb}): "
              f"**{'met' if g['torch_ratio_goal_met'] else 'not met'}**. Smallest ratio per M: " +
              ", ".join(f"M={m}: {v:.2f}" for m, v in g["torch_ratio_min_by_M_pipelined"].items()) + "."]
        if g.get("torch_ratio_min_by_M_oversubscribed"):
            L.append("  Oversubscribed (more ranks than cores), smallest ratio per M: " + ", ".join(
                f"M={m}: {v:.2f}" for m, v in g["torch_ratio_min_by_M_oversubscribed"].items()) + ".")
        allr = [r["ratio"] for r in g["torch_ratio"] if r["P"] > 1]
        if allr:
            L.append(f"  Largest ratio per M: " + ", ".join(
                f"M={m}: {v:.2f}" for m, v in g["torch_ratio_max_by_M_pipelined"].items()) +
                f". Median over pipelined rows of the step-by-step paired ratio: "
                f"{g['torch_ratio_paired_median_pipelined']:.2f}.")
        if g.get("deferred_over_inline_by_M"):
            L.append(f"  Where the margin comes from (P ≥ 2, {tb}, step-by-step paired): deferred over inline "
                     "weight gradients " + ", ".join(f"M={m}: {min(v):.2f}–{max(v):.2f}"
                                                     for m, v in g["deferred_over_inline_by_M"].items() if v) +
                     "; parml with inline weight gradients over torch pipelining " +
                     ", ".join(f"M={m}: {min(v):.2f}–{max(v):.2f}"
                               for m, v in g["inline_over_torch_by_M"].items() if v) + ".")
        p1 = [r["ratio"] for r in g["torch_ratio"] if r["P"] == 1]
        if p1:
            L.append(f"  P = 1 (single stage, no messages): {min(p1):.2f} – {max(p1):.2f}.")
    else:
        L += ["* torch pipelining comparison: not available (" + str(res.get("torch_pipelining_error")) + ")."]
    if g["efficiency"]:
        L += [f"* Compute-bound, P = 2, M = {max(cfg['microbatches'])}: efficiency ≥ 0.9 × bound: "
              f"**{'met' if g['efficiency_goal_met'] else 'not met'}** (" +
              "; ".join(f"{r['schedule']}/{r['backend']}: {r['efficiency']:.3f} vs bound {r['bound']:.3f}"
                        f" = {r['eff_over_bound']:.2f}" for r in g["efficiency"]) + ")."]
    L.append("")
    # where time goes
    L += ["## Where time goes", "",
          f"Per rank at M = {max(cfg['microbatches'])} (ms, medians). The benchmark times the calls of "
          "`comm.isend` (posting sends) and of the final loss broadcast (`LayerParallel._from_last`, where "
          "the last rank waits for rank 0's last backward) on its own; `LayerParallel.times` does not count "
          "either as wait, so both are part of *other* there.", "",
          "| model | P | schedule | backend | step | compute | wait | other | in isend | in loss bcast |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for e in sorted(res["entries"], key=lambda e: (e["model"], e["P"], e["schedule"], e["backend"])):
        if e["P"] == 1 or e["M"] != max(cfg["microbatches"]):
            continue
        L.append("| " + " | ".join([e["model"], str(e["P"]) + (STAR if e["oversubscribed"] else ""),
                                     e["schedule"], e["backend"], ms(e["step_s"]), _ranks(e, "compute_s"),
                                     _ranks(e, "wait_s"), _ranks(e, "other_s"), _ranks(e, "other_isend_s"),
                                     _ranks(e, "other_loss_broadcast_s")]) + " |")
    L.append("")
    lat = res.get("latency", {})
    for b, d in lat.items():
        L.append(f"* {b}: one-way message latency through `comm.send`/`comm.recv` (P = 2): " +
                 ", ".join(f"{int(k) / 1024:.0f} KiB {1e6 * v:.0f} µs" for k, v in d.items()) + ".")
    if "dispatch_s" in res.get("serial", {}):
        L.append(f"* One tiny eager op (torch.add on 1-element tensors): {1e6 * res['serial']['dispatch_s']:.1f} µs.")
    for name, m in cfg["models"].items():
        prof = serial.get(name, {}).get("block_profile")
        if prof:
            L.append(f"* {name}: one residual block forward + backward per micro-batch size: " +
                     ", ".join(f"{b} rows {1e6 * v['fwd_bwd_s']:.0f} µs ({v['gemm_gflops']:.1f} GFLOP/s)"
                               for b, v in prof.items()) + ".")
    if res.get("failures"):
        L += ["", "## Failed launches", ""] + [f"* {f.splitlines()[0]}" for f in res["failures"]]
    path.write_text("\n".join(L) + "\n")


def write_plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = res["config"]
    names = list(cfg["models"])
    fig, axes = plt.subplots(len(names), 2, figsize=(13, 4.6 * len(names)), squeeze=False)
    colors = {1: "tab:blue", 2: "tab:orange", 4: "tab:red"}
    markers = {"gpipe": "o", "1f1b": "s"}
    styles = {"gloo": "-", "nccl": "-", "mpi": ":"}
    serial = res.get("serial", {}).get("models", {})
    for i, name in enumerate(names):
        ax_t, ax_e = axes[i]
        rows = [e for e in res["entries"] if e["model"] == name]
        for P in cfg["P"]:
            for b in cfg["backends"]:
                for s in cfg["schedules"]:
                    pts = sorted((e["M"], e) for e in rows if e["P"] == P and e["backend"] == b
                                 and e["schedule"] == s)
                    if not pts:
                        continue
                    Ms = [m for m, _ in pts]
                    tag = f"P={P}{'*' if P > (res['meta']['cpu_count'] or 1) else ''} {b} {s}"
                    ax_t.plot(Ms, [1e3 * e["step_s"] for _, e in pts], styles[b], marker=markers[s],
                              color=colors.get(P, "k"), label=tag, alpha=0.85)
                    ax_e.plot(Ms, [e["efficiency"] for _, e in pts], styles[b], marker=markers[s],
                              color=colors.get(P, "k"), label=tag, alpha=0.85)
                    if b == torch_backend(res):
                        tp = [(m, e["torch"]["step_s"]) for m, e in pts if e.get("torch") and "step_s" in e["torch"]]
                        if tp:
                            ax_t.plot([m for m, _ in tp], [1e3 * t for _, t in tp], "--", marker=markers[s],
                                      mfc="none", color=colors.get(P, "k"), label=f"torch P={P} {s}")
            Ms = sorted(cfg["microbatches"])
            ax_e.plot(Ms, [m / (m + P - 1) for m in Ms], "k--", lw=1, alpha=0.5)
            ax_e.annotate(f"bound P={P}", (Ms[-1], Ms[-1] / (Ms[-1] + P - 1)), fontsize=7,
                          xytext=(3, -3), textcoords="offset points")
        sm = serial.get(name, {}).get("by_M", {})
        if sm:
            ks = sorted(sm, key=int)
            ax_t.plot([int(k) for k in ks], [1e3 * sm[k]["step_s"] for k in ks], "k-", lw=2, label="serial")
        for ax in (ax_t, ax_e):
            ax.set_xscale("log", base=2)
            ax.set_xticks(cfg["microbatches"], [str(m) for m in cfg["microbatches"]])
            ax.set_xlabel("micro-batches M")
            ax.grid(alpha=0.3)
        ax_t.set_ylabel("step time (ms)")
        ax_t.set_title(f"{cfg['models'][name]['label']}: step time (torch pipelining dashed)", fontsize=9)
        ax_e.set_ylabel("efficiency (busiest compute / step)")
        ax_e.set_ylim(0, 1.08)
        ax_e.set_title("pipeline efficiency vs bound M/(M+P-1) (black dashed)", fontsize=9)
        ax_t.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------

def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="reduced sizes (K/8, batch/4, M in {1,4}, P in {1,2})")
    ap.add_argument("--out", default=None,
                    help="output folder (default benchmarks/results/pipeline, or pipeline_cuda with --device cuda)")
    ap.add_argument("--only", default=None, metavar="MODEL[:P]",
                    help="run one model (overhead or compute), optionally one world size, e.g. compute:2")
    ap.add_argument("--backends", default=None, help="comma-separated subset of gloo,mpi (nccl,mpi with --device cuda)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="cpu (gloo and MPI) or cuda (NCCL and MPI with staged or CUDA-aware buffers)")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the markdown and the plot from an existing OUT/results.json")
    args = ap.parse_args(argv)
    args.out = args.out or str(HERE / "results" / ("pipeline_cuda" if args.device == "cuda" else "pipeline"))
    if args.report_only:
        out = Path(args.out)
        res = json.loads((out / "results.json").read_text())
        res["goals"] = goals(res)
        (out / "results.json").write_text(json.dumps(res, indent=1))
        write_markdown(res, out / "pipeline_scaling.md")
        write_plot(res, out / "pipeline_scaling.png")
        return 0
    base = QUICK if args.quick else FULL
    models = {}
    for name, m in base["models"].items():
        mm = dict(m, in_features=IN_FEATURES, classes=CLASSES)
        if args.quick:
            mm.update(blocks=m["blocks"] // 8, batch=m["batch"] // 4)
            mm["label"] = (f"{name}-bound (quick: K={mm['blocks']}, width {mm['width']}, "
                           f"batch {mm['batch']})")
        models[name] = mm
    Ps = list(base["P"])
    if args.only:
        name, _, p = args.only.partition(":")
        if name not in models or (p and not p.isdigit()):
            ap.error(f"--only {args.only!r}: expected MODEL[:P] with MODEL in {', '.join(models)}")
        models = {name: models[name]}
        Ps = [int(p)] if p else Ps
    import torch
    gpus = 0
    if args.device == "cuda":
        if not torch.cuda.is_available():
            ap.error("--device cuda: CUDA is not available on this machine (torch "
                     f"{torch.__version__}); use --device cpu")
        gpus = torch.cuda.device_count()
    tb = "nccl" if args.device == "cuda" else "gloo"
    all_backends = [tb, "mpi"]
    backends = list(all_backends)
    if args.backends:
        wanted = args.backends.split(",")
        unknown = [b for b in wanted if b not in all_backends]
        if unknown:
            ap.error(f"--backends {args.backends!r}: valid with --device {args.device}: {','.join(all_backends)}")
        backends = [b for b in all_backends if b in wanted]
    why_no_mpi = mpi_unavailable()
    if why_no_mpi and "mpi" in backends:
        print(f"skipping the mpi backend: {why_no_mpi}", flush=True)
        backends.remove("mpi")
    cfg = {"quick": args.quick, "models": models, "P": Ps, "microbatches": base["microbatches"],
           "schedules": base["schedules"], "backends": backends, "warmup": base["warmup"],
           "steps": base["steps"], "serial_steps": base["serial_steps"], "dtype": "float32",
           "threads_per_rank": 1, "inline_ablation": base["inline_ablation"], "device": args.device}
    res = {"meta": {"torch": torch.__version__, "python": platform.python_version(),
                    "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "loadavg_start": _loadavg(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "mpi_skipped": why_no_mpi, "gpu_count": gpus,
                    "gpu_name": torch.cuda.get_device_name(0) if gpus else None},
           "config": cfg, "entries": [], "latency": {}, "failures": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    worker_models = {k: {kk: v[kk] for kk in ("in_features", "classes", "width", "blocks", "batch")}
                     for k, v in models.items()}
    common = {"models": worker_models, "microbatches": cfg["microbatches"], "schedules": cfg["schedules"],
              "warmup": cfg["warmup"], "comm_timeout": 120.0, "inline_ablation": cfg["inline_ablation"],
              "device": args.device}
    lat_bytes = sorted({m["batch"] // M * m["width"] * 4 for m in models.values() for M in cfg["microbatches"]})
    with tempfile.TemporaryDirectory(prefix="parml-pipe-") as tmpd:
        tmp = Path(tmpd)
        print(f"== serial (1 process, no communicator)", flush=True)
        r, err = launch(dict(common, backend="serial", steps=cfg["serial_steps"]), 1,
                        base["launch_timeout"][1], tmp, "serial")
        if err:
            print(err, flush=True)
            res["failures"].append(err)
        else:
            res["serial"] = r
        units, what = (gpus, "GPUs") if args.device == "cuda" else (os.cpu_count() or 1, "cores")
        for P in cfg["P"]:
            for b in backends:
                if b == "nccl" and P > gpus:
                    print(f"== nccl P={P}: skipped (NCCL needs a GPU per rank; {gpus} here)", flush=True)
                    continue
                over = f" (oversubscribed: more ranks than {what})" if P > units else ""
                print(f"== {b} P={P}{over}", flush=True)
                job = dict(common, backend=b, steps=cfg["steps"], torch_pipelining=(b != "mpi"),
                           latency_bytes=lat_bytes if P == 2 else [], latency_reps=base["latency_reps"])
                r, err = launch(job, P, base["launch_timeout"].get(P, 420), tmp, f"{b}-P{P}")
                if err:
                    print(err, flush=True)
                    res["failures"].append(err)
                    continue
                for name in models:
                    res["entries"].extend(r["models"][name])
                if r.get("latency_s"):
                    res["latency"][b] = r["latency_s"]
                if r.get("torch_pipelining_error"):
                    res["torch_pipelining_error"] = r["torch_pipelining_error"]
    res["meta"]["loadavg_end"] = _loadavg()
    res["meta"]["wall_s"] = time.monotonic() - t_start
    res["goals"] = goals(res)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    write_markdown(res, out / "pipeline_scaling.md")
    try:
        write_plot(res, out / "pipeline_scaling.png")
    except Exception as exc:  # a missing matplotlib must not lose the numbers
        print(f"plot failed: {exc}", flush=True)
    g = res["goals"]
    print(f"done in {res['meta']['wall_s']:.0f} s -> {out}", flush=True)
    if g["torch_ratio"]:
        print("parml/torch throughput, smallest per M (P>=2, a core per rank): " +
              ", ".join(f"M={m}: {v:.2f}" for m, v in g["torch_ratio_min_by_M_pipelined"].items()) +
              f"  goal >= 1.1: {'met' if g['torch_ratio_goal_met'] else 'not met'}", flush=True)
    for r in g["efficiency"]:
        print(f"compute-bound P=2 M={max(cfg['microbatches'])} {r['schedule']}/{r['backend']}: "
              f"efficiency {r['efficiency']:.3f}, bound {r['bound']:.3f}, ratio {r['eff_over_bound']:.2f} "
              f"(goal >= 0.9)", flush=True)
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
