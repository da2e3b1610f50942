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


def check_world_size(world_size: int, requested: int | None, option: str = "--ranks") -> None:
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


@dataclass(frozen=True)
class LevelPlan:
    """Where one level lives: its blocks partitioned over ranks 0..ranks-1 (a prefix of the world)."""
    level: int            # 1 = coarsest
    partition: Partition

    @property
    def blocks(self) -> int:
        return self.partition.blocks

    @property
    def ranks(self) -> int:
        return self.partition.ranks


def plan_levels(level_blocks: list[int], world_size: int, min_blocks_per_rank: int = 1) -> list[LevelPlan]:
    """Ranks and partitions of every level (coarsest first).

    The finest level uses every rank. A coarser level keeps its finer neighbour's ranks while it has
    at least `min_blocks_per_rank` blocks per rank, otherwise it is gathered onto the largest
    prefix of ranks that satisfies the policy (at least one rank). Levels that restrict further
    need an even number of blocks per chunk. Where two neighbours have the same ranks their
    chunk boundaries are aligned (coarse bounds x 2), so transfers between them stay on-rank.
    """
    if min_blocks_per_rank < 1:
        raise LayoutError(f"--min-blocks-per-rank {min_blocks_per_rank} must be at least 1")
    levels = len(level_blocks)
    finest = level_blocks[-1]
    most = finest // 2 if levels > 1 else finest
    if world_size > most:
        raise LayoutError(f"more ranks ({world_size}) than the finest level can use: {finest} blocks "
                          f"{'in pairs ' if levels > 1 else ''}allow at most {most} ranks")
    ranks = [world_size] * levels
    for i in range(levels - 2, -1, -1):
        cap = level_blocks[i] // 2 if i > 0 else level_blocks[i]
        ranks[i] = max(1, min(ranks[i + 1], level_blocks[i] // min_blocks_per_rank, cap))
    plans = [LevelPlan(1, partition_blocks(level_blocks[0], ranks[0]))]
    for i in range(1, levels):
        prev = plans[-1].partition
        if ranks[i] == prev.ranks:
            part = Partition(tuple(2 * b for b in prev.bounds))
        else:
            part = partition_blocks(level_blocks[i], ranks[i], align=2)
        plans.append(LevelPlan(i + 1, part))
    return plans


def describe_plan(plans: list[LevelPlan]) -> str:
    """One line per level, finest first: blocks, ranks, blocks per rank."""
    lines = []
    for p in reversed(plans):
        sizes = [b - a for a, b in zip(p.partition.bounds, p.partition.bounds[1:])]
        per = f"{sizes[0]}" if min(sizes) == max(sizes) else f"{min(sizes)}-{max(sizes)}"
        lines.append(f"level {p.level}: {p.blocks} blocks on {p.ranks} rank(s), {per} blocks per rank")
    return "\n".join(lines)
