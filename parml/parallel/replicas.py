"""Data replicas of a layer rank: the gradients of its shard summed over its data group.

Every replica of a layer rank holds the same parameters and computes its share of each batch (its
micro-batches' losses are summed and divided by the full batch size), so the sum of the replicas'
gradients is the full batch's gradient. ``GradientReducer`` sums them in buckets of about
``bucket_bytes``, each started with a non-blocking all-reduce (``Communicator.iallreduce``) as soon
as its parameters' gradients are final — a chunk's at its last weight-gradient flush — so the
reduction overlaps the rest of the pipeline's tail (the earlier ranks' last backwards).
Every replica buckets the same parameters in the same order, so the all-reduces of a data group
line up (NCCL runs a communicator's collectives in posting order). The last layer rank's share of
the loss rides in its last bucket (``flush(..., extra=loss)``): one all-reduce per step, not two.
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
        self._inflight: list = []        # (request, parameters, flat buffer, extra or None)
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

    def flush(self, params, extra: torch.Tensor | None = None) -> None:
        """Every gradient of the step is final: bucket the rest of `params` and start it all.
        `extra` (a 0-d tensor, e.g. the replica's loss) is summed in the last bucket, in that bucket's
        dtype, and written back by ``wait``."""
        self.ready(params)
        self._start(extra)

    def _start(self, extra: torch.Tensor | None = None) -> None:
        if not self._open and extra is None:
            return
        parts = [p.grad.reshape(-1) for p in self._open]
        if extra is not None:
            parts.append(extra.reshape(1).to(parts[0].dtype if parts else extra.dtype))
        flat = torch.cat(parts)
        self._inflight.append((self.comm.iallreduce(flat), self._open, flat, extra))
        self.buckets += 1
        self._open, self._bytes = [], 0

    def wait(self) -> None:
        """Finish every all-reduce and write the sums into ``.grad``."""
        for req, params, flat, extra in self._inflight:
            req.wait()
            offset = 0
            for p in params:
                n = p.grad.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n
            if extra is not None:
                extra.copy_(flat[-1])
        self.discard()

    def discard(self) -> None:
        """Forget the step (after ``wait``, or a step that failed part-way)."""
        self._inflight, self._open, self._bytes = [], [], 0
        self._seen.clear()

    def begin(self) -> None:
        self.discard()
        self.buckets = 0
