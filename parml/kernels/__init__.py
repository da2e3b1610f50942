"""Kernels for chunks of stacked dense ODE blocks: one call per chunk instead of ops per block.

A chunk of K dense blocks, y <- y + h σ(W_k y + b_k) (Euler) or midpoint RK2 (design.md, "Kernels"),
costs a few tensor ops per block; at width 3 each op is dispatch (~9 µs) around no arithmetic.
Three implementations behind one interface, ``Kernel.apply(chunk, y, sink) -> y_K``:

- ``torch``: the torch fused chunk (``torch_chunk.EulerDense``, a hand-written adjoint) for
  Euler, the plain autograd loop otherwise.
- ``fused`` on CPU (``cpu.FusedDense``): one numba call per chunk forward and backward, streaming
  tiles of the batch through all blocks (``_numba_dense``).
- ``fused`` on CUDA (``cuda_graphs.GraphedKernel``): the reference chunk captured in CUDA graphs
  per (chunk, shape) and micro-batch in flight, so a replay is one launch instead of thousands.

Around them, ``network.NetworkGradient`` trains a one-stage dense model or pipeline shard on CPU
without autograd (the opening a torch matmul, the fused chunk, the head and loss one numba call),
where every weight gradient stays inline: at width 3 autograd's nodes cost more than the arithmetic.

``select_kernel(name, device, dtype, width, ...)`` picks one for ``--kernel auto|torch|fused`` and
says why when ``auto`` does not pick the fused one. The model keeps the reference step-by-step
loop; ``attach_kernels(model, name)`` routes each dense chunk through its kernel from outside
(``BlockChunk.kernel``), and a pipeline stage sets ``ChunkKernel.sink`` while it trains, so
weight gradients go to its ``DeferredWeightGrads``.
"""
from __future__ import annotations

import warnings

import torch

from . import cpu, cuda_graphs
from .base import TORCH, Kernel, TorchKernel
from .deferred import DeferredWeightGrads
from .torch_chunk import EulerDense

KERNELS = ("auto", "torch", "fused")
# auto on CPU, by width (benchmarks/kernels.py, one thread, torch time / fused time per step):
# width <= 16 fused at every batch (width 8: 13.6x at batch 100, 4.4x at 2000); width 32 fused up
# to batch 768 (2.6x at 100, 1.3x at 500, 0.96-1.1x at 1000); width 64 up to batch 128 (1.4x at
# 100, 0.9-1.0x at 250); from width 96 on torch (width 128: 0.5-0.7x): GEMM-bound blocks, where
# MKL's matmuls beat the tile loops.
AUTO_BATCH_LIMITS = ((16, None), (48, 768), (95, 128))   # (largest width, largest batch for fused)
AUTO_MAX_WIDTH = 96
# auto on CUDA: graphs are opt-in (``fused``) until benchmarks/kernels.py has run on a GPU.
AUTO_CUDA_GRAPHS = False


class KernelFallbackWarning(UserWarning):
    """``--kernel auto`` wanted the fused kernel but could not load it."""


# The fused CPU kernel hands its weight gradients to a deferred sink only where a neighbour waits
# for the adjoint and the chunk is wider than this. Its inline backward sums them per tile in cache;
# deferring writes and rereads every block's adjoint instead (benchmarks/kernels.py-style timing,
# one thread, backward + weight gradients, inline / deferred): width 3, 2048 blocks, batch 2000
# 9.3 / 12.0 + 14.3 ms; width 8, 256 blocks, batch 1000 2.6 / 2.8 + 2.4 ms: slower even on the
# critical path. Width 16: 10.1 / 7.2 + 6.6 ms; width 32, batch 500: 17.2 / 11.3 + 9.0 ms: the
# adjoint leaves sooner, worth it only where a neighbour waits for it.
FUSED_INLINE_MAX_WIDTH = 8


class FusedCPUKernel(Kernel):
    """The numba kernel for dense chunks on CPU; conv chunks fall through to the reference."""
    name = "fused"

    def defers(self, width: int, waited: bool) -> bool:
        return waited and width > FUSED_INLINE_MAX_WIDTH

    def apply(self, chunk, y, sink=None):
        if chunk.weight.dim() != 3 or chunk.num_blocks == 0:
            return TORCH.apply(chunk, y, sink)
        deferred = None if sink is None else (sink, chunk)
        return cpu.fused_chunk(y, chunk.weight, chunk.bias, chunk.h, chunk.activation, chunk.stepper, deferred)


class AutoCPUKernel(Kernel):
    """Per call: fused up to ``max_batch`` samples, torch above (mid widths, where the crossover
    from dispatch-bound to GEMM-bound blocks depends on the batch). Always defers its weight
    gradients (``Kernel.defers``): replicas whose shares straddle ``max_batch`` pick different
    kernels, but must defer alike."""
    name = "auto"

    def __init__(self, max_batch: int):
        self.max_batch = max_batch

    def choose(self, batch: int) -> Kernel:
        return FUSED_CPU if batch <= self.max_batch else TORCH

    def apply(self, chunk, y, sink=None):
        return self.choose(y.shape[0]).apply(chunk, y, sink)

    def __repr__(self):
        return f"<auto kernel: fused up to batch {self.max_batch}, torch above>"



FUSED_CPU = FusedCPUKernel()
_warned: set[str] = set()


def _unsupported(dtype, stepper, activation) -> str | None:
    if dtype not in cpu.DTYPES:
        return f"dtype {dtype} (fused kernels: float32, float64)"
    if stepper not in cpu.STEPPER_CODES:
        return f"stepper {stepper!r} (fused kernels: {', '.join(cpu.STEPPER_CODES)})"
    if activation not in cpu.ACTIVATION_CODES:
        return f"activation {activation!r} (fused kernels: {', '.join(cpu.ACTIVATION_CODES)})"
    return None


def select_kernel(name: str, device, dtype: torch.dtype, width: int, stepper: str = "euler",
                  activation: str = "relu") -> tuple[Kernel, str | None]:
    """The kernel for ``--kernel name`` on `device` and the reason when auto did not pick fused.

    ``fused`` where it cannot run raises a one-line error; ``auto`` falls back to torch (with one
    warning line when the compiled kernel cannot load) and returns the reason."""
    if name not in KERNELS:
        raise ValueError(f"--kernel {name!r} is not one of {', '.join(KERNELS)}")
    if name == "torch":
        return TORCH, None
    device = torch.device(device)
    problem = _unsupported(dtype, stepper, activation)
    if device.type == "cuda":
        ok, why = cuda_graphs.available()
        if name == "fused":
            if not ok:
                raise RuntimeError(f"--kernel fused: {why}")
            return cuda_graphs.GRAPHED, None
        if not AUTO_CUDA_GRAPHS:
            return TORCH, "CUDA graphs are opt-in (--kernel fused) until measured on a GPU"
        return (cuda_graphs.GRAPHED, None) if ok else (TORCH, why)
    if device.type != "cpu":
        if name == "fused":
            raise RuntimeError(f"--kernel fused: no fused kernel for device {device.type}; valid: cpu, cuda")
        return TORCH, f"no fused kernel for device {device.type}"
    if problem:
        if name == "fused":
            raise ValueError(f"--kernel fused: unsupported {problem}")
        return TORCH, f"unsupported {problem}"
    ok, why = cpu.available()
    if name == "fused":
        if not ok:
            raise RuntimeError(f"--kernel fused: {why}")
        return FUSED_CPU, None
    if not ok:
        if why not in _warned:
            _warned.add(why)
            warnings.warn(f"--kernel auto: using torch kernels, {why}", KernelFallbackWarning, stacklevel=2)
        return TORCH, why
    for max_width, max_batch in AUTO_BATCH_LIMITS:
        if width <= max_width:
            if max_batch is None:
                return FUSED_CPU, None
            return AutoCPUKernel(max_batch), f"width {width}: fused up to batch {max_batch}, torch above (GEMM-bound)"
    return TORCH, f"width {width} >= {AUTO_MAX_WIDTH}: GEMM-bound blocks, torch's matmuls are faster"


def auto_fused(device_type: str, width: int) -> bool:
    """Whether ``--kernel auto`` runs a dense chunk of `width` on `device_type` through the fused CPU
    kernel at every batch size, where the compiled kernels load (the planner's model of
    ``select_kernel``): on CPU up to the first width of ``AUTO_BATCH_LIMITS``."""
    return device_type == "cpu" and width <= AUTO_BATCH_LIMITS[0][0]


def auto_defers(device_type: str, width: int, waited: bool) -> bool:
    """Whether ``--weight-grads auto`` defers a dense chunk of `width` under ``--kernel auto`` on
    `device_type`, where the compiled kernels load (the planner's model of ``ChunkKernel``): the
    fused kernel (``auto_fused``) decides by ``FusedCPUKernel.defers``; the others defer."""
    if auto_fused(device_type, width):
        return FUSED_CPU.defers(width, waited)
    return True


def kernel_for(chunk, name: str = "auto") -> tuple[Kernel, str | None]:
    """``select_kernel`` for one chunk's device, dtype, width, stepper and activation."""
    w = chunk.weight
    return select_kernel(name, w.device, w.dtype, w.shape[1], chunk.stepper, chunk.activation)


class ChunkKernel:
    """One chunk's kernel as attached to it: the implementation, why ``auto`` chose it, and the
    deferred weight-gradient sink a pipeline stage sets while it trains (None: autograd)."""

    def __init__(self, impl: Kernel, reason: str | None = None):
        self.impl, self.reason = impl, reason
        self.sink: DeferredWeightGrads | None = None

    @property
    def name(self) -> str:
        return self.impl.name

    def sink_for(self, chunk, sink):
        """Where `chunk`'s weight gradients go under a stage's `sink`: the sink, or None (inline:
        autograd writes .grad, the stage's finish adds the deferred rest) where the kernel chooses
        (``--weight-grads auto``) and declines to defer."""
        if sink is not None and sink.kernels_choose and not self.impl.defers(chunk.weight.shape[1], sink.waited):
            return None
        return sink

    def __call__(self, chunk, y):
        return self.impl.apply(chunk, y, self.sink_for(chunk, self.sink))


def apply_chunk(chunk, y, kernel: Kernel | str = "auto", sink=None):
    """y_K of `chunk` from y through `kernel` (a Kernel, or a name resolved for this chunk)."""
    if isinstance(kernel, str):
        kernel = kernel_for(chunk, kernel)[0]
    return kernel.apply(chunk, y, sink)


def attach_kernels(model, kernel: Kernel | str = "auto") -> list[ChunkKernel]:
    """Route every dense chunk of `model` (a full model or a shard) through `kernel` (a Kernel, or
    the name ``select_kernel`` resolves per chunk); conv chunks keep their own forward. Attach
    after ``shard()`` (a shard's chunks are copies). Returns the attached kernels."""
    attached = []
    for chunk in model.block_chunks():
        if chunk.weight.dim() != 3:
            chunk.kernel = None
            continue
        impl, why = kernel_for(chunk, kernel) if isinstance(kernel, str) else (kernel, None)
        chunk.kernel = ChunkKernel(impl, why)
        attached.append(chunk.kernel)
    return attached


__all__ = ["AUTO_MAX_WIDTH", "FUSED_CPU", "FUSED_INLINE_MAX_WIDTH", "KERNELS", "TORCH", "ChunkKernel",
           "DeferredWeightGrads", "EulerDense", "Kernel", "KernelFallbackWarning", "TorchKernel", "apply_chunk",
           "attach_kernels", "auto_defers", "auto_fused", "kernel_for", "select_kernel"]
