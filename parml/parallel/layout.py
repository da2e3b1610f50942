"""Who owns what: blocks -> ranks for each level, and every check of ranks against blocks.

Blocks are split into contiguous chunks; rank 0 also holds the opening, the last rank the head.
Chunk boundaries are multiples of ``align`` (2^(L-1) for an L-level hierarchy), so halving a
level's partition gives the next coarser level's partition and time transfers stay on-rank.
"""
from __future__ import annotations

from dataclasses import dataclass


class LayoutError(ValueError):
    """A rank/block layout that cannot work; the message names the option and the numbers."""


@dataclass(frozen=True)
class Partition:
    """Contiguous block ranges [bounds[r], bounds[r+1]) for ranks r = 0..P-1 of one level."""
    bounds: tuple[int, ...]

    @property
    def ranks(self) -> int:
        return len(self.bounds) - 1

    @property
    def blocks(self) -> int:
        return self.bounds[-1]

    def range(self, rank: int) -> tuple[int, int]:
        return self.bounds[rank], self.bounds[rank + 1]

    def coarsened(self, factor: int) -> "Partition":
        if any(b % factor for b in self.bounds):
            raise LayoutError(f"partition {self.bounds} is not aligned to {factor}")
        return Partition(tuple(b // factor for b in self.bounds))

    def describe(self) -> str:
        return ", ".join(f"rank {r}: [{a}, {b})" for r, (a, b) in enumerate(zip(self.bounds, self.bounds[1:])))


def partition_blocks(blocks: int, ranks: int, align: int = 1) -> Partition:
    """Balanced contiguous split of `blocks` over `ranks`, boundaries on multiples of `align`."""
    if ranks < 1:
        raise LayoutError(f"number of ranks must be at least 1, got {ranks}")
    if blocks % align:
        raise LayoutError(f"--blocks {blocks} is not a multiple of the level alignment {align}")
    units = blocks // align
    if ranks > units:
        if align == 1:
            raise LayoutError(f"more ranks ({ranks}) than blocks ({blocks}): use at most {blocks} "
                              f"ranks or more --blocks")
        raise LayoutError(f"{ranks} ranks cannot share the coarsest level's {units} blocks "
                          f"({blocks} blocks / 2^(levels-1) = {align}): use at most {units} ranks, "
                          f"fewer --levels or more --blocks")
    return Partition(tuple(align * (r * units // ranks) for r in range(ranks + 1)))


def check_world_size(world_size: int, requested: int | None, option: str = "--nproc") -> None:
    """The launcher's world size must match what the command line asked for."""
    if requested is not None and requested != world_size:
        raise LayoutError(f"{option} {requested} does not match the launcher's world size {world_size} "
                          f"(torchrun --nproc_per_node / mpirun -n)")


def check_microbatches(batch: int, microbatches: int) -> None:
    if microbatches < 1:
        raise LayoutError(f"--microbatches {microbatches} must be at least 1")
    if batch < microbatches:
        raise LayoutError(f"--microbatches {microbatches} is more than the batch size {batch}: "
                          f"each micro-batch needs at least one sample")
