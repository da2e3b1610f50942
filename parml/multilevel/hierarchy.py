"""The hierarchy of networks coarsened in time, and the transfers between neighbouring levels.

Level l = 1 (coarsest) ... L (finest); each coarser level halves every stage's blocks and doubles h
(paper §2.2.2). Transfers act on block parameters along the time axis (dim 0 of a chunk's stacked
tensors); shared parameters (opening, projections, head) are transferred as the identity (§3.1).

- ``prolongate``: I, coarse -> fine. "constant": fine 2j, 2j+1 <- coarse j (the paper's choice);
  "linear": fine 2j <- c_j, fine 2j+1 <- (c_j + c_{j+1}) / 2 (Haber et al.), c_{J} := c_{J-1}.
- ``restrict_gradient``: R = I^T, so <R g, e> = <g, I e>.
- ``restrict_parameters``: a left inverse of I (average of pairs for "constant", injection for "linear").

Every operator takes a list of tensors in ``ordered_parameters`` order and works chunk by chunk,
so on a layer-parallel rank whose chunk boundaries are aligned across levels "constant" is local;
"linear" reads one row across each rank boundary inside a stage (the halos of
``parallel.transfer.time_halos``).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..model import ModelSpec, ODEResNet

INTERPOLATIONS = ("constant", "linear")
METRICS = ("l2", "euclidean")


class HierarchyError(ValueError):
    """A hierarchy that this network cannot have; the message names the option."""


def check_levels(spec: ModelSpec, levels: int) -> None:
    """Every stage must halve cleanly levels-1 times and keep at least one block."""
    if levels < 1:
        raise HierarchyError(f"--levels {levels} must be at least 1")
    factor = 2 ** (levels - 1)
    for s in spec.stages:
        if factor > s.blocks:
            raise HierarchyError(f"--levels {levels} is too deep for {s.blocks} blocks: at most "
                                 f"{int(math.log2(s.blocks)) + 1} (each coarser level halves the blocks)")
        if s.blocks % factor:
            raise HierarchyError(f"--blocks {s.blocks} must be divisible by 2^(levels-1) = {factor} "
                                 f"for --levels {levels}")


def level_specs(spec: ModelSpec, levels: int) -> list[ModelSpec]:
    """Specs of levels 1..L (coarsest first)."""
    check_levels(spec, levels)
    return [spec.coarsened(2 ** (levels - 1 - i)) for i in range(levels)]


def ordered_parameters(model: ODEResNet) -> list[torch.nn.Parameter]:
    """Canonical order: each chunk's (weight, bias), then the shared parameters."""
    out = []
    for c in model.block_chunks():
        out += [c.weight, c.bias]
    return out + model.shared_parameters()


def block_mask(model: ODEResNet) -> list[bool]:
    """True for time-indexed (block) entries of ``ordered_parameters``."""
    n = 2 * len(model.block_chunks())
    return [True] * n + [False] * len(model.shared_parameters())


def step_sizes(model: ODEResNet) -> list[float]:
    """h of each block entry, 1.0 for shared: the L2(0,T) metric's weights."""
    hs = []
    for c in model.block_chunks():
        hs += [c.h, c.h]
    return hs + [1.0] * len(model.shared_parameters())


# --- time transfers on one stacked tensor (dim 0 = time) ----------------------------------------

def _prolongate(c: torch.Tensor, interpolation: str, after: torch.Tensor | None = None) -> torch.Tensor:
    """`after`: the next coarse row when the stage continues on the next rank (else c_J := c_{J-1})."""
    if interpolation == "constant":
        return c.repeat_interleave(2, dim=0)
    nxt = torch.cat([c[1:], c[-1:] if after is None else after], dim=0)
    return torch.stack([c, (c + nxt) / 2], dim=1).flatten(0, 1)


def _restrict_gradient(g: torch.Tensor, interpolation: str, before: torch.Tensor | None = None,
                       closes: bool = True) -> torch.Tensor:
    """The adjoint of ``_prolongate``: `before` is the previous rank's last (odd) fine row when the
    stage started there; `closes` says whether this chunk ends its stage (else its last odd row
    belongs to the next rank's first coarse row)."""
    pairs = g.unflatten(0, (g.shape[0] // 2, 2))
    if interpolation == "constant":
        return pairs.sum(1)
    even, odd = pairs[:, 0], pairs[:, 1]
    out = even + odd / 2
    out[1:] += odd[:-1] / 2
    if before is not None:
        out[0] += before[0] / 2
    if closes:
        out[-1] += odd[-1] / 2
    return out


def _restrict_parameters(f: torch.Tensor, interpolation: str) -> torch.Tensor:
    pairs = f.unflatten(0, (f.shape[0] // 2, 2))
    return pairs.mean(1) if interpolation == "constant" else pairs[:, 0].clone()


def _apply(op, tensors, mask, interpolation, **per_entry):
    """`op` on every block entry (with the i-th value of each `per_entry` list, if given)."""
    out = []
    for i, (t, is_block) in enumerate(zip(tensors, mask)):
        kw = {k: v[i] for k, v in per_entry.items() if v is not None}
        out.append(op(t, interpolation, **kw) if is_block else t.clone())
    return out


def prolongate(coarse: list[torch.Tensor], mask: list[bool], interpolation: str = "constant",
               after: list | None = None):
    """I: coarse-level tensors (parameters or corrections) to the fine level. For "linear" on a
    layer-parallel rank, `after[i]` is the next rank's first row of entry i where the stage goes on
    (``parallel.transfer.time_halos``)."""
    return _apply(_prolongate, coarse, mask, interpolation, after=after)


def restrict_gradient(fine: list[torch.Tensor], mask: list[bool], interpolation: str = "constant",
                      before: list | None = None, closes: list | None = None):
    """R = I^T: fine-level gradients to the coarse level (halos as in ``prolongate``)."""
    return _apply(_restrict_gradient, fine, mask, interpolation, before=before, closes=closes)


def restrict_parameters(fine: list[torch.Tensor], mask: list[bool], interpolation: str = "constant"):
    """A left inverse of I: restrict_parameters(prolongate(c)) == c."""
    return _apply(_restrict_parameters, fine, mask, interpolation)


def prolongate_model(coarse: ODEResNet, fine: ODEResNet, interpolation: str = "constant") -> None:
    """Write I(coarse parameters) into `fine` (multilevel initialization, Chang et al. / Haber et al.)."""
    values = prolongate([p.detach() for p in ordered_parameters(coarse)], block_mask(coarse), interpolation)
    with torch.no_grad():
        for p, v in zip(ordered_parameters(fine), values):
            p.copy_(v)


class IndexTransfers:
    """The "constant" transfers between a level and the next coarser one as index maps on θ, the
    parameters as one vector in ``ordered_parameters`` order (a CPU level of ``mgopt``):
    I c = c[up]; R g = g[even] + g[odd] on the block entries, g[even] on the shared ones; the
    parameter restriction (R g) / 2 on the block entries. The maps are read off the list operators
    above applied to index vectors, so both are one definition. Two or three numpy ops where the
    list operators take one torch op per entry and transfer (~50 µs a transfer at width 3), a fixed
    cost per level visit that a data replica cannot halve.

    `coarse`: the coarse level's ``ordered_parameters`` (shapes only); `mask`: ``block_mask``."""

    def __init__(self, coarse: list[torch.Tensor], mask: list[bool]):
        def vector(shapes):
            n = [math.prod(s) for s in shapes]
            return [t.reshape(s) for t, s in zip(torch.arange(sum(n), dtype=torch.float64).split(n), shapes)]

        shapes = [tuple(t.shape) for t in coarse]
        self.up = torch.cat([t.reshape(-1) for t in prolongate(vector(shapes), mask)]).long().numpy()
        fine = vector([(2 * s[0], *s[1:]) if b else s for s, b in zip(shapes, mask)])
        pairs = [f.unflatten(0, (f.shape[0] // 2, 2)) for f, b in zip(fine, mask) if b]
        self.blocks = sum(p[:, 0].numel() for p in pairs)        # block entries come first in θ
        even = [p[:, 0] for p in pairs] + [f for f, b in zip(fine, mask) if not b]
        self.even = torch.cat([t.reshape(-1) for t in even]).long().numpy()
        self.odd = torch.cat([p[:, 1].reshape(-1) for p in pairs]).long().numpy()

    def restrict_gradient(self, g: np.ndarray) -> np.ndarray:
        out = g[self.even]
        out[:self.blocks] += g[self.odd]
        return out

    def restrict_parameters(self, theta: np.ndarray) -> np.ndarray:
        out = self.restrict_gradient(theta)
        out[:self.blocks] *= 0.5
        return out

    def prolongate(self, c: np.ndarray) -> np.ndarray:
        return c[self.up]
