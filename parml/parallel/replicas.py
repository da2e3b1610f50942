"""Data replicas of a layer rank: the gradients of its shard summed over its data group.

Every replica of a layer rank holds the same parameters and computes its share of each batch (its
micro-batches' losses are summed and divided by the full batch size), so the sum of the replicas'
gradients is the full batch's gradient. ``GradientReducer`` sums them in buckets of about
``bucket_bytes``, each started with a non-blocking all-reduce (``Communicator.iallreduce``) as soon
as its parameters' gradients are final — a chunk's at its last weight-gradient flush — so the
reduction overlaps the rest of the pipeline's tail (the earlier ranks' last backwards).
Every replica buckets the same parameters in the same order, so the all-reduces of a data group
line up (NCCL runs a communicator's collectives in posting order).
"""
from __future__ import annotations

import torch

BUCKET_BYTES = 4 << 20


class GradientReducer:
    """Sums ``.grad`` of the parameters handed to ``ready`` / ``flush`` over `comm` (a data group)."""

    def __init__(self, comm, bucket_bytes: int = BUCKET_BYTES):
        self.comm, self.bucket_bytes = comm, bucket_bytes
        self._open: list = []            # parameters waiting for their bucket to fill
        self._bytes = 0
        self._inflight: list = []        # (request, parameters, flat buffer)
        self._seen: set = set()
        self.buckets = 0                 # all-reduces started in the last step

    def ready(self, params) -> None:
        """These parameters' gradients are final for this step: bucket them, start full buckets."""
        for p in params:
            if id(p) in self._seen:
                continue
            self._seen.add(id(p))
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if self._open and p.grad.dtype != self._open[0].grad.dtype:
                self._start()
            self._open.append(p)
            self._bytes += p.grad.numel() * p.grad.element_size()
            if self._bytes >= self.bucket_bytes:
                self._start()

    def flush(self, params) -> None:
        """Every gradient of the step is final: bucket the rest of `params` and start it all."""
        self.ready(params)
        self._start()

    def _start(self) -> None:
        if not self._open:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in self._open])
        self._inflight.append((self.comm.iallreduce(flat), self._open, flat))
        self.buckets += 1
        self._open, self._bytes = [], 0

    def wait(self) -> None:
        """Finish every all-reduce and write the sums into ``.grad``."""
        for req, params, flat in self._inflight:
            req.wait()
            offset = 0
            for p in params:
                n = p.grad.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n
        self.discard()

    def discard(self) -> None:
        """Forget the step (after ``wait``, or a step that failed part-way)."""
        self._inflight, self._open, self._bytes = [], [], 0
        self._seen.clear()

    def begin(self) -> None:
        self.discard()
        self.buckets = 0
