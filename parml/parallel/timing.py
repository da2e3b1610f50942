"""Step, compute and wait times that mean the same on CPU and on CUDA.

On CPU an interval is host wall time. On CUDA the host only queues kernels (and NCCL's waits are
stream waits), so host timers would measure launch time: there an interval is a pair of CUDA
events on the current stream, resolved into seconds after the step's ``synchronize`` — compute is
the device time of the kernels, wait the time the stream stalled on a receive or a send.
"""
from __future__ import annotations

import time

import torch


def synchronize(device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so that a host clock sees device time."""
    device = device if isinstance(device, torch.device) else torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageTimer:
    """``t = start(); ...; seconds = stop(t, bucket)``.

    CPU: ``stop`` returns the elapsed seconds. CUDA: ``stop`` records an event and returns 0.0; the
    seconds per bucket come from ``collect()`` once the device was synchronized."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self._pending: list = []

    def start(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, start, bucket: str) -> float:
        if not self.cuda:
            return time.perf_counter() - start
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._pending.append((bucket, start, end))
        return 0.0

    def collect(self) -> dict:
        """Seconds per bucket of the intervals recorded since the last call (CUDA; {} on CPU)."""
        out: dict = {}
        for bucket, a, b in self._pending:
            out[bucket] = out.get(bucket, 0.0) + a.elapsed_time(b) / 1e3
        self._pending.clear()
        return out
