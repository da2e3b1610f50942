"""The loss and every gradient of a one-stage dense ODE ResNet on CPU, or of a pipeline shard of
one, with no autograd around them.

At width 3 a coarse level's gradient is ~0.1 ms of arithmetic inside ~0.9 ms of dispatch: autograd
nodes for the opening, the fused chunk, the head and the cross-entropy, the engine, and the
accumulation into ``.grad`` (circles, 16 blocks, batch 2000: 0.70 ms for the model's forward and
backward against 0.10 ms in the kernel). A V-cycle takes 28 such gradients, so on one process this
was a fifth of the cycle and on a data replica, whose arithmetic is half, a third.

``NetworkGradient`` computes eq. (3)-(8) and their adjoint directly: the opening as a torch matmul,
the blocks through the fused kernel (``cpu.ChunkRun``), the head with the loss and its gradient in
one numba call (``_numba_network``). Every compiled entry point costs ~0.25 s to load from numba's
cache at start-up, so the opening stays a matmul. The gradients land in one flat buffer, each
parameter's ``.grad`` a view of it, with a last slot for the loss: where one rank holds the whole
model (one process, each replica of a one-rank layer group, a redundant coarse level) a data group
sums all of it with one all-reduce and nothing is copied in or out (DDP's bucket views). A
pipeline stage runs it per micro-batch (``PipelineStage.manual``).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from . import FUSED_CPU, auto_fused, cpu


@functools.lru_cache(maxsize=1)
def _load_ends():
    from . import _numba_network
    cpu.tolerate_cache_write_errors(_numba_network)
    return _numba_network


def auto_network(spec, device_type: str) -> bool:
    """Whether one rank holding all of `spec` computes it through ``NetworkGradient`` under
    ``--kernel auto`` where the compiled kernels load (the planner's model of ``build``): one dense
    stage on CPU, narrow enough that auto always picks the fused kernel."""
    return not spec.conv and len(spec.stages) == 1 and auto_fused(device_type, spec.stages[0].width)


class NetworkGradient:
    """Forward and adjoint of `model`, a one-stage dense ``ODEResNet`` or a shard of one whose chunk
    runs the fused CPU kernel (``build`` says whether one fits): [opening] → blocks → [head, loss].

    A step: ``begin()`` gives every parameter's ``.grad`` a view of a fresh flat buffer (in the order
    of ``layout``, its last entry free for the loss); ``forward(m, inp, y, total)`` runs micro-batch
    m from the data (first shard) or the received state and returns (Σ ℓ / total on the last shard,
    else None; y_b on the others, else None); ``backward(m, g)`` takes dL/dy_b (None on the last
    shard, whose head already formed it) and returns dL/dy_a (None on the first shard), adding m's
    gradients to the buffer.
    ``grad(x, y, total, microbatches)`` is a whole model's step on one rank: (loss, flat)."""

    def __init__(self, model):
        self.first, self.last = model.opening is not None, model.head is not None
        self.chunk = model.chunks[0]
        self.params = ([model.opening.weight] if self.first else []) + [self.chunk.weight, self.chunk.bias] + \
            ([model.head.weight, model.head.bias] if self.last else [])
        # the buffer holds the block parameters first, then the shared ones (the order of
        # ``multilevel.hierarchy.ordered_parameters``): a level whose θ is one vector in that order
        # adds its Tikhonov term to the buffer with no copy (``mgopt._tikhonov_flat``)
        self.layout = [self.chunk.weight, self.chunk.bias] + model.shared_parameters()
        ends, at = [0], {}
        for p in self.layout:
            at[id(p)] = ends[-1]
            ends.append(ends[-1] + p.numel())
        self.spans = [(at[id(p)], at[id(p)] + p.numel()) for p in self.params]
        self.numel = ends[-1]
        self.dtype = self.chunk.weight.dtype
        self.regression = model.spec.task == "regression"
        self._grads = None          # numpy views of flat, per parameter (``begin``)
        self._held = {}

    @staticmethod
    def build(model, kernels) -> "NetworkGradient | None":
        """A ``NetworkGradient`` where `model` (a model or shard) is dense, one stage, on CPU, with its
        chunk on the fused kernel (`kernels`: its chunks' ``ChunkKernel``s); else None."""
        spec = model.spec
        if spec.conv or len(spec.stages) != 1 or len(model.chunks) != 1 or model.projections:
            return None
        if len(kernels) != 1 or kernels[0].impl is not FUSED_CPU or model.chunks[0].kernel is not kernels[0]:
            return None
        opening, head = model.opening, model.head
        if opening is not None and (type(opening) is not nn.Linear or opening.bias is not None):
            return None
        if head is not None and (type(head) is not nn.Linear or head.bias is None):
            return None
        if any(p.device.type != "cpu" or p.dtype != model.chunks[0].weight.dtype for p in model.parameters()):
            return None
        return NetworkGradient(model)

    def begin(self) -> torch.Tensor:
        """Start a step: zeroed gradients, each parameter's ``.grad`` a view of the returned buffer."""
        # numpy views and torch.from_numpy: a torch view costs 4 µs, a numpy one 0.6 (x 5 per step)
        flat = torch.from_numpy(np.zeros(self.numel + 1, cpu.NP_DTYPES[self.dtype]))
        flat_np = flat.numpy()
        self._grads = [flat_np[a:b].reshape(p.shape) for p, (a, b) in zip(self.params, self.spans)]
        for p, g in zip(self.params, self._grads):
            p.grad = torch.from_numpy(g)
        self._held.clear()
        return flat

    def forward(self, m, inp: torch.Tensor, y: torch.Tensor | None, total: int):
        if self._grads is None:
            raise RuntimeError("NetworkGradient.forward before begin(): a training step starts with begin()")
        ends, ch = _load_ends(), self.chunk
        inp = inp.detach()
        x = (inp if inp.dtype == self.dtype else inp.to(self.dtype)).contiguous()
        # the opening with torch's BLAS, under torch's thread count (numpy's starts a thread per core)
        y0 = torch.mm(x, self.params[0].detach().T).numpy() if self.first else x.numpy()
        run = cpu.ChunkRun(y0, ch.weight, ch.bias, ch.h, ch.activation, ch.stepper, True)
        out = run.out
        if not self.last:
            self._held[m] = (run, x, None)
            return None, torch.from_numpy(out)
        H, c = self.params[-2].detach().numpy(), self.params[-1].detach().numpy()
        gH, gc = self._grads[-2], self._grads[-1]
        gy, scale = np.empty_like(out), 1.0 / total
        y = y.detach()
        if self.regression:
            loss = ends.head_squared_error(out, H, c, _targets(y, (out.shape[0], H.shape[0]), self.dtype), scale,
                                           gH, gc, gy)
        else:
            loss = ends.head_cross_entropy(out, H, c, y.contiguous().numpy(), scale, gH, gc, gy)
        self._held[m] = (run, x, gy)
        return loss * scale, None

    def backward(self, m, g: torch.Tensor | None = None) -> torch.Tensor | None:
        run, x, gy = self._held.pop(m)
        i = 1 if self.first else 0
        gin, _, _ = run.backward(gy if g is None else g.detach().contiguous().numpy(), self._grads[i],
                                 self._grads[i + 1])
        if not self.first:
            return torch.from_numpy(gin)
        self.params[0].grad.addmm_(torch.from_numpy(gin).T, x)
        return None

    def end(self) -> None:
        """Forget a step that failed part-way (what its micro-batches held)."""
        self._held.clear()

    def grad(self, x: torch.Tensor, y: torch.Tensor, total: int, microbatches: int = 1):
        """A whole model's loss Σ_n ℓ(x_n, y_n) / total (float64) and its gradients in the returned
        flat buffer (each ``.grad`` a view), whose last entry holds the loss in the parameters'
        dtype. Micro-batches run one after the other, as the pipeline runs them on one rank."""
        flat = self.begin()
        loss = 0.0
        parts = zip(x.tensor_split(microbatches), y.tensor_split(microbatches)) if microbatches > 1 else [(x, y)]
        for m, (x_m, y_m) in enumerate(parts):
            loss += self.forward(m, x_m, y_m, total)[0]
            self.backward(m)
        flat.numpy()[-1] = loss
        return loss, flat


def _targets(y, shape, dtype):
    t = y.detach().to(dtype).contiguous().numpy()
    if t.shape != shape:
        raise ValueError(f"regression targets of shape {tuple(t.shape)} do not fit outputs {shape}")
    return t
