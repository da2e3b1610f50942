"""The rank code of the mesh study (a harness entry): every layout of the launch's size on every
workload, interleaved in short rounds, then circles' V-cycle trained to the target per layout.

A step is timed inside the run: ``build_vcycle`` (as ``parml train`` builds it) and its calls, with
wall and CPU seconds and the seconds blocked in every communicator the rank holds; the (1, 1)
layout runs on rank 0 alone (a ``SelfComm``) while the others wait in a barrier. Every layout is
built once per workload and their steps interleave in short rounds (``measure``), in an order
rotated every repeat, so a slow spell of the machine (the cache and memory are shared with whatever
else runs on the host) falls on all layouts alike instead of on one layout's steps. Rank 0 gathers
every rank's rows and emits one ``Sample`` per (workload, layout, repeat).
"""
from __future__ import annotations

import os
import time

from parml.comm import SelfComm
from parml.config import TrainConfig
from parml.data import batches, load_dataset
from parml.reproduce.paper import TASK_SETUP
from parml.training.build import build_vcycle

from ..harness import timed_train
from .records import Layout, MeshJob, Sample, StepRow, Target

#: name -> (the paper's task setup, levels): one GD step, the default V-cycle, multilevel SGD
WORKLOADS = {"circles-gd": ("circles", 1), "circles-vcycle": ("circles", TrainConfig().levels),
             "mnist-sgd": ("mnist", TrainConfig().levels)}


def config(name: str, job: MeshJob, lay: Layout, **over) -> TrainConfig:
    task, levels = WORKLOADS[name]
    s = TASK_SETUP[task]
    return TrainConfig(**{"dataset": s["dataset"], "width": s["width"], "lr": s["lr"], "beta": s["beta"],
                          "batch_size": s["batch_size"], "levels": levels, "blocks": job.blocks,
                          "data_parallel": lay.D, "coarse_layout": lay.coarse, "kernel": job.kernel,
                          "data_dir": job.data_dir if task == "mnist" else None, "progress": False,
                          "target_accuracy": None,
                          **({} if lay.min_blocks is None else {"min_blocks_per_rank": lay.min_blocks}), **over})


def _batches(data, cfg: TrainConfig, count: int) -> list:
    """`count` (batch, batch id) pairs: the full batch, or the epoch's mini-batches in turn."""
    if cfg.batch_size is None:
        return [((data.x_train, data.y_train), 0)] * count
    out, epoch = [], 0
    while len(out) < count:
        for i, idx in enumerate(batches(data.x_train.shape[0], cfg.batch_size, cfg.seed, epoch)):
            out.append(((data.x_train[idx], data.y_train[idx]), (epoch, i)))
        epoch += 1
    return out[:count]


def _step(run, batch, bid) -> StepRow:
    """One timed V-cycle (GD step) on this rank: `run` is (vcycle, its communicators)."""
    vcycle, comms = run
    w0, c0, t0 = sum(c.wait_seconds for c in comms), time.process_time(), time.perf_counter()
    res = vcycle(batch, bid)
    wall = time.perf_counter() - t0
    return StepRow(wall, time.process_time() - c0, sum(c.wait_seconds for c in comms) - w0,
                   list(res.level_seconds), os.getloadavg()[0])


def _built(cfg: TrainConfig, data):
    def build(c):
        vcycle = build_vcycle(cfg, data, c)
        return vcycle, vcycle.groups.communicators()
    return build


def on_layout(comm, lay: Layout, run):
    """`run(c)` on the layout's communicator: the whole launch, or (1, 1) on rank 0 alone (the
    others wait in a barrier; their result is None)."""
    if lay.D * lay.P == comm.size:
        return run(comm)
    result = run(SelfComm(timeout=comm.timeout, device=comm.device)) if comm.rank == 0 else None
    comm.barrier()     # the ranks outside slept here, polling every ~1 ms: they leave up to 1 ms late
    comm.barrier()     # so meet once more, all awake, and start the next step together
    return result


def rotated(layouts: list, rep: int) -> list:
    k = rep % len(layouts)
    return layouts[k:] + layouts[:k]


#: timed steps of one layout in a row; each run of them follows one untimed step of the same layout
BLOCK = 5


def measure(comm, job: MeshJob, name: str, data) -> dict:
    """Every layout of `job` on workload `name`: built once, `job.warm` untimed steps each, then
    per repeat ``job.steps[name]`` timed steps of each, in rounds: a round runs every layout, in
    the order ``rotated`` for the repeat, for one untimed step and up to ``BLOCK`` timed ones on
    the same batches for all. The untimed step brings the layout's buffers back into the cache
    after the other layouts, as its previous cycle would in a training run; short rounds spread a
    slow spell of the host over all layouts. {(layout index, repeat): rows of this rank (None
    where it is not in the layout)}."""
    cfgs = [config(name, job, lay) for lay in job.layouts]
    runs = [on_layout(comm, lay, _built(cfg, data)) for lay, cfg in zip(job.layouts, cfgs)]
    steps = job.steps[name]
    plan = _batches(data, cfgs[0], job.warm + job.repeats * steps)
    rows = {(k, rep): [] for k in range(len(runs)) for rep in range(job.repeats)}

    def one(k, batch, bid):
        return on_layout(comm, job.layouts[k], lambda c: _step(runs[k], batch, bid))

    for batch, bid in plan[:job.warm]:
        for k in range(len(runs)):
            one(k, batch, bid)
    for rep in range(job.repeats):
        order = rotated(list(range(len(runs))), rep)
        mine = plan[job.warm + rep * steps: job.warm + (rep + 1) * steps]
        for block in (mine[i:i + BLOCK] for i in range(0, steps, BLOCK)):
            for k in order:
                one(k, *block[0])                        # untimed: this layout's buffers back in cache
                for batch, bid in block:
                    row = one(k, batch, bid)
                    if row is not None:
                        rows[(k, rep)].append(row)
    return {key: (r or None) for key, r in rows.items()}


def to_target(comm, cfg: TrainConfig, data, world: int, lay: Layout, rep: int) -> Target | None:
    """Train to validation accuracy 1.0 (at most cfg.max_cycles cycles); rank 0's record."""
    run, _, _ = timed_train(cfg, comm, data)
    if comm.rank != 0:
        return None
    return Target(world, lay, rep, run.seconds, run.train_s, run.cycles, run.reached_target, run.val_acc,
                  os.getloadavg()[0])


def run_launch(job: MeshJob, comm, emit) -> None:
    datas: dict = {}
    for name in job.workloads:
        cfg = config(name, job, job.layouts[0])
        datas[name] = load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed, flatten=True)
        if comm.rank == 0:
            print(f"[{comm.size} ranks] {name}: {len(job.layouts)} layouts in rounds, "
                  f"{job.repeats} x {job.steps[name]} steps each", flush=True)
        gathered = comm.allgather_object(measure(comm, job, name, datas[name]))
        if comm.rank != 0:
            continue
        for rep in range(job.repeats):
            for k in rotated(list(range(len(job.layouts))), rep):
                lay = job.layouts[k]
                ranks = [mine[(k, rep)] for mine in gathered]
                emit(Sample(comm.size, name, lay, rep, ranks))
                print(f"[{comm.size} ranks] {name:14s} {lay.shape} {lay.label:14s} repeat {rep}: "
                      f"{1e3 * min(r.wall for r in ranks[0]):.1f} ms/step (fastest)", flush=True)
    if not job.target_runs:
        return
    data = datas["circles-vcycle"] if "circles-vcycle" in datas else load_dataset("circles", None, seed=0, flatten=True)
    for rep in range(job.repeats):
        for lay in rotated(job.layouts, rep):
            run_name = f"t{rep}-{lay.D}x{lay.P}-{lay.coarse}{lay.min_blocks or ''}-{comm.size}"
            cfg = config("circles-vcycle", job, lay, target_accuracy=1.0, max_cycles=job.max_cycles,
                         out=job.runs_dir, run_name=run_name, overwrite=True)
            t = on_layout(comm, lay, lambda c: to_target(c, cfg, data, comm.size, lay, rep))
            if comm.rank == 0:
                emit(t)
                print(f"[{comm.size} ranks] to val acc 1.0 {lay.shape} {lay.label:14s} repeat {rep}: "
                      f"{t.seconds:.2f} s, {t.cycles} cycles{'' if t.reached else ' (not reached)'}", flush=True)
