"""Moving a level's tensors between two layouts: gather onto fewer ranks, scatter back, replicate.

MG/OPT restricts on the fine level's ranks (chunks are even, so restriction is local), then the
restricted parameters and gradients are *moved* to the coarse level's layout; the coarse
correction comes back the same way before it is prolongated. Where both levels have the same
ranks and aligned chunks nothing moves. Block tensors move by overlapping step ranges, shared
ones (opening, projections, head) from their owner on one level to their owner on the other.

A list of tensors here is always in ``hierarchy.ordered_parameters`` order of the shard that
the rank holds on that level; every rank derives every other rank's layout from the plan.

Tag-blind transports (NCCL match the k-th send of a pair with its k-th receive, and run a pair's
operations in posting order): every rank posts its sends and receives in one global order — the
pieces in ``_pieces`` order, the halo rows chunk by chunk — so both sides of a pair post the same
sequence (each send facing its receive), and the earliest unfinished piece is always at the head
of both its ranks' streams. The tags only label the messages (``tests/nccl_model.py`` checks that
they match at every delivery).
"""
from __future__ import annotations

import torch

from ..model import ModelSpec
from .layout import LevelLayout
from .sharding import shard_entries

TAG_BASE = 1 << 20   # above any pipeline tag (2 * micro-batch + direction)


def _placement(where) -> LevelLayout:
    """A ``LevelLayout``, or a bare ``Partition`` on the prefix of the world (one replica)."""
    return where if isinstance(where, LevelLayout) else LevelLayout(0, where)


def _pieces(spec: ModelSpec, src, dst, world: int | None = None):
    """Every (src world rank, dst world rank, src entry index, dst entry index, rows) piece, in one
    global order, between layouts (or partitions) `src` and `dst` on `world` ranks. A destination
    takes its rows from the source replica that contains its own world rank (the last replica where
    none does): restriction and prolongation between a replicated coarse level and its fine level
    stay inside one fine replica."""
    src, dst = _placement(src), _placement(dst)
    if world is None:
        world = max(src.stride * src.replicas, dst.stride * dst.replicas)
    src_entries = [shard_entries(spec, *src.partition.range(j)) for j in range(src.ranks)]
    pieces = []
    for r in range(world):
        pos = dst.position(r)
        if pos is None:
            continue
        de = shard_entries(spec, *dst.partition.range(pos[1]))
        ds = min(r // src.stride, src.replicas - 1)
        for k, se in enumerate(src_entries):
            for i, a in enumerate(se):
                for j, b in enumerate(de):
                    if a.key != b.key:
                        continue
                    if a.key[0] == "shared":
                        pieces.append((src.world_rank(ds, k), r, i, j, None))
                    elif max(a.lo, b.lo) < min(a.hi, b.hi):
                        lo, hi = max(a.lo, b.lo), min(a.hi, b.hi)
                        pieces.append((src.world_rank(ds, k), r, i, j, (lo - a.lo, hi - a.lo, lo - b.lo, hi - b.lo)))
    pieces.sort(key=lambda t: t[:4])
    return pieces


class Mover:
    """Moves tensor lists from layout `src` to layout `dst` over `comm` (the world communicator).

    `src` and `dst` are ``LevelLayout``s (replicas of a partition on the mesh) or bare
    ``Partition``s on a prefix of the world. Where every rank holds the same rows on both, nothing
    moves.
    """

    def __init__(self, comm, spec: ModelSpec, src, dst):
        self.comm, self.src, self.dst = comm, _placement(src), _placement(dst)
        self.local = self.src.same_place(self.dst)
        self.pieces = [] if self.local else _pieces(spec, self.src, self.dst, comm.size)

    def __call__(self, tensors: list[torch.Tensor] | None, like: list[torch.Tensor] | None, slot: int = 0):
        """`tensors`: this rank's list on `src` (None if not on src); `like`: templates of this
        rank's list on `dst` (None if not on dst). Returns the list on `dst` (None elsewhere)."""
        if self.local:
            return tensors
        me = self.comm.rank
        out = [torch.empty_like(t) for t in like] if like is not None else None
        sends, recvs = [], []
        for n, (p, q, i, j, rows) in enumerate(self.pieces):
            tag = TAG_BASE + slot * 65536 + n
            if p == me:
                piece = tensors[i] if rows is None else tensors[i][rows[0]:rows[1]]
                if q == me:
                    (out[j] if rows is None else out[j][rows[2]:rows[3]]).copy_(piece)
                else:
                    sends.append(self.comm.isend(piece.contiguous(), q, tag))
            elif q == me:
                target = out[j] if rows is None else out[j][rows[2]:rows[3]]
                buf = torch.empty_like(target)
                recvs.append((self.comm.irecv(buf, p, tag), target, buf))
        for req, target, buf in recvs:
            req.wait()
            target.copy_(buf)
        for req in sends:
            req.wait()
        return out


HALO_TAG = TAG_BASE - 8   # below the movers' tags, above any pipeline tag of a sane micro-batch count


def time_halos(model, comm, tensors: list[torch.Tensor], mask: list[bool], kind: str):
    """The rows of neighbouring ranks that the linear time stencil reads across rank boundaries.

    `tensors` are in ``ordered_parameters`` order of `model` (this rank's shard). Where a chunk's
    stage goes on past this rank, ``kind="next_first"`` fetches the next rank's first row of each
    of its entries (prolongation: fine 2j+1 <- (c_j + c_{j+1}) / 2); where it started on an earlier
    rank, ``kind="previous_last"`` fetches the previous rank's last row (the transposed stencil of
    the gradient restriction). Returns (halos, closes): per entry the fetched [1, ...] row or None,
    and for block entries whether the chunk ends its stage (None for shared entries).
    """
    if kind not in ("next_first", "previous_last"):
        raise ValueError(f"kind must be 'next_first' or 'previous_last', got {kind!r}")
    chunks = model.block_chunks()
    halos, closes = [None] * len(tensors), [None] * len(tensors)
    sends, recvs = [], []
    for i, c in enumerate(chunks):
        ends = c.first + c.num_blocks == model.spec.stages[c.stage].blocks
        starts = c.first == 0
        for f in (0, 1):                    # weight, bias
            n = 2 * i + f
            assert mask[n], "block entries come first, two per chunk"
            closes[n] = ends
            tag = HALO_TAG + 2 * (kind == "previous_last") + f
            if kind == "next_first":
                if not starts:
                    sends.append(comm.isend(tensors[n][:1].contiguous(), comm.rank - 1, tag))
                if not ends:
                    halos[n] = torch.empty_like(tensors[n][:1])
                    recvs.append(comm.irecv(halos[n], comm.rank + 1, tag))
            else:
                if not ends:
                    sends.append(comm.isend(tensors[n][-1:].contiguous(), comm.rank + 1, tag))
                if not starts:
                    halos[n] = torch.empty_like(tensors[n][-1:])
                    recvs.append(comm.irecv(halos[n], comm.rank - 1, tag))
    for req in recvs + sends:
        req.wait()
    return halos, closes
