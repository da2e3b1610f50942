"""Measure this machine's costs into a ``Profile`` (a few minutes at most; ``quick`` for tests).

Compute is timed through parml's own code: a ``parallel.stage.PipelineStage`` holding a shard of a
``model.build_model`` network runs ``forward`` / ``backward`` (and its deferred weight-gradient
``flush``) exactly as the executor calls them, with a loopback communicator in place of the
neighbours, for the first, a middle and the last rank of a pipeline. Per-step bookkeeping is timed
on ``mgopt.Level`` over a one-rank ``LayerParallel``. Communication is timed through parml's
``Communicator`` on ranks started by ``launch.run_local`` (gloo with torchrun's variables; MPI
under mpirun), for 2 ranks and, in the full mode, as many ranks as cores and twice that
(recorded as oversubscribed).

    python -m parml.plan.calibrate [--device cpu] [--backend gloo,mpi] [--quick] --out profile.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .profile import CommCost, Fit, KernelCost, Profile, ProfileError

ROOT = Path(__file__).resolve().parents[2]

KERNEL_FEATURES = ["1", "n", "n*b", "n*b*v*s", "n*b*v^2*s", "n*v^2"]
FIRST_FEATURES = ["1", "b*v*s", "b*i*v*s"]
LAST_FEATURES = ["1", "b*v*s", "b*o*v"]
PARAM_FEATURES = ["1", "p"]
ALLREDUCE_FEATURES = ["log2(g)", "B*(g-1)/g"]

GRIDS = {
    "quick": {"widths": [4, 32], "rows": [32, 256], "blocks": [4, 16], "ends_io": [(2, 2), (64, 10)],
              "ends_widths": [4, 32], "ends_rows": [32, 256], "conv": [], "min_time": 0.004, "max_reps": 5,
              "p2p_bytes": [8, 65536, 1 << 20], "p2p_reps": 20, "groups": "two"},
    "full": {"widths": [3, 10, 32, 128, 512], "rows": [16, 128, 500, 2000], "blocks": [4, 32, 256],
             "ends_io": [(2, 2), (64, 10), (784, 10)], "ends_widths": [3, 32, 128], "ends_rows": [64, 1000],
             "conv": [(4, 7), (16, 14), (8, 28)], "min_time": 0.03, "max_reps": 11,
             "p2p_bytes": [8, 1024, 16384, 262144, 1 << 20, 4 << 20], "p2p_reps": 100, "groups": "all"},
}
MAX_ELEMENTS = 6e8      # n·b·v² cap of one timed kernel call (keeps the full grid in minutes)


# --- timing helpers --------------------------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock(device):
    """The compute clock: this thread's CPU time on a CPU (one torch thread per rank), so that
    other processes on a shared machine do not inflate the costs; wall time on a GPU."""
    return time.perf_counter if device.type == "cuda" else time.thread_time


def _median_time(fn, device, min_time, max_reps):
    """Median of repeated timings of fn() (which returns a dict of parts), after one warm-up."""
    return _interleaved([fn], device, min_time, max_reps)[0]


def _interleaved(fns, device, min_time, max_reps, min_reps=5):
    """Per fn, the median of its parts over rounds that call every fn once in turn (so that
    the load of a shared machine drifts alike for all of them); one warm-up round first."""
    for fn in fns:
        fn()
    samples, spent, clock = [[] for _ in fns], 0.0, _clock(device)
    while True:
        for fn, acc in zip(fns, samples):
            _sync(device)
            t0 = clock()
            acc.append(fn())
            _sync(device)
            spent += clock() - t0
        n = len(samples[0])
        if n >= max_reps or (n >= min_reps and spent >= min_time * len(fns)):
            break
    return [{k: statistics.median(s[k] for s in acc) for k in acc[0]} for acc in samples]


class _Done:
    def wait(self):
        return None

    def done(self):
        return True


class LoopbackComm:
    """Stands in for a pipeline's neighbours: sends complete at once, receives yield random states."""

    def __init__(self, rank, size, device):
        self.rank, self.size, self.device = rank, size, device

    def isend(self, tensor, dst, tag=0):
        return _Done()

    def irecv(self, tensor, src, tag=0):
        tensor.normal_(0.0, 0.5)
        return _Done()

    def recv(self, tensor, src, tag=0):
        tensor.normal_(0.0, 0.5)


def _stage_timer(spec, role, n, rows, device, weight_grads, dtype=torch.float32):
    """fn() timing one micro-batch through a PipelineStage: F, B (adjoint), W (deferred flush),
    finish (writing .grad); role: first | middle | last of a 3-rank pipeline."""
    from ..model import build_model
    from ..parallel.stage import PipelineStage

    model = build_model(spec, seed=0, dtype=dtype)
    rank = {"first": 0, "middle": 1, "last": 2}[role]
    shard = model.shard(rank * n, (rank + 1) * n).to(device)
    stage = PipelineStage(shard, LoopbackComm(rank, 3, device), device, weight_grads)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(rows, spec.in_features, generator=gen, dtype=dtype).to(device)
    if spec.conv:
        x = x.reshape(rows, *spec.input_shape)
    y = torch.randint(0, spec.out_features, (rows,), generator=gen).to(device)
    w_time, clock = [0.0], _clock(device)
    if stage.deferred is not None:
        flush = stage.deferred.flush

        def timed(m=None):
            _sync(device)
            t = clock()
            flush(m)
            _sync(device)
            w_time[0] += clock() - t
        stage.deferred.flush = timed

    def one():
        for p in shard.parameters():
            p.grad = None
        stage.post_receives([rows])
        stage.deferring(True)
        _sync(device)
        t0 = clock()
        stage.forward(0, x, y, rows)
        _sync(device)
        t1 = clock()
        w_time[0] = 0.0
        stage.backward(0)
        _sync(device)
        t2 = clock()
        w = w_time[0]
        stage.flush_weight_grads()
        _sync(device)
        t3 = clock()
        stage.deferring(False)
        stage.end_step()
        stage.finish_sends()
        return {"F": t1 - t0, "B": t2 - t1 - w, "W": w, "finish": t3 - t2}
    return one


def _dense_spec(width, blocks, in_features=8, out_features=4):
    from ..model import ModelSpec, StageSpec
    return ModelSpec(in_features, out_features, (StageSpec(width, blocks),))


def _conv_spec(channels, side, blocks, in_channels=1, out_features=10):
    from ..model import ModelSpec, StageSpec
    return ModelSpec(in_channels * side * side, out_features, (StageSpec(channels, blocks, "conv"),),
                     input_shape=(in_channels, side, side))


# --- compute ---------------------------------------------------------------------------------------

def measure_kernels(grid, device, log=print):
    """Dense kernels (deferred and inline weight gradients), the ends, and the finish step."""
    out, ends_pts = {}, {"first_F": ([], []), "first_B": ([], []), "last_F": ([], []), "last_B": ([], [])}
    finish_pts = ([], [])
    for wg, name in (("deferred", "dense"), ("inline", "dense-inline")):
        pts, F, B, W = [], [], [], []
        for v in grid["widths"]:
            for b in grid["rows"]:
                for n in grid["blocks"]:
                    if n * b * v * v > MAX_ELEMENTS:
                        continue
                    t = _median_time(_stage_timer(_dense_spec(v, 3 * n), "middle", n, b, device, wg), device,
                                     grid["min_time"], grid["max_reps"])
                    pts.append({"n": n, "b": b, "v": v, "s": 1})
                    F.append(t["F"])
                    B.append(t["B"])
                    W.append(t["W"])
                    if wg == "deferred":
                        finish_pts[0].append({"p": n * (v * v + v)})
                        finish_pts[1].append(t["finish"])
        kc = KernelCost(Fit.fitted(KERNEL_FEATURES, pts, F), Fit.fitted(KERNEL_FEATURES, pts, B),
                        Fit.fitted(KERNEL_FEATURES, pts, W) if wg == "deferred" else Fit.constant(0.0),
                        f"fused Euler dense blocks, weight grads {wg}; PipelineStage middle rank",
                        [[p["n"], p["b"], p["v"], 1, f, b_, w] for p, f, b_, w in zip(pts, F, B, W)])
        out[name] = kc
        log(f"  kernel {name}: {len(pts)} points, F fit median/max rel. error "
            f"{kc.forward.median_rel_error:.1%}/{kc.forward.max_rel_error:.1%}, B "
            f"{kc.backward.median_rel_error:.1%}/{kc.backward.max_rel_error:.1%}")
    n = min(grid["blocks"])
    roles = ("middle", "first", "last")
    ends_scale = []
    for i_f, o_f in grid["ends_io"]:
        for v in grid["ends_widths"]:
            for b in grid["ends_rows"]:
                spec = _dense_spec(v, 3 * n, i_f, o_f)
                measured = _interleaved([_stage_timer(spec, r, n, b, device, "deferred") for r in roles], device,
                                        grid["min_time"], 3 * grid["max_reps"], 3 * 5)
                times = dict(zip(roles, measured))
                for role, extra in (("first", {"i": i_f}), ("last", {"o": o_f})):
                    for k in ("F", "B"):
                        diff = times[role][k] - times["middle"][k]
                        ends_pts[f"{role}_{k}"][0].append({"b": b, "v": v, "s": 1, **extra})
                        ends_pts[f"{role}_{k}"][1].append(max(diff, 0.0))
                        ends_scale.append(times["middle"][k])
    ends = {}
    floor = statistics.median(ends_scale)   # errors relative to a rank's time, not to the difference
    for key, (pts, ys) in ends_pts.items():
        ends[key] = Fit.fitted(FIRST_FEATURES if key.startswith("first") else LAST_FEATURES, pts, ys, floor)
    finish = Fit.fitted(PARAM_FEATURES, *finish_pts)
    return out, ends, finish


def measure_conv(grid, device, log=print):
    if not grid["conv"]:
        return None
    pts, F, B = [], [], []
    for c, side in grid["conv"]:
        for b in (16, 64):
            for n in (2, 6):
                t = _median_time(_stage_timer(_conv_spec(c, side, 3 * n), "middle", n, b, device, "deferred"),
                                 device, grid["min_time"], grid["max_reps"])
                pts.append({"n": n, "b": b, "v": c, "s": side * side})
                F.append(t["F"])
                B.append(t["B"] + t["W"])
    kc = KernelCost(Fit.fitted(KERNEL_FEATURES, pts, F), Fit.fitted(KERNEL_FEATURES, pts, B), Fit.constant(0.0),
                    "3x3 conv blocks (autograd), no norm; PipelineStage middle rank",
                    [[p["n"], p["b"], p["v"], p["s"], f, b_, 0.0] for p, f, b_ in zip(pts, F, B)])
    log(f"  kernel conv: {len(pts)} points, F fit median/max rel. error "
        f"{kc.forward.median_rel_error:.1%}/{kc.forward.max_rel_error:.1%}")
    return kc


def _level_timer(lev, ex, x, y, device):
    """fn() timing Level.gradient beyond the stage's compute, the update after a cached gradient
    (Level.smooth), and one restriction / prolongation pass over the level's parameters."""
    from ..multilevel.hierarchy import prolongate, restrict_gradient, restrict_parameters
    ids, clock = iter(range(10 ** 9)), _clock(device)

    def one():
        c0 = ex.stage.compute_seconds
        _sync(device)
        w0, t0 = time.perf_counter(), clock()
        bid = next(ids)
        lev.gradient((x, y), bid)
        _sync(device)
        w1, t1 = time.perf_counter(), clock()
        lev.smooth(1, None, (x, y), bid)        # the gradient is cached: only the update runs
        _sync(device)
        t2 = clock()
        vals = lev.values()
        rp = restrict_parameters(vals, lev.mask)
        restrict_gradient(vals, lev.mask)
        lev.add(prolongate([r * 0 for r in rp], lev.mask))
        _sync(device)
        t3 = clock()
        # the stage counts its compute in wall seconds: scale it to this clock
        inside = (ex.stage.compute_seconds - c0) * ((t1 - t0) / (w1 - w0) if w1 > w0 else 1.0)
        return {"grad": (t1 - t0) - inside, "update": t2 - t1, "transfer": (t3 - t2) / 3}
    return one


def measure_steps(grid, device, log=print):
    """Per gradient evaluation: Level.gradient and the executor around the stage's compute; per
    optimizer update; per restriction/prolongation list (elementwise passes), against p."""
    from ..comm import SelfComm
    from ..multilevel.mgopt import Level, level_optimizer
    from ..model import build_model
    from ..parallel.executor import LayerParallel

    pts, grad_t, upd_t, tr_t = [], [], [], []
    for v in grid["widths"][:3]:
        for K in (16, 128):
            spec = _dense_spec(v, K, 8, 4)
            model = build_model(spec, seed=0)
            ex = LayerParallel(model, SelfComm(device=device), "1f1b", 1, device=device)
            lev = Level(ex, 1e-4, 1.0 / K, "l2", 1.0, level_optimizer("sgd", 1e-3))
            x = torch.randn(64, 8).to(device)
            y = torch.randint(0, 4, (64,)).to(device)
            t = _median_time(_level_timer(lev, ex, x, y, device), device, grid["min_time"], grid["max_reps"])
            pts.append({"p": sum(p.numel() for p in model.parameters())})
            grad_t.append(max(t["grad"], 1e-7))
            upd_t.append(max(t["update"], 1e-7))
            tr_t.append(max(t["transfer"], 1e-7))
    return {"gradient": Fit.fitted(PARAM_FEATURES, pts, grad_t), "update": Fit.fitted(PARAM_FEATURES, pts, upd_t),
            "transfer": Fit.fitted(PARAM_FEATURES, pts, tr_t)}


# --- communication ---------------------------------------------------------------------------------

def comm_worker(out_path: str, sizes: list[int], reps: int) -> None:
    """Runs on every rank: ping-pong between ranks 0 and 1, the sender's isend posting cost, and
    all-reduce over all ranks, through parml's Communicator. Rank 0 writes the JSON."""
    from ..comm import make_communicator
    device = os.environ.get("PARML_PLAN_DEVICE", "cpu")
    comm = make_communicator("auto", timeout=120, device=device)
    dev = comm.device
    res = {"size": comm.size, "p2p": [], "allreduce": [], "post": None}
    for n in sizes:
        buf = torch.zeros(max(n // 4, 1), dtype=torch.float32, device=dev)
        r = max(4, reps if n <= 65536 else reps // 5)
        comm.barrier()
        if comm.rank < 2:
            peer = 1 - comm.rank
            for i in range(r + 2):
                if i == 2:
                    t0 = time.perf_counter()
                if comm.rank == 0:
                    comm.send(buf, peer, 7)
                    comm.recv(buf, peer, 7)
                else:
                    comm.recv(buf, peer, 7)
                    comm.send(buf, peer, 7)
            res["p2p"].append([n, (time.perf_counter() - t0) / (2 * r)])
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


def _launch(backend, nprocs, sizes, reps, device, timeout, log):
    from ..launch import clean_env, mpi_unavailable, run_local
    if backend == "mpi" and mpi_unavailable():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "comm.json"
        cmd = [sys.executable, "-m", "parml.plan.calibrate", "--worker", str(out), "--sizes",
               ",".join(map(str, sizes)), "--reps", str(reps)]
        env = clean_env([str(ROOT)], {"PARML_PLAN_DEVICE": "cuda" if backend == "nccl" else "cpu"})
        run = run_local(cmd, nprocs, "mpi" if backend == "mpi" else "gloo", timeout, tmp, f"calib-{backend}", env,
                        cwd=ROOT, capture_stdout=True)
        if not run.ok or not out.exists():
            log(f"  {backend} x{nprocs}: failed ({'timeout' if run.timed_out else run.returncodes})\n{run.tails(800)}")
            return None
        return json.loads(out.read_text())


def _comm_cost(runs, backend, note):
    p2p = [pt for r in runs for pt in r["p2p"]]
    fit = Fit.fitted(["1", "B"], [{"B": n} for n, _ in p2p], [t for _, t in p2p])
    lat, inv_bw = fit.coef
    ar = [pt for r in runs for pt in r["allreduce"]]
    arfit = Fit.fitted(ALLREDUCE_FEATURES, [{"g": g, "B": n} for g, n, _ in ar], [t for *_, t in ar])
    post = statistics.median([r["post"] for r in runs if r.get("post") is not None] or [0.0])
    return CommCost(lat, 1.0 / inv_bw if inv_bw > 0 else float("inf"), post, arfit, None, None,
                    {"p2p": p2p, "allreduce": ar, "fit_p2p": [fit.median_rel_error, fit.max_rel_error]}, note)


def measure_comm(backends, cores, grid, device, log=print):
    out = {}
    sizes, reps = grid["p2p_bytes"], grid["p2p_reps"]
    for backend in backends:
        counts = [2] if grid["groups"] == "two" else sorted({2, max(2, cores), 2 * max(2, cores)})
        normal, over = [], []
        for n in counts:
            t0 = time.perf_counter()
            res = _launch(backend, n, sizes, reps, device, 120 + 30 * n, log)
            if res is None:
                continue
            (over if n > cores else normal).append(res)
            log(f"  {backend} x{n}{' (oversubscribed)' if n > cores else ''}: "
                f"one-way {res['p2p'][0][1] * 1e6:.1f} us at {res['p2p'][0][0]} B, "
                f"{time.perf_counter() - t0:.1f} s")
        if not normal and not over:
            continue
        cost = _comm_cost(normal or over, backend, f"{'oversubscribed ' if not normal else ''}{backend}, "
                                                   f"{max(counts)} ranks at most on this machine")
        if normal and over:
            cost.oversubscribed = _comm_cost(over, backend, f"{backend} with more ranks than cores")
        out[backend] = cost
    return out


# --- the machine -----------------------------------------------------------------------------------

def machine_info(device) -> tuple[dict, dict, str, int, float]:
    import numpy

    from .. import __version__
    versions = {"parml": __version__, "python": platform.python_version(), "torch": torch.__version__,
                "numpy": numpy.__version__}
    try:
        import mpi4py
        versions["mpi4py"] = mpi4py.__version__
    except ImportError:
        pass
    from ..launch import mpirun_path
    mpirun = mpirun_path()
    if mpirun:
        try:
            first = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=20,
                                   check=False).stdout
            versions["mpi"] = first.strip().splitlines()[0] if first.strip() else "unknown"
        except (OSError, subprocess.SubprocessError):
            pass
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    machine = {"system": platform.system(), "release": platform.release(), "machine": platform.machine(),
               "processor": _cpu_name(), "cpus": cpus, "memory_bytes": mem,
               "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
               "compute_clock": "wall (synchronized)" if device.type == "cuda" else "thread CPU time"}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        versions["cuda"] = torch.version.cuda
        machine["gpus"] = torch.cuda.device_count()
        return machine, versions, props.name, torch.cuda.device_count(), float(props.total_memory)
    return machine, versions, machine["processor"], cpus, float(mem) / max(cpus, 1)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def available_backends(device: str) -> list[str]:
    from ..launch import mpi_unavailable
    out = ["nccl"] if device == "cuda" and torch.cuda.device_count() >= 2 else []
    if device == "cpu":
        out.append("gloo")
    if mpi_unavailable() is None:
        out.append("mpi")
    return out


def calibrate(device: str = "cpu", backends=None, out=None, quick: bool = False, log=print,
              threads: int = 1) -> Profile:
    """Measure this machine into a Profile (written to `out` if given), with `threads` torch
    threads per rank (parml's ranks run one each by default)."""
    if device not in ("cpu", "cuda"):
        raise ProfileError(f"--device {device!r} is not one of: cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ProfileError("--device cuda but no CUDA device is available")
    valid = ("gloo", "mpi", "nccl")
    backends = available_backends(device) if backends is None else list(backends)
    bad = [b for b in backends if b not in valid]
    if bad:
        raise ProfileError(f"--backend {','.join(bad)} is not one of: {', '.join(valid)}")
    dev = torch.device("cuda" if device == "cuda" else "cpu")
    grid = GRIDS["quick" if quick else "full"]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _calibrate(dev, device, backends, out, quick, log, threads, grid)
    finally:
        torch.set_num_threads(before)


def _calibrate(dev, device, backends, out, quick, log, threads, grid):
    t0 = time.perf_counter()
    machine, versions, name, cores, memory = machine_info(dev)
    log(f"calibrating {name} ({device}, {threads} thread(s), {cores} core(s)/device(s)); "
        f"{'quick' if quick else 'full'} grid")
    kernels, ends, finish = measure_kernels(grid, dev, log)
    conv = measure_conv(grid, dev, log)
    if conv is not None:
        kernels["conv"] = conv
    step = measure_steps(grid, dev, log)
    step["finish"] = finish
    log(f"  compute measured in {time.perf_counter() - t0:.1f} s")
    comm = measure_comm(backends, cores, grid, device, log)
    prof = Profile(device, kernels, comm, ends, step, cores, memory, "float32", threads, name, machine, versions,
                   datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   f"measured by parml.plan.calibrate ({'quick' if quick else 'full'}) in "
                   f"{time.perf_counter() - t0:.0f} s")
    if out is not None:
        prof.save(out)
        log(f"wrote {out}")
    return prof


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default=None, help="comma-separated: gloo, mpi, nccl [default: every one present]")
    ap.add_argument("--out", default="profile.json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="8", help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=20, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        torch.set_num_threads(1)
        comm_worker(a.worker, [int(s) for s in a.sizes.split(",")], a.reps)
        from ..comm import exit_process
        exit_process(0)
    try:
        calibrate(a.device, a.backend.split(",") if a.backend else None, a.out, a.quick, threads=a.threads)
    except ProfileError as e:
        print(f"parml: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
