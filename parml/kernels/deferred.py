"""The deferred weight-gradient sink of fused dense chunks (zero-bubble's backward / weight split)."""
from __future__ import annotations

import torch


class DeferredWeightGrads:
    """Weight gradients of fused dense Euler chunks, formed after the input adjoint was sent.

    A pipeline stage's backward only has to produce the input adjoint λ_a quickly (the previous
    rank waits for it); the parameter gradients ∂W_k = h Σ_m g_{a,k,m}ᵀ y_{k,m} are not on that
    path. The chunk's adjoint therefore stores (y_k, g_{a,k}) of micro-batch ``microbatch`` here,
    and ``flush(m)`` — run by the stage once λ_a of m is on its way — forms every block's gradient
    of m with one batched matmul per chunk, accumulated per chunk; ``finish`` writes the sums to
    ``.grad`` at the step's end. This is the backward/weight split of zero-bubble pipeline
    schedules (B sends, then W fills the time until the next message): K small matmuls become one
    batched one, and a micro-batch's states are released at its W, so 1F1B keeps its memory bound.
    """

    def __init__(self, waited: bool = True, kernels_choose: bool = False):
        self.microbatch = 0                    # set by the stage before each backward
        # `kernels_choose` (--weight-grads auto): each chunk's kernel decides whether deferring pays
        # (``Kernel.defers``), told whether a neighbour waits for the stage's input adjoints
        # (`waited`: not the first stage); otherwise every chunk defers
        self.waited, self.kernels_choose = waited, kernels_choose
        self._pending: dict[int, dict] = {}    # micro-batch -> {id(chunk): (chunk, ys, gas, h)}
        self._acc: dict[int, list] = {}        # id(chunk) -> [chunk, Σ gaᵀy, Σ ga, h] of this step
        self._free: dict[tuple, list] = {}     # buffers of flushed micro-batches, reused
        self._held = 0                         # bytes of the buffers handed out and not yet flushed
        self.peak_bytes = 0                    # most bytes ever handed out at once

    def buffer(self, like: torch.Tensor, blocks: int) -> torch.Tensor:
        """An uninitialised [blocks, *like.shape] buffer, recycled from a flushed micro-batch when
        one is free: fresh multi-MiB allocations cost a page fault per 4 KiB on every step."""
        key = ((blocks,) + tuple(like.shape), like.dtype, like.device)
        free = self._free.get(key)
        buf = free.pop() if free else like.new_empty(key[0])
        self._held += buf.nbytes
        self.peak_bytes = max(self.peak_bytes, self._held)
        return buf

    def add(self, chunk, ys, gas, h):
        items = self._pending.setdefault(self.microbatch, {})
        if id(chunk) in items:
            raise RuntimeError(f"chunk backpropagated twice for micro-batch {self.microbatch}")
        items[id(chunk)] = (chunk, ys, gas, h)

    def pending(self) -> int:
        """How many (chunk, micro-batch) gradients wait for ``flush``, plus sums waiting for ``finish``."""
        return sum(len(items) for items in self._pending.values()) + len(self._acc)

    def discard(self):
        """Drop what is stored (a step that failed part-way)."""
        self._pending.clear()
        self._acc.clear()
        self._held = 0

    @torch.no_grad()
    def flush(self, microbatch: int | None = None):
        """Accumulate the stored gradients of `microbatch` (None: all) into the step's sums."""
        keys = list(self._pending) if microbatch is None else [microbatch]
        for m in keys:
            for key, (chunk, ys, gas, h) in self._pending.pop(m, {}).items():
                acc = self._acc.get(key)
                if acc is None:
                    self._acc[key] = [chunk, torch.bmm(gas.transpose(1, 2), ys), gas.sum(1), h]
                else:
                    acc[1].baddbmm_(gas.transpose(1, 2), ys)
                    acc[2] += gas.sum(1)
                self._held -= ys.nbytes + gas.nbytes
                for t in (ys, gas):     # nothing else refers to them once m's backward is done
                    self._free.setdefault((tuple(t.shape), t.dtype, t.device), []).append(t)

    @torch.no_grad()
    def finish(self, done=None):
        """Flush what is left and add the step's sums, times h, to ``chunk.weight.grad``/``.bias.grad``;
        `done([weight, bias])` is told as soon as a chunk's gradients are final (data replicas)."""
        self.flush()
        for chunk, gw, gb, h in self._acc.values():
            for p, g in ((chunk.weight, gw.mul_(h)), (chunk.bias, gb.mul_(h))):
                p.grad = g if p.grad is None else p.grad.add_(g)
            if done is not None:
                done([chunk.weight, chunk.bias])
        self._acc.clear()
