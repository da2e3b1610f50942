"""One rank's slice of the network in a pipeline: receive, compute, send, keep activations.

Forward of micro-batch m: receive y_a (tag 2m) from the previous rank — or read the data on the
first rank — run the local steps [a, b), send y_b on. Backward: receive the adjoint λ_b (tag 2m+1)
— or start from the loss on the last rank — backpropagate through the local steps and send λ_a
back. Buffers are preallocated from the model's shape plan, never inferred from a trial send;
a training step posts all of its receives up front (``post_receives``).

With ``weight_grads="deferred"`` a backward first computes and sends the input adjoint and only
then forms the dense blocks' weight gradients of that micro-batch, one batched matmul per chunk
(``kernels.DeferredWeightGrads``): the previous rank gets its adjoint without waiting for them, and
they fill the time until this rank's next message arrives. ``flush_weight_grads`` writes the
step's sums to ``.grad`` after the last backward.
"""
from __future__ import annotations

import time

import torch

from ..kernels import DeferredWeightGrads

WEIGHT_GRADS = ("deferred", "inline")


class PipelineStage:
    """Rank `rank` of `size` holding `shard` (an ``ODEResNet`` shard), talking over `comm`."""

    def __init__(self, shard, comm, device=None, weight_grads: str = "deferred"):
        if weight_grads not in WEIGHT_GRADS:
            raise ValueError(f"weight_grads must be one of {', '.join(WEIGHT_GRADS)}, got {weight_grads!r}")
        self.shard, self.comm = shard, comm
        self.deferred = DeferredWeightGrads() if weight_grads == "deferred" else None
        self.rank, self.size = comm.rank, comm.size
        self.first, self.last = self.rank == 0, self.rank == self.size - 1
        self.device = device or comm.device
        self.dtype = next(shard.parameters()).dtype
        self._held = {}        # micro-batch -> (input, output or loss)
        self._sends = []
        self._posted = {}      # tag -> (request, buffer) of receives posted ahead
        self.compute_seconds = 0.0
        self.wait_seconds = 0.0
        self.send_seconds = 0.0     # the part of wait_seconds spent posting sends

    # -- communication helpers
    def post_receives(self, sizes):
        """Post every receive of a training step up front (`sizes`: rows per micro-batch).

        A rendezvous transport (gloo's TCP pairs send only after the receiver posted its buffer)
        then moves each state and adjoint while this rank computes, instead of starting the
        handshake when the rank already waits for the data."""
        for m, rows in enumerate(sizes):
            if not self.first:
                self._post(self.shard.state_shape(self.shard.start, rows), self.rank - 1, 2 * m)
            if not self.last:
                self._post(self.shard.state_shape(self.shard.stop, rows), self.rank + 1, 2 * m + 1)

    def _post(self, shape, src, tag):
        buf = torch.empty(shape, dtype=self.dtype, device=self.device)
        self._posted[tag] = (self.comm.irecv(buf, src, tag), buf)

    def _recv(self, shape, src, tag):
        t0 = time.perf_counter()
        if tag in self._posted:
            req, buf = self._posted.pop(tag)
            req.wait()
            if tuple(buf.shape) != tuple(shape):
                raise RuntimeError(f"message {tag} from rank {src} has shape {tuple(buf.shape)}, expected {tuple(shape)}")
        else:
            buf = torch.empty(shape, dtype=self.dtype, device=self.device)
            self.comm.recv(buf, src, tag)
        self.wait_seconds += time.perf_counter() - t0
        return buf

    def _send(self, tensor, dst, tag):
        t0 = time.perf_counter()   # posting can block (gloo hands the send to its I/O thread)
        self._sends.append(self.comm.isend(tensor.contiguous(), dst, tag))
        dt = time.perf_counter() - t0
        self.wait_seconds += dt
        self.send_seconds += dt

    def finish_sends(self):
        t0 = time.perf_counter()
        for req in self._sends:
            req.wait()
        self._sends.clear()
        self.wait_seconds += time.perf_counter() - t0

    def deferring(self, on: bool):
        """Route the dense chunks' weight gradients to the deferred sink (training steps only)."""
        for chunk in self.shard.block_chunks():
            if chunk.kernel is not None:
                chunk.kernel.sink = self.deferred if on else None

    def end_step(self):
        """Forget what a step that failed part-way left behind (stored gradients, posted receives)."""
        if self.deferred is not None:
            self.deferred.discard()
        self._posted.clear()

    def flush_weight_grads(self):
        """Write the step's deferred weight gradients to ``.grad`` (after the stage's last backward)."""
        if self.deferred is not None and self.deferred.pending():
            t0 = time.perf_counter()
            self.deferred.finish()
            self.compute_seconds += time.perf_counter() - t0

    # -- compute
    def forward(self, m, x_m, y_m, total, train=True):
        """Forward of micro-batch m; on the last rank returns (summed loss / total, output)."""
        if self.first:
            inp = x_m
        else:
            inp = self._recv(self.shard.state_shape(self.shard.start, x_m.shape[0]), self.rank - 1, 2 * m)
            inp.requires_grad_(train)
        t0 = time.perf_counter()
        with torch.set_grad_enabled(train):
            out = self.shard(inp)
            loss = self.shard.loss(out, y_m, reduction="sum") / total if self.last else None
        self.compute_seconds += time.perf_counter() - t0
        if not self.last:
            self._send(out.detach(), self.rank + 1, 2 * m)
        if train:
            self._held[m] = (inp, loss if self.last else out)
        return loss, out

    def backward(self, m):
        inp, out = self._held.pop(m)
        if self.last:
            grad = None
        else:
            grad = self._recv(out.shape, self.rank + 1, 2 * m + 1)
        t0 = time.perf_counter()
        if self.deferred is not None:
            self.deferred.microbatch = m
        torch.autograd.backward(out, grad)
        self.compute_seconds += time.perf_counter() - t0
        if not self.first:
            self._send(inp.grad, self.rank - 1, 2 * m + 1)
        if self.deferred is not None:   # W of m, after its adjoint is on the way (zero-bubble's B/W split)
            t0 = time.perf_counter()
            self.deferred.flush(m)
            self.compute_seconds += time.perf_counter() - t0
