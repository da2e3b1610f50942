"""ODE ResNets: a residual network is a time discretization of dy/dt = F(y; θ(t)) on [0, T].

x --opening Q--> y_0 --step_0--> y_1 ... --step_{K-1}--> y_K --head--> logits      (paper eq. 3-8)

The model is a plain ``nn.Module`` with no communication. Block parameters of a stage are stored
stacked (``weight[K, v, v]``, ``bias[K, v]``) so that time transfers (``hierarchy.py``) are
vectorised and a layer-parallel shard is just a slice of the stack (``ODEResNet.shard``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import nn
import torch.nn.functional as tf

ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh}


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

@dataclass(frozen=True)
class StageSpec:
    """A run of residual blocks at one width: `blocks` time steps of size T / blocks."""
    width: int
    blocks: int


@dataclass(frozen=True)
class ModelSpec:
    in_features: int
    out_features: int
    stages: tuple[StageSpec, ...] = (StageSpec(3, 2048),)
    T: float = 1.0
    activation: str = "relu"
    stepper: str = "euler"
    task: str = "classification"   # or "regression" (MSE)

    def __post_init__(self):
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("stepper", self.stepper, STEPPERS)
        if self.task not in ("classification", "regression"):
            raise ValueError(f"unknown task {self.task!r}; valid: classification, regression")
        if not self.stages or any(s.blocks < 1 or s.width < 1 for s in self.stages):
            raise ValueError("every stage needs at least one block and a positive width")

    @property
    def total_blocks(self) -> int:
        return sum(s.blocks for s in self.stages)

    def coarsened(self, factor: int) -> "ModelSpec":
        """The same network with `factor` times fewer (and longer) steps in every stage."""
        return replace(self, stages=tuple(StageSpec(s.width, s.blocks // factor) for s in self.stages))


# --- modules ---------------------------------------------------------------------------------------

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

    @property
    def num_blocks(self) -> int:
        return self.weight.shape[0]

    def forward(self, y):
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
        widths = [s.width for s in spec.stages]
        self.opening = nn.Linear(spec.in_features, widths[0], bias=False, dtype=dtype)
        _init_linear(self.opening, g)
        for i, s in enumerate(spec.stages):
            if i > 0:
                proj = nn.Linear(widths[i - 1], s.width, bias=False, dtype=dtype)
                _init_linear(proj, g)
                self.projections[str(i)] = proj
            w = torch.empty(s.blocks, s.width, s.width, dtype=dtype)
            bound = 1.0 / math.sqrt(s.width)
            w.uniform_(-bound, bound, generator=g)   # weights random, biases zero (paper §4.2)
            self.chunks.append(BlockChunk(w, torch.zeros(s.blocks, s.width, dtype=dtype),
                                          spec.T / s.blocks, spec.activation, spec.stepper, i, 0))
        self.head = nn.Linear(widths[-1], spec.out_features, dtype=dtype)
        _init_linear(self.head, g)

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
        return (batch, self.spec.stages[stage].width)

    def output_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, self.spec.stages[-1].width)


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


def _init_linear(lin: nn.Linear, g):
    bound = 1.0 / math.sqrt(lin.in_features)
    with torch.no_grad():
        lin.weight.uniform_(-bound, bound, generator=g)
        if lin.bias is not None:
            lin.bias.zero_()


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
