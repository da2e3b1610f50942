"""Predictions: one GD step and one V-cycle of a workload on a layout, per rank and per level.

A V-cycle is its recorded level sequence (``vcycle.cycle_trace``) with each event a simulated
phase (``programs``): gradient evaluations and updates on that level's layout, moves between two
levels' layouts. Phases shared by several events or candidates are simulated once (``cache``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..parallel.layout import LayoutError
from ..parallel.schedule import get_schedule
from .costs import DTYPE_BYTES, OPTIMIZER_STATES, Layout, LevelLayout, Workload, level_layouts, shard_parameters
from .engine import Run
from .profile import Profile
from .programs import Context, PhaseResult, simulate_gradient, simulate_move, simulate_update
from .vcycle import cycle_trace


@dataclass
class RankStats:
    """Seconds of one layer rank (replica 0; replicas are identical) over a step or cycle."""
    rank: int
    compute: float = 0.0      # F + B + W + bookkeeping
    wait: float = 0.0         # blocked on a message, a collective's slower members, or the all-reduce
    comm: float = 0.0         # collective cost, message posting and receiving
    idle: float = 0.0         # done, or outside the level's ranks, until the phase ends

    @property
    def total(self):
        return self.compute + self.wait + self.comm + self.idle

    def to_dict(self):
        return {"rank": self.rank, "compute": self.compute, "wait": self.wait, "comm": self.comm,
                "idle": self.idle, "bubble": 1.0 - self.compute / self.total if self.total > 0 else 0.0}


@dataclass
class Prediction:
    layout: Layout
    step_seconds: float                 # one GD step on the finest level (gradient + update)
    cycle_seconds: float                # one V-cycle (= step_seconds for L = 1)
    work_units: float                   # of the V-cycle (eq. 10)
    level_seconds: list                 # per level of the cycle, coarsest first
    step_ranks: list                    # RankStats per layer rank for the GD step
    cycle_ranks: list                   # RankStats per world rank of one fine replica for the cycle
    bubble: float                       # 1 - mean compute / step, GD step
    activation_bytes: list              # peak per layer rank of fine replica 0, over every level's gradient
    memory_bytes: list                  # parameters, gradients, optimizer state, activations (all levels held)
    allreduce: dict                     # gradient all-reduce of the GD step: seconds, exposed, overlap
    levels: list                        # per level: blocks, layer ranks, replicas
    step_run: Run | None = None

    def to_dict(self):
        return {"step_seconds": self.step_seconds, "cycle_seconds": self.cycle_seconds,
                "work_units": self.work_units, "level_seconds": self.level_seconds, "bubble": self.bubble,
                "step_ranks": [r.to_dict() for r in self.step_ranks],
                "cycle_ranks": [r.to_dict() for r in self.cycle_ranks],
                "activation_bytes": self.activation_bytes, "memory_bytes": self.memory_bytes,
                "allreduce": self.allreduce, "levels": self.levels}


class _Stats:
    """Seconds per world rank of one fine replica: compute, comm, wait, idle (rows of an array)."""

    def __init__(self, n: int):
        self.a = np.zeros((4, n))

    def add(self, phase: PhaseResult, idx: np.ndarray, end: float) -> None:
        """Add one phase: world rank r takes the totals of the phase's rank idx[r] (-1: not in
        the phase, idle until it ends)."""
        tot = phase.totals()
        ok = idx >= 0
        self.a[:, ok] += tot[:, idx[ok]]
        self.a[3, ok] += end - phase.run.end
        self.a[3, ~ok] += end

    def ranks(self) -> list:
        c, m, w, i = (self.a[k].tolist() for k in range(4))
        return [RankStats(r, c[r], w[r], m[r], i[r]) for r in range(self.a.shape[1])]


class _Phases:
    """The simulated phases of one prediction, shared through `memo` with other candidates."""

    def __init__(self, work: Workload, layout: Layout, ctx: Context, levs: list, memo: dict, record: bool):
        self.work, self.layout, self.ctx, self.levs, self.memo, self.record = work, layout, ctx, levs, memo, record
        self.machine = (layout.backend, ctx.ranks_per_node, ctx.world, ctx.background, work.dtype)
        self.common = (layout.microbatches, layout.schedule, layout.weight_grads) + self.machine
        self.world = range(layout.layer_ranks)     # world ranks of fine replica 0
        self._index: dict = {}

    @staticmethod
    def where(lev: LevelLayout):
        return (lev.level, lev.partition.bounds, lev.replicas, lev.stride, lev.redundant)

    def _get(self, key, make):
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]

    def grad(self, lev) -> PhaseResult:
        return self._get(("grad", self.where(lev), self.common),
                         lambda: simulate_gradient(lev, self.work, self.layout, self.ctx, record=self.record))

    def update(self, lev) -> PhaseResult:
        return self._get(("update", self.where(lev), self.machine), lambda: simulate_update(lev, self.ctx))

    def move(self, i, down) -> PhaseResult:
        levs = self.levs
        return self._get(("move", self.where(levs[i]), self.where(levs[i - 1]), down, self.machine),
                         lambda: simulate_move(levs[i], levs[i - 1], self.ctx, DTYPE_BYTES[self.work.dtype],
                                               down, self.world))

    def level_index(self, lev) -> np.ndarray:
        """Per world rank of fine replica 0: the layer rank of `lev`'s replica 0 that stands for it
        (replicas run the same program), or -1 outside the level's ranks."""
        if lev.level not in self._index:
            d, j = np.divmod(np.arange(len(self.world)), lev.stride)
            self._index[lev.level] = np.where((j < lev.ranks) & (d < lev.replicas), j, -1)
        return self._index[lev.level]

    def world_index(self, phase: PhaseResult) -> np.ndarray:
        """Per world rank of fine replica 0: its index in a move's ranks, or -1."""
        where = {r: i for i, r in enumerate(phase.ranks)}
        return np.array([where.get(r, -1) for r in self.world], dtype=np.int64)


def _cycle(ph: _Phases, events) -> tuple[float, list, dict]:
    """Replay the recorded V-cycle: (seconds, per-level seconds, per-rank stats)."""
    level_seconds = [0.0] * ph.work.levels
    stats = _Stats(len(ph.world))
    total = 0.0
    for kind, level in events:
        lev = ph.levs[level - 1]
        if kind == "grad":
            phase = ph.grad(lev)
        elif kind == "update":
            phase = ph.update(lev)
        elif kind == "assign":     # restriction from level+1 and the move down
            phase = ph.move(level, True)
        else:                      # "add": the correction from level-1 moves up
            phase = ph.move(level - 1, False)
        stats.add(phase, ph.level_index(lev) if kind in ("grad", "update") else ph.world_index(phase), phase.seconds)
        level_seconds[level - 1] += phase.seconds
        total += phase.seconds
    return total, level_seconds, stats


def predict(work: Workload, layout: Layout, profile: Profile, keep_run: bool = False,
            cache: dict | None = None) -> Prediction:
    """Simulate one GD step on the finest level and one V-cycle of `work` on `layout`.
    `cache`: a dict shared by predictions of the same workload and profile (the planner's), so
    that a level phase shared by several candidates is simulated once."""
    get_schedule(layout.schedule)      # unknown names fail here; registered extras are fine
    D, P = layout.data_parallel, layout.layer_ranks
    if D < 1 or P < 1:
        raise LayoutError(f"--data-parallel {D} and layer ranks {P} must be at least 1")
    if D * P > 1:
        profile.backend(layout.backend)
    ctx = Context(profile, layout.backend, D * P, layout.ranks_per_node or profile.cores, layout.background)
    levs = level_layouts(work, layout)
    ph = _Phases(work, layout, ctx, levs, {} if cache is None or keep_run else cache, keep_run)
    g, u = ph.grad(levs[-1]), ph.update(levs[-1])
    step_stats = _Stats(P)
    every = np.arange(P)
    step_stats.add(g, every, g.seconds)
    step_stats.add(u, every, u.seconds)
    step = g.seconds + u.seconds
    events, wu = cycle_trace(str(work.setup))
    total, level_seconds, cycle_stats = _cycle(ph, events)
    bubble = 1.0 - float(step_stats.a[0].sum()) / (P * step) if step > 0 else 0.0
    acts = [g.activation_bytes[j] for j in range(P)]
    for lev in levs[:-1]:       # a coarse level can hold more: a redundant one runs the whole batch
        peaks = ph.grad(lev).activation_bytes
        for r, j in enumerate(ph.level_index(lev)):
            if j >= 0:
                acts[r] = max(acts[r], peaks[j])
    mem = _memory(levs, work, acts, DTYPE_BYTES[work.dtype], ph.world)
    return Prediction(layout, step, total, wu, level_seconds, step_stats.ranks(), cycle_stats.ranks(), bubble,
                      acts, mem, g.allreduce,
                      [{"level": lv.level, "blocks": lv.spec.total_blocks, "layer_ranks": lv.ranks,
                        "replicas": lv.replicas, "redundant": lv.redundant} for lv in levs],
                      g.run if keep_run else None)


def _memory(levs, work, acts, dbytes, world) -> list:
    """Bytes per world rank of one fine replica: every level's parameters, gradients, the Level's
    gradient copy and optimizer state; the largest peak activations of any level (`acts`)."""
    copies = 3 + OPTIMIZER_STATES.get(work.optimizer, 0)
    out = list(acts[:len(world)])
    for lev in levs:
        for r, j in lev.members(world):
            out[r] += copies * shard_parameters(lev.spec, *lev.partition.range(j)) * dbytes
    return out


def serial_prediction(work: Workload, profile: Profile, backend: str = "gloo", schedule: str = "1f1b",
                      weight_grads: str = "auto") -> Prediction:
    """One rank, one micro-batch: the reference for efficiencies."""
    return predict(work, Layout(1, 1, 1, schedule, "gather", 1, weight_grads, backend), profile)
