"""The loss and every gradient of a whole dense ODE ResNet on CPU, with no autograd around them.

At width 3 a coarse level's gradient is ~0.1 ms of arithmetic inside ~0.9 ms of dispatch: autograd
nodes for the opening, the fused chunk, the head and the cross-entropy, the engine, and the
accumulation into ``.grad`` (circles, 16 blocks, batch 2000: 0.70 ms for the model's forward and
backward against 0.10 ms in the kernel). A V-cycle takes 28 such gradients, so on one process this
was a fifth of the cycle and on a data replica, whose arithmetic is half, a third.

Where one rank holds the whole model (one process; each replica of a one-rank layer group; a
redundant coarse level) ``NetworkGradient`` computes eq. (3)-(8) and their adjoint directly: the
opening and the head as numpy matmuls, the blocks through the fused kernel (``cpu.ChunkRun``), the
loss and its gradient in one numba call (``_numba_loss``). The gradients land in one flat buffer,
each parameter's ``.grad`` a view of it, with a last slot for the loss: a data group sums all of
it with one all-reduce and nothing is copied in or out (DDP's bucket views).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from . import FUSED_CPU, cpu


@functools.lru_cache(maxsize=1)
def _load_ends():
    from . import _numba_network
    cpu.tolerate_cache_write_errors(_numba_network)
    return _numba_network


# the opening as numba loops up to this many input features, torch's matmul (BLAS) above
OPENING_LOOP_MAX_FEATURES = 32


class NetworkGradient:
    """``(loss, flat) = grad(x, y, total, microbatches)`` for `model`, a whole single-stage dense
    ``ODEResNet`` whose chunk runs the fused CPU kernel (``build`` says whether one fits).

    loss = Σ_n ℓ(x_n, y_n) / total (float64); every parameter's ``.grad`` is set to its view of
    `flat`, whose last entry is the loss in the parameters' dtype. Micro-batches are run one after
    the other and their gradients summed, as the pipeline does on one rank (the memory bound)."""

    def __init__(self, model):
        self.model = model
        self.chunk = model.chunks[0]
        self.params = [model.opening.weight, self.chunk.weight, self.chunk.bias, model.head.weight,
                       model.head.bias]
        ends = [0]
        for p in self.params:
            ends.append(ends[-1] + p.numel())
        self.spans = list(zip(ends, ends[1:]))
        self.numel = ends[-1]
        self.regression = model.spec.task == "regression"

    @staticmethod
    def build(model, kernels) -> "NetworkGradient | None":
        """A ``NetworkGradient`` where `model` is whole, dense, one stage, on CPU, with its chunk
        on the fused kernel (`kernels`: what ``attach_kernels`` returned); else None."""
        spec = model.spec
        whole = (model.start, model.stop) == (0, spec.total_blocks)
        if not whole or spec.conv or len(spec.stages) != 1 or len(model.chunks) != 1 or model.projections:
            return None
        if len(kernels) != 1 or kernels[0].impl is not FUSED_CPU or model.chunks[0].kernel is not kernels[0]:
            return None
        opening, head = model.opening, model.head
        if type(opening) is not nn.Linear or opening.bias is not None or type(head) is not nn.Linear or head.bias is None:
            return None
        if any(p.device.type != "cpu" or p.dtype != model.chunks[0].weight.dtype for p in model.parameters()):
            return None
        return NetworkGradient(model)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, total: int, microbatches: int = 1):
        ends = _load_ends()
        dtype = self.params[0].dtype
        # numpy views and torch.from_numpy: a torch view costs 4 µs, a numpy one 0.6 (x 5 per call)
        flat = torch.from_numpy(np.zeros(self.numel + 1, cpu.NP_DTYPES[dtype]))
        flat_np = flat.numpy()
        grads = [flat_np[a:b].reshape(p.shape) for p, (a, b) in zip(self.params, self.spans)]
        for p, g in zip(self.params, grads):
            p.grad = torch.from_numpy(g)
        gQ, gW, gb, gH, gc = grads
        Q, H, c = (p.detach().numpy() for p in (self.params[0], self.params[3], self.params[4]))
        ch = self.chunk
        small = Q.shape[1] <= OPENING_LOOP_MAX_FEATURES
        scale = 1.0 / total
        loss = 0.0
        x = x.detach() if x.dtype == dtype else x.detach().to(dtype)
        y = y.detach()
        parts = zip(x.tensor_split(microbatches), y.tensor_split(microbatches)) if microbatches > 1 else [(x, y)]
        for x_m, y_m in parts:
            x_m = x_m.contiguous()
            xn = x_m.numpy()
            if small:
                y0 = np.empty((xn.shape[0], Q.shape[0]), xn.dtype)
                ends.opening(xn, Q, y0)
            else:       # torch's BLAS, under torch's thread count: numpy's would start a thread per core
                y0 = torch.mm(x_m, self.params[0].detach().T).numpy()
            run = cpu.ChunkRun(y0, ch.weight, ch.bias, ch.h, ch.activation, ch.stepper, True)
            out = run.out
            gy = np.empty_like(out)
            if self.regression:
                loss += ends.head_squared_error(out, H, c, _targets(y_m, (out.shape[0], H.shape[0]), dtype), scale,
                                                gH, gc, gy)
            else:
                loss += ends.head_cross_entropy(out, H, c, y_m.contiguous().numpy(), scale, gH, gc, gy)
            gin, _, _ = run.backward(gy, gW, gb)
            if small:
                ends.opening_grad(gin, xn, gQ)
            else:
                self.params[0].grad.addmm_(torch.from_numpy(gin).T, x_m)
        loss *= scale
        flat_np[-1] = loss
        return loss, flat


def _targets(y, shape, dtype):
    t = y.detach().to(dtype).contiguous().numpy()
    if t.shape != shape:
        raise ValueError(f"regression targets of shape {tuple(t.shape)} do not fit outputs {shape}")
    return t
