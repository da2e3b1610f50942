"""ODE ResNets: a residual network is a time discretization of dy/dt = F(y; θ(t)) on [0, T].

x --opening Q--> y_0 --step_0--> y_1 ... --step_{K-1}--> y_K --head--> logits      (paper eq. 3-8)

The model is a plain ``nn.Module`` with no communication. Block parameters of a stage are stored
stacked (``weight[K, v, v]``, ``bias[K, v]``) so that time transfers (``multilevel.hierarchy``) are
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

import copy
import math

import torch
import torch.nn.functional as tf
from torch import nn

from .blocks import (BlockChunk, ConvBlockChunk, ConvOpening, ConvProjection, PooledHead, init_linear,
                     init_uniform)
from .spec import ModelSpec


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
        init_linear(self.opening, g, spec.init)
        for i, s in enumerate(spec.stages):
            if i > 0:
                proj = nn.Linear(widths[i - 1], s.width, bias=False, dtype=dtype)
                init_linear(proj, g, spec.init)
                self.projections[str(i)] = proj
            w = torch.empty(s.blocks, s.width, s.width, dtype=dtype)
            init_uniform(w, s.width, g, s.width, spec.init)   # weights random, biases zero (paper §4.2)
            self.chunks.append(BlockChunk(w, torch.zeros(s.blocks, s.width, dtype=dtype),
                                          spec.T / s.blocks, spec.activation, spec.stepper, i, 0))
        self.head = nn.Linear(widths[-1], spec.out_features, dtype=dtype)
        init_linear(self.head, g, spec.init)

    def _build_conv(self, spec, g, dtype):
        stages = spec.stages
        self.opening = ConvOpening(spec.input_shape, stages[0].width, dtype)
        init_uniform(self.opening.weight, spec.input_shape[0] * 9, g, stages[0].width * 9, spec.init)
        for i, s in enumerate(stages):
            if i > 0:
                proj = ConvProjection(stages[i - 1].width, s.width, s.stride, spec.projection, dtype)
                init_uniform(proj.weight, stages[i - 1].width, g, s.width, spec.init)
                self.projections[str(i)] = proj
            w = torch.empty(s.blocks, s.width, s.width, 3, 3, dtype=dtype)
            init_uniform(w, s.width * 9, g, s.width * 9, spec.init)
            self.chunks.append(ConvBlockChunk(w, torch.zeros(s.blocks, s.width, dtype=dtype), spec.T / s.blocks,
                                              spec.activation, spec.stepper, i, 0, spec.norm))
        flat = spec.head == "flatten"
        features = math.prod(spec.stage_state_shape(len(stages) - 1)) if flat else stages[-1].width
        self.head = PooledHead(features, spec.out_features, dtype, flat)
        init_uniform(self.head.weight, features, g, spec.out_features, spec.init)

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
                    out.projections[str(i)] = copy.deepcopy(self.projections[str(i)])
            offset += s.blocks
        if start == 0:
            out.opening = copy.deepcopy(self.opening)
        if stop == total:
            out.head = copy.deepcopy(self.head)
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


def build_model(spec: ModelSpec, seed: int = 0, dtype=torch.float32) -> ODEResNet:
    """The full model with parameters drawn from `seed`: identical on every rank that calls it."""
    g = torch.Generator().manual_seed(seed)
    return ODEResNet(spec, generator=g, dtype=dtype)


def tikhonov(model: ODEResNet, beta: float, block_weight: float) -> torch.Tensor:
    """β (w Σ_k ‖θ_k‖² + ‖θ_shared‖²): w is 2^(L-l) (paper §4.1) or h (L2(0,T) metric)."""
    blocks = sum((c.weight.square().sum() + c.bias.square().sum()) for c in model.chunks)
    shared = sum(p.square().sum() for p in model.shared_parameters())
    return beta * (block_weight * blocks + shared)
