"""One rank of a tests.multiproc.run_ranks launch.

Usage: python tests/_worker.py TMPDIR module.path:function

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


def main() -> None:
    tmp, func = sys.argv[1], sys.argv[2]
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
