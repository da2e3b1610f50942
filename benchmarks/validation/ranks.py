"""The rank code of the plan validation (a harness entry): every configuration of the launch.

Every rank builds the configuration's training run with parml's own ``build_vcycle`` (L = 1: one
GD step; L = 8: one V-cycle; D > 1: the data x layer mesh, as ``parml train`` runs it), warms up,
then times the calls. A step's time is the slowest rank's, after a barrier.

The machine is shared: before every timed step all ranks spin for a moment and record the share
of a core they got; the background load (other busy processes competing for the cores) follows
as B = cores / share - ranks (``analyse.background``), and the prediction uses it.
"""
from __future__ import annotations

import os
import statistics
import time

import torch

from parml.config import TrainConfig
from parml.data import Dataset, load_dataset
from parml.training.build import build_vcycle

from .records import Case, Conf, Measured, ValJob


def case_data(case: Case, data_dir: str | None) -> tuple[Dataset, torch.Tensor, torch.Tensor]:
    """The dataset the run is built on and the batch every step uses."""
    if case.dataset == "random":
        g = torch.Generator().manual_seed(1234)
        x = torch.randn(case.batch, case.in_features, generator=g)
        y = torch.randint(0, case.classes, (case.batch,), generator=g)
        data = Dataset("random", x, y, x[:8], y[:8], case.classes, "classification", (case.in_features,))
    else:
        data = load_dataset(case.dataset, data_dir if case.dataset == "mnist" else None, seed=0)
    return data, data.x_train[:case.batch], data.y_train[:case.batch]


def config(case: Case, conf: Conf) -> TrainConfig:
    return TrainConfig(dataset="circles" if case.dataset == "random" else case.dataset, blocks=case.blocks,
                       width=case.width, levels=conf.levels, lr=case.lr, microbatches=conf.M,
                       schedule=conf.schedule, min_blocks_per_rank=conf.mbpr, data_parallel=conf.D,
                       coarse_layout=conf.coarse, progress=False)


def probe(comm, seconds: float = 0.08) -> float:
    """Every rank spins at once; the mean share of a core a rank got."""
    comm.barrier()
    t0, c0 = time.perf_counter(), time.thread_time()
    x = 0
    while time.perf_counter() - t0 < seconds:
        x += 1
    share = (time.thread_time() - c0) / (time.perf_counter() - t0)
    return statistics.mean(comm.allgather_object(share))


def run_config(case: Case, conf: Conf, comm, data, x, y) -> Measured:
    vc = build_vcycle(config(case, conf), data, comm)
    for i in range(conf.warmup):
        vc((x, y), batch_id=-1 - i)
    steps, cpus, shares, loads = [], [], [], []
    for i in range(conf.steps):
        shares.append(probe(comm))
        loads.append(os.getloadavg()[0])
        comm.barrier()
        t0, c0 = time.perf_counter(), time.thread_time()
        vc((x, y), batch_id=i)
        wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
        steps.append(max(comm.allgather_object(wall)))
        cpus.append(comm.allgather_object(cpu))
    return Measured(**vars(conf), world=comm.size, step_s=statistics.median(steps), steps_s=steps, cpu_s=cpus,
                    share=shares, loadavg=loads)


def run_configs(job: ValJob, comm, emit) -> None:
    cache: dict = {}
    for conf in job.configs:
        case = job.cases[conf.case]
        if conf.case not in cache:
            cache = {conf.case: case_data(case, job.data_dir)}      # one case's data at a time
        t0 = time.perf_counter()
        m = run_config(case, conf, comm, *cache[conf.case])
        if comm.rank == 0:
            emit(m)
            print(f"[{comm.size}] {conf.case:9s} L={conf.levels} D={conf.D} P={comm.size // conf.D} M={conf.M} "
                  f"{conf.schedule:5s} mbpr={conf.mbpr:<3d} {conf.coarse:9s} step {1e3 * m.step_s:8.1f} ms  "
                  f"share {statistics.median(m.share):.2f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
