"""ODE ResNets: a residual network is a time discretization of dy/dt = F(y; θ(t)) on [0, T].

x --opening Q--> y_0 --step_0--> y_1 ... --step_{K-1}--> y_K --head--> logits      (paper eq. 3-8)

The model is a plain ``nn.Module`` with no communication. Block parameters of a stage are stored
stacked (``weight[K, v, v]``, ``bias[K, v]``) so that time transfers (``hierarchy.py``) are
vectorised and a layer-parallel shard is just a slice of the stack (``ODEResNet.shard``).

Two kinds of stages (``StageSpec.kind``):

- "dense": F(y) = σ(W_k y + b_k) on states [batch, v]; opening and projections are linear maps,
  the head is linear.
- "conv": F(y) = σ(N(conv3x3(y; W_k)) + b_k) on images [batch, C, H, W] (Haber et al., Chang et
  al.), ``weight[K, C, C, 3, 3]``, ``bias[K, C]``, N an optional per-sample norm (off by default).
  The opening is a 3x3 convolution in_channels -> C_0; the projection into stage i is a 1x1
  convolution C_{i-1} -> C_i with stride s_i (or s_i x s_i average pooling then a 1x1 convolution),
  the downsampling layer between groups (Zang's projection layer, Chang's first block of a stage);
  the head is global average pooling then a linear map.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn
import torch.nn.functional as tf

ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}


# --- steppers: one small class each (torchdiffeq-style registry) -------------------------------

STEPPERS: dict[str, type] = {}


def register_stepper(name):
    def wrap(cls):
        cls.name = name
        STEPPERS[name] = cls
        return cls
    return wrap


@register_stepper("euler")
class Euler:
    """Forward Euler, y + h F(y): the plain ResNet block (paper eq. 5)."""

    @staticmethod
    def step(f, y, h):
        return torch.add(y, f(y), alpha=h)


@register_stepper("rk2")
class RK2:
    """Midpoint RK2 with one parameter set per step (Zang): k1 = F(y), k2 = F(y + h/2 k1)."""

    @staticmethod
    def step(f, y, h):
        k1 = f(y)
        return torch.add(y, f(torch.add(y, k1, alpha=h / 2)), alpha=h)


def _choice(kind, name, table):
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(table))}")
    return table[name]


# --- architecture, independent of parameters ------------------------------------------------------

STAGE_KINDS = ("dense", "conv")
PROJECTIONS = ("conv", "avgpool")   # conv stages: strided 1x1 convolution | average pooling + 1x1
NORMS = ("none", "layer")           # conv blocks: no norm | per-sample norm over (C, H, W), no parameters
HEADS = ("pool", "flatten")         # conv head: global average pool + linear | linear on the flattened state
INITS = ("uniform", "glorot")       # weights U(±1/√fan_in) | Glorot uniform U(±√(6/(fan_in+fan_out))), Keras' default


@dataclass(frozen=True)
class StageSpec:
    """A run of residual blocks at one width: `blocks` time steps of size T / blocks.

    For a "conv" stage `width` is the number of channels and `stride` the downsampling factor of
    the projection that leads into the stage (1 for the first stage and for dense stages).
    """
    width: int
    blocks: int
    kind: str = "dense"
    stride: int = 1


@dataclass(frozen=True)
class ModelSpec:
    in_features: int
    out_features: int
    stages: tuple[StageSpec, ...] = (StageSpec(3, 2048),)
    T: float = 1.0
    activation: str = "relu"
    stepper: str = "euler"
    task: str = "classification"   # or "regression" (MSE)
    input_shape: tuple[int, ...] | None = None   # per-sample (C, H, W) of conv networks
    projection: str = "conv"       # conv networks: strided 1x1 conv | avgpool + 1x1 conv
    norm: str = "none"             # conv blocks: none | layer
    head: str = "pool"             # conv networks: pool (resolution independent) | flatten (Haber et al.)
    init: str = "uniform"          # weight initialization: uniform ±1/√fan_in | glorot (Keras default)

    def __post_init__(self):
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("init", self.init, {k: k for k in INITS})
        _choice("stepper", self.stepper, STEPPERS)
        if self.task not in ("classification", "regression"):
            raise ValueError(f"unknown task {self.task!r}; valid: classification, regression")
        if not self.stages or any(s.blocks < 1 or s.width < 1 for s in self.stages):
            raise ValueError("every stage needs at least one block and a positive width")
        for s in self.stages:
            _choice("stage kind", s.kind, {k: k for k in STAGE_KINDS})
            if s.stride < 1:
                raise ValueError(f"--strides: stride {s.stride} must be at least 1")
        kinds = {s.kind for s in self.stages}
        if len(kinds) > 1:
            raise ValueError(f"--arch: stages mix kinds {sorted(kinds)}; every stage must be dense or every stage conv")
        if self.conv:
            self._check_conv()
        elif any(s.stride != 1 for s in self.stages):
            raise ValueError("--strides: dense stages cannot downsample (stride must be 1)")

    def _check_conv(self):
        _choice("projection", self.projection, {k: k for k in PROJECTIONS})
        _choice("norm", self.norm, {k: k for k in NORMS})
        _choice("head", self.head, {k: k for k in HEADS})
        shape = self.input_shape
        if shape is None or len(shape) != 3 or any(int(d) < 1 for d in shape):
            raise ValueError(f"--arch conv needs the per-sample input shape (C, H, W), got input_shape={shape}")
        if math.prod(shape) != self.in_features:
            raise ValueError(f"--arch conv: input_shape {tuple(shape)} has {math.prod(shape)} values but the "
                             f"data has {self.in_features} features per sample")
        if self.stages[0].stride != 1:
            raise ValueError(f"--strides: the first stage cannot downsample (stride {self.stages[0].stride}); "
                             "the opening keeps the image size")
        h, w = shape[1], shape[2]
        for i, s in enumerate(self.stages[1:], start=1):
            if h % s.stride or w % s.stride:
                raise ValueError(f"--strides: stage {i} downsamples the {h}x{w} state of stage {i - 1} by "
                                 f"{s.stride}, which does not divide the image size")
            h, w = h // s.stride, w // s.stride

    @property
    def conv(self) -> bool:
        return self.stages[0].kind == "conv"

    @property
    def total_blocks(self) -> int:
        return sum(s.blocks for s in self.stages)

    def stage_state_shape(self, stage: int) -> tuple[int, ...]:
        """Per-sample shape of the states of `stage`: (width,) or (C, H, W)."""
        s = self.stages[stage]
        if not self.conv:
            return (s.width,)
        h, w = self.input_shape[1], self.input_shape[2]
        for t in self.stages[1:stage + 1]:
            h, w = h // t.stride, w // t.stride
        return (s.width, h, w)

    def coarsened(self, factor: int) -> "ModelSpec":
        """The same network with `factor` times fewer (and longer) steps in every stage."""
        return replace(self, stages=tuple(replace(s, blocks=s.blocks // factor) for s in self.stages))


# --- modules ---------------------------------------------------------------------------------------

def _activation_backward(op, *args):
    """(adjoint, σ(z), out) -> σ'(z) ⊙ adjoint, written into `out` unless it is None."""
    return lambda g, s, out: (op(g, s, *args) if out is None
                              else op.grad_input(g, s, *args, grad_input=out))


_ACTIVATION_BACKWARD = {
    "relu": _activation_backward(torch.ops.aten.threshold_backward, 0),
    "tanh": _activation_backward(torch.ops.aten.tanh_backward),
    "sigmoid": _activation_backward(torch.ops.aten.sigmoid_backward),
}


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

    def __init__(self):
        self.microbatch = 0                    # set by the stage before each backward
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
    def finish(self):
        """Flush what is left and add the step's sums, times h, to ``chunk.weight.grad``/``.bias.grad``."""
        self.flush()
        for chunk, gw, gb, h in self._acc.values():
            for p, g in ((chunk.weight, gw.mul_(h)), (chunk.bias, gb.mul_(h))):
                p.grad = g if p.grad is None else p.grad.add_(g)
        self._acc.clear()


class _EulerDense(torch.autograd.Function):
    """Forward Euler through stacked dense blocks, y <- y + h σ(y W_kᵀ + b_k), as one autograd node.

    The forward runs the same ops and saves what autograd would (each y_k and σ_k); the hand-written
    adjoint recursion is 4 ops per block without per-node engine cost, which dominates small widths
    (1.4-1.5x per step on a K = 1024, width 32 model):
        g_a = σ'(z_k) ⊙ λ_{k+1},  ∂W_k = h g_aᵀ y_k,  ∂b_k = h Σ g_a,  λ_k = λ_{k+1} + h g_a W_k
    With a ``DeferredWeightGrads`` sink the y_k live in one stacked (recycled) buffer, the backward
    only runs the 2-op λ recursion, and ∂W, ∂b are left to the sink's ``flush``.
    """

    @staticmethod
    def forward(ctx, y, weight, bias, h, activation, deferred):
        sigma, n = ACTIVATIONS[activation], weight.shape[0]
        if deferred is None:
            ys = []
        else:
            ys = deferred[0].buffer(y, n)
            ys[0].copy_(y)
        ss = []
        for k, (w, b) in enumerate(zip(weight.unbind(0), bias.unbind(0))):
            if deferred is None:
                ys.append(y)
            s = sigma(torch.addmm(b, y, w.t()))
            ss.append(s)
            y = torch.add(y, s, alpha=h, out=ys[k + 1] if deferred is not None and k + 1 < n else None)
        ctx.save_for_backward(weight, *([ys] if deferred is not None else ys), *ss)
        ctx.h, ctx.activation, ctx.deferred = h, activation, deferred   # deferred: (sink, chunk) or None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        dsigma, h = _ACTIVATION_BACKWARD[ctx.activation], ctx.h
        if ctx.deferred is not None:
            weight, ys, *ss = ctx.saved_tensors
            sink, chunk = ctx.deferred
            gas = sink.buffer(g, weight.shape[0])
            for k in range(weight.shape[0] - 1, -1, -1):
                dsigma(g, ss[k], gas[k])                        # dL/da_k / h
                g = torch.addmm(g, gas[k], weight[k], alpha=h)  # dL/dy_k = g + h ga W_k
            sink.add(chunk, ys, gas, h)
            return g, None, None, None, None, None
        weight, *saved = ctx.saved_tensors
        n = weight.shape[0]
        ys, ss = saved[:n], saved[n:]
        gw = torch.empty_like(weight)
        gb = torch.empty(weight.shape[:2], dtype=weight.dtype, device=weight.device)
        for k in range(n - 1, -1, -1):
            ga = dsigma(g, ss[k], None)
            torch.mm(ga.t(), ys[k], out=gw[k])
            torch.sum(ga, 0, out=gb[k])
            g = torch.addmm(g, ga, weight[k], alpha=h)
        return g, gw.mul_(h), gb.mul_(h), None, None, None


class BlockChunk(nn.Module):
    """Consecutive time steps [first, first + n) of one stage, parameters stacked along dim 0.

    F(y; W_k, b_k) = σ(W_k y + b_k) (paper eq. 4); each step advances y by the stepper with h.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, h: float, activation: str,
                 stepper: str, stage: int = 0, first: int = 0):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)
        self.h, self.stage, self.first = h, stage, first
        self.activation, self.stepper = activation, stepper
        self._sigma = ACTIVATIONS[activation]
        self._step = STEPPERS[stepper].step
        self.weight_grad_sink: DeferredWeightGrads | None = None   # set by a pipeline stage

    @property
    def num_blocks(self) -> int:
        return self.weight.shape[0]

    def forward(self, y):
        if (self.stepper == "euler" and self.activation in _ACTIVATION_BACKWARD and self.num_blocks
                and torch.is_grad_enabled()):
            deferred = None if self.weight_grad_sink is None else (self.weight_grad_sink, self)
            return _EulerDense.apply(y, self.weight, self.bias, self.h, self.activation, deferred)
        sigma, step, h = self._sigma, self._step, self.h
        for w, b in zip(self.weight.unbind(0), self.bias.unbind(0)):
            y = step(lambda z: sigma(torch.addmm(b, z, w.t())), y, h)
        return y

    def slice(self, start: int, stop: int) -> "BlockChunk":
        """A new chunk holding a copy of steps [start, stop) (local indices)."""
        return BlockChunk(self.weight.detach()[start:stop].clone(), self.bias.detach()[start:stop].clone(),
                          self.h, self.activation, self.stepper, self.stage, self.first + start)

    def extra_repr(self):
        return (f"stage={self.stage}, steps=[{self.first}, {self.first + self.num_blocks}), "
                f"width={self.weight.shape[-1]}, h={self.h:g}, {self.activation}, {self.stepper}")


class ConvBlockChunk(BlockChunk):
    """Conv steps: F(y; W_k, b_k) = σ(N(conv3x3(y; W_k)) + b_k) on [batch, C, H, W] states,
    ``weight[K, C, C, 3, 3]``, ``bias[K, C]``, zero padding (the image size is kept);
    N is the identity (norm "none") or a per-sample normalization over (C, H, W) (norm "layer")."""

    def __init__(self, weight, bias, h, activation, stepper, stage=0, first=0, norm="none"):
        super().__init__(weight, bias, h, activation, stepper, stage, first)
        self.norm = norm

    def forward(self, y):
        sigma, step, h = self._sigma, self._step, self.h
        if self.norm == "none":
            for w, b in zip(self.weight.unbind(0), self.bias.unbind(0)):
                y = step(lambda z: sigma(tf.conv2d(z, w, b, padding=1)), y, h)
            return y
        for w, b in zip(self.weight.unbind(0), self.bias.unbind(0)):
            def f(z):
                c = tf.conv2d(z, w, padding=1)
                return sigma(tf.layer_norm(c, c.shape[1:]) + b[:, None, None])
            y = step(f, y, h)
        return y

    def slice(self, start: int, stop: int) -> "ConvBlockChunk":
        return ConvBlockChunk(self.weight.detach()[start:stop].clone(), self.bias.detach()[start:stop].clone(),
                              self.h, self.activation, self.stepper, self.stage, self.first + start, self.norm)

    def extra_repr(self):
        return (f"stage={self.stage}, steps=[{self.first}, {self.first + self.num_blocks}), "
                f"channels={self.weight.shape[1]}, h={self.h:g}, {self.activation}, {self.stepper}, norm={self.norm}")


class ConvOpening(nn.Module):
    """3x3 convolution in_channels -> C_0 (no bias, zero padding); flattened inputs are reshaped."""

    def __init__(self, input_shape, channels, dtype):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.weight = nn.Parameter(torch.empty(channels, input_shape[0], 3, 3, dtype=dtype))

    def forward(self, x):
        if x.dim() == 2:
            x = x.reshape(x.shape[0], *self.input_shape)
        return tf.conv2d(x, self.weight, padding=1)


class ConvProjection(nn.Module):
    """Between stages: 1x1 convolution C_in -> C_out with stride s ("conv"), or s x s average
    pooling followed by the 1x1 convolution ("avgpool"). No bias."""

    def __init__(self, cin, cout, stride, mode, dtype):
        super().__init__()
        self.stride, self.mode = stride, mode
        self.weight = nn.Parameter(torch.empty(cout, cin, 1, 1, dtype=dtype))

    def forward(self, y):
        if self.mode == "avgpool":
            if self.stride > 1:
                y = tf.avg_pool2d(y, self.stride)
            return tf.conv2d(y, self.weight)
        return tf.conv2d(y, self.weight, stride=self.stride)

    def extra_repr(self):
        return f"{self.weight.shape[1]} -> {self.weight.shape[0]}, stride={self.stride}, {self.mode}"


class PooledHead(nn.Module):
    """Global average pooling over (H, W), then a linear map C -> out ("pool"), or a linear map
    of the flattened state C*H*W -> out ("flatten", Haber et al.'s classifier)."""

    def __init__(self, features, out_features, dtype, flatten=False):
        super().__init__()
        self.flatten = flatten
        self.weight = nn.Parameter(torch.empty(out_features, features, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype))

    def forward(self, y):
        return tf.linear(y.flatten(1) if self.flatten else y.mean(dim=(2, 3)), self.weight, self.bias)


class ODEResNet(nn.Module):
    """Opening Q, stages of residual blocks (projections between stages), head.

    A *shard* (``shard(a, b)``) is the same class holding only global steps [a, b): the opening
    if a == 0, the head if b == K, and projection i if the first step of stage i+1 lies in [a, b).
    A shard maps its input (data x, or the state y_a) to its output (state y_b, or logits).
    """

    def __init__(self, spec: ModelSpec, generator: torch.Generator | None = None,
                 dtype=torch.float32, _empty: bool = False):
        super().__init__()
        self.spec = spec
        self.start, self.stop = 0, spec.total_blocks
        self.opening: nn.Module | None = None
        self.head: nn.Module | None = None
        self.chunks = nn.ModuleList()
        self.projections = nn.ModuleDict()   # key: str(stage index it leads into)
        if _empty:
            return
        g = generator
        if spec.conv:
            self._build_conv(spec, g, dtype)
            return
        widths = [s.width for s in spec.stages]
        self.opening = nn.Linear(spec.in_features, widths[0], bias=False, dtype=dtype)
        _init_linear(self.opening, g, spec.init)
        for i, s in enumerate(spec.stages):
            if i > 0:
                proj = nn.Linear(widths[i - 1], s.width, bias=False, dtype=dtype)
                _init_linear(proj, g, spec.init)
                self.projections[str(i)] = proj
            w = torch.empty(s.blocks, s.width, s.width, dtype=dtype)
            _uniform(w, s.width, g, s.width, spec.init)   # weights random, biases zero (paper §4.2)
            self.chunks.append(BlockChunk(w, torch.zeros(s.blocks, s.width, dtype=dtype),
                                          spec.T / s.blocks, spec.activation, spec.stepper, i, 0))
        self.head = nn.Linear(widths[-1], spec.out_features, dtype=dtype)
        _init_linear(self.head, g, spec.init)

    def _build_conv(self, spec, g, dtype):
        stages = spec.stages
        self.opening = ConvOpening(spec.input_shape, stages[0].width, dtype)
        _uniform(self.opening.weight, spec.input_shape[0] * 9, g, stages[0].width * 9, spec.init)
        for i, s in enumerate(stages):
            if i > 0:
                proj = ConvProjection(stages[i - 1].width, s.width, s.stride, spec.projection, dtype)
                _uniform(proj.weight, stages[i - 1].width, g, s.width, spec.init)
                self.projections[str(i)] = proj
            w = torch.empty(s.blocks, s.width, s.width, 3, 3, dtype=dtype)
            _uniform(w, s.width * 9, g, s.width * 9, spec.init)
            self.chunks.append(ConvBlockChunk(w, torch.zeros(s.blocks, s.width, dtype=dtype), spec.T / s.blocks,
                                              spec.activation, spec.stepper, i, 0, spec.norm))
        flat = spec.head == "flatten"
        features = math.prod(spec.stage_state_shape(len(stages) - 1)) if flat else stages[-1].width
        self.head = PooledHead(features, spec.out_features, dtype, flat)
        _uniform(self.head.weight, features, g, spec.out_features, spec.init)

    # -- evaluation
    def forward(self, inp):
        y = self.opening(inp) if self.opening is not None else inp
        for chunk in self.chunks:
            key = str(chunk.stage)
            if chunk.first == 0 and key in self.projections:
                y = self.projections[key](y)
            y = chunk(y)
        return self.head(y) if self.head is not None else y

    def loss(self, output, target, reduction="mean"):
        """Data loss of the head's output: softmax cross-entropy, or MSE for regression."""
        if self.spec.task == "regression":
            return tf.mse_loss(output, target, reduction=reduction)
        return tf.cross_entropy(output, target, reduction=reduction)

    # -- structure
    def block_chunks(self) -> list[BlockChunk]:
        return list(self.chunks)

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters not indexed by time (opening, projections, head): transferred as identity."""
        mods = [self.opening, *self.projections.values(), self.head]
        return [p for m in mods if m is not None for p in m.parameters()]

    def stage_of_step(self, step: int) -> tuple[int, int]:
        """Global step index -> (stage, index within the stage)."""
        for i, s in enumerate(self.spec.stages):
            if step < s.blocks:
                return i, step
            step -= s.blocks
        raise IndexError(step)

    def shard(self, start: int, stop: int) -> "ODEResNet":
        """A copy of global steps [start, stop) with the shared pieces that go with them."""
        total = self.spec.total_blocks
        if not 0 <= start < stop <= total:
            raise ValueError(f"shard [{start}, {stop}) is not inside [0, {total})")
        if (self.start, self.stop) != (0, total):
            raise ValueError("shard() takes a full model")
        out = ODEResNet(self.spec, _empty=True)
        out.start, out.stop = start, stop
        offset = 0
        for i, (s, chunk) in enumerate(zip(self.spec.stages, self.chunks)):
            lo, hi = max(start, offset), min(stop, offset + s.blocks)
            if lo < hi:
                out.chunks.append(chunk.slice(lo - offset, hi - offset))
                if i > 0 and lo == offset:
                    out.projections[str(i)] = _copy_module(self.projections[str(i)])
            offset += s.blocks
        if start == 0:
            out.opening = _copy_module(self.opening)
        if stop == total:
            out.head = _copy_module(self.head)
        return out

    def state_shape(self, step: int, batch: int) -> tuple[int, ...]:
        """Shape of the state y_step passed into global step `step` (before any projection):
        what a layer-parallel rank starting at `step` receives, preallocated from this plan."""
        stage, index = self.stage_of_step(step)
        if index == 0 and stage > 0:
            stage -= 1
        return (batch, *self.spec.stage_state_shape(stage))

    def output_shape(self, batch: int) -> tuple[int, ...]:
        """Shape of the last state y_K (before the head)."""
        return (batch, *self.spec.stage_state_shape(len(self.spec.stages) - 1))


def shard_state(model: ODEResNet) -> dict:
    """A shard's parameters keyed by position, so that any other partition can reassemble them."""
    return {"chunks": [(c.stage, c.first, c.weight.detach().cpu().clone(), c.bias.detach().cpu().clone())
                       for c in model.block_chunks()],
            "shared": {n: p.detach().cpu().clone() for n, p in model.named_parameters()
                       if not n.startswith("chunks.")}}


def assemble_state(parts: list[dict]) -> dict:
    """The full model's state dict from the ``shard_state`` of every shard."""
    state, stages = {}, {}
    for part in parts:
        state.update(part["shared"])
        for stage, first, w, b in part["chunks"]:
            stages.setdefault(stage, []).append((first, w, b))
    for stage, pieces in stages.items():
        pieces.sort(key=lambda t: t[0])
        state[f"chunks.{stage}.weight"] = torch.cat([w for _, w, _ in pieces])
        state[f"chunks.{stage}.bias"] = torch.cat([b for _, _, b in pieces])
    return state


def _init_bound(fan_in: int, fan_out: int, init: str) -> float:
    """Half-width of the uniform weight distribution: 1/√fan_in, or Glorot's √(6/(fan_in+fan_out))
    (variance 2/(fan_in+fan_out); Keras' default, which the MG/OPT paper's code uses)."""
    if _choice("init", init, {k: k for k in INITS}) == "glorot":
        return math.sqrt(6.0 / (fan_in + fan_out))
    return 1.0 / math.sqrt(fan_in)


def _init_linear(lin: nn.Linear, g, init: str = "uniform"):
    bound = _init_bound(lin.in_features, lin.out_features, init)
    with torch.no_grad():
        lin.weight.uniform_(-bound, bound, generator=g)
        if lin.bias is not None:
            lin.bias.zero_()


def _uniform(t: torch.Tensor, fan_in: int, g, fan_out: int | None = None, init: str = "uniform"):
    """Fill `t` uniformly; fan_in / fan_out count the inputs / outputs of one weight (× kernel size for convs)."""
    bound = _init_bound(fan_in, fan_in if fan_out is None else fan_out, init)
    with torch.no_grad():
        t.uniform_(-bound, bound, generator=g)


def _copy_module(m):
    import copy
    return copy.deepcopy(m)


def build_model(spec: ModelSpec, seed: int = 0, dtype=torch.float32) -> ODEResNet:
    """The full model with parameters drawn from `seed`: identical on every rank that calls it."""
    g = torch.Generator().manual_seed(seed)
    return ODEResNet(spec, generator=g, dtype=dtype)


def tikhonov(model: ODEResNet, beta: float, block_weight: float) -> torch.Tensor:
    """β (w Σ_k ‖θ_k‖² + ‖θ_shared‖²): w is 2^(L-l) (paper §4.1) or h (L2(0,T) metric)."""
    blocks = sum((c.weight.square().sum() + c.bias.square().sum()) for c in model.chunks)
    shared = sum(p.square().sum() for p in model.shared_parameters())
    return beta * (block_weight * blocks + shared)
