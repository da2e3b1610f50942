"""parml.comm on real processes over gloo and MPI: point-to-point, collectives, sub-communicators,
timeouts, a failing rank. Single-process parts: tests/unit/test_comm.py."""

from __future__ import annotations

import os
import sys
import time

import pytest
import torch

from multiproc import run_ranks
from parml.comm import CommError, CommTimeout

BACKEND_PARAMS = ["gloo", "mpi"]      # run_ranks skips "mpi" (a failure under PARML_REQUIRE_MPI=1) without MPI


# --------------------------------------------------------------------------
# functions run on every rank (called as f(comm, **args) by tests/_worker.py)
# --------------------------------------------------------------------------


def _check_p2p(comm, out):
    P, r = comm.size, comm.rank
    left, right = (r - 1) % P, (r + 1) % P
    f64 = torch.float64

    # isend/irecv with several tags, receives posted and waited out of order
    sends = [comm.isend(torch.full((5,), 100.0 * r + t, dtype=f64), right, tag=t) for t in range(4)]
    bufs = {t: torch.empty(5, dtype=f64) for t in range(4)}
    recvs = {t: comm.irecv(bufs[t], left, tag=t) for t in (3, 1, 2, 0)}
    for t in (2, 0, 3, 1):
        recvs[t].wait()
        recvs[t].wait()  # second wait is a no-op
        assert recvs[t].done
    for s in sends:
        s.wait()
    for t in range(4):
        assert torch.equal(bufs[t], torch.full((5,), 100.0 * left + t, dtype=f64)), (t, bufs[t])

    # blocking recv in the opposite order of the sends
    s10 = comm.isend(torch.tensor([r, 10], dtype=torch.int64), right, tag=10)
    s11 = comm.isend(torch.tensor([r, 11], dtype=torch.int64), right, tag=11)
    b11, b10 = torch.empty(2, dtype=torch.int64), torch.empty(2, dtype=torch.int64)
    comm.recv(b11, left, tag=11)
    comm.recv(b10, left, tag=10)
    s10.wait()
    s11.wait()
    assert b11.tolist() == [left, 11] and b10.tolist() == [left, 10]

    # blocking send/recv between partners
    partner = r ^ 1
    got = torch.empty(3)
    if r % 2 == 0:
        comm.send(torch.full((3,), float(r)), partner, tag=5)
        comm.recv(got, partner, tag=5)
    else:
        comm.recv(got, partner, tag=5)
        comm.send(torch.full((3,), float(r)), partner, tag=5)
    assert torch.equal(got, torch.full((3,), float(partner)))

    # simultaneous bidirectional isend of large messages (beyond eager limits)
    n = 1 << 20
    before = comm.bytes_sent
    to_right = torch.arange(n, dtype=torch.float32) + r
    to_left = torch.arange(n, dtype=torch.float32) - r
    from_left, from_right = torch.empty(n), torch.empty(n)
    reqs = [
        comm.isend(to_right, right, tag=20),
        comm.isend(to_left, left, tag=21),
        comm.irecv(from_left, left, tag=20),
        comm.irecv(from_right, right, tag=21),
    ]
    for q in reversed(reqs):
        q.wait()
    assert torch.equal(from_left, torch.arange(n, dtype=torch.float32) + left)
    assert torch.equal(from_right, torch.arange(n, dtype=torch.float32) - right)
    assert comm.bytes_sent - before == 2 * 4 * n

    # dtypes (0-d, bool, bfloat16) and a non-contiguous send
    payloads = [
        torch.tensor(3.5 + r, dtype=torch.float64),
        torch.tensor([r % 2 == 0, True, False]),
        torch.tensor([1.5, -2.25 * (r + 1)], dtype=torch.bfloat16),
        (torch.arange(6.0).reshape(2, 3) + 10 * r).t(),
    ]
    sreqs = [comm.isend(p, right, tag=30 + i) for i, p in enumerate(payloads)]
    for i, p in enumerate(payloads):
        buf = torch.empty(p.shape, dtype=p.dtype)
        comm.recv(buf, left, tag=30 + i)
        if i == 0:
            expect = torch.tensor(3.5 + left, dtype=torch.float64)
        elif i == 1:
            expect = torch.tensor([left % 2 == 0, True, False])
        elif i == 2:
            expect = torch.tensor([1.5, -2.25 * (left + 1)], dtype=torch.bfloat16)
        else:
            expect = (torch.arange(6.0).reshape(2, 3) + 10 * left).t()
        assert torch.equal(buf, expect), (i, buf, expect)
    for q in sreqs:
        q.wait()

    # argument errors
    with pytest.raises(CommError):
        comm.isend(torch.zeros(1), r)
    with pytest.raises(ValueError):
        comm.isend(torch.zeros(1), P)
    with pytest.raises(ValueError):
        comm.isend(torch.zeros(1), right, tag=-1)
    with pytest.raises(ValueError):
        comm.irecv(torch.zeros(2, 3).t(), left)
    out["p2p"] = True


def _check_collectives(comm, out):
    P, r = comm.size, comm.rank
    # float64 exactness: float32 could not hold 1 + k * 2**-40
    x = torch.tensor([1.0 + r * 2.0**-40, 2.0**40 + 0.5 * r], dtype=torch.float64)
    assert comm.allreduce(x) is x
    assert x[0].item() == P + 2.0**-40 * (P * (P - 1) // 2)
    assert x[1].item() == P * 2.0**40 + 0.5 * (P * (P - 1) // 2)

    m = torch.tensor([float(r), -float(r), 0.5 * r], dtype=torch.float64)
    comm.allreduce(m, "max")
    assert m.tolist() == [P - 1, 0.0, 0.5 * (P - 1)]
    m = torch.tensor([float(r), -float(r)], dtype=torch.float64)
    comm.allreduce(m, op="min")
    assert m.tolist() == [0.0, -(P - 1)]

    i = torch.tensor([r, 1, 2**40], dtype=torch.int64)
    comm.allreduce(i)
    assert i.tolist() == [P * (P - 1) // 2, P, P * 2**40]

    nc = (torch.arange(6.0).reshape(2, 3) * (r + 1)).t()
    assert not nc.is_contiguous()
    comm.allreduce(nc)
    assert torch.equal(nc, (torch.arange(6.0).reshape(2, 3) * (P * (P + 1) // 2)).t())

    b = torch.tensor([r == 0, False])
    comm.allreduce(b, "max")
    assert b.tolist() == [True, False]

    h = torch.tensor([1.0, 0.5 * r], dtype=torch.bfloat16)
    comm.allreduce(h)
    assert h.tolist() == [float(P), 0.5 * (P * (P - 1) // 2)]

    # scalars: python floats reduced in float64
    s = comm.allreduce_scalar(1e15 + 0.5 * r)
    assert isinstance(s, float) and s == P * 1e15 + 0.5 * (P * (P - 1) // 2)
    assert comm.allreduce_scalar(float(r), "max") == float(P - 1)
    assert comm.allreduce_scalar(float(r) + 0.25, op="min") == 0.25
    assert comm.allreduce_scalar(2.0, op="prod") == 2.0**P
    with pytest.raises(ValueError):
        comm.allreduce_scalar(1.0, op="avg")

    # broadcast in place
    root = P - 1
    t = torch.arange(4, dtype=torch.float64) * 7 if r == root else torch.full((4,), -1.0, dtype=torch.float64)
    assert comm.broadcast(t, root) is t
    assert torch.equal(t, torch.arange(4, dtype=torch.float64) * 7)
    k = torch.tensor([r, r], dtype=torch.int32)
    comm.broadcast(k, 0)
    assert k.tolist() == [0, 0]

    # objects
    obj = {"list": [1, 2, 3], "text": "hello from root", "tensor": torch.ones(2) * r} if r == 1 else None
    got = comm.broadcast_object(obj, root=1)
    assert got["list"] == [1, 2, 3] and got["text"] == "hello from root"
    assert torch.equal(got["tensor"], torch.ones(2))
    gathered = comm.allgather_object(("rank", r, "x" * (100 * r)))
    assert gathered == [("rank", q, "x" * (100 * q)) for q in range(P)]
    assert comm.allgather_object(None) == [None] * P

    comm.barrier()
    out["collectives"] = True


def _check_splits(comm, out):
    P, r = comm.size, comm.rank
    # pairs [0,1] and [2,3]: every rank calls split for every pair
    pairs = [list(range(i, i + 2)) for i in range(0, P, 2)]
    subs = [comm.split(p) for p in pairs]
    mine = r // 2
    for j, s in enumerate(subs):
        assert (s is None) == (j != mine), (j, s)
    sub = subs[mine]
    assert (sub.size, sub.rank) == (2, r % 2)
    assert sub.backend == comm.backend
    pair_sum = sum(pairs[mine])
    assert sub.allreduce_scalar(float(r)) == pair_sum
    partner = r ^ 1
    got = torch.empty(1)
    q = sub.isend(torch.tensor([float(r)]), 1 - sub.rank, tag=7)
    sub.recv(got, 1 - sub.rank, tag=7)
    q.wait()
    assert got.item() == partner

    # nested split, reversed order: rank i of the child is rank ranks[i] of the parent
    nested = sub.split([1, 0])
    assert (nested.size, nested.rank) == (2, 1 - sub.rank)
    assert nested.allgather_object(r) == [pairs[mine][1], pairs[mine][0]]
    single = nested.split([0])
    if nested.rank == 0:
        assert (single.size, single.rank) == (1, 0)
        assert single.allreduce_scalar(5.0) == 5.0
        assert single.allgather_object("a") == ["a"]
    else:
        assert single is None

    # whole communicator, reversed
    rev = comm.split(list(reversed(range(P))))
    assert (rev.size, rev.rank) == (P, P - 1 - r)
    assert rev.broadcast_object(("from", r) if rev.rank == 0 else None, 0) == ("from", P - 1)
    # split of a split of a split
    inner = rev.split([0, 1])
    if inner is not None:
        assert r in (P - 1, P - 2)
        inner2 = inner.split([1, 0])
        assert inner2.allgather_object(r) == [P - 2, P - 1]
        inner2.barrier()
    else:
        assert r < P - 2

    # only some ranks listed
    listed = [3, 1] if P >= 4 else [1]
    part = comm.split(listed)
    if r in listed:
        assert part.rank == listed.index(r) and part.size == len(listed)
        assert part.allgather_object(r) == listed
    else:
        assert part is None

    # the parent still works after all this
    assert comm.allreduce_scalar(1.0) == P
    with pytest.raises(ValueError):
        comm.split([0, 0])
    out["splits"] = True


def _check_timeout(comm, out):
    """Rank 0 receives a message that never comes, on a sub-communicator with a
    2 s timeout; the world communicator then releases rank 1."""
    sub = comm.split([0, 1])
    if comm.rank == 0:
        sub.timeout = 2.0
        t0 = time.monotonic()
        with pytest.raises(CommTimeout) as info:
            sub.recv(torch.empty(4), 1, tag=999)
        elapsed = time.monotonic() - t0
        assert 1.8 <= elapsed < 6.0, elapsed
        msg = str(info.value)
        assert "recv" in msg and "rank 1" in msg and "2 s" in msg, msg
        out["timeout_elapsed"] = elapsed
        if comm.backend == "mpi":
            # an all-reduce whose peer never comes times out in its guarding barrier, not in the
            # blocking Allreduce behind it; rank 1 then completes that barrier so nothing is left
            t0 = time.monotonic()
            with pytest.raises(CommTimeout) as info:
                sub.allreduce(torch.ones(3))
            assert 1.8 <= time.monotonic() - t0 < 6.0
            assert "allreduce(sum) of (3,)" in str(info.value), str(info.value)
            out["allreduce_timeout"] = True
        comm.send(torch.ones(1), 1, tag=1000)
    elif comm.rank == 1:
        comm.recv(torch.empty(1), 0, tag=1000)
        if comm.backend == "mpi":
            sub.barrier()


def _suite(comm, check_timeout=False):
    out = {
        "rank": comm.rank,
        "size": comm.size,
        "backend": comm.backend,
        "device": str(comm.device),
        "omp": os.environ.get("OMP_NUM_THREADS"),
        "threads": torch.get_num_threads(),
    }
    t0 = time.perf_counter()
    _check_p2p(comm, out)
    _check_collectives(comm, out)
    _check_splits(comm, out)
    out["bytes_sent"] = comm.bytes_sent
    out["wait_seconds"] = comm.wait_seconds
    out["elapsed"] = time.perf_counter() - t0
    if check_timeout:
        _check_timeout(comm, out)
    return out


def _fail_on_rank1(comm):
    if comm.rank == 1:
        raise ValueError("deliberate failure on rank 1")
    comm.recv(torch.empty(1), 1, tag=3)  # would wait for ever without abort
    return "unreachable"


def _sleep(comm, seconds):
    time.sleep(seconds)
    return comm.rank


# --------------------------------------------------------------------------
# multi-process tests
# --------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("nprocs", [2, 4])
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_comm_suite(backend, nprocs):
    results = run_ranks(
        "tests.distributed.test_comm:_suite", nprocs, backend, timeout=90, args={"check_timeout": nprocs == 2}
    )
    expected_backend = "mpi" if backend == "mpi" else "gloo"
    assert [res["rank"] for res in results] == list(range(nprocs))
    for res in results:
        assert res["size"] == nprocs
        assert res["backend"] == expected_backend
        assert res["device"] == "cpu"
        assert res["omp"] == "1" and res["threads"] == 1
        assert res["p2p"] and res["collectives"] and res["splits"]
        assert res["bytes_sent"] > 8 * (1 << 20)
        assert res["wait_seconds"] > 0
    if nprocs == 2:
        assert 1.8 <= results[0]["timeout_elapsed"] < 6.0
        assert results[0].get("allreduce_timeout", False) == (backend == "mpi")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_failing_rank_reports_traceback_and_peers_stop(backend):
    t0 = time.monotonic()
    with pytest.raises(AssertionError) as info:
        run_ranks("tests.distributed.test_comm:_fail_on_rank1", 2, backend, timeout=45)
    msg = str(info.value)
    assert "deliberate failure on rank 1" in msg and "rank 1 failed" in msg
    assert "timed out" not in msg
    assert time.monotonic() - t0 < 30


def _loaded(comm):
    return {m: m in sys.modules for m in ("_rank_preload", "torch._dynamo", "parml.training.trainer")}


@pytest.mark.skipif(os.environ.get("PARML_TEST_SPAWN", "fork") != "fork", reason="ranks are not forked")
def test_forked_gloo_ranks_start_with_the_fork_servers_preload():
    """The fork server imports tests/_rank_preload.py (torch, parml, torch._dynamo, the compiled
    kernels) once; a server that could not import it forks ranks that each import them again."""
    assert run_ranks("tests.distributed.test_comm:_loaded", 2, "gloo", timeout=60) == [
        {"_rank_preload": True, "torch._dynamo": True, "parml.training.trainer": True}] * 2


@pytest.mark.timeout(60)
def test_run_ranks_timeout():
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match=r"timed out after 4 s"):
        run_ranks("tests.distributed.test_comm:_sleep", 2, "gloo", timeout=4, args={"seconds": 60})
    assert time.monotonic() - t0 < 15
