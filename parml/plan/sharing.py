"""Processor sharing: ranks of a node split its cores evenly among those computing (more ranks
than cores, or other busy processes on a shared machine), and ``run_programs``, which picks the
evaluation: exact (``engine.run_exact``) when every rank has a core, sharing otherwise.
"""
from __future__ import annotations

import heapq
import math

from .engine import COLLECTIVE, COMPUTE, KINDS, RECV, SEND, START, Programs, Run, SimulationError, Span, run_exact


def run_programs(programs: Programs, share=None, cores: float | None = None, record: bool = True,
                 background: float = 0.0, compiled: bool | None = None) -> Run:
    """Run every rank's program from t = 0.

    `share`: None (every rank computes at full speed) or {rank: {other rank: copies}}: the ranks
    whose computing slows `rank` down (copies counts identical replicas on its node, itself
    included); then a computing rank runs at min(1, cores / (Σ copies of computing ranks + background)).
    `background`: other runnable processes on every node, competing for its cores.
    A compute row's `y` adds to its seconds when the rank starts it on a node whose cores are all
    busy (the receiver's extra cost there, ``CommCost.receive_busy``); the exact evaluation, where
    every rank has a core, never adds it.
    `record` is kept for callers; spans are rebuilt on demand.
    """
    if share is None:
        return run_exact(programs, compiled)
    return run_shared(programs, share, cores, background)


class _Shared:
    """Time-ordered fluid simulation: a node's computing ranks split its cores evenly."""

    def __init__(self, programs: Programs, share: dict, cores: float, background: float):
        self.programs = programs
        self.ranks, off, *cols, self.labels = programs.arrays()
        self.code, self.kind, self.x, self.y, self.key, self.link = [c.tolist() for c in cols]
        self.off = off.tolist()
        self.idx = {r: i for i, r in enumerate(self.ranks)}
        R = len(self.ranks)
        self.share = [[(self.idx[q], c) for q, c in share[r].items() if q in self.idx] for r in self.ranks]
        self.cores, self.background = cores, background
        self.pc = self.off[:-1]
        self.state = ["run"] * R                    # run | compute | blocked | done
        self.remaining, self.began = [0.0] * R, [0.0] * R
        self.spans = {r: [] for r in self.ranks}
        self.finish = {}
        self.arrival, self.waiting, self.link_free, self.posts = {}, {}, {}, {}
        self.handles = [[0.0, 0.0, 0.0] for _ in programs.handles]
        self.since = [0.0] * R
        self.timers, self.seq, self.t = [], 0, 0.0

    def label(self, i, j):
        return self.labels[j] if self.labels is not None else ""

    def timer(self, at, i, what, info):
        self.seq += 1
        heapq.heappush(self.timers, (at, self.seq, i, what, info))

    def block(self, i):
        self.state[i], self.since[i] = "blocked", self.t

    def step(self, i):
        t, stop = self.t, self.off[i + 1]
        while self.pc[i] < stop:
            j = self.pc[i]
            c, k = self.code[j], self.key[j]
            if c == COMPUTE:
                self.pc[i] += 1
                seconds = self.x[j] + (self.y[j] if self.y[j] > 0 and self.saturated(i) else 0.0)
                if seconds > 0:
                    self.state[i], self.remaining[i], self.began[i] = "compute", seconds, t
                    return
            elif c == SEND:
                ln = self.link[j]
                st = max(t, self.link_free.get(ln, -math.inf))
                self.link_free[ln] = st + self.y[j]
                self.arrival[k] = st + self.x[j] + self.y[j]
                if k in self.waiting:
                    self.timer(max(self.arrival[k], t), self.waiting.pop(k), "recv", k)
                self.pc[i] += 1
            elif c == RECV:
                self.block(i)
                if k in self.arrival:
                    self.timer(max(self.arrival[k], t), i, "recv", k)
                else:
                    self.waiting[k] = i
                return
            elif c == COLLECTIVE:
                joined = self.posts.setdefault(k, {})
                joined[i] = t
                self.block(i)
                if len(joined) == len(self.programs.collectives[k][0]):
                    for m in joined:
                        self.timer(t + self.x[j], m, "collective", (k, t, self.x[j]))
                    del self.posts[k]
                return
            elif c == START:
                self.handles[k] = [t, t + self.x[j], 0.0]
                self.pc[i] += 1
            else:
                if self.handles[k][1] > t:
                    self.block(i)
                    self.timer(self.handles[k][1], i, "wait", k)
                    return
                self.pc[i] += 1
        self.state[i] = "done"
        self.finish[self.ranks[i]] = t

    def saturated(self, i) -> bool:
        """Every core of rank i's node taken by its other computing ranks and the background: a
        compute row's `y` (a message's extra cost on a busy node) applies."""
        load = sum(c for q, c in self.share[i] if q != i and self.state[q] == "compute") + self.background
        return load >= self.cores

    def rates(self):
        computing = [i for i, s in enumerate(self.state) if s == "compute"]
        on = set(computing)
        out = {}
        for i in computing:
            load = sum(c for q, c in self.share[i] if q in on) + self.background
            out[i] = min(1.0, self.cores / load) if load > 0 else 1.0
        return out

    def wake(self, i, what, info):
        t, r = self.t, self.ranks[i]
        j = self.pc[i]
        if what == "recv" and t > self.since[i]:
            self.spans[r].append(Span(self.since[i], t, "wait", self.label(i, j)))
        elif what == "collective":
            _, last, seconds = info
            if last > self.since[i]:
                self.spans[r].append(Span(self.since[i], last, "wait", self.label(i, j)))
            if seconds > 0:
                self.spans[r].append(Span(last, t, "collective", self.label(i, j)))
        elif what == "wait":
            self.spans[r].append(Span(self.since[i], t, "wait", self.label(i, j)))
            self.handles[info][2] = t - self.since[i]
        self.pc[i] += 1
        self.state[i] = "run"

    def advance(self) -> bool:
        """Run to the next event; False when every rank is done."""
        for i, s in enumerate(self.state):
            if s == "run":
                self.step(i)
        if all(s == "done" for s in self.state):
            return False
        rate = self.rates()
        t_next = min((self.t + self.remaining[i] / k for i, k in rate.items()), default=math.inf)
        if self.timers:
            t_next = min(t_next, self.timers[0][0])
        if t_next == math.inf:
            raise SimulationError("simulated program deadlocks: blocked ranks " +
                                  ", ".join(str(self.ranks[i]) for i, s in enumerate(self.state) if s != "done"))
        dt, self.t = t_next - self.t, t_next
        for i, k in rate.items():
            self.remaining[i] -= dt * k
            if self.remaining[i] <= 1e-12 * max(1.0, self.t):
                j = self.pc[i] - 1
                self.spans[self.ranks[i]].append(Span(self.began[i], self.t, KINDS[self.kind[j]], self.label(i, j)))
                self.state[i] = "run"
        while self.timers and self.timers[0][0] <= self.t:
            _, _, i, what, info = heapq.heappop(self.timers)
            if self.state[i] == "blocked":
                self.wake(i, what, info)
        return True

    def run(self) -> Run:
        while self.advance():
            pass
        sums = {}
        for r, spans in self.spans.items():
            acc = dict.fromkeys(KINDS, 0.0)
            for s in spans:
                acc[s.kind] += s.end - s.start
            sums[r] = acc
        handles = {h: tuple(v) for h, v in zip(self.programs.handles, self.handles)}
        return Run(dict(self.finish), max(self.finish.values(), default=0.0), sums, handles, self.spans)


def run_shared(programs: Programs, share: dict, cores: float, background: float = 0.0) -> Run:
    """Processor sharing among the ranks of a node (see ``run_programs``)."""
    return _Shared(programs, share, cores, background).run()
