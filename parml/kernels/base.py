"""The kernel interface: ``Kernel.apply(chunk, y, sink) -> y_K`` for a chunk of stacked dense
blocks, and the torch implementation every other kernel is checked against."""
from __future__ import annotations

import torch

from ..model.steppers import ACTIVATIONS, STEPPERS
from .torch_chunk import ACTIVATION_BACKWARD, EulerDense


class Kernel:
    """Runs a chunk of stacked dense blocks: ``apply(chunk, y, sink)`` returns y_K.

    ``sink`` is a deferred weight-gradient sink (``DeferredWeightGrads`` protocol, see ``cpu``)
    or None for gradients written by autograd."""
    name = "kernel"

    def apply(self, chunk, y, sink=None):
        raise NotImplementedError

    def defers(self, width: int, waited: bool) -> bool:
        """Whether a chunk of `width` hands its weight gradients to a pipeline stage's deferred sink;
        `waited`: a neighbour waits for this stage's input adjoint (any stage but the first). Here
        always: one batched GEMM per chunk beats K small ones even where nobody waits (torch's
        kernels; ``benchmarks/RESULTS.md``, backward/weight split). The answer may not depend on
        the batch: every data replica of a layer rank must defer the same chunks, because the
        gradient all-reduce buckets parameters in the order their gradients become final."""
        return True

    def __repr__(self):
        return f"<{self.name} kernel>"


class TorchKernel(Kernel):
    """The reference speed path: the torch fused Euler chunk (hand adjoint), the loop otherwise."""
    name = "torch"

    def apply(self, chunk, y, sink=None):
        if chunk.weight.dim() != 3:      # conv chunks keep their oneDNN/cuDNN convolutions
            return _plain(chunk, y)
        if (chunk.stepper == "euler" and chunk.activation in ACTIVATION_BACKWARD and chunk.num_blocks
                and torch.is_grad_enabled()):
            deferred = None if sink is None else (sink, chunk)
            return EulerDense.apply(y, chunk.weight, chunk.bias, chunk.h, chunk.activation, deferred)
        return _plain(chunk, y)


def _plain(chunk, y):
    """The step-by-step loop of ``BlockChunk.forward`` (the model's reference)."""
    if chunk.weight.dim() != 3:          # conv chunks carry no kernel: their own forward
        return chunk.forward(y)
    sigma, step, h = ACTIVATIONS[chunk.activation], STEPPERS[chunk.stepper].step, chunk.h
    for w, b in zip(chunk.weight.unbind(0), chunk.bias.unbind(0)):
        y = step(lambda z, w=w, b=b: sigma(torch.addmm(b, z, w.t())), y, h)
    return y


TORCH = TorchKernel()
