"""Fused implementations of a dense block chunk's forward and adjoint, attached from outside.

The model keeps the reference step-by-step loop (``BlockChunk.forward``); ``attach_kernels``
routes every dense chunk of a model through a fused kernel instead. ``ChunkKernel.sink`` is where
deferred weight gradients go while a pipeline stage trains (``DeferredWeightGrads``), else None.
"""
from __future__ import annotations

from .deferred import DeferredWeightGrads
from .torch_chunk import ACTIVATION_BACKWARD, EulerDense

KERNELS = ("auto", "torch")     # auto: the fastest available for the chunk


class ChunkKernel:
    """A fused forward/adjoint for one model's dense Euler chunks; ``sink`` set by a pipeline stage."""

    def __init__(self, name: str = "torch"):
        self.name = name
        self.sink: DeferredWeightGrads | None = None

    @staticmethod
    def supports(chunk) -> bool:
        return (chunk.stepper == "euler" and chunk.activation in ACTIVATION_BACKWARD and chunk.num_blocks > 0
                and chunk.weight.dim() == 3)    # dense: weight[K, v, v]

    def __call__(self, chunk, y):
        deferred = None if self.sink is None else (self.sink, chunk)
        return EulerDense.apply(y, chunk.weight, chunk.bias, chunk.h, chunk.activation, deferred)


def attach_kernels(model, name: str = "torch") -> ChunkKernel:
    """Route `model`'s supported dense chunks through one shared kernel; returns it."""
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; valid: {', '.join(KERNELS)}")
    kernel = ChunkKernel("torch")
    for chunk in model.block_chunks():
        chunk.kernel = kernel if kernel.supports(chunk) else None
    return kernel


__all__ = ["KERNELS", "ChunkKernel", "DeferredWeightGrads", "EulerDense", "attach_kernels"]
