"""The sub-communicators of a data x layer mesh (``layout.MeshPlan``): one per layer group (a
replica's layer ranks) and one per data group (a layer rank's replicas) of each level layout.

Splitting is collective over the world communicator, so every rank makes the groups of every
layout in the same order, members or not; groups with the same ranks are made once and shared
(the levels of one layout then share their communicators, and NCCL's per-direction groups).
"""
from __future__ import annotations

from .layout import LevelLayout


class MeshGroups:
    """``of(layout)`` -> (layer group, data group) of this rank; made on first use, then cached."""

    def __init__(self, comm):
        self.comm = comm
        self._groups = {tuple(range(comm.size)): comm}

    def group(self, ranks: list[int]):
        """The communicator over world `ranks` (None on the other ranks); collective on first use."""
        key = tuple(ranks)
        if key not in self._groups:
            self._groups[key] = self.comm.split(list(ranks))
        return self._groups[key]

    def of(self, layout: LevelLayout):
        """(layer group, data group or None) of this rank on `layout`; (None, None) off it. A redundant
        layout's replicas each run the whole batch: they have no data group."""
        layers = [self.group(layout.layer_group(d)) for d in range(layout.replicas)]
        datas = [self.group(layout.data_group(j)) for j in range(layout.ranks)] if layout.shares > 1 else []
        pos = layout.position(self.comm.rank)
        if pos is None:
            return None, None
        d, j = pos
        return layers[d], (datas[j] if datas else None)

    def communicators(self) -> list:
        """Every communicator this rank holds (statistics: wait seconds per group)."""
        return [c for c in self._groups.values() if c is not None]
