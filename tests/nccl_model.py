"""An in-process model of NCCL's point-to-point semantics, for running the real code without a GPU.

``run_model(fn, size, ...)`` runs ``fn(comm, *args)`` on ``size`` threads, each holding a
:class:`ModelComm` that implements parml's ``Communicator`` contract (``parml/comm.py``) with the
rules of PyTorch's NCCL process group:

* **tags are ignored**: the k-th send from a to b is matched with the k-th receive on b from a;
* **streams are FIFO**: an operation runs only when every operation posted before it on its
  stream has finished, so a receive at the head of a stream blocks everything queued behind it.
  ``streams="pair"`` gives each (communicator, pair of ranks) one stream on each side, shared by
  both directions (PyTorch's default for single send/recv); ``streams="rank"`` puts every
  operation of a rank on a communicator on one stream, collectives included (grouped
  ``batch_isend_irecv`` runs on the communicator's collective stream);
* ``transfer="buffered"``: a send completes when it reaches the head of its stream (small
  messages fit NCCL's connection buffers); ``transfer="rendezvous"``: a send completes only
  together with its matching receive, both at the heads of their streams (large messages);
* collectives complete when every rank of the communicator has reached them.

Waiting blocks the calling thread, which has the same dependencies as PyTorch's stream waits
(every later NCCL operation waits on the compute stream, which waits on the awaited one).

``transfer="tagged"`` is the contrast: messages are matched by (source, tag) as gloo and MPI do,
sends are buffered, and the communicator reports ``ordered_p2p = False``.

A deadlock (every live rank blocked, nothing can progress) raises :class:`CommTimeout` on every
blocked rank at once, naming what each waits for; a hang that the detector cannot see ends at
``timeout`` seconds. With ``check_tags`` (default) a matched send and receive with different tags,
sizes or dtypes fail with :class:`CommError`: on real NCCL they would silently swap data.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque

import torch

from parml.comm import CommError, CommTimeout, Communicator, Request

TRANSFERS = ("buffered", "rendezvous", "tagged")
STREAMS = ("pair", "rank")


class _Op:
    __slots__ = ("kind", "group", "rank", "peer", "tag", "tensor", "payload", "index", "done", "error",
                 "at_head", "partner", "spec", "result", "thread")

    def __init__(self, kind, group, rank, peer=-1, tag=0, tensor=None, spec=None):
        self.kind, self.group, self.rank, self.peer, self.tag = kind, group, rank, peer, tag
        self.tensor, self.spec = tensor, spec
        self.payload = self.partner = self.result = self.error = None
        self.index = -1
        self.done = self.at_head = False

    def describe(self):
        g = self.group
        if self.kind == "send":
            return f"send #{self.index} to rank {self.peer} (tag {self.tag}) on {g.name}"
        if self.kind == "recv":
            return f"recv #{self.index} from rank {self.peer} (tag {self.tag}) on {g.name}"
        return f"{self.spec[0]} #{self.index} on {g.name}"


class _Group:
    """One communicator: its world ranks and the per-rank posting counters."""

    _ids = itertools.count()

    def __init__(self, world_ranks, name):
        self.id = next(self._ids)
        self.world_ranks = list(world_ranks)
        self.name = name
        self.splits = [0] * len(self.world_ranks)
        self.children = {}
        self.coll_count = [0] * len(self.world_ranks)
        self.colls = {}            # index -> {rank: op}


class Engine:
    """Shared state of one model world: streams, matching, deadlock detection."""

    def __init__(self, size, transfer="buffered", streams="pair", timeout=20.0, check_tags=True):
        if transfer not in TRANSFERS:
            raise ValueError(f"transfer must be one of {TRANSFERS}, got {transfer!r}")
        if streams not in STREAMS:
            raise ValueError(f"streams must be one of {STREAMS}, got {streams!r}")
        self.size, self.transfer, self.streams = size, transfer, streams
        self.timeout, self.check_tags = float(timeout), check_tags
        self.cv = threading.Condition()
        self.queues: dict = {}         # stream key -> deque of ops (posting order)
        self.posted: dict = {}         # (group id, src, dst, kind) -> number posted
        self.pending: dict = {}        # (group id, src, dst, index) -> {"send": op, "recv": op}
        self.mail: dict = {}           # tagged mode: (group id, src, dst, tag) -> deque of payloads
        self.waiting_recv: dict = {}   # tagged mode: (group id, src, dst, tag) -> deque of recv ops
        self.alive: set = set()
        self.blocked: dict = {}        # thread -> op it waits for
        self.failure: str | None = None
        self.deadlock: str | None = None
        self.messages = 0
        self.world = _Group(range(size), "world")

    # ---- posting ---------------------------------------------------------------------------
    def _stream(self, op):
        if self.streams == "rank":
            return ("rank", op.group.id, op.rank)
        if op.kind in ("send", "recv"):
            return ("pair", op.group.id, op.rank, op.peer)
        return ("coll", op.group.id, op.rank)

    def post(self, op):
        with self.cv:
            if self.failure:
                raise CommError(self.failure)
            g = op.group
            if op.kind in ("send", "recv"):
                src, dst = (op.rank, op.peer) if op.kind == "send" else (op.peer, op.rank)
                key = (g.id, src, dst, op.kind)
                op.index = self.posted.get(key, 0)
                self.posted[key] = op.index + 1
                if self.transfer == "tagged":
                    self._post_tagged(op, src, dst)
                    return
                slot = self.pending.setdefault((g.id, src, dst, op.index), {})
                slot[op.kind] = op
                other = slot.get("recv" if op.kind == "send" else "send")
                if other is not None:
                    op.partner, other.partner = other, op
            else:
                op.index = g.coll_count[op.rank]
                g.coll_count[op.rank] += 1
                g.colls.setdefault(op.index, {})[op.rank] = op
            self.queues.setdefault(self._stream(op), deque()).append(op)
            self._progress()

    def _post_tagged(self, op, src, dst):
        key = (op.group.id, src, dst, op.tag)
        if op.kind == "send":
            op.done = True
            waiting = self.waiting_recv.get(key)
            if waiting:
                self._deliver(op.tensor, waiting.popleft(), op)
            else:
                self.mail.setdefault(key, deque()).append(op.tensor.detach().clone())
        else:
            box = self.mail.get(key)
            if box:
                self._copy_in(op, box.popleft(), None)
            else:
                self.waiting_recv.setdefault(key, deque()).append(op)
        self.cv.notify_all()

    # ---- progress --------------------------------------------------------------------------
    def _copy_in(self, recv, data, send):
        if self.check_tags and send is not None and send.tag != recv.tag:
            self._fail_pair(send, recv, f"tag {send.tag} sent, tag {recv.tag} expected")
            return
        dst = recv.tensor
        if data.dtype != dst.dtype or data.numel() != dst.numel():
            self._fail_pair(send, recv, f"{data.numel()} x {data.dtype} sent into a buffer of "
                                        f"{dst.numel()} x {dst.dtype}")
            return
        dst.copy_(data.reshape(dst.shape))
        recv.done = True
        self.messages += 1
        self.pending.pop((recv.group.id, recv.peer, recv.rank, recv.index), None)   # matched: forget

    def _deliver(self, data, recv, send):
        self._copy_in(recv, data, send)

    def _fail_pair(self, send, recv, why):
        err = CommError(f"message mismatch: {send.describe() if send else '?'} on rank {recv.peer} "
                        f"matched {recv.describe()} on rank {recv.rank}: {why}")
        for op in (send, recv):
            if op is not None:
                op.error, op.done = err, True

    def _try(self, op):
        """Run `op`, which is at the head of its stream, as far as it can; True when it finished."""
        if op.done:
            return True
        op.at_head = True
        if op.kind == "send":
            if self.transfer == "buffered":
                op.payload = op.tensor.detach().clone()
                op.done = True
                r = op.partner
                if r is not None and r.at_head and not r.done:
                    self._deliver(op.payload, r, op)
                return True
            r = op.partner
            if r is not None and r.at_head and not r.done:
                self._deliver(op.tensor, r, op)
                op.done = True
                return True
            return False
        if op.kind == "recv":
            s = op.partner
            if s is None:
                return False
            if self.transfer == "buffered":
                if s.done and s.payload is not None:
                    self._deliver(s.payload, op, s)
                    return op.done
                return False
            if s.at_head and not s.done:
                self._deliver(s.tensor, op, s)
                s.done = True
                return True
            return False
        # collective: complete when every rank of the group has it at the head of its stream
        g = op.group
        ops = g.colls[op.index]
        if len(ops) < len(g.world_ranks) or not all(o.at_head or o is op for o in ops.values()):
            return False
        self._collective(g, [ops[r] for r in range(len(g.world_ranks))])
        del g.colls[op.index]
        return True

    def _collective(self, g, ops):
        specs = {o.spec for o in ops}
        if len(specs) != 1:
            err = CommError(f"collective mismatch on {g.name} #{ops[0].index}: " +
                            "; ".join(f"rank {o.rank}: {o.spec}" for o in ops))
            for o in ops:
                o.error, o.done = err, True
            return
        what = ops[0].spec[0]
        if what.startswith("allreduce"):
            red = ops[0].spec[1]
            acc = ops[0].tensor.detach().clone()
            for o in ops[1:]:
                t = o.tensor
                if red == "sum":
                    acc += t
                elif red == "max":
                    acc = torch.maximum(acc, t)
                elif red == "min":
                    acc = torch.minimum(acc, t)
                else:
                    acc *= t
            for o in ops:
                o.tensor.copy_(acc)
        elif what == "broadcast":
            root = ops[0].spec[1]
            src = ops[root].tensor.detach().clone()
            for o in ops:
                if o.rank != root:
                    o.tensor.copy_(src)
        for o in ops:
            o.done = True

    def _progress(self):
        changed = True
        any_change = False
        while changed:
            changed = False
            for q in self.queues.values():
                while q and self._try(q[0]):
                    q.popleft()
                    changed = any_change = True
                if q:
                    q[0].at_head = True
        if any_change:
            self.cv.notify_all()
        return any_change

    # ---- waiting ---------------------------------------------------------------------------
    def wait(self, op, timeout):
        me = threading.current_thread()
        deadline = time.monotonic() + timeout
        with self.cv:
            self.blocked[me] = op
            try:
                while True:
                    self._progress()
                    if op.done:
                        if op.error is not None:
                            raise op.error
                        return
                    if self.failure:
                        raise CommError(self.failure)
                    if self.deadlock:
                        raise CommTimeout(f"{op.describe()} on rank {op.rank} timed out: deadlock: {self.deadlock}")
                    if self.alive and all(t in self.blocked and not self.blocked[t].done for t in self.alive):
                        self.deadlock = self._explain()
                        self.cv.notify_all()
                        continue
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise CommTimeout(f"{op.describe()} on rank {op.rank} timed out after {self.timeout:g} s")
                    self.cv.wait(min(left, 0.25))
            finally:
                self.blocked.pop(me, None)

    def _explain(self):
        parts = []
        for t, op in self.blocked.items():
            parts.append(f"rank {op.group.world_ranks[op.rank]} waits at {op.describe()}")
        heads = []
        for key, q in self.queues.items():
            if q:
                h = q[0]
                heads.append(f"{key[0]} stream of rank {h.group.world_ranks[h.rank]}: head {h.describe()} "
                             f"({len(q)} queued)")
        return "; ".join(parts) + (" | " + "; ".join(heads) if heads else "")

    def enter(self, thread):
        """Count `thread` as a live rank (before it starts, so that no rank looks alone)."""
        with self.cv:
            self.alive.add(thread)

    def leave(self):
        with self.cv:
            self.alive.discard(threading.current_thread())
            self.cv.notify_all()

    def abort(self, message):
        with self.cv:
            if not self.failure:
                self.failure = message
            self.cv.notify_all()


class _ModelRequest(Request):
    def __init__(self, comm, op):
        super().__init__(comm, op.kind, op.peer, op.tag, op.tensor)
        self._op = op

    def _wait(self, deadline):
        self._comm._engine.wait(self._op, max(deadline - time.monotonic(), 0.0))

    def _describe(self):
        return self._op.describe() if self._op.kind == "coll" else super()._describe()


class ModelComm(Communicator):
    """One rank of a model world (see the module docstring)."""

    def __init__(self, engine: Engine, group: _Group, rank: int):
        super().__init__()
        self._engine, self._group = engine, group
        self.rank, self.size = rank, len(group.world_ranks)
        self.backend = "nccl-model" if engine.transfer != "tagged" else "tagged-model"
        self.ordered_p2p = engine.transfer != "tagged"
        self.timeout = engine.timeout
        self.device = torch.device("cpu")

    # ---- point to point --------------------------------------------------------------------
    def isend(self, tensor, dst, tag=0):
        self._check_open()
        dst = self._check_peer(dst, "isend")
        tag = self._check_tag(tag)
        op = _Op("send", self._group, self.rank, dst, tag, tensor if tensor.is_contiguous() else tensor.contiguous())
        self._engine.post(op)
        self.bytes_sent += tensor.numel() * tensor.element_size()
        return _ModelRequest(self, op)

    def irecv(self, tensor, src, tag=0):
        self._check_open()
        src = self._check_peer(src, "irecv")
        tag = self._check_tag(tag)
        self._check_recv_buffer(tensor)
        op = _Op("recv", self._group, self.rank, src, tag, tensor)
        self._engine.post(op)
        return _ModelRequest(self, op)

    # ---- collectives -----------------------------------------------------------------------
    def _collective(self, spec, tensor):
        self._check_open()
        op = _Op("coll", self._group, self.rank, tensor=tensor, spec=spec)
        self._engine.post(op)
        t0 = time.perf_counter()
        try:
            self._engine.wait(op, self.timeout)
        finally:
            self.wait_seconds += time.perf_counter() - t0

    def allreduce(self, tensor, op="sum"):
        self._check_op(op)
        if self.size > 1:
            self._collective(("allreduce", op, tuple(tensor.shape), tensor.dtype), tensor)
            self.collective_bytes += tensor.numel() * tensor.element_size()
        return tensor

    def iallreduce(self, tensor, op="sum"):
        """Posted on the rank's stream like every collective; done when every rank posted it."""
        self._check_open()
        self._check_op(op)
        op_ = _Op("coll", self._group, self.rank, tensor=tensor, spec=("allreduce", op, tuple(tensor.shape),
                                                                      tensor.dtype))
        if self.size > 1:
            self._engine.post(op_)
            self.collective_bytes += tensor.numel() * tensor.element_size()
        else:
            op_.done = True
        return _ModelRequest(self, op_)

    def broadcast(self, tensor, root):
        root = self._check_root(root)
        if self.size > 1:
            self._collective(("broadcast", root, tuple(tensor.shape), tensor.dtype), tensor)
        return tensor

    def barrier(self):
        if self.size > 1:
            self._collective(("barrier",), None)

    # ---- structure -------------------------------------------------------------------------
    def split(self, ranks):
        self._check_open()
        ranks = self._check_split(ranks)
        g = self._group
        with self._engine.cv:
            g.splits[self.rank] += 1
            key = g.splits[self.rank]
            child = g.children.get(key)
            if child is None:
                world = [g.world_ranks[r] for r in ranks]
                child = g.children[key] = (list(ranks), _Group(world, f"{g.name}/split{key}{ranks}"))
            elif child[0] != ranks:
                raise CommError(f"split #{key} of {g.name}: rank {self.rank} asked for {ranks}, "
                                f"another rank for {child[0]}")
        if self.rank not in ranks:
            return None
        sub = ModelComm(self._engine, child[1], ranks.index(self.rank))
        return sub

    def abort(self, message):
        self._engine.abort(message)
        self._closed = True


class RankFailures(AssertionError):
    """Some ranks raised; ``errors`` maps rank -> exception (the first root cause is in the message)."""

    def __init__(self, errors: dict, message: str):
        super().__init__(message)
        self.errors = errors


def run_model(fn, size, *args, transfer="buffered", streams="pair", timeout=20.0, check_tags=True,
              join_timeout=None, **kwargs):
    """Run ``fn(comm, *args, **kwargs)`` on `size` threads of one model world; per-rank results.

    A rank that raises aborts the world (the others fail at their next communication); the
    exceptions come back as :class:`RankFailures`, the first non-secondary one named first."""
    engine = Engine(size, transfer, streams, timeout, check_tags)
    results, errors = [None] * size, {}

    def body(rank):
        try:
            results[rank] = fn(ModelComm(engine, engine.world, rank), *args, **kwargs)
        except BaseException as exc:          # noqa: BLE001 - reported to the caller
            errors[rank] = exc
            if not isinstance(exc, CommError):
                engine.abort(f"rank {rank} failed: {type(exc).__name__}: {exc}")
        finally:
            engine.leave()

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    threads = [threading.Thread(target=body, args=(r,), daemon=True, name=f"model-rank{r}") for r in range(size)]
    for t in threads:
        engine.enter(t)
    for t in threads:
        t.start()
    end = time.monotonic() + (join_timeout if join_timeout is not None else 3 * timeout + 30)
    for t in threads:
        t.join(max(end - time.monotonic(), 0.0))
    torch.set_num_threads(prev)
    hung = [t.name for t in threads if t.is_alive()]
    if hung:
        engine.abort("run_model: threads did not finish")
        raise RankFailures(errors, f"threads {hung} did not finish (a hang outside communication)")
    if errors:
        def rank_of(item):               # root causes first: a rank's own error, a deadlock, a mismatch
            r, e = item
            kind = (0 if not isinstance(e, CommError) else 1 if isinstance(e, CommTimeout)
                    else 2 if "mismatch" in str(e) else 3)
            return kind, r
        first_rank, first = sorted(errors.items(), key=rank_of)[0]
        lines = [f"rank {r}: {type(e).__name__}: {e}" for r, e in sorted(errors.items())]
        raise RankFailures(errors, f"{len(errors)} rank(s) failed ({transfer}, {streams} streams); first: rank "
                                   f"{first_rank}: {type(first).__name__}: {first}\n" + "\n".join(lines)) from first
    run_model.last_messages = engine.messages
    return results
