"""One rank's slice of the network in a pipeline: receive, compute, send, keep activations.

Forward of micro-batch m: receive y_a (tag 2m) from the previous rank — or read the data on the
first rank — run the local steps [a, b), send y_b on. Backward: receive the adjoint λ_b (tag 2m+1)
— or start from the loss on the last rank — backpropagate through the local steps and send λ_a
back. Buffers are preallocated from the model's shape plan, never inferred from a trial send;
a training step posts all of its receives up front (``post_receives``) where the transport
matches messages by tag.

On a tag-blind, stream-ordered transport (NCCL: ``comm.ordered_p2p``) a pair's messages are
delivered in posting order and a receive at the head of a stream blocks what is queued behind it.
There states travel on one communicator and adjoints on another (``direction_groups``), so each
pair's stream carries one direction only, and each receive is posted just before it is needed:
the order of the operations on every stream is then the order of the schedule's F (or B) actions,
which ``schedule.check_message_order`` proves equal on both sides. No send can wait behind an
unmatched receive, whether a send completes at once (small messages) or only when matched.

With ``weight_grads="deferred"`` a backward first computes and sends the input adjoint and only
then forms the dense blocks' weight gradients of that micro-batch, one batched matmul per chunk
(``kernels.DeferredWeightGrads``): the previous rank gets its adjoint without waiting for them, and
they fill the time until this rank's next message arrives. ``flush_weight_grads`` writes the
step's sums to ``.grad`` after the last backward. With ``"auto"`` (the default) each chunk's
kernel decides whether deferring pays (``Kernel.defers``): the fused CPU kernel computes narrow
chunks' weight gradients inline, and every chunk's on the first stage, where no neighbour waits for
the adjoint; torch's kernels always defer.
"""
from __future__ import annotations

import torch

from ..kernels import DeferredWeightGrads
from ..kernels.network import NetworkGradient
from .timing import StageTimer

WEIGHT_GRADS = ("auto", "deferred", "inline")


def direction_groups(comm):
    """(states, adjoints): two communicators over all ranks of `comm`, one per pipeline direction.

    Collective (every rank of `comm` calls it at the same point: building a ``LayerParallel``);
    created once per communicator and kept on it, so the levels of one group share them."""
    groups = getattr(comm, "_parml_direction_groups", None)
    if groups is None:
        everyone = list(range(comm.size))
        groups = (comm.split(everyone), comm.split(everyone))
        comm._parml_direction_groups = groups
    return groups


class PipelineStage:
    """Rank `rank` of `size` holding `shard` (an ``ODEResNet`` shard), talking over `comm`."""

    def __init__(self, shard, comm, device=None, weight_grads: str = "auto"):
        if weight_grads not in WEIGHT_GRADS:
            raise ValueError(f"weight_grads must be one of {', '.join(WEIGHT_GRADS)}, got {weight_grads!r}")
        self.shard, self.comm = shard, comm
        # tag-blind transports (NCCL): one communicator per direction, receives posted lazily
        self.ordered = bool(getattr(comm, "ordered_p2p", False))
        self.states, self.adjoints = direction_groups(comm) if self.ordered and comm.size > 1 else (comm, comm)
        self.early_receives = not self.ordered
        self.timer = StageTimer(device or comm.device)
        self.rank, self.size = comm.rank, comm.size
        self.first, self.last = self.rank == 0, self.rank == self.size - 1
        self.deferred = (DeferredWeightGrads(waited=not self.first, kernels_choose=weight_grads == "auto")
                         if weight_grads != "inline" else None)
        self.device = device or comm.device
        self.dtype = next(shard.parameters()).dtype
        # a one-stage dense shard whose weight gradients stay inline: trained without autograd
        # (``kernels.NetworkGradient``: ~0.3 ms less per micro-batch and stage at width 3)
        chunks = shard.block_chunks()
        inline = all(c.kernel is not None and c.kernel.sink_for(c, self.deferred) is None for c in chunks)
        self.manual = NetworkGradient.build(shard, [c.kernel for c in chunks]) if inline else None
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
        handshake when the rank already waits for the data. Tag-blind transports skip this:
        there a receive posted early would block its stream (see the module docstring)."""
        if not self.early_receives:
            return
        for m, rows in enumerate(sizes):
            if not self.first:
                self._post(self.states, self.shard.state_shape(self.shard.start, rows), self.rank - 1, 2 * m)
            if not self.last:
                self._post(self.adjoints, self.shard.state_shape(self.shard.stop, rows), self.rank + 1, 2 * m + 1)

    def _post(self, comm, shape, src, tag):
        buf = torch.empty(shape, dtype=self.dtype, device=self.device)
        self._posted[tag] = (comm.irecv(buf, src, tag), buf)

    def _recv(self, comm, shape, src, tag):
        t0 = self.timer.start()
        if tag in self._posted:
            req, buf = self._posted.pop(tag)
            req.wait()
            if tuple(buf.shape) != tuple(shape):
                raise RuntimeError(f"message {tag} from rank {src} has shape {tuple(buf.shape)}, "
                                   f"expected {tuple(shape)}")
        else:
            buf = torch.empty(shape, dtype=self.dtype, device=self.device)
            comm.recv(buf, src, tag)
        self.wait_seconds += self.timer.stop(t0, "wait")
        return buf

    def _send(self, comm, tensor, dst, tag):
        t0 = self.timer.start()   # posting can block (gloo hands the send to its I/O thread)
        self._sends.append(comm.isend(tensor.contiguous(), dst, tag))
        dt = self.timer.stop(t0, "send")
        self.wait_seconds += dt
        self.send_seconds += dt

    def finish_sends(self):
        t0 = self.timer.start()
        for req in self._sends:
            req.wait()
        self._sends.clear()
        self.wait_seconds += self.timer.stop(t0, "wait")

    def deferring(self, on: bool):
        """Route the dense chunks' weight gradients to the deferred sink (training steps only)."""
        for chunk in self.shard.block_chunks():
            if chunk.kernel is not None:
                chunk.kernel.sink = self.deferred if on else None

    def collect_times(self):
        """Add the device times recorded since the last call (CUDA events; call after a synchronize)."""
        done = self.timer.collect()
        self.compute_seconds += done.get("compute", 0.0)
        self.send_seconds += done.get("send", 0.0)           # posting sends: part of the wait
        self.wait_seconds += done.get("wait", 0.0) + done.get("send", 0.0)

    def begin_step(self):
        """A training step starts: where the shard trains without autograd, fresh gradients."""
        if self.manual is not None:
            self.manual.begin()

    def end_step(self):
        """Forget what a step that failed part-way left behind (stored gradients, posted receives)."""
        if self.deferred is not None:
            self.deferred.discard()
        if self.manual is not None:
            self.manual.end()
        self._posted.clear()

    def flush_weight_grads(self, done=None):
        """Write the step's deferred weight gradients to ``.grad`` (after the stage's last backward);
        `done(params)` hears of each chunk whose gradients are final."""
        if self.deferred is not None and self.deferred.pending():
            t0 = self.timer.start()
            self.deferred.finish(done)
            self.compute_seconds += self.timer.stop(t0, "compute")

    # -- compute
    def forward(self, m, x_m, y_m, total, train=True):
        """Forward of micro-batch m; on the last rank returns (summed loss / total, output)."""
        if self.first:
            inp = x_m
        else:
            inp = self._recv(self.states, self.shard.state_shape(self.shard.start, x_m.shape[0]),
                             self.rank - 1, 2 * m)
            inp.requires_grad_(train and self.manual is None)
        if train and self.manual is not None:
            return self._forward_manual(m, inp, y_m, total)
        t0 = self.timer.start()
        with torch.set_grad_enabled(train):
            out = self.shard(inp)
            loss = self.shard.loss(out, y_m, reduction="sum") / total if self.last else None
        self.compute_seconds += self.timer.stop(t0, "compute")
        if not self.last:
            self._send(self.states, out.detach(), self.rank + 1, 2 * m)
        if train:
            self._held[m] = (inp, loss if self.last else out)
        return loss, out

    def _forward_manual(self, m, inp, y_m, total):
        t0 = self.timer.start()
        loss, out = self.manual.forward(m, inp, y_m, total)
        self.compute_seconds += self.timer.stop(t0, "compute")
        if self.last:
            self._held[m] = None
            return torch.tensor(loss, dtype=torch.float64), None
        self._send(self.states, out, self.rank + 1, 2 * m)
        self._held[m] = out.shape
        return None, out

    def _backward_manual(self, m):
        shape = self._held.pop(m)
        grad = None if self.last else self._recv(self.adjoints, shape, self.rank + 1, 2 * m + 1)
        t0 = self.timer.start()
        gin = self.manual.backward(m, grad)
        self.compute_seconds += self.timer.stop(t0, "compute")
        if not self.first:
            self._send(self.adjoints, gin, self.rank - 1, 2 * m + 1)

    def backward(self, m):
        if self.manual is not None:
            return self._backward_manual(m)
        inp, out = self._held.pop(m)
        if self.last:
            grad = None
        else:
            grad = self._recv(self.adjoints, out.shape, self.rank + 1, 2 * m + 1)
        t0 = self.timer.start()
        if self.deferred is not None:
            self.deferred.microbatch = m
        torch.autograd.backward(out, grad)
        self.compute_seconds += self.timer.stop(t0, "compute")
        if not self.first:
            self._send(self.adjoints, inp.grad, self.rank - 1, 2 * m + 1)
        if self.deferred is not None:   # W of m, after its adjoint is on the way (zero-bubble's B/W split)
            t0 = self.timer.start()
            self.deferred.flush(m)
            self.compute_seconds += self.timer.stop(t0, "compute")
