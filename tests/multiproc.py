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

import shutil
import sys
import tempfile
from pathlib import Path

from parml.launch import clean_env, mpi_unavailable, mpirun_command, mpirun_path, run_local  # noqa: F401

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
WORKER = TESTS_DIR / "_worker.py"

_GRACE_AFTER_FAILURE = 5.0  # s the other ranks get after one rank failed


def _mpirun_path() -> str | None:
    return mpirun_path()


def mpirun_available() -> bool:
    """True when ``mpirun`` and ``mpi4py`` are both there."""
    return mpi_unavailable() is None


def base_env(extra: dict | None = None) -> dict:
    """os.environ without launcher variables, plus the worker settings and ``extra``."""
    env = clean_env([str(REPO_ROOT), str(TESTS_DIR)])
    env.setdefault("PARML_TEST_DEVICE", "cpu")
    env.update({k: str(v) for k, v in (extra or {}).items()})
    return env


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
    try:
        torch.save(dict(args or {}), tmp / "args.pt")
        extra = {"PARML_TEST_COMM_TIMEOUT": f"{max(0.75 * timeout, 1.0):g}"}
        extra.update(env or {})
        penv = base_env(extra)
        cmd_tail = [sys.executable, str(WORKER), str(tmp), func]

        run = run_local(cmd_tail, nprocs, backend, timeout, tmp, "rank", penv, cwd=REPO_ROOT,
                        capture_stdout=True, grace=_GRACE_AFTER_FAILURE, poll=0.02)
        errors = []
        for r in range(nprocs):
            ef = tmp / f"rank{r}.err"
            if ef.exists():
                errors.append(f"--- rank {r} failed ---\n{ef.read_text(errors='replace')}")
        if run.timed_out:
            msg = f"run_ranks({func}, nprocs={nprocs}, backend={backend}) timed out after {timeout:g} s"
            if errors:
                msg += "\n" + "\n".join(errors)
            raise AssertionError(msg + "\n" + run.tails(3000))
        if errors:
            raise AssertionError(
                f"run_ranks({func}, nprocs={nprocs}, backend={backend}): "
                f"{len(errors)} rank(s) failed\n" + "\n".join(errors) + "\n" + run.tails(3000)
            )
        bad = [(label, code) for (label, _, _), code in zip(run.logs, run.returncodes) if code != 0]
        missing = [r for r in range(nprocs) if not (tmp / f"rank{r}.pt").exists()]
        if bad or missing:
            raise AssertionError(
                f"run_ranks({func}, nprocs={nprocs}, backend={backend}): exit codes {bad}, "
                f"no result from ranks {missing}\n" + run.tails(3000)
            )
        return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(nprocs)]
    finally:
        # run_local kills its processes even when pytest-timeout or ^C interrupts the wait
        shutil.rmtree(tmp, ignore_errors=True)
