"""The discrete-event engine: every rank's program as rows of ops, run from t = 0.

Ops: ``compute`` (seconds of one kind), ``send`` (the sender continues; the message arrives
latency + bytes/bandwidth later, queued behind earlier messages on the same link), ``recv``
(blocks until its message arrived), ``collective`` (blocking; done `seconds` after its last
member joined), ``start`` / ``wait`` (a non-blocking operation whose peers are identical copies
of this rank: done at post + seconds).

The exact evaluation lives here (``run_exact``): each rank runs until it blocks, one pass per
op (max-plus); numba compiles it for large programs (optional; the same function runs as plain
Python). ``sharing`` holds the processor-sharing evaluation and ``run_programs``.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

try:                                     # optional: compiles the exact engine for large programs
    import numba
    import numba.extending
except ImportError:                      # pragma: no cover - numba is installed with parml[fast]
    numba = None

KINDS = ("F", "B", "W", "other", "post", "wait", "collective")
KIND = {k: i for i, k in enumerate(KINDS)}
WAIT, COLL = KIND["wait"], KIND["collective"]
COMPUTE, SEND, RECV, COLLECTIVE, START, WAITOP = range(6)
NUMBA_MIN_OPS = 5000                    # below this the plain-Python engine is faster than a compile


class SimulationError(RuntimeError):
    """A program that cannot finish (a deadlock); the message names the blocked operations."""


class Programs(Mapping):
    """Every rank's ops as rows (code, kind, x, y, key, link); a mapping rank -> its row count.

    compute: x = seconds · send: x = latency, y = seconds on the wire, key = message id, link id ·
    recv: key = message id, y = source rank · collective: x = seconds, key = collective id ·
    start: x = seconds, key = handle id · wait: key = handle id.
    Rows of one rank run in the order they were appended; ``extend_ranks`` appends the same rows
    to many ranks at once (a pipeline's middle ranks run identical action lists).
    """

    def __init__(self, labels: bool = False):
        self._index: dict = {}           # rank id -> internal index, in order of appearance
        self._count: list = []
        self._blocks: list = []          # (internal rank of each row, code, kind, x, y, key, link)
        self._pending: list = []         # rows appended one at a time, not yet a block
        self._labels: list | None = [] if labels else None
        self._messages: dict = {}
        self.n_messages = 0
        self._links: dict = {}
        self.n_links = 0
        self.collectives: list = []      # (members, label)
        self._coll_ids: dict = {}
        self.handles: list = []          # (rank, name)
        self._handle_ids: dict = {}
        self._arrays = None

    # -- Mapping over ranks
    def __getitem__(self, rank):
        return self._count[self._index[rank]]

    def __iter__(self):
        return iter(self._index)

    def __len__(self):
        return len(self._index)

    @property
    def labelled(self) -> bool:
        return self._labels is not None

    # -- ids
    def _ri(self, r) -> int:
        i = self._index.get(r)
        if i is None:
            i = self._index[r] = len(self._count)
            self._count.append(0)
        return i

    def message(self, src, dst, tag) -> int:
        key = (src, dst, tag)
        if key not in self._messages:
            self._messages[key] = self.n_messages
            self.n_messages += 1
        return self._messages[key]

    def reserve_messages(self, n: int) -> int:
        """A block of n message ids for a caller that numbers its own messages."""
        base, self.n_messages = self.n_messages, self.n_messages + n
        return base

    def link(self, src, dst) -> int:
        if (src, dst) not in self._links:
            self._links[(src, dst)] = self.reserve_links(1)
        return self._links[(src, dst)]

    def reserve_links(self, n: int) -> int:
        base, self.n_links = self.n_links, self.n_links + n
        return base

    def collective_id(self, key, members, label="") -> int:
        if key not in self._coll_ids:
            self._coll_ids[key] = len(self.collectives)
            self.collectives.append((tuple(members), label))
        return self._coll_ids[key]

    def handle_id(self, rank, name) -> int:
        if (rank, name) not in self._handle_ids:
            self._handle_ids[(rank, name)] = len(self.handles)
            self.handles.append((rank, name))
        return self._handle_ids[(rank, name)]

    # -- appending
    def extend_ranks(self, ranks, code, kind, x, y, key, link, labels=None) -> None:
        """The same n rows for every rank in `ranks`; each column is (n,) or (len(ranks), n)."""
        self._flush()
        idx = np.array([self._ri(r) for r in ranks], dtype=np.int64)
        n = np.shape(code)[-1]
        shape = (len(idx), n)
        cols = [np.broadcast_to(np.asarray(c, dtype=t), shape).ravel()
                for c, t in zip((code, kind, x, y, key, link), (np.int64, np.int64, float, float, np.int64, np.int64))]
        self._blocks.append((np.repeat(idx, n), *cols))
        for i in idx:
            self._count[i] += n
        if self._labels is not None:
            self._labels += list(labels) if labels is not None else [""] * (n * len(idx))

    def extend_rows(self, ranks, code, kind, x, y, key, link, labels=None) -> None:
        """Rows of many ranks at once, one rank per row; each rank's rows keep their order."""
        self._flush()
        ranks = np.asarray(ranks, dtype=np.int64)
        uniq, inv = np.unique(ranks, return_inverse=True)
        idx = np.array([self._ri(int(r)) for r in uniq], dtype=np.int64)[inv]
        n = len(ranks)
        cols = [np.broadcast_to(np.asarray(c, dtype=t), (n,)).copy()
                for c, t in zip((code, kind, x, y, key, link), (np.int64, np.int64, float, float, np.int64, np.int64))]
        self._blocks.append((idx, *cols))
        for i, c in zip(*np.unique(idx, return_counts=True)):
            self._count[i] += int(c)
        if self._labels is not None:
            self._labels += list(labels) if labels is not None else [""] * n

    def extend(self, r, code, kind, x, y=None, key=None, link=None, labels=None) -> None:
        """Rows of one rank given as arrays (or lists) of equal length."""
        n = len(code)
        self.extend_ranks([r], code, kind, x, np.zeros(n) if y is None else y,
                          np.full(n, -1) if key is None else key, np.full(n, -1) if link is None else link, labels)

    def _row(self, r, code, kind, x, y=0.0, key=-1, link=-1, label=""):
        i = self._ri(r)
        self._pending.append((i, code, kind, x, y, key, link))
        self._count[i] += 1
        if self._labels is not None:
            self._labels.append(label)

    def _flush(self):
        self._arrays = None
        if self._pending:
            cols = list(zip(*self._pending))
            types = (np.int64, np.int64, np.int64, float, float, np.int64, np.int64)
            self._blocks.append(tuple(np.array(c, dtype=t) for c, t in zip(cols, types)))
            self._pending = []

    def compute(self, r, seconds, kind="other", label=""):
        self._row(r, COMPUTE, KIND[kind], seconds, label=label)

    def send(self, r, dst, tag, nbytes, cost):
        wire = nbytes / cost.bandwidth if cost.bandwidth else 0.0
        self._row(r, SEND, 0, cost.latency, wire, self.message(r, dst, tag), self.link(r, dst), f"send {tag} to {dst}")

    def recv(self, r, src, tag):
        self._row(r, RECV, 0, 0.0, src, self.message(src, r, tag), label=f"recv {tag} from {src}")

    def collective(self, r, key, members, seconds, label=""):
        self._row(r, COLLECTIVE, 0, seconds, 0.0, self.collective_id(key, members, label), label=label)

    def start(self, r, name, seconds, label=""):
        self._row(r, START, 0, seconds, 0.0, self.handle_id(r, name), label=label)

    def wait(self, r, name):
        self._row(r, WAITOP, 0, 0.0, 0.0, self.handle_id(r, name), label=f"wait {name}")

    def arrays(self):
        """(ranks, offsets, code, kind, x, y, key, link, labels): every rank's rows, contiguous."""
        self._flush()
        if self._arrays is None:
            ranks = list(self._index)
            cols = [np.concatenate([b[i] for b in self._blocks]) if self._blocks else np.zeros(0, dtype=np.int64)
                    for i in range(7)]
            order = np.argsort(cols[0], kind="stable")
            off = np.zeros(len(ranks) + 1, dtype=np.int64)
            off[1:] = np.cumsum(self._count)
            labels = [self._labels[i] for i in order.tolist()] if self._labels is not None else None
            self._arrays = (ranks, off, *(c[order] for c in cols[1:]), labels)
        return self._arrays


@dataclass
class Span:
    start: float
    end: float
    kind: str        # F | B | W | other | post | wait | collective
    label: str = ""


@dataclass
class Run:
    """What the engine saw: per rank its seconds per kind and finish time; spans on demand."""
    finish: dict
    end: float
    sums: dict                                     # rank -> {kind: seconds}
    handles: dict = field(default_factory=dict)    # (rank, handle) -> (posted, done, waited)
    _spans: dict | None = None
    _source: tuple | None = None                   # what spans are rebuilt from (exact engine)

    @property
    def spans(self) -> dict:
        if self._spans is None:
            self._spans = _spans_from_rows(*self._source)
        return self._spans

    def totals(self, rank) -> dict:
        out = dict(self.sums[rank])
        out["idle"] = self.end - self.finish[rank]
        return out

    def timeline(self, rank, kinds=("F", "B", "W")) -> list[tuple[str, float, float]]:
        return [(s.label, s.start, s.end) for s in self.spans[rank] if s.kind in kinds]


def _spans_from_rows(labels, ranks, off, code, kind, start, end, joined):
    out = {}
    for i, r in enumerate(ranks):
        spans = []
        for j in range(off[i], off[i + 1]):
            c, s, e = code[j], start[j], end[j]
            lab = labels[j] if labels is not None else ""
            if c == COMPUTE and e > s:
                spans.append(Span(s, e, KINDS[kind[j]], lab))
            elif c in (RECV, WAITOP) and e > s:
                spans.append(Span(s, e, "wait", lab))
            elif c == COLLECTIVE:
                if joined[j] > s:
                    spans.append(Span(s, joined[j], "wait", lab))
                if e > joined[j]:
                    spans.append(Span(joined[j], e, "collective", lab))
        out[r] = spans
    return out


# --- the exact engine ------------------------------------------------------------------------------

def _jitable(fn):
    """A helper of ``_exact``: plain Python, and callable from numba-compiled code too."""
    return numba.extending.register_jitable(fn) if numba is not None else fn


@_jitable
def _push(queue, inq, tail, r):
    """Queue rank r to run (once); returns the new tail of the ring buffer."""
    if not inq[r]:
        queue[tail] = r
        inq[r] = True
        tail = (tail + 1) % len(queue)
    return tail


@_jitable
def _send(i, t, x, y, key, link, arrival, sent, link_free):
    """The message leaves when its link is free and arrives latency + wire time later."""
    k, ln = key[i], link[i]
    st = t if t > link_free[ln] else link_free[ln]
    link_free[ln] = st + y[i]
    arrival[k] = st + x[i] + y[i]
    sent[k] = True
    return k


@_jitable
def _complete(i, r, cid, x, owner, start, end, joined, sums, clock, pc, coll_last, coll_head, coll_next,
              queue, inq, tail):
    """The last member joined collective `cid` at op i: every member waits for it, pays the
    collective's seconds and continues at its end. Returns (end time, queue tail)."""
    last = coll_last[cid]
    fin = last + x[i]
    j = coll_head[cid]
    while j >= 0:
        rr = owner[j]
        if last > start[j]:
            sums[rr, 5] += last - start[j]
        sums[rr, 6] += x[i]
        joined[j] = last
        end[j] = fin
        if rr != r:
            clock[rr] = fin
            pc[rr] = j + 1
            tail = _push(queue, inq, tail, rr)
        j = coll_next[j]
    return fin, tail


def _exact(code, kind, x, y, key, link, owner, off, coll_size, sums, clock, pc, done, start, end, joined,
           arrival, sent, waiting, link_free, coll_joined, coll_last, coll_head, coll_next,
           h_posted, h_done, h_waited, queue, inq):
    """Max-plus evaluation: each rank runs until it blocks. Plain indexing only, so that the same
    code runs as Python on lists and compiled by numba on arrays."""
    head, tail = 0, 0
    for r in range(len(clock)):
        tail = _push(queue, inq, tail, r)
    while head != tail:
        r = queue[head]
        head = (head + 1) % len(queue)
        inq[r] = False
        i, t, blocked = pc[r], clock[r], False
        while i < off[r + 1]:
            c = code[i]
            start[i] = t
            if c == 0:                                       # compute
                t += x[i]
                sums[r, kind[i]] += x[i]
            elif c == 1:                                     # send
                k = _send(i, t, x, y, key, link, arrival, sent, link_free)
                if waiting[k] >= 0:
                    tail = _push(queue, inq, tail, waiting[k])
            elif c == 2:                                     # recv
                k = key[i]
                if not sent[k]:
                    waiting[k], blocked = r, True
                    break
                waiting[k] = -1
                if arrival[k] > t:
                    sums[r, 5] += arrival[k] - t
                    t = arrival[k]
            elif c == 3:                                     # collective
                cid = key[i]
                coll_joined[cid] += 1
                coll_next[i], coll_head[cid] = coll_head[cid], i
                coll_last[cid] = max(coll_last[cid], t)
                if coll_joined[cid] < coll_size[cid]:
                    blocked = True
                    break
                t, tail = _complete(i, r, cid, x, owner, start, end, joined, sums, clock, pc, coll_last, coll_head,
                                    coll_next, queue, inq, tail)
            elif c == 4:                                     # start
                h_posted[key[i]], h_done[key[i]] = t, t + x[i]
            elif h_done[key[i]] > t:                         # wait
                sums[r, 5] += h_done[key[i]] - t
                h_waited[key[i]] = h_done[key[i]] - t
                t = h_done[key[i]]
            end[i] = t
            i += 1
        pc[r], clock[r] = i, t
        done[r] = not blocked
    return 0


_exact_compiled = None


def _compiled():
    global _exact_compiled
    if _exact_compiled is None:
        _exact_compiled = numba.njit(cache=True)(_exact)
    return _exact_compiled


def run_exact(programs: Programs, compiled: bool | None = None) -> Run:
    """Every rank at full speed: the max-plus evaluation (numba-compiled for large programs)."""
    ranks, off, code, kind, x, y, key, link, labels = programs.arrays()
    n, R = len(code), len(ranks)
    if compiled is None:
        compiled = numba is not None and n >= NUMBA_MIN_OPS
    owner = np.repeat(np.arange(R, dtype=np.int64), np.diff(off))
    coll_size = np.array([len(m) for m, _ in programs.collectives] or [0], dtype=np.int64)
    nc, nh, nm, nl = len(coll_size), max(len(programs.handles), 1), max(programs.n_messages, 1), \
        max(programs.n_links, 1)
    state = dict(sums=np.zeros((R, len(KINDS))), clock=np.zeros(R), pc=off[:-1].copy(),
                 done=np.zeros(R, dtype=np.bool_), start=np.zeros(n), end=np.zeros(n), joined=np.zeros(n),
                 arrival=np.zeros(nm), sent=np.zeros(nm, dtype=np.bool_), waiting=np.full(nm, -1, dtype=np.int64),
                 link_free=np.full(nl, -np.inf), coll_joined=np.zeros(nc, dtype=np.int64),
                 coll_last=np.full(nc, -np.inf), coll_head=np.full(nc, -1, dtype=np.int64),
                 coll_next=np.full(n, -1, dtype=np.int64), h_posted=np.zeros(nh), h_done=np.zeros(nh),
                 h_waited=np.zeros(nh), queue=np.zeros(R + 1, dtype=np.int64), inq=np.zeros(R, dtype=np.bool_))
    inputs = [code, kind, x, y, key, link, owner, off, coll_size]
    if compiled:
        _compiled()(*inputs, *state.values())
    else:
        py = {k: v.tolist() for k, v in state.items()}
        _exact(*[a.tolist() for a in inputs], **dict(py, sums=_Rows(py["sums"])))
        state = {k: np.asarray(v) for k, v in py.items()}
    if not state["done"].all():
        raise _deadlock(programs, ranks, off, state["pc"], state["done"])
    clock, sums = state["clock"], state["sums"]
    finish = {r: float(clock[i]) for i, r in enumerate(ranks)}
    handles = {h: (float(state["h_posted"][i]), float(state["h_done"][i]), float(state["h_waited"][i]))
               for i, h in enumerate(programs.handles)}
    return Run(finish, max(finish.values(), default=0.0),
               {r: dict(zip(KINDS, map(float, sums[i]))) for i, r in enumerate(ranks)}, handles,
               None, (labels, ranks, off, code, kind, state["start"], state["end"], state["joined"]))


class _Rows:
    """``sums[r, k]`` indexing on a list of lists, so that ``_exact`` runs unchanged in Python."""

    def __init__(self, rows):
        self.rows = rows

    def __getitem__(self, rk):
        return self.rows[rk[0]][rk[1]]

    def __setitem__(self, rk, value):
        self.rows[rk[0]][rk[1]] = value


def _deadlock(programs, ranks, off, pc, done):
    blocked = [f"rank {r} at op {int(pc[i] - off[i])}" for i, r in enumerate(ranks) if not done[i]]
    return SimulationError("simulated program deadlocks: " + "; ".join(blocked[:6]))
