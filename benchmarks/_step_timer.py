"""Timing of the training steps alone (GD steps or V-cycles, without validation) for benchmarks."""
from __future__ import annotations

import contextlib
import time


@contextlib.contextmanager
def step_timer(calls: list):
    """Record (cost of the trained level = depth / K, seconds) of every GD step (V-cycle call)."""
    from parml.multilevel.mgopt import VCycle
    original = VCycle.__call__

    def timed(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return original(self, *a, **k)
        finally:
            calls.append((self.levels[-1].cost, time.perf_counter() - t0))

    VCycle.__call__ = timed
    try:
        yield calls
    finally:
        VCycle.__call__ = original
