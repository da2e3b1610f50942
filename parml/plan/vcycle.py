"""The V-cycle's level sequence, recorded from the real ``mgopt.VCycle`` (Algorithm 1).

Stand-in levels log each gradient evaluation the engine computes (cache hits excluded), each
optimizer step and each transfer, so the simulated cycle's work units are eq. (10) by
construction of the engine, not of a formula.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from ..model import ModelSpec, StageSpec, build_model
from ..multilevel.mgopt import CycleSetup, Level, VCycle


class _Executor:
    """What a Level needs of its ranks, on one process: gradients are zeros, the call is logged."""
    rank = 0

    def __init__(self, model, number, log):
        self.model, self.number, self.log = model, number, log

    def allgather_object(self, obj):
        return [obj]

    def time_halos(self, tensors, mask, kind):
        return None, None

    def forward_backward_sum(self, x, y, local):
        self.log.append(("grad", self.number))
        for p in self.model.parameters():
            p.grad = torch.zeros_like(p)
        return 0.0, local()


class _Optimizer:
    def __init__(self, number, log):
        self.number, self.log, self.param_groups = number, log, []

    def step(self):
        self.log.append(("update", self.number))


class _TraceLevel(Level):
    def assign(self, values):
        self.executor.log.append(("assign", self.number))
        super().assign(values)

    def add(self, values):
        self.executor.log.append(("add", self.number))
        super().add(values)


@lru_cache(maxsize=64)
def cycle_trace(setup_text: str) -> tuple[tuple[tuple[str, int], ...], float]:
    """Events of one ``mgopt.VCycle`` call for the setup (paper notation): ("grad", l) per gradient
    evaluation the engine computes, ("update", l) per optimizer step, ("assign", l) when level l
    receives the restricted point (a move down), ("add", l) when level l adds the prolongated
    correction (a move up). Returns (events, work units)."""
    setup = CycleSetup.parse(setup_text)
    L = setup.levels
    log: list = []
    levels = []
    for i in range(L):
        blocks = 2 ** i
        model = build_model(ModelSpec(1, 2, (StageSpec(1, blocks),)), seed=0, dtype=torch.float64)
        levels.append(_TraceLevel(_Executor(model, i + 1, log), 0.0, 1.0, "euclidean", blocks / 2 ** (L - 1),
                                  lambda ps, n=i + 1: _Optimizer(n, log), number=i + 1))
    vc = VCycle(levels, setup)
    vc((torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.long)), 0)
    return tuple(log), vc.work_units
