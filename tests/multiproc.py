"""Run a function on several real processes, the way the launchers do.

``run_ranks("tests.distributed.test_comm:_suite", 4, "gloo")`` starts 4 processes running
``tests/_worker.py``; each builds ``comm = make_communicator("auto", ...)``,
calls ``_suite(comm, **args)`` and saves what it returns.  The list of the
returned values (index = rank) comes back; any failing rank turns into an
AssertionError that carries its traceback.

* ``backend="gloo"``: plain subprocesses with the variables torchrun sets
  (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``),
  so ``make_communicator("auto")`` picks the torch backend (gloo on CPU).
* ``backend="mpi"``: ``mpirun -n N ... python tests/_worker.py``; the test is
  skipped when ``mpirun`` or ``mpi4py`` is missing (a failure under PARML_REQUIRE_MPI=1, see
  tests/conftest.py).

``run_cmd`` runs a launcher command line (``parml``, ``torchrun``, ``mpirun``, a benchmark) the
same way: in its own session, killed with every process it started at the deadline or when the
test is interrupted; ``launch`` builds the ``parml`` command line for the serial, torchrun and
mpirun cases.

How gloo ranks start: forked from one fork server per test session that has imported torch and
parml (``tests/_rank_preload.py``), each in its own session with its own output files and the
variables torchrun sets; they then build their communicator over TCP like any torchrun worker.
That saves ~2 s of CPU per rank. ``PARML_TEST_SPAWN=exec`` starts a fresh interpreter per rank
instead; mpirun always does, and launcher tests (``launch``, ``run_cmd``) run the real launchers.

Environment of the workers: ``OMP_NUM_THREADS=1``, repo root and ``tests/`` on
``PYTHONPATH``, ``PARML_TEST_COMM_TIMEOUT`` (communicator timeout, seconds;
default 3/4 of ``timeout`` so that a hang shows up as a CommTimeout traceback
before the harness kills the run) and ``PARML_TEST_DEVICE`` (default ``cpu``).
Both can be overridden through ``env``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from parml.launch import (LocalRun, clean_env, free_port, kill_group, mpi_unavailable, mpirun_command,  # noqa: F401
                          mpirun_path, run_local, torchrun_env, wait_all)

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
WORKER = TESTS_DIR / "_worker.py"

_GRACE_AFTER_FAILURE = 5.0  # s the other ranks get after one rank failed
MPI_MISSING = "MPI unavailable"   # every skip for a missing mpirun / mpi4py starts with this (conftest)


def _mpirun_path() -> str | None:
    return mpirun_path()


def mpirun_available() -> bool:
    """True when ``mpirun`` and ``mpi4py`` are both there."""
    return mpi_unavailable() is None


def skip_without_mpi() -> None:
    """Skip the calling test when mpirun or mpi4py is missing (fails under PARML_REQUIRE_MPI=1)."""
    reason = mpi_unavailable()
    if reason is not None:
        import pytest

        pytest.skip(f"{MPI_MISSING}: {reason}")


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
    if backend == "mpi":
        skip_without_mpi()

    tmp = Path(tempfile.mkdtemp(prefix="parml-ranks-"))
    try:
        torch.save(dict(args or {}), tmp / "args.pt")
        extra = {"PARML_TEST_COMM_TIMEOUT": f"{max(0.75 * timeout, 1.0):g}"}
        extra.update(env or {})
        penv = base_env(extra)
        if backend == "gloo" and os.environ.get("PARML_TEST_SPAWN", "fork") == "fork":
            run = _run_forked(str(tmp), func, nprocs, timeout, penv)
        else:
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


_FORK_CONTEXT: list = []


def _fork_context():
    """The session's fork server, started once with one compute thread and the preload imported."""
    if not _FORK_CONTEXT:
        import multiprocessing
        from multiprocessing import forkserver

        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["_rank_preload"])
        saved = dict(os.environ)
        # Python 3.11's forkserver.main never applies the sys.path it is given and silently skips a
        # preload it cannot import: tests/ and the repo root must be on the server's PYTHONPATH,
        # or every rank imports torch and parml again (~1.5 s of CPU each)
        path = [str(TESTS_DIR), str(REPO_ROOT)] + [p for p in saved.get("PYTHONPATH", "").split(os.pathsep) if p]
        os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PARML_TEST_FORK_SERVER="1",
                          PYTHONPATH=os.pathsep.join(path))
        try:
            forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        _FORK_CONTEXT.append(ctx)
    return _FORK_CONTEXT[0]


def _run_forked(tmp: str, func: str, nprocs: int, timeout: float, env: dict) -> LocalRun:
    """gloo ranks of ``run_ranks`` forked from the fork server, with torchrun's variables."""
    from _worker import forked_rank

    port = free_port()
    return run_forked([(forked_rank, (tmp, func, dict(env, **torchrun_env(r, nprocs, port)))) for r in range(nprocs)],
                      Path(tmp), "rank", timeout)


def run_forked(targets: list, log_dir: Path, label: str, timeout: float,
               grace: float = _GRACE_AFTER_FAILURE) -> LocalRun:
    """``run_local`` for processes forked from the fork server: ``fn(*args, stdout_path,
    stderr_path)`` per target, the same deadline, the same grace after a first failure, and every
    process killed on the way out (also when pytest interrupts the wait)."""
    ctx, procs, logs = _fork_context(), [], []
    try:
        for i, (fn, args) in enumerate(targets):
            out, err = log_dir / f"{label}.{i}.stdout", log_dir / f"{label}.{i}.stderr"
            p = ctx.Process(target=fn, args=(*args, str(out), str(err)), daemon=False)
            p.start()
            procs.append(p)
            logs.append((f"{label}.{i}", out, err))
        timed_out = wait_all(lambda: [p.exitcode for p in procs], timeout, grace, 0.02)
    finally:
        for p in procs:
            if p.exitcode is None:
                p.kill()
            p.join(10)
    return LocalRun([p.exitcode for p in procs], timed_out, logs)


# --- launcher command lines --------------------------------------------------------------------------

_MARK = "PARML_TEST_RUN_ID"    # carried by every process a run_cmd call starts, found again in /proc


def _marked_pids(mark: str) -> list[int]:
    """Processes whose environment carries ``PARML_TEST_RUN_ID=mark`` (Linux /proc; [] elsewhere)."""
    needle, pids = f"{_MARK}={mark}".encode(), []
    for entry in Path("/proc").glob("[0-9]*") if Path("/proc").is_dir() else []:
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except (OSError, ValueError):
            pass
    return [p for p in pids if p != os.getpid()]


def kill_marked(mark: str) -> None:
    """SIGKILL every process still carrying the mark: torchrun starts its workers in sessions of
    their own, and a killed launcher leaves them orphaned, so killing its group is not enough."""
    for pid in _marked_pids(mark):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def run_cmd(cmd: list[str], timeout: float, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """Run a command line like ``subprocess.run(capture_output=True, text=True)``, but in its own
    session with a marker variable: at the deadline, or when pytest interrupts the test, the whole
    process group and every process carrying the marker are killed (no rank outlives the test).
    A deadline is an AssertionError carrying the tails of stdout and stderr."""
    __tracebackhide__ = True
    mark = uuid.uuid4().hex
    full_env = dict(os.environ if env is None else env, **{_MARK: mark})
    tmp = Path(tempfile.mkdtemp(prefix="parml-cmd-"))
    try:
        run = run_local(list(map(str, cmd)), 1, "plain", timeout, tmp, "cmd", full_env, cwd=cwd,
                        capture_stdout=True, poll=0.05)
        out, err = ((tmp / f"cmd.0.{k}").read_text(errors="replace") for k in ("stdout", "stderr"))
    finally:
        kill_marked(mark)
        shutil.rmtree(tmp, ignore_errors=True)
    return _completed(cmd, " ".join(map(str, cmd)), run, timeout, out, err)


def _completed(cmd, what: str, run: LocalRun, timeout: float, out: str, err: str) -> subprocess.CompletedProcess:
    """``subprocess.run``'s result (the first non-zero exit code, else 0), or an AssertionError with
    the output's tails when the deadline passed."""
    __tracebackhide__ = True
    if run.timed_out:
        raise AssertionError(f"{what} timed out after {timeout:g} s; every process killed\n"
                             f"--- stdout ---\n{out[-3000:]}\n--- stderr ---\n{err[-3000:]}")
    codes = [c for c in run.returncodes if c != 0]
    return subprocess.CompletedProcess(cmd, codes[0] if codes else 0, out, err)


def parml_cmd(kind: str, nprocs: int, args: list[str]) -> list[str]:
    """``python -m parml.cli ARGS`` as one process ("serial"), under torchrun or under mpirun."""
    if kind == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nprocs),
                "-m", "parml.cli", *args]
    if kind == "mpirun":
        skip_without_mpi()
        return mpirun_command(nprocs) + [sys.executable, "-m", "parml.cli", *args]
    if kind != "serial":
        raise ValueError(f"kind must be serial, torchrun or mpirun, got {kind!r}")
    return [sys.executable, "-m", "parml.cli", *args]


def launch(kind: str, nprocs: int, args: list[str], cwd, timeout: float = 120,
           env: dict | None = None) -> subprocess.CompletedProcess:
    """``parml ARGS`` in a clean environment (no enclosing launcher's variables, one thread) plus
    ``env``: under the real launchers ("torchrun", "mpirun"), or as processes forked from the fork
    server running ``parml.cli.main`` ("serial": one process; "ranks": ``nprocs`` gloo ranks with
    the variables torchrun gives its workers, for tests that are about training, not the launcher).
    ``PARML_TEST_SPAWN=exec`` runs "serial" as ``python -m parml.cli`` and "ranks" under torchrun."""
    exec_only = os.environ.get("PARML_TEST_SPAWN", "fork") != "fork"
    if kind == "ranks" and exec_only:
        kind = "torchrun"
    if kind in ("serial", "ranks") and not exec_only:
        return _launch_forked(kind, nprocs, args, cwd, timeout, base_env(env))
    return run_cmd(parml_cmd(kind, nprocs, args), timeout, env=base_env(env), cwd=cwd)


def _launch_forked(kind, nprocs, args, cwd, timeout, env) -> subprocess.CompletedProcess:
    __tracebackhide__ = True
    from _worker import forked_cli

    nprocs, port = (1, 0) if kind == "serial" else (nprocs, free_port())
    tmp = Path(tempfile.mkdtemp(prefix="parml-cli-"))
    try:
        targets = [(forked_cli, (list(map(str, args)), str(cwd if cwd is not None else os.getcwd()),
                                 env if kind == "serial" else dict(env, **torchrun_env(r, nprocs, port))))
                   for r in range(nprocs)]
        run = run_forked(targets, tmp, "cli", timeout, grace=10.0)
        out, err = ("".join((tmp / f"cli.{r}.{k}").read_text(errors="replace") for r in range(nprocs))
                    for k in ("stdout", "stderr"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cmd = ["parml", *map(str, args)]
    return _completed(cmd, f"{' '.join(cmd)} ({kind}, {nprocs})", run, timeout, out, err)


def parml_batch(argvs: list[list[str]], cwd=None, timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """Serial ``parml ARGS`` for every argument list in `argvs`, one after another in a single
    process (tests/_cli_batch.py: each through ``parml.cli.main`` with its own captured stdout,
    stderr and exit code), so that tests of many one-line user errors pay one interpreter start."""
    __tracebackhide__ = True
    tmp = Path(tempfile.mkdtemp(prefix="parml-batch-"))
    try:
        (tmp / "in.json").write_text(json.dumps([list(map(str, a)) for a in argvs]))
        r = run_cmd([sys.executable, str(TESTS_DIR / "_cli_batch.py"), tmp / "in.json", tmp / "out.json"], timeout,
                    env=base_env(), cwd=cwd)
        assert r.returncode == 0, f"tests/_cli_batch.py failed (exit {r.returncode})\n{r.stderr[-3000:]}"
        results = json.loads((tmp / "out.json").read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [subprocess.CompletedProcess(["parml", *a], d["returncode"], d["stdout"], d["stderr"])
            for a, d in zip(argvs, results)]


def rerender(script, out: Path, dest: Path, args: list, timeout: float) -> subprocess.CompletedProcess:
    """``SCRIPT --report-only --out DEST ARGS`` on a copy of OUT/results.json, which must succeed."""
    __tracebackhide__ = True
    shutil.copy(Path(out) / "results.json", Path(dest) / "results.json")
    proc = run_benchmark(script, ["--report-only", "--out", dest, *args], timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def benchmark_results(script, out: Path, args: list, timeout: float, quick: dict | None = None) -> tuple[str, dict]:
    """``SCRIPT ARGS --out OUT`` (see run_benchmark), which must succeed; its stdout and the
    OUT/results.json it wrote."""
    __tracebackhide__ = True
    proc = run_benchmark(script, [*args, "--out", out], timeout, quick=quick)
    assert proc.returncode == 0, f"{Path(script).name} failed\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout, json.loads((Path(out) / "results.json").read_text())


def assert_written(out: Path, names) -> None:
    """Every file in `names` is in OUT and not empty."""
    __tracebackhide__ = True
    for name in names:
        assert (Path(out) / name).is_file() and (Path(out) / name).stat().st_size > 0, name


def run_benchmark(script, args: list, timeout: float, quick: dict | None = None) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGS`` from the repository root (see run_cmd). `quick` updates the script's
    QUICK settings first (e.g. fewer images, so that the 600-image MNIST fixture suffices): the
    script is then loaded as a module and its main(argv) called, with the script's name and folder
    in sys.argv[0] and sys.path as when it runs as a script."""
    cmd = [sys.executable, str(script), *map(str, args)]
    if quick:
        code = ("import importlib.util, sys\n"
                f"sys.argv[0] = {str(script)!r}\n"
                f"sys.path.insert(0, {str(Path(script).parent)!r})\n"
                f"spec = importlib.util.spec_from_file_location('benchmark', {str(script)!r})\n"
                "mod = importlib.util.module_from_spec(spec)\n"
                "spec.loader.exec_module(mod)\n"
                f"mod.QUICK.update({quick!r})\n"
                "sys.exit(mod.main(sys.argv[1:]))\n")
        cmd = [sys.executable, "-c", code, *map(str, args)]
    return run_cmd(cmd, timeout, env=base_env(), cwd=REPO_ROOT)
