"""A discrete-event replay of parml's own training step and V-cycle with a profile's costs.

Nothing here restates the pipeline or the cycle as formulas:

* a rank's program is built from the action list the executor runs
  (``parallel.schedule.get_schedule(name).stage_actions``), with the messages ``parallel.stage``
  sends (F of micro-batch m receives tag 2m from the previous rank and sends to the next; B
  receives tag 2m+1 from the next rank, sends the input adjoint back, then forms its deferred
  weight gradients W), the executor's loss broadcast and Level.gradient's all-reduce;
* the level sequence of a V-cycle is recorded by running the real ``mgopt.VCycle`` (Algorithm 1)
  on stand-in levels that log each gradient evaluation, optimizer step and transfer
  (``cycle_trace``), so its work units are eq. (10) by construction of the engine, not of a formula;
* level layouts come from ``parallel.layout.plan_levels``; transfers between layouts send the
  pieces ``parallel.transfer.Mover`` sends.

The mesh (issue 17): world = D data replicas × P layer ranks, world rank = d·P + s. Each layer
rank all-reduces its gradients over its D replicas, started after its last weight gradient, so it
overlaps the pipeline's tail. Coarse levels: ``gather`` keeps D replicas on the first P_l layer
ranks of each replica (the others idle); ``replicate`` runs P_l layer ranks × D·P/P_l replicas
(P_l rounded down to a divisor of P). Replicas run the same program, so one replica is simulated
and the D-way all-reduce starts when that replica's rank posts it.

Message semantics: a send costs the sender the backend's posting overhead and arrives latency +
bytes/bandwidth later (messages on one link queue behind each other); a receive blocks until its
message has arrived; a collective completes its cost after the last member joined. Ranks that
share a node's cores (more ranks than ``profile.cores``, or ``Layout.background`` other busy
processes) split them evenly among those computing (processor sharing; a waiting rank blocks and
leaves its core); otherwise each computes at full speed.
"""
from __future__ import annotations

import heapq
import math
from bisect import bisect_right
from collections import defaultdict, deque
from dataclasses import dataclass, field
from functools import lru_cache
from typing import ClassVar

from ..model import ModelSpec, StageSpec
from ..parallel.layout import LayoutError, Partition, plan_mesh
from ..parallel.schedule import get_schedule
from .profile import CommCost, Profile

DTYPE_BYTES = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}
OPTIMIZER_STATES = {"sgd": 0, "momentum": 1, "adam": 2}
COARSE_LAYOUTS = ("gather", "replicate")


class SimulationError(RuntimeError):
    """A program that cannot finish (a deadlock); the message names the blocked operations."""


# --- the engine ------------------------------------------------------------------------------------

@dataclass(slots=True)
class Compute:
    code: ClassVar[int] = 0
    seconds: float
    label: str = ""
    kind: str = "other"          # F | B | W | other | post


@dataclass(slots=True)
class Send:
    code: ClassVar[int] = 1
    dst: int
    tag: object
    nbytes: float
    link: CommCost


@dataclass(slots=True)
class Recv:
    code: ClassVar[int] = 2
    src: int
    tag: object


@dataclass(slots=True)
class Collective:
    code: ClassVar[int] = 3
    """Blocking: done `seconds` after the last of `members` joined."""
    key: object
    members: tuple
    seconds: float
    label: str = ""


@dataclass(slots=True)
class Start:
    code: ClassVar[int] = 4
    """Non-blocking operation whose peers are identical copies of this rank: done at post + seconds."""
    handle: object
    seconds: float
    label: str = ""


@dataclass(slots=True)
class Wait:
    code: ClassVar[int] = 5
    handle: object


@dataclass(slots=True)
class Span:
    start: float
    end: float
    kind: str        # F | B | W | other | post | wait | collective
    label: str = ""


KINDS = ("F", "B", "W", "other", "post", "wait", "collective")


@dataclass
class Run:
    """What the engine saw: per rank its spans (if recorded), seconds per kind and finish time."""
    spans: dict
    finish: dict
    end: float
    handles: dict = field(default_factory=dict)   # (rank, handle) -> (posted, done, waited)
    sums: dict = field(default_factory=dict)      # rank -> {kind: seconds}

    def __post_init__(self):
        if not self.sums:
            for r, spans in self.spans.items():
                acc = dict.fromkeys(KINDS, 0.0)
                for s in spans:
                    acc[s.kind] += s.end - s.start
                self.sums[r] = acc

    def totals(self, rank) -> dict:
        out = dict(self.sums[rank])
        out["idle"] = self.end - self.finish[rank]
        return out

    def timeline(self, rank, kinds=("F", "B", "W")) -> list[tuple[str, float, float]]:
        return [(s.label, s.start, s.end) for s in self.spans[rank] if s.kind in kinds]


def _arrival(op: Send, src, t, link_free):
    key = (src, op.dst)
    start = max(t, link_free.get(key, -math.inf))
    wire = op.nbytes / op.link.bandwidth if op.link.bandwidth else 0.0
    link_free[key] = start + wire
    return start + op.link.latency + wire


def run_programs(programs: dict, share=None, cores: float | None = None, record: bool = True,
                 background: float = 0.0) -> Run:
    """Run every rank's program (a list of ops) from t = 0.

    `share`: None (every rank computes at full speed) or {rank: {other rank: copies}}: the ranks
    whose computing slows `rank` down (copies counts identical replicas on its node, itself
    included); then a computing rank runs at min(1, cores / Σ copies of computing ranks).
    `background`: other runnable processes on every node, competing for its cores.
    `record`: keep every span (timelines); otherwise only the seconds per kind.
    """
    if share is None:
        return _run_fast(programs, record)
    return _run_shared(programs, share, cores, background)


def _deadlock(programs, pc, done):
    blocked = [f"rank {r} at {programs[r][pc[r]]}" for r in programs if not done[r]]
    return SimulationError("simulated program deadlocks: " + "; ".join(blocked[:6]))


def _run_fast(programs: dict, record: bool = True) -> Run:
    """Max-plus evaluation: each rank runs until it blocks; exact, one pass per op."""
    sums = {r: dict.fromkeys(KINDS, 0.0) for r in programs}
    clock = {r: 0.0 for r in programs}
    pc = {r: 0 for r in programs}
    done = {r: False for r in programs}
    spans = {r: [] for r in programs}
    messages, link_free, posts, handles = {}, {}, {}, {}
    blocked_on = {}
    queue = deque(programs)
    queued = set(programs)
    while queue:
        r = queue.popleft()
        queued.discard(r)
        prog, out, i, t, sr = programs[r], spans[r], pc[r], clock[r], sums[r]
        n = len(prog)
        while i < n:
            op = prog[i]
            code = op.code
            if code == 0:                                   # Compute
                if op.seconds > 0:
                    if record:
                        out.append(Span(t, t + op.seconds, op.kind, op.label))
                    sr[op.kind] += op.seconds
                    t += op.seconds
            elif code == 1:                                 # Send
                key = (r, op.dst, op.tag)
                messages[key] = _arrival(op, r, t, link_free)
                if blocked_on.get(op.dst) == key and op.dst not in queued:
                    queue.append(op.dst)
                    queued.add(op.dst)
            elif code == 2:                                 # Recv
                key = (op.src, r, op.tag)
                arr = messages.pop(key, None)
                if arr is None:
                    blocked_on[r] = key
                    break
                blocked_on.pop(r, None)
                if arr > t:
                    if record:
                        out.append(Span(t, arr, "wait", f"recv {op.tag} from {op.src}"))
                    sr["wait"] += arr - t
                    t = arr
            elif code == 3:                                 # Collective
                joined = posts.setdefault(op.key, {})
                joined.setdefault(r, t)
                if len(joined) < len(op.members):
                    blocked_on[r] = op.key
                    break
                last = max(joined.values())
                finish = last + op.seconds
                for m in op.members:
                    tm = joined[m]
                    if last > tm:
                        if record:
                            spans[m].append(Span(tm, last, "wait", op.label))
                        sums[m]["wait"] += last - tm
                    if op.seconds > 0:
                        if record:
                            spans[m].append(Span(last, finish, "collective", op.label))
                        sums[m]["collective"] += op.seconds
                    if m != r:
                        clock[m] = finish
                        blocked_on.pop(m, None)
                        pc[m] += 1
                        if m not in queued:
                            queue.append(m)
                            queued.add(m)
                t = finish
                blocked_on.pop(r, None)
                del posts[op.key]
            elif code == 4:                                 # Start
                handles[(r, op.handle)] = [t, t + op.seconds, 0.0]
            else:                                           # Wait
                h = handles[(r, op.handle)]
                if h[1] > t:
                    if record:
                        out.append(Span(t, h[1], "wait", f"wait {op.handle}"))
                    sr["wait"] += h[1] - t
                    h[2] = h[1] - t
                    t = h[1]
            i += 1
        else:
            done[r] = True
        pc[r], clock[r] = i, t
    if not all(done.values()):
        raise _deadlock(programs, pc, done)
    end = max(clock.values(), default=0.0)
    return Run(spans, dict(clock), end, {k: tuple(v) for k, v in handles.items()}, sums)


def _run_shared(programs: dict, share: dict, cores: float, background: float = 0.0) -> Run:
    """Time-ordered fluid simulation with processor sharing among the ranks of a node."""
    t = 0.0
    pc = {r: 0 for r in programs}
    state = {r: "run" for r in programs}          # run | compute | blocked | done
    remaining, began, label = {}, {}, {}
    spans = {r: [] for r in programs}
    finish = {}
    messages, link_free, posts, handles = {}, {}, {}, {}
    blocked_on, blocked_since = {}, {}
    timers = []                                    # (time, seq, rank, kind, info)
    seq = [0]

    def timer(at, r, kind, info=None):
        seq[0] += 1
        heapq.heappush(timers, (at, seq[0], r, kind, info))

    def step(r):
        prog = programs[r]
        while pc[r] < len(prog):
            op = prog[pc[r]]
            if isinstance(op, Compute):
                pc[r] += 1
                if op.seconds > 0:
                    state[r], remaining[r], began[r], label[r] = "compute", op.seconds, t, (op.kind, op.label)
                    return
            elif isinstance(op, Send):
                key = (r, op.dst, op.tag)
                messages[key] = arr = _arrival(op, r, t, link_free)
                if blocked_on.get(op.dst) == key:
                    timer(max(arr, t), op.dst, "recv", key)
                pc[r] += 1
            elif isinstance(op, Recv):
                key = (op.src, r, op.tag)
                blocked_on[r], blocked_since[r], state[r] = key, t, "blocked"
                if key in messages:
                    timer(max(messages[key], t), r, "recv", key)
                return
            elif isinstance(op, Collective):
                joined = posts.setdefault(op.key, {})
                joined[r] = t
                blocked_on[r], blocked_since[r], state[r] = op.key, t, "blocked"
                if len(joined) == len(op.members):
                    for m in op.members:
                        timer(t + op.seconds, m, "collective", (op, t))
                    del posts[op.key]
                return
            elif isinstance(op, Start):
                handles[(r, op.handle)] = [t, t + op.seconds, 0.0]
                pc[r] += 1
            elif isinstance(op, Wait):
                h = handles[(r, op.handle)]
                if h[1] > t:
                    blocked_on[r], blocked_since[r], state[r] = ("wait", op.handle), t, "blocked"
                    timer(h[1], r, "wait", op.handle)
                    return
                pc[r] += 1
        state[r] = "done"
        finish[r] = t

    def rates():
        computing = [r for r in programs if state[r] == "compute"]
        out = {}
        for r in computing:
            load = sum(share[r].get(q, 0) for q in computing) + background
            out[r] = min(1.0, cores / load) if load > 0 else 1.0
        return out

    for r in programs:
        step(r)
    while True:
        ready = [r for r in programs if state[r] == "run"]
        for r in ready:
            step(r)
        if all(state[r] == "done" for r in programs):
            break
        rate = rates()
        t_next = min((t + remaining[r] / rate[r] for r in rate), default=math.inf)
        if timers:
            t_next = min(t_next, timers[0][0])
        if t_next == math.inf:
            raise _deadlock(programs, pc, {r: state[r] == "done" for r in programs})
        dt = t_next - t
        for r, k in rate.items():
            remaining[r] -= dt * k
        t = t_next
        for r in rate:
            if remaining[r] <= 1e-12 * max(1.0, t):
                kind, lab = label[r]
                spans[r].append(Span(began[r], t, kind, lab))
                state[r] = "run"
        while timers and timers[0][0] <= t:
            _, _, r, kind, info = heapq.heappop(timers)
            if state[r] != "blocked":
                continue
            if kind == "recv":
                if blocked_on.get(r) != info:
                    continue
                arr = messages.pop(info)
                if arr > blocked_since[r]:
                    spans[r].append(Span(blocked_since[r], t, "wait", f"recv {info[2]} from {info[0]}"))
            elif kind == "collective":
                op, last = info
                if last > blocked_since[r]:
                    spans[r].append(Span(blocked_since[r], last, "wait", op.label))
                if op.seconds > 0:
                    spans[r].append(Span(last, t, "collective", op.label))
            elif kind == "wait":
                h = handles[(r, info)]
                spans[r].append(Span(blocked_since[r], t, "wait", f"wait {info}"))
                h[2] = t - blocked_since[r]
            blocked_on.pop(r, None)
            pc[r] += 1
            state[r] = "run"
    end = max(finish.values(), default=0.0)
    return Run(spans, finish, end, {k: tuple(v) for k, v in handles.items()})


# --- what is simulated -----------------------------------------------------------------------------

@dataclass
class Workload:
    """The training problem: the finest network, samples per step, the hierarchy and its cycle."""
    spec: ModelSpec
    batch: int
    levels: int = 1
    cycle: object = None            # mgopt.CycleSetup; None: CycleSetup.default(levels)
    dtype: str = "float32"
    optimizer: str = "sgd"

    @property
    def setup(self):
        from ..multilevel.mgopt import CycleSetup
        return self.cycle if self.cycle is not None else CycleSetup.default(self.levels)

    @classmethod
    def from_config(cls, cfg, in_features: int, out_features: int, n_train: int, input_shape=None,
                    task: str = "classification") -> Workload:
        """From a ``TrainConfig`` and the dataset's sizes (no data is loaded)."""
        spec = cfg.model_spec(in_features, out_features, task, input_shape)
        batch = min(cfg.batch_size or n_train, n_train)
        return cls(spec, batch, cfg.levels, cfg.setup, cfg.dtype, cfg.optimizer)


@dataclass
class Layout:
    """One candidate: D data replicas × P layer ranks, M micro-batches, schedule, coarse layout."""
    data_parallel: int = 1
    layer_ranks: int = 1
    microbatches: int = 1
    schedule: str = "1f1b"
    coarse_layout: str = "gather"
    min_blocks_per_rank: int = 16
    weight_grads: str = "deferred"
    backend: str = "gloo"
    ranks_per_node: int | None = None   # None: profile.cores (a full node, not oversubscribed)
    background: float = 0.0             # other processes busy on each node (a shared machine)

    @property
    def world(self) -> int:
        return self.data_parallel * self.layer_ranks


@dataclass(frozen=True)
class LevelLayout:
    """Where one level runs: `replicas` × partition.ranks layer ranks; world rank = d·stride + j."""
    level: int
    spec: ModelSpec
    partition: Partition
    replicas: int
    stride: int

    @property
    def ranks(self) -> int:
        return self.partition.ranks

    def world_rank(self, d, j) -> int:
        return d * self.stride + j

    def position(self, world_rank):
        d, j = divmod(world_rank, self.stride)
        if j >= self.ranks or d >= self.replicas:
            return None
        return d, j


def _split_sizes(n: int, parts: int) -> list[int]:
    """Row counts of ``tensor_split(n, parts)``: the first n % parts get one more."""
    q, r = divmod(n, parts)
    return [q + 1 if i < r else q for i in range(parts)]


def level_specs_of(spec: ModelSpec, levels: int) -> list[ModelSpec]:
    from ..multilevel.hierarchy import level_specs
    return level_specs(spec, levels)


def level_layouts(work: Workload, layout: Layout) -> list[LevelLayout]:
    """Every level's layout (coarsest first): ``parallel.layout.plan_mesh``, the run's own rule."""
    specs = level_specs_of(work.spec, work.levels)
    mesh = plan_mesh([s.total_blocks for s in specs], layout.world, layout.data_parallel,
                     layout.min_blocks_per_rank, layout.coarse_layout)
    return [LevelLayout(lv.level, sp, lv.partition, lv.replicas, lv.stride) for lv, sp in zip(mesh.levels, specs)]


# --- per-rank costs --------------------------------------------------------------------------------

def _stage_ranges(spec: ModelSpec, a: int, b: int):
    """(stage index, blocks in [a, b) of that stage) for the stages the shard [a, b) touches."""
    out, offset = [], 0
    for i, s in enumerate(spec.stages):
        lo, hi = max(a, offset), min(b, offset + s.blocks)
        if lo < hi:
            out.append((i, hi - lo))
        offset += s.blocks
    return out


def _stage_of_step(spec: ModelSpec, step: int) -> int:
    for i, s in enumerate(spec.stages):
        if step < s.blocks:
            return i
        step -= s.blocks
    return len(spec.stages) - 1


def _pixels(spec: ModelSpec, stage: int) -> int:
    shape = spec.stage_state_shape(stage)
    return math.prod(shape[1:]) if len(shape) > 1 else 1


def state_elements(spec: ModelSpec, boundary: int) -> int:
    """Per-sample elements of the state passed at global step `boundary` (model.state_shape)."""
    stage = _stage_of_step(spec, boundary)
    offset = sum(s.blocks for s in spec.stages[:stage])
    if boundary == offset and stage > 0:
        stage -= 1
    return math.prod(spec.stage_state_shape(stage))


def _block_row_elements(spec: ModelSpec, stage: int) -> int:
    v = spec.stages[stage].width
    return v * v * (9 if spec.conv else 1) + v


def shared_entries(spec: ModelSpec) -> dict:
    """Elements of each shared parameter and the global step whose owner holds it."""
    v0, vl = spec.stages[0].width, spec.stages[-1].width
    K = spec.total_blocks
    out = {}
    if spec.conv:
        out["opening.weight"] = (v0 * spec.input_shape[0] * 9, 0)
        feats = math.prod(spec.stage_state_shape(len(spec.stages) - 1)) if spec.head == "flatten" else vl
    else:
        out["opening.weight"] = (v0 * spec.in_features, 0)
        feats = vl
    offset = 0
    for i, s in enumerate(spec.stages):
        if i > 0:
            out[f"projections.{i}.weight"] = (spec.stages[i - 1].width * s.width, offset)
        offset += s.blocks
    out["head.weight"] = (spec.out_features * feats, K - 1)
    out["head.bias"] = (spec.out_features, K - 1)
    return out


def shard_parameters(spec: ModelSpec, a: int, b: int) -> int:
    """Parameter elements of shard [a, b) (blocks and the shared pieces that go with it)."""
    offset, total = 0, 0
    for i, s in enumerate(spec.stages):
        lo, hi = max(a, offset), min(b, offset + s.blocks)
        if lo < hi:
            total += (hi - lo) * _block_row_elements(spec, i)
        offset += s.blocks
    for n, owner in shared_entries(spec).values():
        if a <= owner < b:
            total += n
    return total


def kernel_name(spec: ModelSpec, weight_grads: str) -> str:
    if spec.conv:
        return "conv"
    return "dense" if weight_grads == "deferred" and spec.stepper == "euler" else "dense-inline"


@dataclass
class StageCost:
    """One layer rank's costs per micro-batch of `rows`: forward, backward (adjoint), weight grads."""
    spec: ModelSpec
    a: int
    b: int
    profile: Profile
    weight_grads: str
    _memo: dict = field(default_factory=dict, repr=False)

    def _parts(self, rows):
        if rows not in self._memo:
            self._memo[rows] = self._compute(rows)
        return self._memo[rows]

    def _compute(self, rows):
        prof, spec = self.profile, self.spec
        kern = prof.kernel(kernel_name(spec, self.weight_grads))
        scale = 2.0 if spec.stepper == "rk2" else 1.0      # two F evaluations per step (estimate)
        f = bw = w = 0.0
        for stage, n in _stage_ranges(spec, self.a, self.b):
            x = {"n": n, "b": rows, "v": spec.stages[stage].width, "s": _pixels(spec, stage)}
            f += scale * kern.forward(**x)
            bw += scale * kern.backward(**x)
            w += scale * kern.weight(**x)
        if self.a == 0:
            x = {"b": rows, "v": spec.stages[0].width, "s": _pixels(spec, 0),
                     "i": spec.input_shape[0] if spec.conv else spec.in_features}
            f += prof.end_cost("first", "F", **x)
            bw += prof.end_cost("first", "B", **x)
        if self.b == spec.total_blocks:
            last = len(spec.stages) - 1
            x = {"b": rows, "v": spec.stages[last].width, "s": _pixels(spec, last), "o": spec.out_features}
            f += prof.end_cost("last", "F", **x)
            bw += prof.end_cost("last", "B", **x)
        return f, bw, w

    def forward(self, rows):
        return self._parts(rows)[0]

    def backward(self, rows):
        return self._parts(rows)[1]

    def weight(self, rows):
        return self._parts(rows)[2]

    def activation_bytes(self, rows, dtype_bytes):
        """Saved states of one micro-batch (y_k and σ_k per block) and the adjoint buffer of B."""
        held = gas = 0
        for stage, n in _stage_ranges(self.spec, self.a, self.b):
            per = rows * math.prod(self.spec.stage_state_shape(stage)) * dtype_bytes
            held += 2 * n * per
            gas += n * per
        return held, gas


# --- one gradient evaluation on one level -----------------------------------------------------------

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
        ranks = list(ranks)
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
    ranks: list                 # simulated layer ranks (replica 0), index = layer rank
    activation_bytes: dict = field(default_factory=dict)
    allreduce: dict = field(default_factory=dict)


def gradient_programs(lev: LevelLayout, work: Workload, layout: Layout, ctx: Context):
    """Programs of replica 0's layer ranks for one ``Level.gradient`` on level `lev`:
    ``LayerParallel.forward_backward`` replayed from the schedule's action list."""
    prof = ctx.profile
    P, D, M = lev.ranks, lev.replicas, layout.microbatches
    dbytes = DTYPE_BYTES[work.dtype]
    rows_replica = _split_sizes(work.batch, D)[0] if D <= work.batch else 0
    if rows_replica < M:
        raise LayoutError(f"--microbatches {M} with {D} data replicas needs a batch of at least {D * M} samples "
                          f"(level {lev.level} has {work.batch})")
    rows = _split_sizes(rows_replica, M)
    sched = get_schedule(layout.schedule)
    deferred = kernel_name(lev.spec, layout.weight_grads) == "dense"
    programs, peaks = {}, {}
    group = [lev.world_rank(0, j) for j in range(P)]
    everyone = [lev.world_rank(d, j) for d in range(D) for j in range(P)]
    for j in range(P):
        a, b = lev.partition.range(j)
        cost = StageCost(lev.spec, a, b, prof, layout.weight_grads)
        me = lev.world_rank(0, j)
        prev, nxt = lev.world_rank(0, j - 1), lev.world_rank(0, j + 1)
        fwd = ctx.link(me, nxt) if j < P - 1 else None
        bwd = ctx.link(me, prev) if j > 0 else None
        out_el, in_el = state_elements(lev.spec, b) * dbytes, state_elements(lev.spec, a) * dbytes
        per_rows = {r: (cost.forward(r), cost.backward(r), cost.weight(r), *cost.activation_bytes(r, dbytes))
                    for r in set(rows)}
        prog, held, peak = [], 0, 0
        for act in sched.stage_actions(j, P, M):
            m = act.microbatch
            r = rows[m]
            f, bw, w, keep, gas = per_rows[r]
            if act.kind == "F":
                if j > 0:
                    prog.append(Recv(prev, 2 * m))
                prog.append(Compute(f, f"{j}F{m}", "F"))
                if fwd is not None:
                    prog.append(Compute(fwd.overhead, "post", "post"))
                    prog.append(Send(nxt, 2 * m, r * out_el, fwd))
                held += keep
                peak = max(peak, held)
            else:
                if fwd is not None:
                    prog.append(Recv(nxt, 2 * m + 1))
                prog.append(Compute(bw, f"{j}B{m}", "B"))
                if bwd is not None:
                    prog.append(Compute(bwd.overhead, "post", "post"))
                    prog.append(Send(prev, 2 * m + 1, r * in_el, bwd))
                if deferred:
                    peak = max(peak, held + gas)
                    prog.append(Compute(w, f"{j}W{m}", "W"))
                held -= keep
        p = shard_parameters(lev.spec, a, b)
        prog.append(Compute(prof.step_cost("finish", p=p), "finish", "other"))
        if D > 1:      # gradients all-reduced over the data group, overlapping the pipeline's tail
            data_group = [lev.world_rank(d, j) for d in range(D)]
            prog.append(Start("grad-allreduce", ctx.allreduce(p * dbytes, data_group), "gradient all-reduce"))
        if P > 1:      # the executor's loss broadcast from the last rank
            prog.append(Collective("loss", tuple(group), ctx.allreduce(8, group), "loss broadcast"))
        if D > 1:
            prog.append(Wait("grad-allreduce"))
        prog.append(Compute(prof.step_cost("gradient", p=p), "gradient", "other"))
        if D * P > 1:  # Level.gradient's all-reduce of (Tikhonov, finite) over the level's group
            prog.append(Collective("totals", tuple(group), ctx.allreduce(16, everyone), "level all-reduce"))
        programs[j] = prog
        peaks[j] = peak
    return programs, peaks


def simulate_gradient(lev: LevelLayout, work: Workload, layout: Layout, ctx: Context,
                      record: bool = True) -> PhaseResult:
    programs, peaks = gradient_programs(lev, work, layout, ctx)
    run = run_programs(programs, ctx.share(lev, list(programs)), ctx.profile.cores, record, ctx.background)
    ar = {}
    if lev.replicas > 1:
        total = sum(h[1] - h[0] for (r, _), h in run.handles.items())
        exposed = sum(h[2] for h in run.handles.values())
        ar = {"seconds": total / len(run.handles), "exposed": exposed / len(run.handles),
              "overlap": 1.0 - exposed / total if total > 0 else 1.0}
    return PhaseResult(run.end, run, list(programs), peaks, ar)


def simulate_update(lev: LevelLayout, ctx: Context, what: str = "update") -> PhaseResult:
    programs = {}
    for j in range(lev.ranks):
        a, b = lev.partition.range(j)
        programs[j] = [Compute(ctx.profile.step_cost(what, p=shard_parameters(lev.spec, a, b)), what, "other")]
    run = run_programs(programs, ctx.share(lev, list(programs)), ctx.profile.cores, background=ctx.background)
    return PhaseResult(run.end, run, list(programs))


# --- transfers between levels ----------------------------------------------------------------------

def move_messages(coarse: ModelSpec, src: LevelLayout, dst: LevelLayout, src_part: Partition,
                  dst_part: Partition, world) -> list[tuple[int, int, int]]:
    """(src world rank, dst world rank, elements) of every piece ``transfer.Mover`` sends to
    the destination ranks in `world`, one message per tensor piece; `src_part` and `dst_part` are
    the two partitions in the coarse level's block units (moves carry coarse-sized tensors). A destination takes its pieces from the source
    replica that contains its own world rank."""
    shared = shared_entries(coarse)
    out = []
    for r in world:
        pos = dst.position(r)
        if pos is None:
            continue
        a, b = dst_part.range(pos[1])
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
    programs = defaultdict(list)
    for r in world:
        pos = src.position(r)
        if pos is not None:
            a, b = src.partition.range(pos[1])
            programs[r].append(Compute(lists * prof.step_cost("transfer", p=shard_parameters(src.spec, a, b)),
                                       "restrict" if down else "correction", "other"))
    for n_list in range(lists):
        for i, (s, d, elems) in enumerate(msgs):
            if s != d:
                link = ctx.link(s, d)
                programs[s] += [Compute(link.overhead, "post", "post"), Send(d, (n_list, i), elems * dbytes, link)]
    for n_list in range(lists):
        for i, (s, d, _) in enumerate(msgs):
            if s != d:
                programs[d].append(Recv(s, (n_list, i)))
    for r in world:
        pos = dst.position(r)
        if pos is not None:
            a, b = dst.partition.range(pos[1])
            programs[r].append(Compute(lists * prof.step_cost("transfer", p=shard_parameters(dst.spec, a, b)),
                                       "assign" if down else "prolongate", "other"))
    programs = {r: p for r, p in programs.items()}
    share = None
    if ctx.oversubscribed or ctx.background:
        share = {r: {q: 1 for q in programs if ctx.node(q) == ctx.node(r)} for r in programs}
    run = run_programs(programs, share, prof.cores, background=ctx.background)
    return PhaseResult(run.end, run, sorted(programs))


# --- the V-cycle's level sequence, recorded from the real VCycle -------------------------------------

@lru_cache(maxsize=64)
def cycle_trace(setup_text: str) -> tuple[tuple[tuple[str, int], ...], float]:
    """Events of one ``mgopt.VCycle`` call for the setup (paper notation): ("grad", l) per gradient
    evaluation the engine computes (cache hits excluded), ("update", l) per optimizer step,
    ("assign", l) when level l receives the restricted point (a move down), ("add", l) when level
    l adds the prolongated correction (a move up). Returns (events, work units)."""
    import torch

    from ..multilevel.mgopt import CycleSetup, Level, VCycle
    from ..model import build_model

    setup = CycleSetup.parse(setup_text)
    L = setup.levels
    log: list = []

    class Executor:
        rank = 0

        def __init__(self, model, number):
            self.model, self.number = model, number

        def allreduce(self, tensor):
            return tensor

        def allgather_object(self, obj):
            return [obj]

        def time_halos(self, tensors, mask, kind):
            return None, None

        def forward_backward(self, x, y):
            log.append(("grad", self.number))
            for p in self.model.parameters():
                p.grad = torch.zeros_like(p)
            return 0.0

    class Optimizer:
        def __init__(self, number):
            self.number, self.param_groups = number, []

        def step(self):
            log.append(("update", self.number))

    class TraceLevel(Level):
        def assign(self, values):
            log.append(("assign", self.number))
            super().assign(values)

        def add(self, values):
            log.append(("add", self.number))
            super().add(values)

    levels = []
    for i in range(L):
        blocks = 2 ** i
        model = build_model(ModelSpec(1, 2, (StageSpec(1, blocks),)), seed=0, dtype=torch.float64)
        levels.append(TraceLevel(Executor(model, i + 1), 0.0, 1.0, "euclidean", blocks / 2 ** (L - 1),
                                 lambda ps, n=i + 1: Optimizer(n), number=i + 1))
    vc = VCycle(levels, setup)
    vc((torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.long)), 0)
    return tuple(log), vc.work_units


# --- predictions -----------------------------------------------------------------------------------

@dataclass
class RankStats:
    """Seconds of one layer rank (replica 0; replicas are identical) over a step or cycle."""
    rank: int
    compute: float = 0.0      # F + B + W + bookkeeping
    wait: float = 0.0         # blocked on a message, a collective's slower members, or the all-reduce
    comm: float = 0.0         # collective cost and message posting
    idle: float = 0.0         # done, or outside the level's ranks, until the phase ends

    @property
    def total(self):
        return self.compute + self.wait + self.comm + self.idle

    def to_dict(self):
        return {"rank": self.rank, "compute": self.compute, "wait": self.wait, "comm": self.comm,
                "idle": self.idle, "bubble": 1.0 - self.compute / self.total if self.total > 0 else 0.0}


@dataclass
class Prediction:
    layout: Layout
    step_seconds: float                 # one GD step on the finest level (gradient + update)
    cycle_seconds: float                # one V-cycle (= step_seconds for L = 1)
    work_units: float                   # of the V-cycle (eq. 10)
    level_seconds: list                 # per level of the cycle, coarsest first
    step_ranks: list                    # RankStats per layer rank for the GD step
    cycle_ranks: list                   # RankStats per world rank of one fine replica for the cycle
    bubble: float                       # 1 - mean compute / step, GD step
    activation_bytes: list              # peak per layer rank, finest level
    memory_bytes: list                  # parameters, gradients, optimizer state, activations (all levels held)
    allreduce: dict                     # gradient all-reduce of the GD step: seconds, exposed, overlap
    levels: list                        # per level: blocks, layer ranks, replicas
    step_run: Run | None = None

    def to_dict(self):
        return {"step_seconds": self.step_seconds, "cycle_seconds": self.cycle_seconds,
                "work_units": self.work_units, "level_seconds": self.level_seconds, "bubble": self.bubble,
                "step_ranks": [r.to_dict() for r in self.step_ranks],
                "cycle_ranks": [r.to_dict() for r in self.cycle_ranks],
                "activation_bytes": self.activation_bytes, "memory_bytes": self.memory_bytes,
                "allreduce": self.allreduce, "levels": self.levels}


def _accumulate(stats: dict, phase: PhaseResult, lev_ranks_to_world, end: float):
    """Add one phase's per-rank totals to `stats` (world rank -> RankStats)."""
    seen = set()
    for key in phase.ranks:
        tot = phase.run.totals(key)
        for w in lev_ranks_to_world(key):
            s = stats.setdefault(w, RankStats(w))
            s.compute += sum(tot.get(k, 0.0) for k in ("F", "B", "W", "other"))
            s.comm += tot.get("collective", 0.0) + tot.get("post", 0.0)
            s.wait += tot.get("wait", 0.0)
            s.idle += tot.get("idle", 0.0) + (end - phase.run.end)
            seen.add(w)
    for w, s in stats.items():
        if w not in seen:
            s.idle += end


def predict(work: Workload, layout: Layout, profile: Profile, keep_run: bool = False,
            cache: dict | None = None) -> Prediction:
    """Simulate one GD step on the finest level and one V-cycle of `work` on `layout`.
    `cache`: a dict shared by predictions of the same workload and profile (the planner's), so
    that a level phase shared by several candidates is simulated once."""
    if layout.schedule.lower() not in ("gpipe", "1f1b"):
        get_schedule(layout.schedule)   # raises for unknown names; registered extras are fine
    D, P = layout.data_parallel, layout.layer_ranks
    if D < 1 or P < 1:
        raise LayoutError(f"--data-parallel {D} and layer ranks {P} must be at least 1")
    if D * P > 1:
        profile.backend(layout.backend)
    ctx = Context(profile, layout.backend, D * P, layout.ranks_per_node or profile.cores, layout.background)
    levs = level_layouts(work, layout)
    dbytes = DTYPE_BYTES[work.dtype]
    fine = levs[-1]
    world = range(P)     # world ranks of fine replica 0

    def to_world(lev):
        # layer rank j of replica 0 of `lev` stands for every rank of fine replica 0 at that position
        owners = defaultdict(list)
        for r in world:
            pos = lev.position(r)
            if pos is not None:
                owners[pos[1]].append(r)
        return lambda j: owners.get(j, [])

    memo = {} if cache is None or keep_run else cache
    common = (layout.microbatches, layout.schedule, layout.weight_grads, layout.backend, ctx.ranks_per_node, D * P,
              ctx.background)

    def where(lev):
        return (lev.level, lev.partition.bounds, lev.replicas, lev.stride)

    def grad(lev):
        key = ("grad", where(lev), common)
        if key not in memo:
            memo[key] = simulate_gradient(lev, work, layout, ctx, record=keep_run)
        return memo[key]

    def update(lev):
        key = ("update", where(lev), common)
        if key not in memo:
            memo[key] = simulate_update(lev, ctx)
        return memo[key]

    def move(i, down):
        key = ("move", where(levs[i]), where(levs[i - 1]), down, common)
        if key not in memo:
            memo[key] = simulate_move(levs[i], levs[i - 1], ctx, dbytes, down, world)
        return memo[key]

    g, u = grad(fine), update(fine)
    step_stats: dict = {}
    step = g.seconds + u.seconds
    _accumulate(step_stats, g, lambda j: [j], g.seconds)
    _accumulate(step_stats, u, lambda j: [j], u.seconds)
    events, wu = cycle_trace(str(work.setup))
    level_seconds = [0.0] * work.levels
    cycle_stats: dict = {r: RankStats(r) for r in world}
    total = 0.0
    for kind, level in events:
        lev = levs[level - 1]
        if kind == "grad":
            ph = grad(lev)
        elif kind == "update":
            ph = update(lev)
        elif kind == "assign":     # restriction from level+1 and the move down
            ph = move(level, True)
        else:                      # "add": the correction from level-1 moves up
            ph = move(level - 1, False)
        if kind in ("grad", "update"):
            _accumulate(cycle_stats, ph, to_world(lev), ph.seconds)
        else:
            _accumulate(cycle_stats, ph, lambda r: [r] if r in world else [], ph.seconds)
        level_seconds[level - 1] += ph.seconds
        total += ph.seconds
    compute = [step_stats[j].compute for j in range(P)]
    bubble = 1.0 - sum(compute) / (P * step) if step > 0 else 0.0
    acts = [g.activation_bytes[j] for j in range(P)]
    mem = _memory(levs, work, layout, acts, dbytes, world)
    return Prediction(layout, step, total, wu, level_seconds, [step_stats[j] for j in range(P)],
                      [cycle_stats[r] for r in world], bubble, acts, mem, g.allreduce,
                      [{"level": lv.level, "blocks": lv.spec.total_blocks, "layer_ranks": lv.ranks,
                        "replicas": lv.replicas} for lv in levs],
                      g.run if keep_run else None)


def _memory(levs, work, layout, fine_acts, dbytes, world) -> list:
    """Bytes per world rank of one fine replica: every level's parameters, gradients, the Level's
    gradient copy and optimizer state; the finest level's peak activations."""
    copies = 3 + OPTIMIZER_STATES.get(work.optimizer, 0)
    out = []
    for r in world:
        total = fine_acts[r]
        for lev in levs:
            pos = lev.position(r)
            if pos is not None:
                a, b = lev.partition.range(pos[1])
                total += copies * shard_parameters(lev.spec, a, b) * dbytes
        out.append(total)
    return out


def serial_prediction(work: Workload, profile: Profile, backend: str = "gloo", schedule: str = "1f1b",
                      weight_grads: str = "deferred") -> Prediction:
    """One rank, one micro-batch: the reference for efficiencies."""
    return predict(work, Layout(1, 1, 1, schedule, "gather", 1, weight_grads, backend), profile)
