"""Each rank's program for one phase of training, built from what parml runs.

* one ``Level.gradient`` (``gradient_programs``): ``LayerParallel.forward_backward`` replayed from
  the schedule's action list (``parallel.schedule.get_schedule(name).stage_actions``), with the
  messages ``parallel.stage`` sends (F of micro-batch m receives tag 2m from the previous rank and
  sends to the next; B receives tag 2m+1 from the next rank, sends the input adjoint back, then
  forms its deferred weight gradients W), the data group's gradient all-reduce (started after the
  rank's last weight gradient, so it overlaps the pipeline's tail; the last rank's loss rides in
  it) and the layer group's all-reduce of the loss with Level.gradient's sums
  (``LayerParallel.forward_backward_sum``);
* an optimizer update (``simulate_update``);
* a transfer between two levels' layouts (``simulate_move``): the pieces ``parallel.transfer.Mover``
  sends, one message per tensor piece.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from ..model import ModelSpec
from ..parallel.layout import LayoutError, Partition, batch_share
from ..parallel.schedule import get_schedule
from .costs import (
    DTYPE_BYTES,
    LevelLayout,
    Layout,
    StageCost,
    Workload,
    _split_sizes,
    _stage_ranges,
    shard_parameters,
    shared_entries,
    state_elements,
)
from .engine import COLLECTIVE, COMPUTE, KIND, RECV, SEND, START, WAITOP, Programs, Run
from .sharing import run_programs
from .profile import CommCost, Profile


@dataclass
class Context:
    """A layout's links and the node structure (which ranks share cores)."""
    profile: Profile
    backend: str
    world: int
    ranks_per_node: int
    background: float = 0.0

    def __post_init__(self):
        self.oversubscribed = min(self.world, self.ranks_per_node) > self.profile.cores
        if self.world > 1:
            c = self.profile.backend(self.backend)
            self._intra = c.oversubscribed if self.oversubscribed and c.oversubscribed is not None else c
            self._inter = c.inter_node if c.inter_node is not None else self._intra

    def node(self, rank) -> int:
        return rank // self.ranks_per_node

    def link(self, src, dst) -> CommCost:
        """The costs of a message src -> dst: between nodes, oversubscribed or plain."""
        rpn = self.ranks_per_node
        return self._intra if src // rpn == dst // rpn else self._inter

    def group_link(self, ranks) -> CommCost:
        """A group's collective runs at the speed of its slowest link (between nodes if it spans any)."""
        return self.link(min(ranks), max(ranks))

    def allreduce(self, nbytes, ranks) -> float:
        ranks = list(ranks)
        return self.group_link(ranks).allreduce_seconds(nbytes, len(ranks)) if len(ranks) > 1 else 0.0

    def share(self, lev: LevelLayout, simulated):
        """{rank: {rank': copies}}: simulated ranks of replica 0 and the replicas that mirror them."""
        if not self.oversubscribed and not self.background:
            return None
        out = {}
        for j in simulated:
            n0 = self.node(lev.world_rank(0, j))
            row = {}
            for q in simulated:
                c = sum(1 for d in range(lev.replicas) if self.node(lev.world_rank(d, q)) == n0)
                if c:
                    row[q] = c
            out[j] = row
        return out


@dataclass
class PhaseResult:
    seconds: float
    run: Run
    ranks: list                 # simulated ranks (layer ranks of replica 0, or world ranks of a move)
    activation_bytes: dict = field(default_factory=dict)
    allreduce: dict = field(default_factory=dict)
    _totals: np.ndarray | None = None

    def totals(self) -> np.ndarray:
        """Rows compute (F, B, W, other), comm (collectives, posting, receiving), wait, idle; a column per rank."""
        if self._totals is None:
            out = np.zeros((4, len(self.ranks)))
            for i, r in enumerate(self.ranks):
                t = self.run.totals(r)
                out[:, i] = (t["F"] + t["B"] + t["W"] + t["other"], t["collective"] + t["post"], t["wait"], t["idle"])
            self._totals = out
        return self._totals


@lru_cache(maxsize=256)
def pipeline_actions(schedule: str, stages: int, microbatches: int):
    """Per stage, (is forward, micro-batch) arrays of its action list from the schedule registry,
    and a number shared by stages whose lists are identical."""
    sched = get_schedule(schedule)
    acts, kinds, seen = [], [], {}
    for j in range(stages):
        a = sched.stage_actions(j, stages, microbatches)
        is_f = np.array([x.kind == "F" for x in a], dtype=bool)
        mb = np.array([x.microbatch for x in a], dtype=np.int64)
        acts.append((is_f, mb))
        kinds.append(seen.setdefault((is_f.tobytes(), mb.tobytes()), len(seen)))
    return acts, kinds


@dataclass
class _Pipe:
    """What one layer rank's pipeline part needs: message ids, links, per-micro-batch costs."""
    j: int
    P: int
    M: int
    base: int                   # first message id; F: base + j·M + m, B: base + (P-1)·M + j·M + m
    rows: np.ndarray
    f: np.ndarray
    b: np.ndarray
    w: np.ndarray
    fwd: CommCost | None
    bwd: CommCost | None
    links: tuple
    out_el: float
    in_el: float
    deferred: bool

    def fmsg(self, j, m):
        return self.base + j * self.M + m

    def bmsg(self, j, m):
        return self.base + (self.P - 1) * self.M + j * self.M + m


def _pipeline_rows(pp: _Pipe, is_f, mb):
    """The rows of one rank's action list: F = [recv received] F [post send], B = [recv received] B
    [post send] [W]; `received` is the receiver's CPU once the message is there (CommCost.receive;
    y: the extra it costs on a node whose cores are all busy, CommCost.busy_extra)."""
    j, P = pp.j, pp.P
    nf = 2 * (j > 0) + 1 + 2 * (j < P - 1)
    nb = 2 * (j < P - 1) + 1 + 2 * (j > 0) + pp.deferred
    cnt = np.where(is_f, nf, nb)
    pos0 = np.cumsum(cnt) - cnt
    n = int(cnt.sum())
    code, kind = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    x, y = np.zeros(n), np.zeros(n)
    key, link = np.full(n, -1, dtype=np.int64), np.full(n, -1, dtype=np.int64)

    def put(p, c, k, xv, yv=0.0, kv=-1, lv=-1):
        code[p], kind[p], x[p], y[p], key[p], link[p] = c, k, xv, yv, kv, lv
        return p + 1

    p, m = pos0[is_f], mb[is_f]
    if j > 0:
        p = put(p, RECV, 0, 0.0, j - 1, pp.fmsg(j - 1, m))
        p = put(p, COMPUTE, KIND["post"], pp.bwd.receive, pp.bwd.busy_extra())
    p = put(p, COMPUTE, KIND["F"], pp.f[m])
    if j < P - 1:
        p = put(p, COMPUTE, KIND["post"], pp.fwd.overhead)
        put(p, SEND, 0, pp.fwd.latency, pp.rows[m] * pp.out_el / pp.fwd.bandwidth, pp.fmsg(j, m), pp.links[0])
    p, m = pos0[~is_f], mb[~is_f]
    if j < P - 1:
        p = put(p, RECV, 0, 0.0, j + 1, pp.bmsg(j, m))
        p = put(p, COMPUTE, KIND["post"], pp.fwd.receive, pp.fwd.busy_extra())
    p = put(p, COMPUTE, KIND["B"], pp.b[m])
    if j > 0:
        p = put(p, COMPUTE, KIND["post"], pp.bwd.overhead)
        p = put(p, SEND, 0, pp.bwd.latency, pp.rows[m] * pp.in_el / pp.bwd.bandwidth, pp.bmsg(j - 1, m), pp.links[1])
    if pp.deferred:
        put(p, COMPUTE, KIND["W"], pp.w[m])
    return code, kind, x, y, key, link


def _pipeline_labels(j, P, is_f, mb, deferred) -> list[str]:
    out = []
    for f, m in zip(is_f.tolist(), mb.tolist()):
        if f:
            out += [f"recv {2 * m} from {j - 1}", "received"] * (j > 0) + [f"{j}F{m}"] \
                + ["post", f"send {2 * m}"] * (j < P - 1)
        else:
            out += [f"recv {2 * m + 1} from {j + 1}", "received"] * (j < P - 1) + [f"{j}B{m}"] \
                + ["post", f"send {2 * m + 1}"] * (j > 0) + [f"{j}W{m}"] * deferred
    return out


def _peak_bytes(is_f, mb, keep, gas, deferred) -> float:
    """Peak activation bytes over the action list: states held from F to B, plus B's adjoints."""
    delta = np.where(is_f, keep[mb], -keep[mb])
    held = np.cumsum(delta)
    peak = float(held[is_f].max(initial=0.0))
    if deferred and (~is_f).any():
        peak = max(peak, float(((held - delta) + gas[mb])[~is_f].max()))
    return peak


def gradient_programs(lev: LevelLayout, work: Workload, layout: Layout, ctx: Context, labels: bool = True):
    """Programs of replica 0's layer ranks for one ``Level.gradient`` on level `lev`, and each
    rank's peak activation bytes. Ranks with the same action list, costs and links get the same
    rows (message, link and handle ids shifted by the rank), built once."""
    P, D, M = lev.ranks, lev.shares, layout.microbatches
    a, b = batch_share(work.batch, D, 0)
    rows_replica = b - a
    if rows_replica < M:
        raise LayoutError(f"--microbatches {M} with {D} data replicas needs a batch of at least {D * M} samples "
                          f"(level {lev.level} has {work.batch})")
    get_schedule(layout.schedule)
    g = _Gradient(lev, work, layout, ctx, Programs(labels), np.array(_split_sizes(rows_replica, M), dtype=float))
    groups: dict = {}
    for j in range(P):
        groups.setdefault(g.group_key(j, labels), []).append(j)
    peaks = {}
    for J in groups.values():
        peak = g.add_group(J)
        peaks.update(dict.fromkeys(J, peak))
    return g.programs, dict(sorted(peaks.items()))


class _Gradient:
    """Builds one level's gradient programs group by group (see ``gradient_programs``)."""

    def __init__(self, lev, work, layout, ctx, programs, rows):
        self.lev, self.work, self.layout, self.ctx, self.programs, self.rows = lev, work, layout, ctx, programs, rows
        P, D, M = lev.ranks, lev.shares, layout.microbatches     # D: the batch's shares
        self.P, self.D, self.M = P, D, M
        self.dbytes = DTYPE_BYTES[work.dtype]
        self.base = programs.reserve_messages(2 * max(P - 1, 0) * M)
        self.lbase = programs.reserve_links(2 * P)
        self.hbase = min(programs.handle_id(j, "grad-allreduce") for j in range(P)) if D > 1 else -1
        group = tuple(lev.world_rank(0, j) for j in range(P))
        # the loss, Level.gradient's Tikhonov term and non-finite flag: 3 float64 over the layer group
        self.final_id = programs.collective_id("loss", group, "loss all-reduce") if P > 1 else -1
        self.final = ctx.allreduce(24, group) if P > 1 else 0.0
        self.costs: dict = {}
        self.actions = pipeline_actions(layout.schedule.lower(), P, M)

    def links(self, j):
        me = self.lev.world_rank(0, j)
        fwd = self.ctx.link(me, self.lev.world_rank(0, j + 1)) if j < self.P - 1 else None
        bwd = self.ctx.link(me, self.lev.world_rank(0, j - 1)) if j > 0 else None
        return fwd, bwd

    def group_key(self, j, alone):
        a, b = self.lev.partition.range(j)
        fwd, bwd = self.links(j)
        ck = (_stage_ranges(self.lev.spec, a, b), a == 0, b == self.lev.spec.total_blocks)
        return (j if alone else None, self.actions[1][j], ck, id(fwd), id(bwd), j == 0, j == self.P - 1)

    def stage_costs(self, a, b):
        """Per micro-batch: forward, backward, weight-gradient seconds, kept and adjoint bytes; and
        whether the stage defers weight gradients (a W action after each backward)."""
        key = (_stage_ranges(self.lev.spec, a, b), a == 0, b == self.lev.spec.total_blocks)
        if key not in self.costs:
            sc = StageCost(self.lev.spec, a, b, self.ctx.profile, self.layout.weight_grads)
            rows = self.rows.tolist()
            per = {r: (sc.forward(r), sc.backward(r), sc.weight(r), *sc.activation_bytes(r, self.dbytes))
                   for r in set(rows)}
            self.costs[key] = [np.array([per[r][i] for r in rows]) for i in range(5)] + [sc.deferred]
        return self.costs[key]

    def tail_rows(self, j, p, deferred):
        """Rows after the pipeline: the deferred weight gradients written to .grad, the data group's
        all-reduce (the last rank's with its loss) started and awaited, Level.gradient's
        bookkeeping, the layer group's all-reduce."""
        prof, D, P = self.ctx.profile, self.D, self.P
        rows = [(COMPUTE, KIND["other"], prof.step_cost("finish", p=p) if deferred else 0.0, -1, "finish")]
        if D > 1:
            data_group = [self.lev.world_rank(d, j) for d in range(D)]
            nbytes = (p + (j == P - 1)) * self.dbytes
            rows.append((START, 0, self.ctx.allreduce(nbytes, data_group), self.hbase + j, "gradient all-reduce"))
            rows.append((WAITOP, 0, 0.0, self.hbase + j, "wait grad-allreduce"))
        rows.append((COMPUTE, KIND["other"], prof.step_cost("gradient", p=p), -1, "gradient"))
        if P > 1:
            rows.append((COLLECTIVE, 0, self.final, self.final_id, "loss all-reduce"))
        return rows

    def add_group(self, J) -> float:
        """Append the rows of ranks J (same action list, costs and links); returns their peak bytes."""
        j0, lev = J[0], self.lev
        a, b = lev.partition.range(j0)
        f, bw, w, keep, gas, deferred = self.stage_costs(a, b)
        fwd, bwd = self.links(j0)
        pp = _Pipe(j0, self.P, self.M, self.base, self.rows, f, bw, w, fwd, bwd,
                   (self.lbase + 2 * j0, self.lbase + 2 * j0 + 1),
                   state_elements(lev.spec, b) * self.dbytes, state_elements(lev.spec, a) * self.dbytes, deferred)
        is_f, mb = self.actions[0][j0]
        code, kind, x, y, key, link = _pipeline_rows(pp, is_f, mb)
        tail = self.tail_rows(j0, shard_parameters(lev.spec, a, b), deferred)
        code = np.concatenate([code, [t[0] for t in tail]])
        kind = np.concatenate([kind, [t[1] for t in tail]])
        x = np.concatenate([x, [t[2] for t in tail]])
        y = np.concatenate([y, np.zeros(len(tail))])
        key = np.concatenate([key, [t[3] for t in tail]])
        link = np.concatenate([link, np.full(len(tail), -1)])
        # per rank after j0: message ids move by M, the recv's source and handle ids by 1, links by 2
        d = (np.asarray(J) - j0)[:, None]
        msg = (code == SEND) | (code == RECV)
        key = key + d * np.where(msg, self.M, np.where((code == START) | (code == WAITOP), 1, 0))
        y = y + d * (code == RECV)
        link = link + d * np.where(code == SEND, 2, 0)
        names = None
        if self.programs.labelled:
            names = _pipeline_labels(j0, self.P, is_f, mb, deferred) + [t[4] for t in tail]
        self.programs.extend_ranks(J, code, kind, x, y, key, link, names)
        return _peak_bytes(is_f, mb, keep, gas, deferred)


def simulate_gradient(lev: LevelLayout, work: Workload, layout: Layout, ctx: Context,
                      record: bool = True) -> PhaseResult:
    programs, peaks = gradient_programs(lev, work, layout, ctx, labels=record)
    run = run_programs(programs, ctx.share(lev, list(programs)), ctx.profile.cores, record, ctx.background)
    ar = {}
    if lev.shares > 1:
        total = sum(h[1] - h[0] for h in run.handles.values())
        exposed = sum(exposed_seconds(run.handles).values())
        ar = {"seconds": total / len(run.handles), "exposed": exposed / len(run.handles),
              "overlap": 1.0 - exposed / total if total > 0 else 1.0}
    return PhaseResult(run.end, run, list(programs), peaks, ar)


def exposed_seconds(handles: dict) -> dict:
    """handle -> seconds its gradient all-reduce lengthens the step: the rank waits for it, and that
    wait lasts past the moment the last rank (rank 0) finished its pipeline and started its own.
    Before that moment the rank would wait anyway, in the layer group's final all-reduce."""
    ready = max(h[0] for h in handles.values())
    return {k: max(0.0, min(waited, done - ready)) for k, (posted, done, waited) in handles.items()}


def simulate_update(lev: LevelLayout, ctx: Context, what: str = "update") -> PhaseResult:
    programs = Programs(labels=True)
    for j in range(lev.ranks):
        a, b = lev.partition.range(j)
        programs.compute(j, ctx.profile.step_cost(what, p=shard_parameters(lev.spec, a, b)), "other", what)
    run = run_programs(programs, ctx.share(lev, list(programs)), ctx.profile.cores, background=ctx.background)
    return PhaseResult(run.end, run, list(programs))


# --- transfers between levels ----------------------------------------------------------------------

def move_messages(coarse: ModelSpec, src: LevelLayout, dst: LevelLayout, src_part: Partition,
                  dst_part: Partition, world) -> list[tuple[int, int, int]]:
    """(src world rank, dst world rank, elements) of every piece ``transfer.Mover`` sends to
    the destination ranks in `world`, one message per tensor piece; `src_part` and `dst_part` are
    the two partitions in the coarse level's block units (moves carry coarse-sized tensors). A
    destination takes its pieces from the source replica that contains its own world rank."""
    shared = shared_entries(coarse)
    out = []
    for r, j in dst.members(world):
        a, b = dst_part.range(j)
        ds = min(r // src.stride, src.replicas - 1)
        for k in range(bisect_right(src_part.bounds, a) - 1, src_part.ranks):
            lo, hi = max(a, src_part.bounds[k]), min(b, src_part.bounds[k + 1])
            if lo >= b:
                break
            if lo >= hi:
                continue
            s = src.world_rank(ds, k)
            for stage, n in _stage_ranges(coarse, lo, hi):
                v = coarse.stages[stage].width
                out.append((s, r, n * (v * v * (9 if coarse.conv else 1))))
                out.append((s, r, n * v))
        for n, owner in shared.values():
            if a <= owner < b:
                k = bisect_right(src_part.bounds, owner) - 1
                out.append((src.world_rank(ds, k), r, n))
    return out


def simulate_move(fine: LevelLayout, coarse: LevelLayout, ctx: Context, dbytes: int, down: bool,
                  world: range) -> PhaseResult:
    """Restriction + move down (parameters and gradient: 2 lists) or the correction's move up and
    prolongation (1 list), on the world ranks `world` of one replica of the finest level."""
    fine_in_coarse = Partition(tuple(x // 2 for x in fine.partition.bounds))
    if down:
        msgs = move_messages(coarse.spec, fine, coarse, fine_in_coarse, coarse.partition, world)
        lists, src, dst = 2, fine, coarse
    else:
        msgs = move_messages(coarse.spec, coarse, fine, coarse.partition, fine_in_coarse, world)
        lists, src, dst = 1, coarse, fine
    prof = ctx.profile
    programs = Programs(labels=False)
    _transfer_compute(programs, src, world, lists, prof, "restrict" if down else "correction")
    _move_rows(programs, [m for m in msgs if m[0] != m[1]], lists, ctx, dbytes)
    _transfer_compute(programs, dst, world, lists, prof, "assign" if down else "prolongate")
    share = None
    if ctx.oversubscribed or ctx.background:
        share = {r: {q: 1 for q in programs if ctx.node(q) == ctx.node(r)} for r in programs}
    run = run_programs(programs, share, prof.cores, background=ctx.background)
    return PhaseResult(run.end, run, sorted(programs))


def _move_rows(programs: Programs, msgs, lists: int, ctx: Context, dbytes: int) -> None:
    """Each list's pieces in order: the sender posts and sends each, then the receivers receive
    them in the same order (messages on one link queue behind each other), each at the receiver's
    CPU cost."""
    if not msgs:
        return
    S, Dst, E = (np.array(c, dtype=np.int64) for c in zip(*msgs))
    rpn = ctx.ranks_per_node
    inside, outside = ctx.link(0, 0), ctx.link(0, rpn)
    same = (S // rpn) == (Dst // rpn)

    def pick(attr):
        return np.where(same, getattr(inside, attr), getattr(outside, attr))
    pairs, inv = np.unique(S * (int(Dst.max()) + 1) + Dst, return_inverse=True)
    link = programs.reserve_links(len(pairs)) + inv
    k = len(S)
    ids = programs.reserve_messages(lists * k) + np.arange(lists * k)
    S, Dst, link = np.tile(S, lists), np.tile(Dst, lists), np.tile(link, lists)
    lat, over = np.tile(pick("latency"), lists), np.tile(pick("overhead"), lists)
    wire = np.tile(E * dbytes / pick("bandwidth"), lists)
    zeros, minus = np.zeros(lists * k), np.full(lists * k, -1)
    programs.extend_rows(np.repeat(S, 2), np.tile([COMPUTE, SEND], lists * k),
                         np.tile([KIND["post"], 0], lists * k), np.column_stack([over, lat]).ravel(),
                         np.column_stack([zeros, wire]).ravel(), np.column_stack([minus, ids]).ravel(),
                         np.column_stack([minus, link]).ravel())
    recv = np.tile(pick("receive"), lists)
    busy = np.tile(np.where(same, inside.busy_extra(), outside.busy_extra()), lists)
    programs.extend_rows(np.repeat(Dst, 2), np.tile([RECV, COMPUTE], lists * k),
                         np.tile([0, KIND["post"]], lists * k), np.column_stack([zeros, recv]).ravel(),
                         np.column_stack([S, busy]).ravel(), np.column_stack([ids, minus]).ravel(),
                         np.repeat(minus, 2))


def _transfer_compute(programs, lev, world, lists, prof, label):
    """Each rank of `lev` in `world` passes over its parameter lists once (restrict / assign / ...)."""
    ranks, seconds, cost = [], [], {}
    for r, j in lev.members(world):
        if j not in cost:
            cost[j] = lists * prof.step_cost("transfer", p=shard_parameters(lev.spec, *lev.partition.range(j)))
        ranks.append(r)
        seconds.append(cost[j])
    if ranks:
        programs.extend_ranks(ranks, [COMPUTE], [KIND["other"]], np.array(seconds)[:, None], [0.0], [-1], [-1],
                              [label] * len(ranks) if programs.labelled else None)
