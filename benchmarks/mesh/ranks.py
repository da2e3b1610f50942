"""The rank code of the mesh study (a harness entry): every layout of the launch's size on every
workload, in an order rotated each repeat, then circles' V-cycle trained to the target per layout.

A step is timed inside the run: ``build_vcycle`` (as ``parml train`` builds it) and its calls, with
wall and CPU seconds and the seconds blocked in every communicator the rank holds; the (1, 1)
layout runs on rank 0 alone (a ``SelfComm``) while the others wait in a barrier. Rank 0 gathers
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


def measure(comm, cfg: TrainConfig, data, steps: int, warm: int) -> list[StepRow]:
    """`warm` untimed, then `steps` timed V-cycle (GD step) calls on this rank."""
    vcycle = build_vcycle(cfg, data, comm)
    comms = vcycle.groups.communicators()
    rows = []
    for i, (batch, bid) in enumerate(_batches(data, cfg, warm + steps)):
        w0, c0, t0 = sum(c.wait_seconds for c in comms), time.process_time(), time.perf_counter()
        res = vcycle(batch, bid)
        wall = time.perf_counter() - t0
        if i >= warm:
            rows.append(StepRow(wall, time.process_time() - c0, sum(c.wait_seconds for c in comms) - w0,
                                list(res.level_seconds), os.getloadavg()[0]))
    return rows


def on_layout(comm, lay: Layout, run):
    """`run(c)` on the layout's communicator: the whole launch, or (1, 1) on rank 0 alone."""
    if lay.D * lay.P == comm.size:
        return run(comm)
    result = run(SelfComm(timeout=comm.timeout, device=comm.device)) if comm.rank == 0 else None
    comm.barrier()
    return result


def rotated(layouts: list, rep: int) -> list:
    k = rep % len(layouts)
    return layouts[k:] + layouts[:k]


def to_target(comm, cfg: TrainConfig, data, world: int, lay: Layout, rep: int) -> Target | None:
    """Train to validation accuracy 1.0 (at most cfg.max_cycles cycles); rank 0's record."""
    run, _, _ = timed_train(cfg, comm, data)
    if comm.rank != 0:
        return None
    return Target(world, lay, rep, run.seconds, run.train_s, run.cycles, run.reached_target, run.val_acc,
                  os.getloadavg()[0])


def run_launch(job: MeshJob, comm, emit) -> None:
    datas: dict = {}
    for rep in range(job.repeats):
        order = rotated(job.layouts, rep)
        for name in job.workloads:
            for lay in order:
                cfg = config(name, job, lay)
                if name not in datas:
                    datas[name] = load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed, flatten=True)
                rows = on_layout(comm, lay, lambda c: measure(c, cfg, datas[name], job.steps[name], job.warm))
                gathered = comm.allgather_object(rows)
                if comm.rank == 0:
                    emit(Sample(comm.size, name, lay, rep, gathered))
                    print(f"[{comm.size} ranks] {name:14s} {lay.shape} {lay.label:14s} repeat {rep}: "
                          f"{1e3 * min(r.wall for r in gathered[0]):.1f} ms/step (fastest)", flush=True)
        if not job.target_runs:
            continue
        if "circles-vcycle" not in datas:
            datas["circles-vcycle"] = load_dataset("circles", None, seed=0, flatten=True)
        data = datas["circles-vcycle"]
        for lay in order:
            run_name = f"t{rep}-{lay.D}x{lay.P}-{lay.coarse}{lay.min_blocks or ''}-{comm.size}"
            cfg = config("circles-vcycle", job, lay, target_accuracy=1.0, max_cycles=job.max_cycles,
                         out=job.runs_dir, run_name=run_name, overwrite=True)
            t = on_layout(comm, lay, lambda c: to_target(c, cfg, data, comm.size, lay, rep))
            if comm.rank == 0:
                emit(t)
                print(f"[{comm.size} ranks] to val acc 1.0 {lay.shape} {lay.label:14s} repeat {rep}: "
                      f"{t.seconds:.2f} s, {t.cycles} cycles{'' if t.reached else ' (not reached)'}", flush=True)
