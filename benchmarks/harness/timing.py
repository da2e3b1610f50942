"""Timing through the training loop's hook: ``train(..., around_cycle=CycleTimer(world))``.

On CUDA each call is bracketed by ``torch.cuda.synchronize`` (a no-op on CPU), so the times are
device times rather than kernel-launch times."""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass

from parml.parallel.timing import synchronize


def median(xs) -> float:
    xs = list(xs)
    return float(statistics.median(xs)) if xs else float("nan")


@dataclass
class CycleTime:
    """One V-cycle (GD step) call on this rank."""
    cost: float          # work units of one gradient of the trained level (its depth / K)
    seconds: float
    comm_wait_s: float   # blocked in communication during the call (world and level groups)


class CycleTimer:
    """The `around_cycle` hook of ``parml.training.trainer.train``: records every V-cycle / GD-step
    call (cascade stages included) with the time blocked in the world's and the levels'
    communicators during it. `world`: the run's communicator (None: the levels' only)."""

    def __init__(self, world=None):
        self.world = world
        self.cycles: list[CycleTime] = []

    @contextlib.contextmanager
    def __call__(self, vcycle):
        comms = [self.world] + [lev.executor.comm for lev in vcycle.levels if lev is not None]
        comms = list({id(c): c for c in comms if c is not None}.values())
        finest = vcycle.levels[-1]
        device = finest.executor.device if finest is not None else "cpu"
        synchronize(device)                 # CUDA: device time of the call, not launch time
        w0 = sum(c.wait_seconds for c in comms)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            synchronize(device)
            seconds = time.perf_counter() - t0
            self.cycles.append(CycleTime(vcycle.levels[-1].cost, seconds,
                                         sum(c.wait_seconds for c in comms) - w0))

    @property
    def seconds(self) -> float:
        return sum(c.seconds for c in self.cycles)

    @property
    def comm_wait_s(self) -> float:
        return sum(c.comm_wait_s for c in self.cycles)

    def by_depth(self, blocks: int) -> dict[int, list[float]]:
        """Seconds of each call grouped by the trained depth (cost x the full depth `blocks`)."""
        out: dict[int, list[float]] = {}
        for c in self.cycles:
            out.setdefault(round(c.cost * blocks), []).append(c.seconds)
        return dict(sorted(out.items()))
