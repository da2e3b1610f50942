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


class _PartitionSizes:
    """``blocks`` and ``ranks`` read from the ``partition`` field: one definition for both level types."""
    partition: Partition

    @property
    def blocks(self) -> int:
        return self.partition.blocks

    @property
    def ranks(self) -> int:
        return self.partition.ranks


@dataclass(frozen=True)
class LevelPlan(_PartitionSizes):
    """Where one level lives: its blocks partitioned over ranks 0..ranks-1 (a prefix of the world)."""
    level: int            # 1 = coarsest
    partition: Partition


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


# --- the data x layer mesh (issue 17) ---------------------------------------------------------------

COARSE_LAYOUTS = ("gather", "replicate", "redundant")


@dataclass(frozen=True)
class LevelLayout(_PartitionSizes):
    """Where one level runs: `replicas` copies of `partition`; world rank = d * stride + j holds
    layer rank j of replica d. ``stride`` is the fine level's P where a coarse level is gathered
    (the ranks d * P + j, j >= P_l, wait) and P_l where it is replicated (every rank works).
    `redundant`: every replica runs the whole batch, so the replicas need no gradient sums."""
    level: int
    partition: Partition
    replicas: int = 1
    stride: int = 0                 # 0: partition.ranks
    redundant: bool = False

    def __post_init__(self):
        if self.stride == 0:
            object.__setattr__(self, "stride", self.partition.ranks)

    @property
    def shares(self) -> int:
        """How many parts each batch is split into: one per replica, or 1 where the level is redundant."""
        return 1 if self.redundant else self.replicas

    def world_rank(self, d: int, j: int) -> int:
        return d * self.stride + j

    def position(self, world_rank: int) -> tuple[int, int] | None:
        """(replica, layer rank) of a world rank, None where the rank has no part in this level."""
        d, j = divmod(world_rank, self.stride)
        return (d, j) if j < self.ranks and d < self.replicas else None

    def layer_group(self, d: int) -> list[int]:
        return [self.world_rank(d, j) for j in range(self.ranks)]

    def data_group(self, j: int) -> list[int]:
        return [self.world_rank(d, j) for d in range(self.replicas)]

    def same_place(self, other: "LevelLayout") -> bool:
        """Every rank holds the same rows on both layouts (transfers between them stay on-rank)."""
        return (self.partition.bounds, self.replicas, self.stride) == \
            (other.partition.bounds, other.replicas, other.stride)

    def coarsened(self, factor: int) -> "LevelLayout":
        """The same ranks holding a `factor` times shallower level (the fine layout in coarse units)."""
        return LevelLayout(self.level, self.partition.coarsened(factor), self.replicas, self.stride, self.redundant)


def batch_share(rows: int, replicas: int, d: int) -> tuple[int, int]:
    """Rows [a, b) of replica d: ``tensor_split``'s split, the first rows % replicas get one more."""
    q, r = divmod(rows, replicas)
    a = d * q + min(d, r)
    return a, a + q + (d < r)


@dataclass(frozen=True)
class MeshPlan:
    """The mesh (torchtitan ParallelDims-style): world = D data replicas x P layer ranks and the
    layout of every level (coarsest first). Built and checked by ``plan_mesh``."""
    world: int
    data_parallel: int
    coarse_layout: str
    levels: tuple[LevelLayout, ...]

    @property
    def layer_ranks(self) -> int:
        return self.world // self.data_parallel


def _check_mesh(world: int, data_parallel: int, coarse_layout: str) -> int:
    if coarse_layout not in COARSE_LAYOUTS:
        raise LayoutError(f"--coarse-layout {coarse_layout!r} is not one of: {', '.join(COARSE_LAYOUTS)}")
    if data_parallel < 1 or world % data_parallel:
        divisors = [str(d) for d in range(1, world + 1) if world % d == 0]
        raise LayoutError(f"--data-parallel {data_parallel} does not divide the world size {world}: use one of "
                          f"{', '.join(divisors)}")
    return world // data_parallel


def plan_mesh(level_blocks: list[int], world: int, data_parallel: int = 1, min_blocks_per_rank: int = 1,
              coarse_layout: str = "gather", batch: int | None = None, microbatches: int = 1,
              finest_ranks: int | None = None, batch_name: str = "--batch-size") -> MeshPlan:
    """Every level's layout on a D x P mesh, with every check (one-line ``LayoutError``s).

    The layer partitions come from ``plan_levels`` on P layer ranks (`finest_ranks` caps the finest
    level: a cascade stage). A level on P_l < P layer ranks is `gather`ed (D replicas of P_l ranks,
    ranks d * P + j, j >= P_l, idle) or `replicate`d: P_l rounded down to a divisor of P, on
    D * P / P_l replicas, so every rank works. `batch` (if given) must leave every micro-batch of
    every replica a sample: batch >= replicas x microbatches on every level (`batch_name` names it).
    """
    P = _check_mesh(world, data_parallel, coarse_layout)
    top = finest_ranks or P
    most = level_blocks[-1] // 2 if len(level_blocks) > 1 else level_blocks[-1]
    if top > most:
        raise LayoutError(f"more layer ranks ({top} = {world} ranks / --data-parallel {data_parallel}) than the "
                          f"finest level's {level_blocks[-1]} blocks allow ({most}"
                          f"{' pairs' if len(level_blocks) > 1 else ''}): use at most {most * data_parallel} ranks, "
                          f"a larger --data-parallel or more --blocks")
    out = []
    plans = plan_levels(level_blocks, top, min_blocks_per_rank)
    for i, plan in enumerate(plans):
        part = plan.partition
        redundant = coarse_layout == "redundant" and i < len(plans) - 1 and \
            (part.ranks < P or plan.blocks < min_blocks_per_rank * P)
        if not redundant and (part.ranks == P or coarse_layout == "gather"):
            out.append(LevelLayout(plan.level, part, data_parallel, P))
            continue
        pl = max(q for q in range(1, part.ranks + 1) if P % q == 0)
        if out and out[-1].ranks == pl and out[-1].stride == pl:     # aligned with the coarser neighbour
            part = Partition(tuple(2 * b for b in out[-1].partition.bounds))
        elif pl != part.ranks:
            part = partition_blocks(part.blocks, pl, align=2 if i > 0 else 1)
        out.append(LevelLayout(plan.level, part, data_parallel * P // pl, pl, redundant))
    if batch is not None:
        check_microbatches(batch, microbatches)
        for lev in out:
            if batch < lev.shares * microbatches:
                where = "" if lev.replicas == data_parallel else \
                    f" (level {lev.level} runs on {lev.replicas} replicas with --coarse-layout replicate)"
                raise LayoutError(f"{batch_name} {batch} is smaller than {lev.replicas} data replicas x "
                                  f"--microbatches {microbatches}{where}: each micro-batch of each replica needs "
                                  f"a sample; use batches of at least {lev.replicas * microbatches} samples")
    return MeshPlan(world, data_parallel, coarse_layout, tuple(out))


def _span(a: int, b: int) -> str:
    return f"[{a}, {b})"


def describe_mesh(plan: MeshPlan, batch: int | None = None, microbatches: int = 1) -> str:
    """The mesh, what every rank holds on the finest level (blocks, data rows), each level's layout."""
    D, P = plan.data_parallel, plan.layer_ranks
    lines = [f"mesh: {plan.world} rank(s) = {D} data replica(s) x {P} layer rank(s), world rank = d*{P} + p; "
             f"coarse levels: {plan.coarse_layout}"]
    finest = plan.levels[-1]
    for r in range(plan.world):
        d, j = finest.position(r)
        a, b = finest.partition.range(j)
        extra = (" + opening" if j == 0 else "") + (" + head" if j == finest.ranks - 1 else "")
        rows = ""
        if batch is not None:
            lo, hi = batch_share(batch, D, d)
            rows = f", batch rows {_span(lo, hi)} in {microbatches} micro-batch(es)"
        lines.append(f"  rank {r}: replica {d}, layer rank {j}: blocks {_span(a, b)}{extra}{rows}")
    for lev in reversed(plan.levels):
        sizes = [b - a for a, b in zip(lev.partition.bounds, lev.partition.bounds[1:])]
        per = f"{sizes[0]}" if min(sizes) == max(sizes) else f"{min(sizes)}-{max(sizes)}"
        idle = [r for r in range(plan.world) if lev.position(r) is None]
        tail = f"; idle ranks {', '.join(map(str, idle))}" if idle else ""
        if lev.redundant:
            tail += "; redundant: every replica runs the whole batch"
        lines.append(f"level {lev.level}: {lev.blocks} blocks on {lev.ranks} layer rank(s) x {lev.replicas} "
                     f"replica(s), {per} blocks per rank{tail}")
    if plan.coarse_layout == "redundant" and len(plan.levels) > 1 and not any(lev.redundant for lev in plan.levels):
        lines.append("note: --coarse-layout redundant changes nothing here: every coarse level has at least "
                     "--min-blocks-per-rank blocks per layer rank; a larger --min-blocks-per-rank runs the "
                     "smaller ones redundantly")
    return "\n".join(lines)
