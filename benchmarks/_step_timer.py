"""Timing of the training steps alone (GD steps or V-cycles, without validation) for benchmarks.

On CUDA each step is bracketed by ``torch.cuda.synchronize`` (a no-op on CPU), so the times are
device times rather than kernel-launch times."""
from __future__ import annotations

import contextlib
import time


@contextlib.contextmanager
def step_timer(calls: list):
    """Record (cost of the trained level = depth / K, seconds) of every GD step (V-cycle call)."""
    from parml.multilevel.mgopt import VCycle
    from parml.parallel.timing import synchronize
    original = VCycle.__call__

    def timed(self, *a, **k):
        finest = self.levels[-1]
        device = finest.executor.device if finest is not None else "cpu"
        synchronize(device)                 # CUDA: device time of the step, not launch time
        t0 = time.perf_counter()
        try:
            return original(self, *a, **k)
        finally:
            synchronize(device)
            calls.append((self.levels[-1].cost, time.perf_counter() - t0))

    VCycle.__call__ = timed
    try:
        yield calls
    finally:
        VCycle.__call__ = original
