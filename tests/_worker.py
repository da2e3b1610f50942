"""One rank of a tests.multiproc.run_ranks launch.

Usage: python tests/_worker.py TMPDIR module.path:function   (a fresh interpreter per rank: mpirun)
or ``forked_rank`` in a process forked from the test session's fork server (gloo ranks; see
tests/multiproc.py), which has torch and parml imported already.

Builds ``comm = make_communicator("auto", timeout=$PARML_TEST_COMM_TIMEOUT,
device=$PARML_TEST_DEVICE)``, calls ``function(comm, **args)`` (args from
TMPDIR/args.pt) and saves the return value to TMPDIR/rank<r>.pt.  On an
exception the traceback goes to TMPDIR/rank<r>.err, the communicator is
aborted and the process exits with status 1.
"""

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

_TESTS = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_TESTS)
for _p in (_TESTS, _ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)


def _guess_rank() -> int:
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def forked_rank(tmp: str, func: str, env: dict, stdout_path: str, stderr_path: str) -> None:
    """A rank forked from the fork server: its own session, output files and environment (the
    launcher's variables), then the same steps as a fresh interpreter."""
    _enter(env, stdout_path, stderr_path)
    main([tmp, func])


def forked_cli(argv: list, cwd: str, env: dict, stdout_path: str, stderr_path: str) -> None:
    """``parml ARGV`` in a process forked from the fork server, in `cwd` with `env`: what
    ``python -m parml.cli ARGV`` does there, without importing torch again."""
    _enter(env, stdout_path, stderr_path)
    os.chdir(cwd)
    code = 0
    try:
        from parml.cli import main as parml_main

        parml_main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _enter(env: dict, stdout_path: str, stderr_path: str) -> None:
    """A forked process in a session of its own, with `env` as its whole environment and its stdout
    and stderr going to the two files."""
    os.setsid()
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    os.environ.clear()
    os.environ.update(env)


def main(argv: list | None = None) -> None:
    tmp, func = (sys.argv[1:3] if argv is None else argv)
    rank = _guess_rank()
    comm = None
    try:
        import importlib

        import torch

        torch.set_num_threads(1)
        from parml.comm import make_communicator

        comm = make_communicator(
            "auto",
            timeout=float(os.environ.get("PARML_TEST_COMM_TIMEOUT", "60")),
            device=os.environ.get("PARML_TEST_DEVICE", "cpu"),
        )
        rank = comm.rank
        module_name, fn_name = func.split(":", 1)
        fn = getattr(importlib.import_module(module_name), fn_name)
        args_path = os.path.join(tmp, "args.pt")
        args = torch.load(args_path, weights_only=False) if os.path.exists(args_path) else {}
        result = fn(comm, **args)
        part = os.path.join(tmp, f"rank{rank}.pt.part")
        torch.save(result, part)
        os.replace(part, os.path.join(tmp, f"rank{rank}.pt"))
    except BaseException:
        import traceback

        text = traceback.format_exc()
        try:
            with open(os.path.join(tmp, f"rank{rank}.err"), "w") as f:
                f.write(text)
        except OSError:
            pass
        sys.stderr.write(text)
        sys.stderr.flush()
        if comm is not None:
            try:
                comm.abort(f"rank {rank} failed in {func}")
            except BaseException:
                pass
        os._exit(1)
    try:
        comm.close()
    except Exception:
        pass
    from parml.comm import exit_process

    exit_process(0)


if __name__ == "__main__":
    main()
