"""The rank code of the MG/OPT study (a harness entry): one launch runs every run of its world
size in turn, timing each through ``train``'s ``around_cycle`` hook and the levels' executors."""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import os

from parml.config import TrainConfig
from parml.data import load_dataset
from parml.parallel.schedule import bubble_fraction
from parml.training.loop import TrainingError
from parml.training.trainer import train

from ..harness import Curve, CycleTimer, timed_train
from .records import LevelEfficiency, LevelTimes, MgJob, MgRun, RankStats, RunSpec


def _config(spec: RunSpec, job: MgJob, comm, **over) -> TrainConfig:
    fields = dict(dataset=spec.dataset, data_dir=job.data_dir, blocks=spec.blocks, width=spec.width,
                  levels=spec.levels, cycle=spec.cycle, lr=spec.lr, beta=spec.beta, metric=spec.metric,
                  batch_size=spec.batch_size, seed=spec.seed, target_accuracy=spec.target_accuracy,
                  max_cycles=spec.max_cycles, eval_every=spec.eval_every, microbatches=spec.microbatches,
                  min_blocks_per_rank=spec.min_blocks_per_rank, out=job.runs_dir, run_name=spec.key,
                  backend=job.backend, comm_timeout=job.comm_timeout, progress=False, overwrite=True,
                  kernel=spec.kernel)
    return TrainConfig(**{**fields, **over})


def warm_up(job: MgJob, comm) -> None:
    """Untimed: the first training in a process pays one-off costs (lazy imports, first kernels,
    process-group setup) of a few seconds that would otherwise land on the first run."""
    first = {}
    for spec in job.runs:
        first.setdefault(spec.dataset, spec)
    for name, spec in first.items():
        data = load_dataset(name, job.data_dir, seed=spec.seed)
        for levels in (1, 8):
            cfg = _config(spec, job, comm, blocks=128, levels=levels, cycle=None, target_accuracy=None, max_cycles=2,
                          eval_every=1, min_blocks_per_rank=16, out=os.path.join(job.runs_dir, "warm-up"),
                          run_name=f"{name}-L{levels}-P{comm.size}")
            with contextlib.redirect_stdout(io.StringIO()):
                train(cfg, comm, data)


def run_launch(job: MgJob, comm, emit) -> None:
    warm_up(job, comm)
    cache = {}
    for spec in job.runs:
        key = (spec.dataset, spec.seed)
        if key not in cache:
            cache[key] = load_dataset(spec.dataset, job.data_dir, seed=spec.seed)
        gc.collect()
        comm.barrier()
        run = one_run(spec, _config(spec, job, comm), comm, cache[key])
        if comm.rank == 0:
            emit(run)
            print(progress_line(run), flush=True)


def one_run(spec: RunSpec, cfg: TrainConfig, comm, data) -> MgRun | None:
    """Train one run; rank 0 returns its record with every rank's times."""
    extra = {f.name: getattr(spec, f.name) for f in dataclasses.fields(RunSpec)}
    run, levels, timer = None, [], CycleTimer(comm)
    try:
        run, levels, timer = timed_train(cfg, comm, data, kind=MgRun, world=comm, backend=comm.backend,
                                         curve=lambda folder: Curve.read(folder, phases=("train",)), **extra)
    except TrainingError as e:           # raised on every rank together (non-finite loss)
        run = MgRun(**extra, status="diverged", error=str(e), backend=comm.backend) if comm.rank == 0 else None
    per_level = [None if lev is None else
                 LevelTimes(lev.executor.comm.size, lev.stats.gradients, lev.executor.total.step,
                            lev.executor.total.compute, lev.executor.total.wait, lev.stats.seconds, lev.stats.gradients)
                 for lev in levels]
    mine = RankStats(comm.rank, timer.seconds, len(timer.cycles), 0.0, 0.0, 0.0, timer.comm_wait_s, 0.0, per_level)
    gathered = comm.allgather_object(mine)
    if comm.rank != 0 or run.status == "diverged":
        return run
    if not run.reached_target:
        run.status = "budget"
    _parallel_stats(run, gathered, spec.microbatches)
    return run


def _parallel_stats(run: MgRun, gathered: list[RankStats], M: int) -> None:
    """Per rank compute / wait from the levels; efficiency = busiest compute / slowest training time."""
    for g in gathered:
        levs = [lv for lv in g.levels if lv is not None]
        g.compute_s, g.wait_s = sum(lv.compute_s for lv in levs), sum(lv.wait_s for lv in levs)
        g.other_s = max(g.train_s - g.compute_s - g.wait_s, 0.0)
        g.rest_s = max(g.train_s - g.compute_s - g.comm_wait_s, 0.0)
    wall = max(g.train_s for g in gathered)
    run.per_rank, run.train_s = gathered, wall
    run.busiest_compute_s = max(g.compute_s for g in gathered)
    run.efficiency = run.busiest_compute_s / wall if wall > 0 else None
    run.bound = 1 - bubble_fraction(len(gathered), M)
    run.level_efficiency = []
    for i in range(len(gathered[0].levels)):         # coarsest first
        have = [g.levels[i] for g in gathered if g.levels[i] is not None]
        fb = max(lv.fb_s for lv in have)
        run.level_efficiency.append(LevelEfficiency(
            have[0].ranks, fb, [g.levels[i].compute_s if g.levels[i] else 0.0 for g in gathered],
            [g.levels[i].wait_s if g.levels[i] else 0.0 for g in gathered],
            max(lv.compute_s for lv in have) / fb if fb > 0 else None))


def progress_line(r: MgRun) -> str:
    head = (f"[P={r.P} {r.backend}] {r.dataset:7s} K={r.blocks} L={r.levels} seed {r.seed}"
            f"{' min-blocks 1' if r.variant == 'min1' else ''}:")
    if r.status == "diverged":
        return f"{head} {r.status}: {r.error}"
    return (f"{head} {r.status:7s} {r.cycles:5d} cycles {r.work_units:8.1f} U  {r.seconds:7.1f} s "
            f"(train {r.train_s:6.1f} s)  val acc {r.val_acc:.4f}  eff {r.efficiency:.3f}")
