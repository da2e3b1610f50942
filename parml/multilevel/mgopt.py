"""MG/OPT: the V-cycle of Gaedke-Merzhäuser et al. (Algorithm 1), cycle notation and work units.

Level objective (eq. 9): H^l(θ) = L^l(θ) + <δg^l, θ>, with the first-order coherence term
δg^l = R ∇H^{l+1}(θ^{l+1}) - ∇L^l(R_θ θ^{l+1}), so that ∇H^l at the restricted point equals the
restricted fine gradient. The coarse correction e = θ^l - θ^{l,0} is prolongated and added.

A ``Level`` sees only its executor: something that computes the data loss and the gradients of
the parameters this process holds (serially, or one layer-parallel shard) and sums a few values
of each rank over the level's ranks in the same collective (``forward_backward_sum``), and that
gathers and fetches neighbouring rows (``allgather_object``, ``time_halos``). So one V-cycle code
runs on one rank or on many, and this module never sees a communicator.

On the CPU a level's parameters are slices of one vector θ and its gradient is one vector in the
same order, so the Tikhonov term, the GD steps and (between levels on the same ranks, constant
interpolation) the transfers are a few numpy ops each (``Level._descend``, ``VCycle._cycle_vectors``,
``hierarchy.IndexTransfers``); elsewhere the same steps run on lists of tensors.
"""
from __future__ import annotations

import functools
import math
import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .hierarchy import (IndexTransfers, block_mask, ordered_parameters, prolongate, restrict_gradient,
                        restrict_parameters, step_sizes)


class CycleError(ValueError):
    """A cycle string that cannot be parsed or does not fit the hierarchy."""


class NonFiniteError(ArithmeticError):
    """A loss or gradient became NaN/inf; the message says on which rank, level and blocks."""


# --- the paper's list notation ---------------------------------------------------------------------

@dataclass(frozen=True)
class CycleSetup:
    """Optimizer steps per level, finest first (paper §4.2 notation, e.g. ``[(1),1,2,{2}]``).

    ``steps[i] = (pre, post)`` for the non-coarsest levels; ``(n)`` is n pre-smoothing steps and no
    post-smoothing, plain ``n`` is n of each; ``coarsest`` is the ``{n}`` steps on level 1.
    """
    steps: tuple[tuple[int, int], ...]
    coarsest: int

    @property
    def levels(self) -> int:
        return len(self.steps) + 1

    @classmethod
    def parse(cls, text: str) -> "CycleSetup":
        body = text.strip()
        if body.startswith("[") and body.endswith("]"):
            body = body[1:-1]
        entries = [e.strip() for e in body.split(",")] if body.strip() else []
        if not entries:
            raise CycleError(f"--cycle {text!r} is empty; expected e.g. '[(1),1,2,{{2}}]'")
        last = re.fullmatch(r"\{\{?(\d+)\}?\}", entries[-1])
        if not last:
            raise CycleError(f"--cycle {text!r}: the last (coarsest) entry must be {{n}}, got {entries[-1]!r}")
        steps = []
        for e in entries[:-1]:
            m = re.fullmatch(r"\((\d+)\)|(\d+)", e)
            if not m:
                raise CycleError(f"--cycle {text!r}: entry {e!r} is not n, (n) or {{n}}")
            steps.append((int(m[1]), 0) if m[1] is not None else (int(m[2]), int(m[2])))
        return cls(tuple(steps), int(last[1]))

    @classmethod
    def default(cls, levels: int) -> "CycleSetup":
        """The paper's setups: [(1), 1..., 2..., {2}] (Table 1); one GD step for L = 1."""
        if levels == 1:
            return cls((), 1)
        middle = levels - 2
        inner = [(1, 1)] * ((middle + 1) // 2) + [(2, 2)] * (middle // 2)
        return cls(((1, 0), *inner), 2)

    def __str__(self):
        parts = [f"({a})" if b == 0 else (str(a) if a == b else f"{a}/{b}") for a, b in self.steps]
        return "[" + ",".join(parts + [f"{{{self.coarsest}}}"]) + "]"

    def check(self, levels: int, option: str = "--cycle") -> "CycleSetup":
        if self.levels != levels:
            raise CycleError(f"{option} {self} has {self.levels} entries but --levels is {levels}")
        return self

    def cost(self) -> float:
        """Work units of one V-cycle by eq. (10): 2^(1-L) μ^1 + Σ_{l=2..L} (μ1+μ2+1) 2^(l-L)."""
        total = self.coarsest * 2.0 ** (1 - self.levels)
        for i, (pre, post) in enumerate(self.steps):        # i = 0 is the finest level L
            total += (pre + post + 1) * 2.0 ** (-i)
        return total


# --- level optimizers: the paper's Algorithm 3 is plain gradient descent ("sgd") ---------------------

class GradientDescent:
    """θ ← θ − lr·∇ (Algorithm 3): the arithmetic of ``torch.optim.SGD`` without momentum, and the
    attributes the V-cycle, the learning-rate schedule and checkpoints use (``param_groups``,
    ``state``). Not torch.optim because its first optimizer imports torch._dynamo (~2 s of CPU in
    every rank of every run) and plain GD needs none of it."""

    def __init__(self, params, lr: float):
        self.param_groups = [{"params": list(params), "lr": lr}]
        self.state: dict = {}          # plain GD keeps no per-parameter state

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:      # one multi-tensor op per group, not one op per parameter
            ps = [p for p in group["params"] if p.grad is not None]
            if ps:
                torch._foreach_add_(ps, [p.grad for p in ps], alpha=-group["lr"])


LEVEL_OPTIMIZERS = {
    "sgd": GradientDescent,
    "momentum": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
}


def level_optimizer(name: str, lr: float):
    """A factory params -> optimizer for every level (``Level(make_optimizer=...)``)."""
    if name not in LEVEL_OPTIMIZERS:
        raise ValueError(f"unknown level optimizer {name!r}; valid: {', '.join(LEVEL_OPTIMIZERS)}")
    make = LEVEL_OPTIMIZERS[name]
    return lambda params: make(params, lr)


# --- one level as MG/OPT sees it -----------------------------------------------------------------

@dataclass
class LevelStats:
    gradients: int = 0
    work_units: float = 0.0
    seconds: float = 0.0


class Level:
    """One level: its parameters (local to this rank), loss/gradient oracle and level optimizer.

    ``block_weight`` is the Tikhonov weight w of β(w Σ‖θ_k‖² + ‖θ_shared‖²); ``metric`` "l2" takes
    block steps in the L2(0,T) metric (gradient divided by h), "euclidean" on the raw parameters.
    """

    def __init__(self, executor, beta: float, block_weight: float, metric: str, cost: float,
                 make_optimizer, number: int = 0):
        self.executor = executor
        self.model = executor.model
        self.params = ordered_parameters(self.model)
        self.mask = block_mask(self.model)
        self.scale = [1.0 / h for h in step_sizes(self.model)] if metric == "l2" else None
        self.beta, self.block_weight, self.cost = beta, block_weight, cost
        # the Tikhonov weight of each parameter; the parameters by weight (block or shared), whose
        # gradients 2wθ are added with one multi-tensor op per weight
        self._w = [beta * (block_weight if is_block else 1.0) for is_block in self.mask]
        self._by_weight = [([i for i, x in enumerate(self._w) if x == w], 2.0 * w) for w in sorted(set(self._w))]
        # on the CPU every parameter is a slice of one vector θ, so the Tikhonov term, its gradient
        # and the finiteness check are a few numpy ops over all of them (``_tikhonov_flat``)
        self._theta = _flatten(self.params)
        self._shapes = [tuple(p.shape) for p in self.params]
        if self._theta is not None:
            sizes = [p.numel() for p in self.params]
            self._twice_w = np.repeat(2.0 * np.array(self._w), sizes).astype(self._theta.dtype)
            self._scale_flat = None if self.scale is None else np.repeat(np.array(self.scale), sizes).astype(
                self._theta.dtype)
        # where the executor's gradient buffer is laid out as θ (one rank holding the whole model:
        # ``NetworkGradient.layout``), the Tikhonov term is added to it with no copy
        layout = getattr(getattr(executor, "network", None), "layout", None)
        self._aligned = (self._theta is not None and layout is not None and len(layout) == len(self.params)
                         and all(a is b for a, b in zip(layout, self.params)))
        self.optimizer = make_optimizer(self.params)
        self.stats = LevelStats()
        self.number = number
        self._version = 0
        self._cache = None

    @property
    def theta(self) -> np.ndarray | None:
        """θ, the level's parameters on this rank as one numpy vector (``ordered_parameters`` order,
        the parameters are its slices), where they are CPU tensors of one dtype; else None."""
        return self._theta

    # parameters as plain tensors
    def values(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    def assign(self, values) -> None:
        """θ ← values: a list of tensors, or on the CPU one vector in θ's order."""
        if isinstance(values, np.ndarray):
            self._theta[:] = values
        else:
            with torch.no_grad():
                for p, v in zip(self.params, values):
                    p.copy_(v)
        self._version += 1

    def add(self, values) -> None:
        """θ ← θ + values (a list, or one vector as in ``assign``)."""
        if isinstance(values, np.ndarray):
            self._theta += values
        else:
            with torch.no_grad():
                for p, v in zip(self.params, values):
                    p.add_(v)
        self._version += 1

    def views(self, vector: np.ndarray) -> list[torch.Tensor]:
        """One vector in θ's order as per-parameter tensors (views)."""
        out, offset = [], 0
        for shape in self._shapes:
            n = math.prod(shape)
            out.append(torch.from_numpy(vector[offset:offset + n].reshape(shape)))
            offset += n
        return out

    def gradient(self, batch, batch_id) -> tuple[float, list[torch.Tensor]]:
        """(L^l, ∇L^l) at the current parameters: data loss + Tikhonov. Cached per point and batch,
        so the δg evaluation doubles as the coarse level's first step (eq. 10 counts it once)."""
        loss, _ = self.gradient_vector(batch, batch_id)
        key, _, grads, flat = self._cache
        if grads is None:          # on the CPU: views of the vector, made where a list is asked for
            grads = self.views(flat)
            self._cache = (key, loss, grads, flat)
        return loss, grads

    def gradient_vector(self, batch, batch_id) -> tuple[float, np.ndarray | None]:
        """``gradient`` without the per-parameter list: (L^l, ∇L^l as one vector in θ's order) on the
        CPU, (L^l, None) elsewhere. Cached like ``gradient`` (``self._cache`` = (key, loss, list or
        None until asked for, vector))."""
        key = (self._version, batch_id)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1], self._cache[3]
        t0 = time.perf_counter()
        grads, vector, finite = [], None, True

        def local(flat=None) -> torch.Tensor:
            """This rank's Tikhonov term and non-finite flag, summed by the executor (`flat`: the
            executor's gradient buffer where it holds the whole model)."""
            nonlocal vector, finite
            reg, finite, vector = self._tikhonov(grads, flat)
            if self._theta is not None:
                return torch.from_numpy(np.array([reg, 0.0 if finite else 1.0]))
            return torch.tensor([reg, 0.0 if finite else 1.0], dtype=torch.float64, device=self.params[0].device)

        loss, totals = self.executor.forward_backward_sum(*batch, local)
        reg, bad = totals.tolist()
        loss += reg
        if bad > 0 or not math.isfinite(loss):
            self._raise_non_finite(loss, finite)
        self.stats.gradients += 1
        self.stats.work_units += self.cost
        self.stats.seconds += time.perf_counter() - t0
        self._cache = (key, loss, None if vector is not None else grads, vector)
        return loss, vector

    def _tikhonov(self, out: list, flat=None) -> tuple[float, bool, np.ndarray | None]:
        """∇L^l = ∇(data loss) + 2βw θ and (β Σ w‖θ_i‖², all finite, ∇L^l as one vector in θ's order
        on the CPU); elsewhere ∇L^l goes into `out`, per parameter, and the vector is None."""
        if self._theta is not None:
            g = flat.numpy()[:-1] if flat is not None and self._aligned else [p.grad for p in self.params]
            return _tikhonov_flat(self._theta, self._twice_w, g)
        return (*_tikhonov_lists([p.detach() for p in self.params], [p.grad.detach() for p in self.params],
                                 self._w, self._by_weight, out), None)

    def _raise_non_finite(self, loss, finite):
        """Every rank of the level stops together. The message names where it started: the ranks
        whose parameters are non-finite, else those whose gradients are."""
        bad_params = not all(bool(torch.isfinite(p).all()) for p in self.params)
        m = self.model
        here = (bad_params, not finite, f"rank {self.executor.rank}, level {self.number}, blocks [{m.start}, {m.stop})")
        every = self.executor.allgather_object(here)
        params = [w for p, _, w in every if p]
        grads = [w for _, g, w in every if g]
        if params:
            where = "non-finite parameters at " + "; ".join(params)
        elif grads:
            where = "non-finite gradient at " + "; ".join(grads)
        else:
            where = f"non-finite loss {loss} at level {self.number}"
        raise NonFiniteError(where)

    def smooth(self, steps, dg, batch, batch_id, observe=None) -> float | None:
        """`steps` level-optimizer steps on H^l = L^l + <δg, θ> (Algorithm 3 with plain GD);
        `observe(θ, ∇L, ∇H)` sees each step's point and gradients (tests of eq. 9)."""
        first = None
        vector = observe is None and self._theta is not None and type(self.optimizer) is GradientDescent
        if steps and dg is not None:        # δg comes as a list, or on the CPU as one vector
            if vector:
                dg = _as_vector(dg)
            elif isinstance(dg, np.ndarray):
                dg = self.views(dg)
        for _ in range(steps):
            if vector:
                loss, gl = self.gradient_vector(batch, batch_id)
                first = loss if first is None else first
                t0 = time.perf_counter()
                self._descend(gl, dg)
                self.stats.seconds += time.perf_counter() - t0
                continue
            loss, gl = self.gradient(batch, batch_id)
            first = loss if first is None else first
            t0 = time.perf_counter()
            # list arithmetic as multi-tensor ops: ~10 µs each against ~3 µs per parameter and op
            g = gl if dg is None else torch._foreach_add(gl, dg)
            if observe is not None:
                observe(self.values(), gl, g)
            if self.scale is not None:
                g = torch._foreach_mul(g, self.scale)
            for p, d in zip(self.params, g):
                p.grad = d
            self.optimizer.step()
            self._version += 1
            self.stats.seconds += time.perf_counter() - t0
        return first

    def _descend(self, gl: np.ndarray, dg: np.ndarray | None) -> None:
        """``smooth``'s step for plain GD on the CPU, θ ← θ − lr·M(∇L^l + δg) (M: the metric's 1/h
        per block entry), as three numpy ops on θ instead of multi-tensor ops over the parameters
        (~10 µs each; a V-cycle takes ~20 steps, a fixed cost that does not halve on a data replica)."""
        (group,) = self.optimizer.param_groups
        g = gl + dg if dg is not None else gl.copy()
        if self._scale_flat is not None:
            g *= self._scale_flat
        g *= group["lr"]
        self._theta -= g
        self._version += 1


def _as_vector(values) -> np.ndarray:
    """A list of CPU tensors in θ's order as one vector (a vector as it is)."""
    return values if isinstance(values, np.ndarray) else torch.cat([v.reshape(-1) for v in values]).numpy()


def _flatten(params) -> np.ndarray | None:
    """Rebind `params` to consecutive slices of one new CPU buffer (their values kept) and return it
    as a numpy vector θ; None, nothing changed, unless all are CPU tensors of one float dtype. In
    place updates (optimizer steps, ``assign``, ``load_state_dict``) write through the slices."""
    if not params or any(p.device.type != "cpu" or p.dtype not in (torch.float32, torch.float64)
                         or p.dtype != params[0].dtype for p in params):
        return None
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.data = flat[offset:offset + n].view_as(p)
            offset += n
    return flat.numpy()


def _tikhonov_flat(theta: np.ndarray, twice_w: np.ndarray, g) -> tuple[float, bool, np.ndarray]:
    """The Tikhonov term of eq. (9)'s L^l on one vector: a handful of numpy ops for every parameter
    at once. Per-parameter torch ops took ~50 µs of a coarse level's ~250 µs gradient (circles, 16
    blocks); a V-cycle takes 28 gradients, and on a data replica they are a fixed cost that does not
    halve with the batch.

    `g`: the data-loss gradients, a list of per-parameter tensors or one vector in θ's order.
    Returns (β Σ w‖θ_i‖², ∇L^l all finite, ∇L^l as one vector in θ's order)."""
    t = theta * twice_w
    reg = 0.5 * float(t @ theta)
    t += g if isinstance(g, np.ndarray) else np.concatenate([x.numpy().reshape(-1) for x in g])
    return reg, bool(np.isfinite(t).all()), t


def _tikhonov_lists(d: list, g: list, w: list, by_weight: list, out: list) -> tuple[float, bool]:
    """``_tikhonov_flat`` for parameters that are not one CPU vector (CUDA): one multi-tensor add
    per weight group, every norm read at once."""
    out.extend(g)
    for idx, twice_w in by_weight:
        for i, t in zip(idx, torch._foreach_add([g[i] for i in idx], [d[i] for i in idx], alpha=twice_w)):
            out[i] = t
    # ‖θ_i‖ and max |∇_i| (inf or nan where any entry is) of every parameter, read at once
    norms = torch.stack(torch._foreach_norm(d) + torch._foreach_norm(out, ord=math.inf)).tolist()
    n = len(d)
    return sum(wi * v * v for wi, v in zip(w, norms[:n])), all(math.isfinite(v) for v in norms[n:])


# --- the V-cycle -----------------------------------------------------------------------------------

@dataclass
class CycleResult:
    loss: float                      # finest-level objective at the start of the cycle
    work_units: float                # spent in this cycle
    level_seconds: list[float] = field(default_factory=list)   # coarsest first


class VCycle:
    """Algorithm 1 over `levels` (coarsest first); one call is one V-cycle on one batch.

    Multilevel SGD (Algorithm 2) is a V-cycle per mini-batch; with one level it is plain GD/SGD.
    Layer-parallel: ``levels[i]`` is None on ranks outside level i's group, and ``movers[i]``
    = (down, up) moves restricted tensors from level i+1's layout to level i's and the
    correction back (``parallel.transfer.Mover``); without movers transfers stay on-rank.
    """

    def __init__(self, levels: list[Level | None], setup: CycleSetup, interpolation: str = "constant",
                 movers: list | None = None, observer=None):
        setup.check(len(levels))
        self.levels, self.setup, self.interpolation = levels, setup, interpolation
        self.movers = movers
        # where a level and the next coarser one are CPU vectors on the same ranks, the constant
        # transfers and the cycle's arithmetic between them are numpy ops on θ (``_cycle_vectors``)
        self._index = [None] * len(levels)
        for i in range(1, len(levels)):
            fine, coarse = levels[i], levels[i - 1]
            moves = movers[i - 1] if movers else (None, None)
            if (interpolation == "constant" and fine is not None and coarse is not None
                    and fine.theta is not None and coarse.theta is not None
                    and all(m is None or getattr(m, "local", False) for m in moves)):
                self._index[i] = IndexTransfers(coarse.params, coarse.mask)
        # observer(i, kind, θ, ∇L, ∇H) with kind "pre" | "post" (each smoothing step) | "restrict" (the
        # point restricted to level i-1): lets tests check eq. (9) at run time, on every rank
        self.observer = observer

    def _watch(self, i, kind):
        return None if self.observer is None else functools.partial(self.observer, i, kind)

    @property
    def work_units(self) -> float:
        """Work units spent so far (complete on rank 0, which every level's group contains)."""
        return sum(lev.stats.work_units for lev in self.levels if lev is not None)

    def __call__(self, batch, batch_id=0) -> CycleResult:
        before = self.work_units
        secs = [lev.stats.seconds if lev else 0.0 for lev in self.levels]
        loss = self._cycle(len(self.levels) - 1, None, batch, batch_id)
        return CycleResult(loss, self.work_units - before,
                           [(lev.stats.seconds if lev else 0.0) - s for lev, s in zip(self.levels, secs)])

    def _cycle(self, i, dg, batch, batch_id):
        lev = self.levels[i]
        if i == 0:
            return lev.smooth(self.setup.coarsest, dg, batch, batch_id, self._watch(i, "pre"))
        if self._index[i] is not None and self.observer is None:
            return self._cycle_vectors(i, dg, batch, batch_id)
        if isinstance(dg, np.ndarray):             # from a level above that ran on vectors
            dg = lev.views(dg)
        pre, post = self.setup.steps[len(self.levels) - 1 - i]
        first = lev.smooth(pre, dg, batch, batch_id, self._watch(i, "pre"))
        loss, gl = lev.gradient(batch, batch_id)
        first = loss if first is None else first
        g = gl if dg is None else torch._foreach_add(gl, dg)
        if self.observer is not None:
            self.observer(i, "restrict", lev.values(), gl, g)
        restricted = theta0 = restrict_parameters(lev.values(), lev.mask, self.interpolation)
        before = closes = None
        if self.interpolation == "linear":
            before, closes = lev.executor.time_halos(g, lev.mask, "previous_last")
        rg = restrict_gradient(g, lev.mask, self.interpolation, before, closes)
        coarse = self.levels[i - 1]
        down, up = self.movers[i - 1] if self.movers else (None, None)
        if down is not None:
            like = coarse.params if coarse is not None else None
            theta0, rg = down(restricted, like, 0), down(rg, like, 1)
        correction = None
        if coarse is not None:
            coarse.assign(theta0)
            _, g_coarse = coarse.gradient(batch, batch_id)
            self._cycle(i - 1, torch._foreach_sub(rg, g_coarse), batch, batch_id)
            correction = torch._foreach_sub([p.detach() for p in coarse.params], theta0)
        if up is not None:
            correction = up(correction, restricted, 0)
        after = None
        if self.interpolation == "linear":
            after, _ = lev.executor.time_halos(correction, lev.mask, "next_first")
        lev.add(prolongate(correction, lev.mask, self.interpolation, after))
        lev.smooth(post, dg, batch, batch_id, self._watch(i, "post"))
        return first

    def _cycle_vectors(self, i, dg, batch, batch_id):
        """``_cycle`` where level i and i-1 are CPU vectors θ on the same ranks and the transfers
        are constant: the same steps as index maps and numpy ops on θ (``IndexTransfers``)."""
        lev, coarse, maps = self.levels[i], self.levels[i - 1], self._index[i]
        dg = None if dg is None else _as_vector(dg)
        pre, post = self.setup.steps[len(self.levels) - 1 - i]
        first = lev.smooth(pre, dg, batch, batch_id)
        loss, gl = lev.gradient_vector(batch, batch_id)
        first = loss if first is None else first
        g = gl if dg is None else gl + dg                                # ∇H^l
        theta0 = maps.restrict_parameters(lev.theta)
        rg = maps.restrict_gradient(g)
        coarse.assign(theta0)
        _, g_coarse = coarse.gradient_vector(batch, batch_id)
        self._cycle(i - 1, rg - g_coarse, batch, batch_id)              # δg of the coarse level
        lev.add(maps.prolongate(coarse.theta - theta0))
        lev.smooth(post, dg, batch, batch_id)
        return first
