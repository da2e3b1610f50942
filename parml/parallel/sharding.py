"""The one shard encoding: a shard's tensors keyed by position (stage, field, block rows) or by
shared name, so any other partition can cut them again. Level transfers (``transfer.Mover``),
model export (``shard_state`` / ``assemble_state``) and checkpoints all use it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import ModelSpec, ODEResNet


@dataclass(frozen=True)
class Entry:
    """One tensor of a shard: block rows [lo, hi) of (stage, field), or a shared parameter."""
    key: tuple            # ("block", stage, field) or ("shared", name)
    lo: int = 0
    hi: int = 0


def shard_entries(spec: ModelSpec, start: int, stop: int) -> list[Entry]:
    """The entries of shard [start, stop) in ``ordered_parameters`` order (stage-local rows)."""
    blocks, shared, offset = [], [], 0
    if start == 0:
        shared.append(Entry(("shared", "opening.weight")))
    for i, s in enumerate(spec.stages):
        lo, hi = max(start, offset), min(stop, offset + s.blocks)
        if lo < hi:
            blocks += [Entry(("block", i, f), lo - offset, hi - offset) for f in ("weight", "bias")]
            if i > 0 and lo == offset:
                shared.append(Entry(("shared", f"projections.{i}.weight")))
        offset += s.blocks
    if stop == spec.total_blocks:
        shared += [Entry(("shared", "head.weight")), Entry(("shared", "head.bias"))]
    return blocks + shared


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
