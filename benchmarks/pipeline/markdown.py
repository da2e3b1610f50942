"""pipeline_scaling.md: per-model tables, memory, goals, where time goes."""
from __future__ import annotations

from ..harness import table
from .analyse import torch_backend
from .records import Entry, PipelineResults

STAR = "\\*"


def ms(x) -> str:
    return "—" if x is None else f"{1e3 * x:.1f}"


def mib(x) -> str:
    return "—" if x is None else f"{x / 2**20:.2f}"


def per_rank(e: Entry, key: str, f=ms) -> str:
    return " / ".join(f(getattr(p, key)) for p in e.per_rank)


def _met(ok: bool) -> str:
    return f"**{'met' if ok else 'not met'}**"


def _by_m(d: dict) -> str:
    return ", ".join(f"M={m}: {v:.2f}" for m, v in d.items())


def _span(d: dict) -> str:
    return ", ".join(f"M={m}: {min(v):.2f}–{max(v):.2f}" for m, v in d.items() if v)


def _kernel_note(kernel: str | None) -> str:
    """Which dense-chunk kernel ran (``--kernel``); nothing for results from before the option."""
    if kernel is None:
        return ""
    return (f" Dense chunks: `--kernel {kernel}`, in parml, the serial reference and torch pipelining alike "
            "(results.json: each entry's `kernels`, what `auto` chose).")


def header(res: PipelineResults) -> list[str]:
    cfg, meta, tb = res.config, res.meta, torch_backend(res)
    if tb == "nccl":
        machine = (f"Machine: {meta.gpu_count} × {meta.gpu_name}, torch {meta.torch}, float32; every timed step is "
                   "bracketed by `torch.cuda.synchronize`, so step times and the parml/torch ratio are device times; "
                   "compute / wait (and so efficiency) come from CUDA events on the compute stream around each "
                   "stage's kernels and communication waits (`parml.parallel.timing`).")
        over = (f"**Rows marked \\* are oversubscribed**: more ranks than the {meta.gpu_count} GPU(s), so ranks "
                "share a GPU (MPI only; NCCL needs a GPU per rank).")
    else:
        machine = (f"Machine: {meta.cpu_count} CPU cores ({meta.processor}), torch {meta.torch}, float32, one "
                   "thread per rank (OMP_NUM_THREADS=1, torch.set_num_threads(1)). Load average before/after: "
                   f"{meta.loadavg_start} / {meta.loadavg_end}.")
        over = (f"**P = 4 is oversubscribed** (marked 4\\*): 4 single-threaded ranks share {meta.cpu_count} cores, "
                "so ranks time-slice and per-rank compute includes time spent descheduled.")
    loads = [v[0] for v in (meta.loadavg_start, meta.loadavg_end) if v]
    shared = tb == "gloo" and loads and max(loads) > (meta.cpu_count or 1)
    return ["# Pipeline scaling: parml LayerParallel vs torch.distributed.pipelining", "",
            ("Quick run (reduced sizes). " if cfg.quick else "") + machine,
            f"Each configuration: {cfg.warmup} warm-up steps, then the median of {cfg.steps} timed steps; a barrier "
            "precedes every step and a step's time is the slowest rank's. parml and torch pipelining steps "
            f"alternate in the same processes ({tb})." + _kernel_note(cfg.kernel), "",
            *([f"**The machine was shared** (1-minute load average up to {max(loads):g} on {meta.cpu_count} cores): "
               "step times of launches that ran minutes apart (e.g. gloo vs mpi rows, or different P) are "
               "confounded by the varying load; parml and torch pipelining are compared step by step in the same "
               "processes, so their ratio is the more robust number.", ""] if shared else []),
            over, "",
            "Columns: *compute / wait / other* are per rank (rank 0 / rank 1 / …) from `LayerParallel.times` "
            "(wait = blocked in receives, in posting and completing sends and in the final loss broadcast; other "
            "= step − compute − wait). *eff* = busiest rank's compute / step time; *bound* = M/(M+P−1) = 1 − "
            "`parml.parallel.schedule.bubble_fraction(P, M)`; *vs serial* = serial time (one process, no "
            "communicator, same M) / step time; *min* = fastest timed step; "
            f"*torch* = torch.distributed.pipelining step time ({tb} only); *parml/torch* = throughput ratio "
            "(torch median time / parml median time; > 1: parml faster; results.json also holds the median of "
            "the step-by-step paired ratios). *inline-W* = the same executor with `weight_grads=\"inline\"` "
            "(weight gradients inside each backward, before its adjoint is sent, instead of one batched matmul "
            f"per chunk after the send; {tb}, alternating in the same processes). *peak act.* = peak bytes "
            "autograd keeps saved for backward on each rank (parameters excluded), or, when larger, the states "
            "and adjoints the deferred weight gradients hold (a micro-batch's until its weight gradients are "
            "formed, right after its backward).", ""]


def model_section(res: PipelineResults, name: str) -> list[str]:
    cfg, tb = res.config, torch_backend(res)
    sm = res.serial.models[name].by_M if res.serial and name in res.serial.models else {}
    L = [f"## {cfg.models[name].label}", ""]
    if sm:
        L += ["Serial (one process, no communicator): " + ", ".join(
            f"M={k}: {ms(v.step_s)} ms (peak act. {mib(v.peak_saved_bytes)} MiB)" for k, v in sm.items()), ""]
    rows = sorted((e for e in res.entries if e.model == name),
                  key=lambda e: (e.P, e.M, cfg.schedules.index(e.schedule), cfg.backends.index(e.backend)))
    cells = []
    for e in rows:
        t, ser = e.torch, sm[e.M].step_s if e.M in sm else None
        cells.append([f"{e.P}{STAR if e.oversubscribed else ''}", e.M, e.schedule, e.backend, ms(e.step_s),
                      ms(e.step_min_s), per_rank(e, "compute_s"), per_rank(e, "wait_s"), per_rank(e, "other_s"),
                      f"{e.efficiency:.3f}", f"{e.bound:.3f}", f"{e.eff_over_bound:.2f}",
                      f"{ser / e.step_s:.2f}" if ser else "—",
                      ms(t.step_s) if t and t.step_s is not None else ("n/a" if t else "—"),
                      f"{t.parml_over_torch_throughput:.2f}" if t and t.step_s is not None else "—",
                      ms(e.inline.step_s) if e.inline else "—", per_rank(e, "peak_saved_bytes", mib)])
    L += table(["P", "M", "schedule", "backend", "step ms", "min ms", "compute ms", "wait ms", "other ms", "eff",
                "bound", "eff/bound", "vs serial", "torch ms", "parml/torch", "inline-W ms", "peak act. MiB"], cells)
    L += ["", *memory_table(res, rows, tb)]
    reasons = sorted({e.torch.error for e in rows if e.torch and e.torch.error})
    if reasons:
        L += ["torch pipelining not run: " + "; ".join(reasons), ""]
    return L


def memory_table(res: PipelineResults, rows: list[Entry], tb: str) -> list[str]:
    Ps, top = res.config.P, max(res.config.microbatches)
    cells = []
    for wg in ("deferred", "inline"):
        for s in res.config.schedules:
            vals = []
            for p in Ps:
                hit = [e for e in rows if e.P == p and e.M == top and e.schedule == s and e.backend == tb]
                src = (hit[0] if wg == "deferred" else hit[0].inline) if hit else None
                vals.append(src.peak_saved_bytes_max if src else None)
            if any(vals):
                cells.append([f"{s}, {wg} weight grads"] + [mib(v) if v else "—" for v in vals]
                             + [f"{v / vals[0]:.2f}" if v and vals[0] else "—" for v in vals[1:]])
    return [f"Peak activation memory (MiB, largest rank) vs P at M = {top}, {tb}:", "",
            *table(["schedule"] + [f"P={p}" for p in Ps] + [f"P={p} / P=1" for p in Ps[1:]], cells), ""]


def goals_section(res: PipelineResults) -> list[str]:
    g, tb, top = res.goals, torch_backend(res), max(res.config.microbatches)
    L = ["## Goals", ""]
    if g.torch_ratio:
        L.append(f"* parml ≥ 1.1× torch pipelining throughput at every M (P ≥ 2 with a core per rank, {tb}): "
                 f"{_met(g.torch_ratio_goal_met)}. Smallest ratio per M: {_by_m(g.torch_ratio_min_by_M_pipelined)}.")
        if g.torch_ratio_min_by_M_oversubscribed:
            L.append("  Oversubscribed (more ranks than cores), smallest ratio per M: "
                     f"{_by_m(g.torch_ratio_min_by_M_oversubscribed)}.")
        if g.torch_ratio_max_by_M_pipelined:
            L.append(f"  Largest ratio per M: {_by_m(g.torch_ratio_max_by_M_pipelined)}. Median over pipelined rows "
                     f"of the step-by-step paired ratio: {g.torch_ratio_paired_median_pipelined:.2f}.")
        if any(g.deferred_over_inline_by_M.values()):
            L.append(f"  Where the margin comes from (P ≥ 2, {tb}, step-by-step paired): deferred over inline "
                     f"weight gradients {_span(g.deferred_over_inline_by_M)}; parml with inline weight gradients "
                     f"over torch pipelining {_span(g.inline_over_torch_by_M)}.")
        p1 = [r.ratio for r in g.torch_ratio if r.P == 1]
        if p1:
            L.append(f"  P = 1 (single stage, no messages): {min(p1):.2f} – {max(p1):.2f}.")
    else:
        errors = sorted({e.torch.error for e in res.entries if e.torch and e.torch.error})
        L.append(f"* torch pipelining comparison: not available ({'; '.join(errors) or 'not run'}).")
    if g.efficiency:
        L.append(f"* Compute-bound, P = 2, M = {top}: efficiency ≥ 0.9 × bound: {_met(g.efficiency_goal_met)} (" +
                 "; ".join(f"{r.schedule}/{r.backend}: {r.efficiency:.3f} vs bound {r.bound:.3f} = "
                           f"{r.eff_over_bound:.2f}" for r in g.efficiency) + ").")
    return L + [""]


def time_section(res: PipelineResults) -> list[str]:
    top = max(res.config.microbatches)
    rows = sorted((e for e in res.entries if e.P > 1 and e.M == top),
                  key=lambda e: (e.model, e.P, e.schedule, e.backend))
    L = ["## Where time goes", "",
         f"Per rank at M = {top} (ms, medians): *wait* includes the time spent posting sends (*in isend*; gloo can "
         "block handing a send to its I/O thread) and in the final collective that brings the loss from the last "
         "rank (*in loss bcast*; the later ranks wait there for rank 0's last backward), both from "
         "`LayerParallel.times` (`sends`, `loss_broadcast`).", "",
         *table(["model", "P", "schedule", "backend", "step", "compute", "wait", "other", "in isend", "in loss bcast"],
                [[e.model, f"{e.P}{STAR if e.oversubscribed else ''}", e.schedule, e.backend, ms(e.step_s),
                  per_rank(e, "compute_s"), per_rank(e, "wait_s"), per_rank(e, "other_s"), per_rank(e, "send_s"),
                  per_rank(e, "loss_broadcast_s")] for e in rows]), ""]
    for b, d in res.latency.items():
        L.append(f"* {b}: one-way message latency through `comm.send`/`comm.recv` (P = 2): " +
                 ", ".join(f"{k / 1024:.0f} KiB {1e6 * v:.0f} µs" for k, v in d.items()) + ".")
    if res.serial and res.serial.dispatch_s:
        L.append(f"* One tiny eager op (torch.add on 1-element tensors): {1e6 * res.serial.dispatch_s:.1f} µs.")
    for name, m in (res.serial.models.items() if res.serial else []):
        if m.block_profile:
            L.append(f"* {name}: one residual block forward + backward per micro-batch size: " +
                     ", ".join(f"{b} rows {1e6 * v.fwd_bwd_s:.0f} µs ({v.gemm_gflops:.1f} GFLOP/s)"
                               for b, v in m.block_profile.items()) + ".")
    if res.failures:
        L += ["", "## Failed launches", ""] + [f"* {f.splitlines()[0]}" for f in res.failures]
    return L


def markdown(res: PipelineResults) -> list[str]:
    L = header(res)
    for name in res.config.models:
        L += model_section(res, name)
    return L + goals_section(res) + time_section(res)
