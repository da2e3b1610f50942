"""The Communicator contract: what every backend guarantees, its errors and its requests.

Backends (``local.SelfComm``, ``torch_backend.TorchComm``, ``mpi_backend.MPIComm``) implement it;
everything outside ``parml.comm`` codes against this class only.

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
* ``iallreduce`` starts an all-reduce and returns its :class:`Request`; a
  communicator's collectives (blocking or not) run in the order every rank
  started them.
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

import os
import pickle
import time
from typing import Any, Callable

import torch

REDUCE_OPS = ("sum", "max", "min", "prod")


class CommError(RuntimeError):
    """A communication operation failed."""


class CommTimeout(CommError):
    """A communication operation did not finish within the communicator's timeout."""


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (works for every dtype, 0-d included)."""
    flat = tensor.reshape(-1)
    if flat.dtype == torch.uint8:
        return flat
    return flat.view(torch.uint8)


YIELD_SECONDS = 2e-3


def poll_until(test: Callable[[], bool], deadline: float, on_timeout: Callable[[], None]) -> None:
    """Call ``test`` until it returns True. For the first ``YIELD_SECONDS`` between calls the rank
    only yields its core (``sched_yield``: at once back when no other process waits for the core),
    then sleeps with a back-off capped at 1 ms so that a long wait leaves the core to others.

    A sleep from the start overslept the partner's arrival: sleeps of 20, 40, 80 ... µs (each at
    least ~60 µs on Linux) left a 300 µs wait at an all-reduce finishing up to 320 µs late on both
    ranks (MPI progresses only inside ``Test``): 9-11 ms of waits per circles V-cycle at D = 2."""
    start = time.monotonic()
    delay = 5e-5
    while not test():
        now = time.monotonic()
        if now >= deadline:
            on_timeout()
            return
        if now - start < YIELD_SECONDS:
            os.sched_yield()
            continue
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
            comm._guard(self._describe(), lambda: self._wait(deadline))
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


class CompletedRequest(Request):
    """A request that finished when it was made (``iallreduce`` of a backend without a native one)."""

    def __init__(self, comm: "Communicator", label: str):
        super().__init__(comm, "collective", -1, 0, None, label)
        self._done = True

    def _wait(self, deadline: float) -> None:  # pragma: no cover - never pending
        pass


def looks_like_timeout(exc: BaseException) -> bool:
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

    def iallreduce(self, tensor: torch.Tensor, op: str = "sum") -> Request:
        """Start an all-reduce of the contiguous `tensor` in place; its ``Request.wait`` ends it.

        Every rank starts the same all-reduces of a communicator in the same order (NCCL runs them
        in posting order); `tensor` must not be touched until the request is done. This default
        reduces at once and returns a finished request."""
        self.allreduce(tensor, op)
        return CompletedRequest(self, f"allreduce({op}) of {tuple(tensor.shape)} {tensor.dtype}")

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

    def abort(self, message: str, quiet: bool = False) -> None:
        """End this communicator and its sub-communicators at once (MPI: the whole job); `message`
        goes to stderr unless `quiet` (the caller has already told the user, in one line)."""
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

    def _guard(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run a backend call; its exception becomes a CommError (or CommTimeout) naming `what`.
        The one error-wrapping helper of every backend."""
        try:
            return fn()
        except CommError:
            raise
        except Exception as exc:
            if looks_like_timeout(exc):
                raise self._timeout_error(what) from exc
            raise self._error(f"{what} failed: {exc}") from exc

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
        if op not in REDUCE_OPS:
            raise ValueError(f"unknown reduction {op!r}; valid: {', '.join(REDUCE_OPS)}")
        return op

    def _check_split(self, ranks) -> list[int]:
        ranks = [int(r) for r in ranks]
        if len(set(ranks)) != len(ranks):
            raise ValueError(f"split: duplicate ranks in {ranks}")
        for r in ranks:
            if r < 0 or r >= self.size:
                raise ValueError(f"split: rank {r} out of range for a communicator of size {self.size}")
        return ranks

    def _collective(self, what: str, start: Callable[[], Any]) -> None:  # pragma: no cover - overridden
        """Start a blocking collective with ``start()`` and wait for it, bounded by ``timeout``."""
        raise NotImplementedError

    def _broadcast_through(self, tensor: torch.Tensor, root: int, work: torch.Tensor,
                           start: Callable[[], Any]) -> torch.Tensor:
        """The part of ``broadcast`` every backend shares once it has a contiguous buffer `work` for
        `tensor` (itself, a copy or a host stage) and the call `start` that broadcasts it: wait,
        count the root's bytes, copy back into `tensor`."""
        self._collective(f"broadcast from rank {root} of {tuple(tensor.shape)} {tensor.dtype}", start)
        if self.rank == root:
            self.collective_bytes += nbytes(work)
        if work is not tensor:
            tensor.copy_(work)
        return tensor

    @staticmethod
    def _check_recv_buffer(tensor: torch.Tensor) -> None:
        if not tensor.is_contiguous():
            raise ValueError("recv/irecv need a contiguous, preallocated tensor")


