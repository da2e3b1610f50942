"""GPU: a dense chunk's forward and backward captured in CUDA graphs, one replay per call.

On a GPU every tensor op of the reference chunk is a kernel launch of several µs, so a width-3
chunk of 2048 blocks (~14,000 ops per step) is launch-bound whatever the device. Capturing the
reference chunk (``torch.cuda.make_graphed_callables``) for fixed shapes turns the forward and the
backward into one graph replay each; the arithmetic is the reference's, so the result equals it
(same kernels, same order).

A captured graph owns static buffers: its input copy, its saved activations, its output and its
gradients. So a graph is *busy* from its forward until its backward has run (or its autograd node
is freed), and a forward that finds every graph of its key (chunk, batch shape, dtype, grad mode)
busy captures another one: a pipeline stage with M micro-batches in flight gets M graphs, and a
forward never overwrites activations that a pending backward still needs. The gradients a replay
returns are cloned on their way out (``_CloneGrad``): autograd would otherwise keep the static
buffer itself as ``.grad`` of a leaf (a stage's input, the parameters), which the next replay
overwrites. Parameters are captured by address (in-place optimizer updates are seen; re-allocated
parameters need ``GraphedKernel.clear()``). Weight gradients go through autograd (``.grad``); a
deferred sink is not used here (its bookkeeping allocates, which a capture cannot), so the
stage's ``flush`` has nothing to do for these chunks. A forward's output is a static buffer too:
it is valid until that graph's next replay, i.e. until after its backward.
"""
from __future__ import annotations

import weakref

import torch

from .base import Kernel, TorchKernel


def available() -> tuple[bool, str | None]:
    if not torch.cuda.is_available():
        return False, "CUDA graphs need a CUDA device (none is visible)"
    if not hasattr(torch.cuda, "make_graphed_callables"):
        return False, "this torch has no torch.cuda.make_graphed_callables"
    return True, None


class GraphedKernel(Kernel):
    """Replays a captured reference chunk; captures on the first call for a new key."""
    name = "fused"

    def __init__(self, warmup: int = 3):
        self.warmup = warmup
        self._graphs: dict[tuple, object] = {}
        self._reference = TorchKernel()

    def clear(self):
        """Forget every capture (after parameters were re-allocated, or to free graph memory)."""
        self._graphs.clear()

    def __len__(self):
        """How many graphs are captured (all keys, all in-flight copies)."""
        return sum(len(v) for v in self._graphs.values())

    def apply(self, chunk, y, sink=None):
        if chunk.weight.dim() != 3 or chunk.num_blocks == 0 or y.device.type != "cuda":
            return self._reference.apply(chunk, y, sink)
        grad = torch.is_grad_enabled()
        key = (id(chunk), tuple(y.shape), y.dtype, y.requires_grad, grad)
        entries = self._graphs.setdefault(key, [])
        entry = next((e for e in entries if not e.busy), None)
        if entry is None:
            entry = _Entry(self._capture(chunk, y))
            entries.append(entry)
        if not grad:
            return entry.fn(y, chunk.weight, chunk.bias)
        entry.busy = True
        out = entry.fn(*(_CloneGrad.apply(t) if t.requires_grad else t for t in (y, chunk.weight, chunk.bias)))
        node = out.grad_fn
        if node is None:            # nothing to differentiate: free at once
            entry.busy = False
        else:
            node.register_hook(entry.release)
            weakref.finalize(node, entry.release)
        return out

    def _capture(self, chunk, y):
        """make_graphed_callables of f(y, W, b) = the reference chunk on (W, b) = the chunk's own
        parameters (captured by address: no copy per call; y is copied into the static input)."""
        reference = self._reference

        def f(y_, w, b):
            return reference.apply(_Params(chunk, w, b), y_, None)

        sample = y.detach().clone().requires_grad_(y.requires_grad)
        if not torch.is_grad_enabled():
            return _graph_forward(f, sample, chunk.weight, chunk.bias, self.warmup)
        torch.cuda.synchronize()
        graphed = torch.cuda.make_graphed_callables(f, (sample, chunk.weight, chunk.bias),
                                                    num_warmup_iters=self.warmup)
        torch.cuda.synchronize()
        return graphed


class _Entry:
    """One captured graph and whether a pending backward still needs its buffers."""

    def __init__(self, fn):
        self.fn, self.busy = fn, False

    def release(self, *_):
        self.busy = False


class _CloneGrad(torch.autograd.Function):
    """Identity forward (a view: same storage, so the graph sees its captured address); the
    backward clones, so no gradient handed to autograd aliases a graph's static buffer."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return g.clone()


class _Params:
    """A chunk whose weight and bias are replaced (the graphed function's arguments)."""

    def __init__(self, chunk, weight, bias):
        self._chunk, self.weight, self.bias = chunk, weight, bias

    def __getattr__(self, name):
        return getattr(self._chunk, name)

    @property
    def num_blocks(self):
        return self.weight.shape[0]


def _graph_forward(f, sample, weight, bias, warmup):
    """Evaluation (no autograd): one captured forward; returns a callable that replays it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            f(sample, weight, bias)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = f(sample, weight, bias)

    def replay(y, w, b):
        sample.copy_(y)
        graph.replay()
        return out
    return replay


GRAPHED = GraphedKernel()
