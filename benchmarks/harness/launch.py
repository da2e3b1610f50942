"""Jobs and where their ranks come from.

A ``Job`` names a function ``entry(payload, comm, emit)`` and how many ranks run it. Outside a
launcher, ``Launcher.run`` starts the ranks (``parml.launch.run_local``: torchrun's variables for
gloo / NCCL, ``mpirun`` for MPI, or one plain process) with ``benchmarks.harness.worker``; inside
an allocation (torchrun, mpirun or srun variables present) this process is one of the ranks and
runs the jobs of its backend on a sub-mesh: a job of P ranks runs on ranks 0..P-1 through a
sub-communicator (``Communicator.split``), so one allocation sweeps every P up to its size.
Either way rank 0 gets the records the entry emitted, as dataclasses.
"""
from __future__ import annotations

import importlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parml.comm import SelfComm, detect_backend, launcher_world_size, make_communicator
from parml.launch import clean_env, run_local

from .records import ROOT, from_json, to_json, write_json


@dataclass
class Job:
    """One launch: `ranks` processes each calling ``entry(payload, comm, emit)``.

    `entry` is "module:function"; `payload` a dataclass (it travels as JSON); `backend` "self"
    (one plain process), "torch" (gloo on CPU, NCCL on CUDA) or "mpi". ``emit(record)`` on rank 0
    keeps a result record; each is written as it comes, so a job that dies keeps what it finished.
    """
    label: str
    entry: str
    payload: Any
    ranks: int = 1
    backend: str = "self"
    device: str = "cpu"
    timeout: float = 600.0
    comm_timeout: float = 120.0


@dataclass
class JobResult:
    label: str
    records: list = field(default_factory=list)
    error: str | None = None          # failed or timed out (records: what it finished)
    skipped: str | None = None        # not run here (inside an allocation of another size)

    def of(self, kind: type) -> list:
        return [r for r in self.records if isinstance(r, kind)]


def qualified_name(kind: type) -> str:
    return f"{kind.__module__}:{kind.__qualname__}"


def resolve(name: str):
    module, _, attr = name.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def encode(record) -> dict:
    return {"type": qualified_name(type(record)), "record": to_json(record)}


def decode(item: dict):
    return from_json(resolve(item["type"]), item["record"])


class Launcher:
    """Runs jobs: starts their ranks here, or, inside a launcher's allocation, is one of them.

    Inside an allocation one communicator (`comm`, made here unless given) serves every job: a
    job of P <= the allocation's size ranks and its backend runs on ranks 0..P-1 (the whole
    communicator, or a sub-communicator split from it, made once per P by every rank) while the
    others wait; a one-rank "self" job runs on rank 0; other jobs (more ranks than the
    allocation, another backend) are skipped (``JobResult.skipped``). Only rank 0 (``self.rank``)
    holds records.
    """

    def __init__(self, log_dir: Path, device: str = "cpu", comm_timeout: float = 3600.0, comm=None):
        self.log_dir = Path(log_dir)
        self.inside = comm is not None or (detect_backend() != "self" and launcher_world_size() > 1)
        self._own = self.inside and comm is None         # made here: closed here
        if self._own:
            comm = make_communicator("auto", timeout=comm_timeout, device=device)
        self.comm = comm
        self.rank = self.comm.rank if self.inside else 0
        self.world = self.comm.size if self.inside else 1
        self.kind = ("mpi" if comm.backend == "mpi" else "torch") if self.inside else None   # as Job.backend
        self._meshes: dict = {}                           # P -> sub-communicator of ranks 0..P-1 (None off it)

    def run(self, job: Job) -> JobResult:
        return self._inside(job) if self.inside else self._start(job)

    def close(self) -> None:
        if self.comm is not None:
            self.comm.barrier()
            for mesh in self._meshes.values():
                if mesh is not None and mesh is not self.comm:
                    mesh.close()
            if self._own:
                self.comm.close()

    def mesh(self, ranks: int):
        """The communicator of ranks 0..`ranks`-1 (None on the others); collective on first use."""
        if ranks == self.world:
            return self.comm
        if ranks not in self._meshes:
            self._meshes[ranks] = self.comm.split(list(range(ranks)))
        return self._meshes[ranks]

    def _start(self, job: Job) -> JobResult:
        job_path, result_path = self.log_dir / f"{job.label}.job.json", self.log_dir / f"{job.label}.result.json"
        job_path.write_text(json.dumps({"entry": job.entry, "payload_type": qualified_name(type(job.payload)),
                                        "payload": to_json(job.payload), "backend": job.backend,
                                        "device": job.device, "comm_timeout": job.comm_timeout}))
        cmd = [sys.executable, "-m", "benchmarks.harness.worker", str(job_path), str(result_path)]
        how = job.backend if job.ranks > 1 or job.backend != "self" else "self"
        run = run_local(cmd, job.ranks, how, job.timeout, self.log_dir, job.label, clean_env([str(ROOT)]),
                        cwd=ROOT, poll=0.1)
        records = [decode(x) for x in json.loads(result_path.read_text())] if result_path.exists() else []
        if run.timed_out:
            return JobResult(job.label, records, f"{job.label}: timed out after {job.timeout:g} s\n" + run.tails())
        if not run.ok or not result_path.exists():
            return JobResult(job.label, records, f"{job.label}: exit codes {run.returncodes}\n" + run.tails())
        return JobResult(job.label, records)

    def _inside(self, job: Job) -> JobResult:
        serial = job.ranks == 1 and job.backend == "self"
        if not serial and (job.ranks > self.world or job.backend != self.kind):
            return JobResult(job.label, skipped=f"{job.label}: needs {job.ranks} ranks ({job.backend}), the "
                                                f"allocation has {self.world} ({self.kind})")
        payload = from_json(type(job.payload), to_json(job.payload))      # as a launched worker sees it
        records: list = []
        if serial:
            comm = SelfComm(timeout=job.comm_timeout, device=self.comm.device) if self.rank == 0 else None
        else:
            comm = self.mesh(job.ranks)
        if comm is not None:
            resolve(job.entry)(payload, comm, lambda r: records.append(r) if comm.rank == 0 else None)
        self.comm.barrier()
        return JobResult(job.label, records if self.rank == 0 else [])


@dataclass
class ProbeJob:
    note: str = ""


@dataclass
class Probe:
    """What a probe job's rank 0 saw: the world, the backend, the sum of the ranks (an allreduce)."""
    size: int
    backend: str
    rank_sum: float
    note: str = ""


def probe(job: ProbeJob, comm, emit) -> None:
    """A job that only checks its ranks: ``Job("probe", "benchmarks.harness.launch:probe", ProbeJob(), 2, "torch")``."""
    import torch
    total = torch.tensor([float(comm.rank)], dtype=torch.float64)
    comm.allreduce(total)
    emit(Probe(comm.size, comm.backend, float(total), job.note))


def write_records(path: Path, records: list) -> None:
    """The worker's result file: every record with its type."""
    write_json(path, [encode(r) for r in records])
