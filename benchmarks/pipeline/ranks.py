"""The rank code of the pipeline study (harness entries): the serial reference and the
layer-parallel launches.

Every rank builds the same full model (seed 0) and batch. A parallel launch times
``LayerParallel.forward_backward`` for every (model, schedule, M) and, alternating step by step in
the same processes, the inline-weight-gradient ablation and torch.distributed.pipelining on the
identical shard; a barrier precedes every step and a step's time is the slowest rank's. Per-rank
compute / wait / sends / loss broadcast come from ``LayerParallel.times``. Activation memory is
measured in one extra untimed step (``SavedTensorMeter``).
"""
from __future__ import annotations

import gc
import importlib
import os
from dataclasses import dataclass, field

import torch

from parml.kernels import attach_kernels
from parml.parallel.executor import LayerParallel
from parml.parallel.layout import partition_blocks
from parml.parallel.schedule import bubble_fraction

from ..harness import median
from .measure import (SavedTensorMeter, TorchPipe, block_profile, dispatch_cost, grad_diff, make_model, peak_saved,
                      ping_pong, serial_step, timed)
from .records import Entry, InlineRun, Latency, RankTimes, Serial, SerialModel, SerialStep, StepJob, TorchRun


def run_serial(job: StepJob, comm, emit) -> None:
    """One process, no messages: M micro-batches with gradient accumulation, per model and M."""
    device = comm.device
    cpu = device.type == "cpu"
    out = Serial(dispatch_s=dispatch_cost() if cpu else None)
    for name, m in job.models.items():
        model, x, y = make_model(m, device)
        attach_kernels(model, job.kernel)
        res = {}
        for M in job.microbatches:
            for _ in range(job.warmup):
                serial_step(model, x, y, M)
            ts, loss = [], None
            for _ in range(job.steps):
                dt, loss = timed(device, serial_step, model, x, y, M)
                ts.append(dt)
            with SavedTensorMeter(model.parameters()) as meter:
                serial_step(model, x, y, M)
            res[M] = SerialStep(median(ts), ts, loss, meter.peak)
            print(f"[serial] {name:8s} P=1 M={M:<2d} step {1e3 * median(ts):8.1f} ms  "
                  f"peak saved {meter.peak / 2**20:7.2f} MiB", flush=True)
        sizes = sorted({m.batch // M for M in job.microbatches} | {m.batch})
        out.models[name] = SerialModel(res, block_profile(m.width, sizes) if cpu else None)
    emit(out)


@dataclass
class _Sample:
    """One rank's measurements of one configuration (gathered on rank 0)."""
    rows: list = field(default_factory=list)      # (step, compute, wait, other, sends, loss broadcast)
    loss: float = float("nan")
    peak: int = 0
    blocks: tuple = (0, 0)
    itimes: list = field(default_factory=list)
    ipeak: int | None = None
    ttimes: list = field(default_factory=list)
    tloss: float | None = None
    tpeak: int | None = None
    gdiff: float | None = None
    kernels: list = field(default_factory=list)


def _torch_pipe(job, model, comm, blocks, schedule, M, device, unavailable):
    """(TorchPipe or None, why not)."""
    if not job.torch_pipelining or unavailable:
        return None, unavailable
    if schedule == "1f1b" and M < comm.size:
        return None, f"Schedule1F1B needs M >= P (M={M}, P={comm.size})"
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else comm.size
    if world != comm.size:       # a sub-mesh of a launcher's allocation: torch's stages span its world
        return None, f"torch pipelining runs on the whole allocation only (P={comm.size} of {world} ranks)"
    try:
        shard = model.shard(*blocks).to(device)
        attach_kernels(shard, job.kernel)      # the same dense-chunk kernel as parml: pipelining is compared
        return TorchPipe(shard, comm.rank, comm.size, schedule, M, device), None
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


def _measure(job: StepJob, comm, model, x, y, schedule, M, blocks, unavailable):
    """Warm-up, then `job.steps` timed steps of parml (and the ablation and torch, alternating)."""
    device = comm.device
    lp = LayerParallel(model, comm, schedule=schedule, microbatches=M, kernel=job.kernel)
    ip = (LayerParallel(model, comm, schedule=schedule, microbatches=M, weight_grads="inline", kernel=job.kernel)
          if job.inline_ablation and job.backend != "mpi" else None)
    tp, why = _torch_pipe(job, model, comm, blocks, schedule, M, device, unavailable)
    s = _Sample(blocks=blocks, kernels=sorted({k.name for k in lp.kernels}))
    comm.barrier()
    for i in range(job.warmup + job.steps):
        comm.barrier()
        dt, s.loss = timed(device, lp.forward_backward, x, y)
        t = lp.times
        if i >= job.warmup:
            step = t.step if device.type == "cpu" else dt
            s.rows.append((step, t.compute, t.wait, max(step - t.compute - t.wait, 0.0), t.sends, t.loss_broadcast))
        if ip is not None:
            comm.barrier()
            dt, _ = timed(device, ip.forward_backward, x, y)
            if i >= job.warmup:
                s.itimes.append(ip.times.step if device.type == "cpu" else dt)
        if tp is not None:
            comm.barrier()
            dt = tp.step(x, y)
            if i >= job.warmup:
                s.ttimes.append(dt)
    s.gdiff = grad_diff(lp.model.parameters(), tp.shard.parameters()) if tp is not None else None
    s.peak = peak_saved(comm, lp.model.parameters(), lp.forward_backward, x, y)
    # deferred weight gradients keep a micro-batch's states until its weight gradients are formed,
    # right after its backward, plus one micro-batch's adjoints: count them too
    s.peak = max(s.peak, lp.stage.deferred.peak_bytes if lp.stage.deferred is not None else 0)
    s.ipeak = peak_saved(comm, ip.model.parameters(), ip.forward_backward, x, y) if ip is not None else None
    if tp is not None:
        s.tpeak, s.tloss = peak_saved(comm, tp.shard.parameters(), tp.step, x, y), tp.loss
    return s, why


def run_parallel(job: StepJob, comm, emit) -> None:
    """Every (model, schedule, M) on this launch's ranks; rank 0 emits an ``Entry`` per configuration."""
    device = comm.device
    # a rank of its own per core (CPU) or per GPU; else ranks time-slice and bubbles fill up
    units = torch.cuda.device_count() if device.type == "cuda" else (os.cpu_count() or 1)
    unavailable = None
    if job.torch_pipelining:
        try:
            importlib.import_module("torch.distributed.pipelining")
        except Exception as exc:  # pragma: no cover - depends on the torch build
            unavailable = f"import failed: {exc}"
    for name, m in job.models.items():
        model, x, y = make_model(m, device)
        blocks = partition_blocks(model.spec.total_blocks, comm.size).range(comm.rank)
        for schedule in job.schedules:
            for M in job.microbatches:
                sample, why = _measure(job, comm, model, x, y, schedule, M, blocks, unavailable)
                gathered = comm.allgather_object(sample)
                if comm.rank == 0:
                    e = summarize(name, m.batch, job.backend, comm.size, schedule, M, gathered, why,
                                  oversubscribed=comm.size > units)
                    emit(e)
                    print(progress_line(e), flush=True)
                gc.collect()  # drop the schedule's cycles while the process group is alive
    if comm.size == 2 and job.latency_bytes:
        lat = ping_pong(comm, job.latency_bytes, job.latency_reps)
        if comm.rank == 0:
            emit(Latency(job.backend, lat))
            print(f"[{job.backend}] P=2 one-way latency (comm.send/recv): " +
                  ", ".join(f"{k} B {1e6 * v:.0f} us" for k, v in lat.items()), flush=True)
    comm.barrier()


def summarize(name, batch, backend, P, schedule, M, allr: list[_Sample], why, oversubscribed=False) -> Entry:
    """The configuration's entry from every rank's sample: a step's time is the slowest rank's."""
    steps = len(allr[0].rows)
    step_each = [max(r.rows[i][0] for r in allr) for i in range(steps)]
    step = median(step_each)
    per_rank = [RankTimes(*(median(t[k] for t in r.rows) for k in range(4)), min(t[0] for t in r.rows), r.peak,
                          list(r.blocks), median(t[4] for t in r.rows), median(t[5] for t in r.rows), r.tpeak)
                for r in allr]
    busiest = max(p.compute_s for p in per_rank)
    bound = 1 - bubble_fraction(P, M)        # M / (M + P - 1)
    e = Entry(name, backend, P, M, schedule, oversubscribed, step, min(step_each), step_each, per_rank, busiest,
              busiest / step, bound, busiest / step / bound, batch / step, allr[-1].loss,
              max(p.peak_saved_bytes for p in per_rank), kernels=allr[0].kernels)
    if allr[0].itimes:
        i_each = [max(r.itimes[i] for r in allr) for i in range(steps)]
        e.inline = InlineRun(median(i_each), i_each, median(i / p for i, p in zip(i_each, step_each)),
                             max(r.ipeak for r in allr))
    if allr[0].ttimes:
        t_each = [max(r.ttimes[i] for r in allr) for i in range(steps)]
        e.torch = TorchRun(median(t_each), min(t_each), t_each, allr[-1].tloss,
                           abs(allr[-1].tloss - allr[-1].loss), max(r.gdiff for r in allr),
                           max(r.tpeak for r in allr), median(t_each) / step,
                           median(t / p for t, p in zip(t_each, step_each)))
    elif why:
        e.torch = TorchRun(error=why)
    return e


def progress_line(e: Entry) -> str:
    ranks = " ".join(f"{1e3 * p.compute_s:.0f}/{1e3 * p.wait_s:.0f}/{1e3 * p.other_s:.0f}" for p in e.per_rank)
    s = (f"[{e.backend}] {e.model:8s} P={e.P}{'*' if e.oversubscribed else ' '} "
         f"M={e.M:<2d} {e.schedule:5s} step {1e3 * e.step_s:8.1f} ms  eff {e.efficiency:.3f} "
         f"(bound {e.bound:.3f}, ratio {e.eff_over_bound:.2f})  c/w/o ms {ranks}")
    if e.inline:
        s += f"  | inline-W {1e3 * e.inline.step_s:.1f} ms"
    if e.torch and e.torch.step_s is not None:
        s += f"  | torch {1e3 * e.torch.step_s:8.1f} ms, parml/torch {e.torch.parml_over_torch_throughput:.2f}x"
    elif e.torch:
        s += "  | torch n/a"
    return s
