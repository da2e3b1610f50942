"""Many ``parml`` command lines in one process (the user-error tests share one interpreter start).

Usage: python tests/_cli_batch.py IN.json OUT.json

IN.json holds a list of argument lists; each goes through ``parml.cli.main`` (what ``python -m
parml`` runs) with stdout and stderr captured, and OUT.json gets one ``{returncode, stdout,
stderr}`` per list: the exit code of ``sys.exit`` (a message code: its text on stderr and 1, as
Python would) and, for any other exception, the traceback on stderr and 1.
"""
import contextlib
import io
import json
import os
import sys
import traceback

os.environ.setdefault("OMP_NUM_THREADS", "1")


def run_one(main, argv: list) -> dict:
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
    return {"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


def main() -> None:
    src, dst = sys.argv[1:3]
    from parml.cli import main as parml_main

    with open(src) as f:
        argvs = json.load(f)
    results = [run_one(parml_main, argv) for argv in argvs]
    with open(dst, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
