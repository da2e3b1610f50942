"""Measure this machine's costs into a ``Profile`` (a few minutes at most; ``quick`` for tests).

Compute (``calibrate_compute``) is timed through parml's own stage, executor and Level code;
communication (``calibrate_comm``) through parml's ``Communicator`` on ranks started locally, for
2 ranks and, in the full mode, as many ranks as cores and twice that (recorded as
oversubscribed). The profile records the machine, library versions, the date and each fit's error.

    parml calibrate [--device cpu] [--backend gloo,mpi] [--quick] --out profile.json
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..comm import exit_process
from ..launch import mpirun_path
from .calibrate_comm import available_backends, comm_worker, measure_comm
from .calibrate_compute import measure_conv, measure_kernels, measure_network, measure_steps
from .profile import Profile, ProfileError

__all__ = ["GRIDS", "calibrate", "comm_worker", "machine_info", "main", "measure_comm", "measure_conv",
           "measure_kernels", "measure_network", "measure_steps"]

GRIDS = {
    "quick": {"widths": [4, 32], "rows": [32, 256], "blocks": [4, 16], "ends_io": [(2, 2), (64, 10)],
              "ends_widths": [4, 32], "ends_rows": [32, 256], "conv": [], "min_time": 0.004, "max_reps": 5,
              "p2p_bytes": [8, 65536, 1 << 20], "p2p_reps": 20, "groups": "two"},
    "full": {"widths": [3, 10, 32, 128, 512], "rows": [16, 128, 500, 1000, 2000], "blocks": [4, 32, 256, 1024, 2048],
             "ends_io": [(2, 2), (64, 10), (784, 10)], "ends_widths": [3, 32, 128], "ends_rows": [64, 1000],
             "conv": [(4, 7), (16, 14), (8, 28)], "min_time": 0.03, "max_reps": 11,
             "p2p_bytes": [8, 1024, 16384, 262144, 1 << 20, 4 << 20], "p2p_reps": 100, "groups": "all"},
}


# --- the machine -----------------------------------------------------------------------------------

def machine_info(device) -> tuple[dict, dict, str, int, float]:
    versions = {"parml": __version__, "python": platform.python_version(), "torch": torch.__version__,
                "numpy": np.__version__}
    try:
        versions["mpi4py"] = importlib.metadata.version("mpi4py")
    except importlib.metadata.PackageNotFoundError:
        pass
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
    network = measure_network(grid, dev, log)
    if network is not None:
        kernels["network"] = network
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
        exit_process(0)
    try:
        calibrate(a.device, a.backend.split(",") if a.backend else None, a.out, a.quick, threads=a.threads)
    except ProfileError as e:
        print(f"parml: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
