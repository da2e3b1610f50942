"""TorchComm: torch.distributed with gloo (CPU tensors) or NCCL (CUDA tensors), on public APIs only.

The world communicator comes from torchrun's variables (``init_process_group("env://")``).
Sub-communicators: on NCCL ``dist.split_group`` (one ncclCommSplit, collective over the parent);
on gloo a ``ProcessGroupGloo`` over a ``PrefixStore`` of a ``TCPStore`` client of the launcher's
store, so only the members take part. (``dist.new_group(..., use_local_synchronization=True)``
names a group by a hash of its ranks and of how many groups the calling process already holds:
when ranks hold different numbers of groups — a coarse level on ranks [0, 1] of 4, then [0] —
the members compute different names and wait for each other forever.) Every group a
communicator makes is remembered, so ``abort`` reaches each one.

Waits: gloo's ``work.wait(timeout)`` bounds every wait by ``comm.timeout``. NCCL's waits are
stream waits: the host queues work ahead of the GPU, and NCCL's watchdog, whose limit is set
above ``comm.timeout`` (``process_group_timeout``), ends an operation that never completes.
"""
from __future__ import annotations

import datetime
import itertools
import os
import sys
import threading
import time

import torch
import torch.distributed as dist

from .base import CommError, Communicator, CompletedRequest, Request, nbytes
from .environment import TORCHRUN_HINT, local_rank


def process_group_timeout(comm_timeout: float) -> float:
    """Seconds for the NCCL process group's watchdog, given ``--comm-timeout``.

    The watchdog counts from when an operation is queued and kills the process (SIGABRT) when it
    fires; parml's own timeout counts from when the host starts waiting and ends the run with a
    one-line message and an abort. The watchdog gets twice the time, and at least two minutes
    more, so that parml's timeout fires first while the host runs ahead of the device."""
    t = float(comm_timeout)
    return max(2.0 * t, t + 120.0)


_WORLDS = itertools.count(1)     # a process may set up the world communicator more than once (tests)


class _TorchRequest(Request):
    def __init__(self, comm, op, peer, tag, tensor, work, label=None):
        super().__init__(comm, op, peer, tag, tensor, label)
        self._work = work

    def _wait(self, deadline):
        comm = self._comm
        if comm.backend == "nccl" and self.op != "collective":
            # NCCL point to point: a stream wait, the host runs on; the process group's watchdog
            # (timeout process_group_timeout(comm.timeout)) bounds the operation.
            self._work.wait()
            return
        # gloo, and NCCL collectives (their result is read on the host): block with the deadline
        remaining = max(deadline - time.monotonic(), 1e-3)
        if self._work.wait(datetime.timedelta(seconds=remaining)) is False:
            raise comm._timeout_error(self._describe())


class TorchComm(Communicator):
    """A torch.distributed process group as a parml communicator.

    ``TorchComm.world(backend, timeout, device)`` starts (or joins) the default group;
    ``split(ranks)`` makes sub-communicators. ``global_ranks[i]`` is the world rank of rank i.
    """

    def __init__(self, group, backend: str, timeout: float, device: torch.device, global_ranks: list[int],
                 owns_world: bool = False, store=None, prefix: str = "parml"):
        super().__init__()
        self._dist = dist
        self._group = group
        self.backend = backend
        self.timeout = float(timeout)
        self.device = torch.device(device)
        self.global_ranks = list(global_ranks)
        self.rank = group.rank()
        self.size = group.size()
        self._owns_world = owns_world
        self._store, self._prefix, self._splits = store, prefix, 0
        self._children: list[TorchComm] = []

    @classmethod
    def world(cls, backend: str = "gloo", timeout: float = 300.0,
              device: str | torch.device | None = None) -> "TorchComm":
        """The default process group (initialised here from torchrun's variables if needed)."""
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"TorchComm backend must be 'gloo' or 'nccl', got {backend!r}")
        if backend == "nccl":
            if not torch.cuda.is_available():
                raise CommError("the nccl backend needs CUDA, but torch.cuda.is_available() is False")
            if not dist.is_nccl_available():
                raise CommError("the nccl backend is not built into this torch")
            if device is None or torch.device(device).index is None:
                device = torch.device("cuda", nccl_device_for(local_rank(), _local_world_size(),
                                                              torch.cuda.device_count()))
            dev = torch.device(device)
            torch.cuda.set_device(dev)
        else:
            if not dist.is_gloo_available():
                raise CommError("the gloo backend is not built into this torch")
            dev = torch.device("cpu")
        owns = not dist.is_initialized()
        if owns:
            missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
            if missing:
                raise CommError(f"{TORCHRUN_HINT} (missing: {', '.join(missing)})")
            pg_timeout = process_group_timeout(timeout) if backend == "nccl" else timeout
            kwargs = {"backend": backend, "init_method": "env://", "timeout": datetime.timedelta(seconds=pg_timeout)}
            if backend == "nccl":
                kwargs["device_id"] = dev
            if _attempt_prefix():       # a job torchrun restarted: not on the keys of the attempt before
                kwargs.update(init_method=None, store=_launcher_store(timeout), rank=int(os.environ["RANK"]),
                              world_size=int(os.environ["WORLD_SIZE"]))
            try:
                dist.init_process_group(**kwargs)
            except Exception as exc:
                raise CommError(f"torch.distributed init ({backend}) failed: {exc}") from exc
        elif backend not in str(dist.get_backend()):
            raise CommError(f"torch.distributed is already initialised with backend "
                            f"{dist.get_backend()!r}, not {backend!r}")
        return cls(dist.group.WORLD, backend, timeout, dev, list(range(dist.get_world_size())), owns,
                   store=_launcher_store(timeout) if backend == "gloo" else None, prefix=f"parml/w{next(_WORLDS)}")

    @property
    def ordered_p2p(self) -> bool:
        """NCCL ignores tags and runs a pair's operations in posting order (``Communicator``)."""
        return self.backend == "nccl"

    def _pg_timeout(self) -> float:
        return process_group_timeout(self.timeout) if self.backend == "nccl" else self.timeout

    # ---- helpers ------------------------------------------------------------
    def _check_tensor_device(self, tensor: torch.Tensor, what: str) -> None:
        if self.backend == "nccl" and tensor.device.type != "cuda":
            raise ValueError(f"{what}: the nccl backend needs CUDA tensors, got {tensor.device}")
        if self.backend == "gloo" and tensor.device.type != "cpu":
            raise ValueError(f"{what}: the gloo backend needs CPU tensors, got {tensor.device}")

    def _collective(self, what: str, start) -> None:
        work = self._guard(what, start)
        _TorchRequest(self, "collective", -1, 0, None, work, label=what).wait()

    # ---- point to point -------------------------------------------------------
    def isend(self, tensor, dst, tag=0):
        self._check_open()
        dst = self._check_peer(dst, "isend")
        tag = self._check_tag(tag)
        self._check_tensor_device(tensor, "isend")
        buf = tensor if tensor.is_contiguous() else tensor.contiguous()
        req = _TorchRequest(self, "send", dst, tag, buf, None)
        req._work = self._guard(req._describe(), lambda: self._group.send([buf], dst, tag))
        self.bytes_sent += nbytes(buf)
        return req

    def irecv(self, tensor, src, tag=0):
        self._check_open()
        src = self._check_peer(src, "irecv")
        tag = self._check_tag(tag)
        self._check_tensor_device(tensor, "irecv")
        self._check_recv_buffer(tensor)
        req = _TorchRequest(self, "recv", src, tag, tensor, None)
        req._work = self._guard(req._describe(), lambda: self._group.recv([tensor], src, tag))
        return req

    # ---- collectives ------------------------------------------------------------
    def _reduce_op(self, op: str):
        ReduceOp = self._dist.ReduceOp
        return {"sum": ReduceOp.SUM, "max": ReduceOp.MAX, "min": ReduceOp.MIN, "prod": ReduceOp.PRODUCT}[op]

    def allreduce(self, tensor, op="sum"):
        self._check_open()
        self._check_op(op)
        self._check_tensor_device(tensor, "allreduce")
        if self.size == 1:
            return tensor
        work_t = tensor
        if tensor.dtype == torch.bool:
            work_t = tensor.to(torch.uint8)
        elif not tensor.is_contiguous():
            work_t = tensor.contiguous()
        what = f"allreduce({op}) of {tuple(tensor.shape)} {tensor.dtype}"
        opts = self._dist.AllreduceOptions()
        opts.reduceOp = self._reduce_op(op)
        self._collective(what, lambda: self._group.allreduce([work_t], opts))
        self.collective_bytes += nbytes(work_t)
        if work_t is not tensor:
            tensor.copy_(work_t)
        return tensor

    def iallreduce(self, tensor, op="sum"):
        """A non-blocking all-reduce (``Communicator.iallreduce``): gloo runs it on its own thread,
        NCCL on the group's stream; ``wait`` is bounded by ``comm.timeout`` as for every collective."""
        self._check_open()
        self._check_op(op)
        self._check_tensor_device(tensor, "iallreduce")
        if not tensor.is_contiguous() or tensor.dtype == torch.bool:
            raise ValueError("iallreduce needs a contiguous, non-boolean tensor")
        what = f"allreduce({op}) of {tuple(tensor.shape)} {tensor.dtype}"
        if self.size == 1:
            return CompletedRequest(self, what)
        opts = self._dist.AllreduceOptions()
        opts.reduceOp = self._reduce_op(op)
        work = self._guard(what, lambda: self._group.allreduce([tensor], opts))
        self.collective_bytes += nbytes(tensor)
        return _TorchRequest(self, "collective", -1, 0, tensor, work, label=what)

    def broadcast(self, tensor, root):
        self._check_open()
        root = self._check_root(root)
        self._check_tensor_device(tensor, "broadcast")
        if self.size == 1:
            return tensor
        work_t = tensor if tensor.is_contiguous() else tensor.contiguous()
        opts = self._dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = root, 0
        return self._broadcast_through(tensor, root, work_t, lambda: self._group.broadcast([work_t], opts))

    def barrier(self):
        self._check_open()
        if self.size == 1:
            return
        t = torch.zeros(1, dtype=torch.int32, device=self.device)
        self._collective("barrier", lambda: self._group.allreduce([t]))

    # ---- structure ----------------------------------------------------------------
    def split(self, ranks):
        """A communicator over `ranks` of this one (None on the other ranks); collective over this one."""
        self._check_open()
        ranks = self._check_split(ranks)
        self._splits += 1            # every rank of this communicator calls split: counters stay in step
        prefix = f"{self._prefix}/s{self._splits}"
        timeout = datetime.timedelta(seconds=self._pg_timeout())
        if self.backend == "nccl":
            group = self._guard(f"split into ranks {ranks}", lambda: self._dist.split_group(
                self._group, [ranks], timeout=timeout, group_desc=prefix))
        elif self.rank in ranks:
            if self._store is None:
                raise self._error("split needs the launcher's store (MASTER_ADDR and MASTER_PORT are not set)")
            store = self._dist.PrefixStore(prefix + "/", self._store)
            group = self._guard(f"split into ranks {ranks}", lambda: self._dist.ProcessGroupGloo(
                store, ranks.index(self.rank), len(ranks), timeout))
        else:
            group = None
        if group is None or self.rank not in ranks:
            return None
        child = TorchComm(group, self.backend, self.timeout, self.device, [self.global_ranks[r] for r in ranks],
                          store=self._store, prefix=prefix)
        self._children.append(child)
        return child

    def abort(self, message, quiet=False):
        try:
            if not quiet:
                print(f"parml: abort (rank {self.rank}): {message}", file=sys.stderr, flush=True)
        except Exception:
            pass
        groups = [c._group for c in self._children] + [self._group]

        def _do():
            for g in groups:
                try:
                    g.abort()
                except Exception:
                    pass

        # Never block the caller: abort in a daemon thread with a bounded join.
        th = threading.Thread(target=_do, daemon=True)
        th.start()
        th.join(5.0)
        self._closed = True

    def close(self):
        if self._closed:
            return
        if self._owns_world:
            try:
                # gloo tears down its connections in background threads: destroying the group
                # while a peer still talks to it can std::terminate at exit. Meet first.
                self.barrier()
            except Exception:
                pass
        self._closed = True
        if self._owns_world:
            try:
                if self._dist.is_initialized():
                    self._dist.destroy_process_group()
            except Exception:
                pass
        self._group = None


def _launcher_store(timeout: float):
    """A client of the launcher's key-value store (torchrun's agent store, or rank 0's), on which
    gloo sub-groups meet; None where the world was set up without MASTER_ADDR / MASTER_PORT."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return None
    try:
        store = dist.TCPStore(addr, int(port), is_master=False, timeout=datetime.timedelta(seconds=timeout))
    except Exception as exc:
        raise CommError(f"cannot reach the launcher's store at {addr}:{port}: {exc}") from exc
    prefix = _attempt_prefix()
    return dist.PrefixStore(prefix, store) if prefix else store


def _attempt_prefix() -> str:
    """torchrun keeps its store when it restarts a job (--max-restarts), and torch does not prefix
    the keys per attempt: a restarted worker can read its peers' addresses of the attempt before
    (gloo: "connectFullMesh failed ... Connection refused"). A restarted attempt gets its own keys."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return "" if attempt in ("", "0") else f"parml/attempt{attempt}/"


def _local_world_size() -> int | None:
    try:
        return int(os.environ["LOCAL_WORLD_SIZE"])
    except (KeyError, ValueError):
        return None


def nccl_device_for(local_rank: int, local_world_size: int | None, device_count: int) -> int:
    """The CUDA device index of a local rank under NCCL (one GPU per rank), or a one-line error.

    NCCL rejects two ranks on one GPU ("Duplicate GPU detected"); MPI can share a GPU by staging
    through host memory, so the error suggests it."""
    local = local_world_size if local_world_size is not None else local_rank + 1
    if device_count < 1 or local > device_count or local_rank >= device_count:
        raise CommError(
            f"--backend torch on --device cuda (NCCL) needs one GPU per local rank: {local} local ranks, "
            f"{device_count} GPU(s); launch at most {max(device_count, 1)} ranks per node "
            f"(torchrun --nproc_per_node {max(device_count, 1)}) or use --backend mpi (ranks share a GPU)")
    return local_rank
