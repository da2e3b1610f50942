"""Communication costs of this machine, timed through parml's ``Communicator`` (see ``calibrate``).

Ranks are started by ``launch.run_local`` (gloo with torchrun's variables; MPI under mpirun):
ping-pong between ranks 0 and 1, the sender's posting cost, and all-reduce against message size
and group size; groups larger than the machine's cores are recorded as oversubscribed, and there a
relay ring whose ranks compute between messages measures what a message costs a node whose cores
are all busy (``relay_receive``).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..comm import make_communicator
from ..launch import clean_env, mpi_unavailable, run_local
from .profile import CommCost, Fit

ROOT = Path(__file__).resolve().parents[2]
ALLREDUCE_FEATURES = ["log2(g)", "B*(g-1)/g"]
RELAY_WORK = 0.5e-3      # s of CPU per message in the oversubscribed relay (a small block's F or B)


# --- communication ---------------------------------------------------------------------------------

def comm_worker(out_path: str, sizes: list[int], reps: int) -> None:
    """Runs on every rank: ping-pong between ranks 0 and 1, the sender's isend posting cost, and
    all-reduce over all ranks, through parml's Communicator. Rank 0 writes the JSON."""
    device = os.environ.get("PARML_PLAN_DEVICE", "cpu")
    comm = make_communicator("auto", timeout=120, device=device)
    dev = comm.device
    res = {"size": comm.size, "p2p": [], "p2p_cpu": [], "allreduce": [], "post": None}
    for n in sizes:
        buf = torch.zeros(max(n // 4, 1), dtype=torch.float32, device=dev)
        r = max(4, reps if n <= 65536 else reps // 5)
        comm.barrier()
        if comm.rank < 2:
            peer = 1 - comm.rank
            for i in range(r + 2):
                if i == 2:
                    t0, c0 = time.perf_counter(), time.thread_time()
                if comm.rank == 0:
                    comm.send(buf, peer, 7)
                    comm.recv(buf, peer, 7)
                else:
                    comm.recv(buf, peer, 7)
                    comm.send(buf, peer, 7)
            res["p2p"].append([n, (time.perf_counter() - t0) / (2 * r)])
            res["p2p_cpu"].append([n, (time.thread_time() - c0) / r])     # the calling thread's CPU
        comm.barrier()
    small = torch.zeros(2, dtype=torch.float32, device=dev)
    k = max(reps, 20)
    comm.barrier()
    if comm.rank == 0:
        t0, reqs = time.perf_counter(), []
        for i in range(k):
            reqs.append(comm.isend(small, 1, 100 + i))
        res["post"] = (time.perf_counter() - t0) / k
        for q in reqs:
            q.wait()
    elif comm.rank == 1:
        for i in range(k):
            comm.recv(torch.empty_like(small), 0, 100 + i)
    comm.barrier()
    cores = int(os.environ.get("PARML_PLAN_CORES", "0"))
    if dev.type == "cpu" and 0 < cores < comm.size:
        res["relay"] = relay(comm, hops=max(reps // 2, 10))
    for n in sizes:
        buf = torch.zeros(max(n // 4, 1), dtype=torch.float32, device=dev)
        r = max(4, reps if n <= 65536 else reps // 5)
        comm.allreduce(buf)
        comm.barrier()
        t0 = time.perf_counter()
        for _ in range(r):
            comm.allreduce(buf)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t = torch.tensor([(time.perf_counter() - t0) / r], dtype=torch.float64, device=dev)
        comm.allreduce(t, "max")
        res["allreduce"].append([comm.size, n, float(t)])
    if comm.rank == 0:
        Path(out_path).write_text(json.dumps(res))
    comm.barrier()
    comm.close()


def _spin(seconds: float) -> None:
    """Compute for `seconds` of this thread's CPU (its wall time stretches when it shares a core)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def relay(comm, hops: int, work: float = RELAY_WORK) -> list:
    """A ring of all ranks passing comm.size small messages round and round, each rank computing
    `work` seconds of CPU on each message before passing it on: with more ranks than cores the
    cores stay busy, as in an oversubscribed pipeline. Returns [messages received per rank, work,
    wall seconds] (the slowest rank's wall time)."""
    n, rank = comm.size, comm.rank
    left, right = (rank - 1) % n, (rank + 1) % n
    sends = []
    comm.barrier()
    t0 = time.perf_counter()
    if rank == 0:
        sends = [comm.isend(torch.zeros(16), right, t) for t in range(n)]
    for h in range(hops):
        for t in range(n):
            buf = torch.empty(16)
            comm.recv(buf, left, t)
            _spin(work)
            if rank != 0 or h < hops - 1:
                sends.append(comm.isend(buf, right, t))
    for q in sends:
        q.wait()
    wall = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    comm.allreduce(wall, "max")
    return [hops * n, work, float(wall)]


def relay_receive(relays, cores: int, post: float) -> float:
    """The CPU a node spends per message beyond the ranks' work when its cores are all busy (the
    receiver's wake-up and copies, the transport threads beside each rank), less the sender's
    posting cost, which the simulator charges separately: in the relay every rank receives
    `messages` messages and computes `work` on each, so the cores' time per message is
    wall * cores / (ranks * messages), of which `work` is the ranks' own. 0 without a relay (no
    run had more ranks than cores): the receive costs what a ping-pong measures."""
    per = [wall * cores / (ranks * msgs) - work for ranks, (msgs, work, wall) in relays]
    return max(statistics.median(per) - post, 0.0) if per else 0.0


def _launch(backend, nprocs, sizes, reps, device, timeout, log, cores=0):
    if backend == "mpi" and mpi_unavailable():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "comm.json"
        cmd = [sys.executable, "-m", "parml.plan.calibrate", "--worker", str(out), "--sizes",
               ",".join(map(str, sizes)), "--reps", str(reps)]
        env = clean_env([str(ROOT)], {"PARML_PLAN_DEVICE": "cuda" if backend == "nccl" else "cpu",
                                      "PARML_PLAN_CORES": str(cores)})
        run = run_local(cmd, nprocs, "mpi" if backend == "mpi" else "gloo", timeout, tmp, f"calib-{backend}", env,
                        cwd=ROOT, capture_stdout=True)
        if not run.ok or not out.exists():
            log(f"  {backend} x{nprocs}: failed ({'timeout' if run.timed_out else run.returncodes})\n{run.tails(800)}")
            return None
        return json.loads(out.read_text())


def _comm_cost(runs, backend, note, cores=0):
    p2p = [pt for r in runs for pt in r["p2p"]]
    # absolute residuals: the messages' stalls add ~1 ms whatever the size (Fit.fitted)
    fit = Fit.fitted(["1", "B"], [{"B": n} for n, _ in p2p], [t for _, t in p2p], absolute=True)
    lat, inv_bw = fit.coef
    ar = [pt for r in runs for pt in r["allreduce"]]
    arfit = Fit.fitted(ALLREDUCE_FEATURES, [{"g": g, "B": n} for g, n, _ in ar], [t for *_, t in ar], absolute=True)
    post = statistics.median([r["post"] for r in runs if r.get("post") is not None] or [0.0])
    cpu = [pt for r in runs for pt in r.get("p2p_cpu", [])]
    relays = [[r["size"], r["relay"]] for r in runs if r.get("relay")]
    return CommCost(lat, 1.0 / inv_bw if inv_bw > 0 else float("inf"), post, arfit, None, None,
                    {"p2p": p2p, "p2p_cpu": cpu, "allreduce": ar, "fit_p2p": [fit.median_rel_error, fit.max_rel_error],
                     **({"relay": relays} if relays else {})},
                    note, receive_cost(cpu, post, backend), relay_receive(relays, cores, post))


def receive_cost(cpu_per_round_trip, post: float, backend: str) -> float:
    """The receiver's CPU per message: in a ping-pong each rank sends and receives once per round
    trip, so the calling thread's CPU per round trip less the sender's posting cost. The calling
    thread's, not the process's: gloo's transport threads added 0.1-0.8 ms per round trip here,
    varying from run to run, on threads beside the rank's own (a 2 s wait cost them 7 ms), which
    delays the rank only where ranks outnumber cores; there ``relay_receive`` measures what a
    message costs a node with no free core (``CommCost.receive_busy``).
    Small messages only (up to 64 KiB: the copies of large ones are in the bandwidth); 0 for NCCL,
    whose transfers run on the GPU."""
    small = [c for n, c in cpu_per_round_trip if n <= 65536]
    if backend == "nccl" or not small:
        return 0.0
    return max(statistics.median(small) - post, 0.0)


def measure_comm(backends, cores, grid, device, log=print):
    out = {}
    sizes, reps = grid["p2p_bytes"], grid["p2p_reps"]
    for backend in backends:
        counts = [2] if grid["groups"] == "two" else sorted({2, max(2, cores), 2 * max(2, cores)})
        normal, over = [], []
        for n in counts:
            t0 = time.perf_counter()
            res = _launch(backend, n, sizes, reps, device, 120 + 30 * n, log, cores)
            if res is None:
                continue
            (over if n > cores else normal).append(res)
            log(f"  {backend} x{n}{' (oversubscribed)' if n > cores else ''}: "
                f"one-way {res['p2p'][0][1] * 1e6:.1f} us at {res['p2p'][0][0]} B, "
                f"CPU per round trip {res['p2p_cpu'][0][1] * 1e6:.1f} us, {time.perf_counter() - t0:.1f} s")
        if not normal and not over:
            continue
        cost = _comm_cost(normal or over, backend, f"{'oversubscribed ' if not normal else ''}{backend}, "
                                                   f"{max(counts)} ranks at most on this machine", cores)
        if normal and over:
            cost.oversubscribed = _comm_cost(over, backend, f"{backend} with more ranks than cores", cores)
        out[backend] = cost
    return out


def available_backends(device: str) -> list[str]:
    out = ["nccl"] if device == "cuda" and torch.cuda.device_count() >= 2 else []
    if device == "cpu":
        out.append("gloo")
    if mpi_unavailable() is None:
        out.append("mpi")
    return out
