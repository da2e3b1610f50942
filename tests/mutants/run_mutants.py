"""Mutation check: each mutant is a plausible MG/OPT or executor bug; every one must be killed.

    python tests/mutants/run_mutants.py [NAME ...] [--tests FILE ...]

Copies the tracked files of this checkout to a temporary folder per mutant, applies one textual
replacement (which must match exactly once), runs the test files and prints which tests failed.
Exit status 1 if a mutant survives or no longer applies. Not part of the default suite (minutes).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ["tests/test_mgopt_reference.py", "tests/test_parallel.py", "tests/test_core.py"]

# name: (file, old text, new text, what the bug is)
MUTANTS = {
    "dg-dropped": ("parml/multilevel/mgopt.py",
                   "self._cycle(i - 1, [r - c for r, c in zip(rg, g_coarse)], batch, batch_id)",
                   "self._cycle(i - 1, None, batch, batch_id)",
                   "δg dropped from the coarse objective"),
    "dg-sign": ("parml/multilevel/mgopt.py",
                "self._cycle(i - 1, [r - c for r, c in zip(rg, g_coarse)], batch, batch_id)",
                "self._cycle(i - 1, [c - r for r, c in zip(rg, g_coarse)], batch, batch_id)",
                "δg sign flipped"),
    "dg-not-in-restricted-gradient": (
        "parml/multilevel/mgopt.py",
        "        g = gl if dg is None else [a + b for a, b in zip(gl, dg)]\n"
        "        if self.observer is not None:\n            self.observer(i, \"restrict\"",
        "        g = gl\n"
        "        if self.observer is not None:\n            self.observer(i, \"restrict\"",
        "δg left out of R∇H on middle levels"),
    "post-smoothing-without-dg": ("parml/multilevel/mgopt.py",
                                  "lev.smooth(post, dg, batch, batch_id,",
                                  "lev.smooth(post, None, batch, batch_id,",
                                  "post-smoothing ignores δg"),
    "coarse-keeps-fine-h": ("parml/multilevel/hierarchy.py",
                            "return [spec.coarsened(2 ** (levels - 1 - i)) for i in range(levels)]",
                            "return [__import__('dataclasses').replace(spec.coarsened(2 ** (levels - 1 - i)), "
                            "T=spec.T / 2 ** (levels - 1 - i)) for i in range(levels)]",
                            "coarse levels keep the fine h"),
    "fused-adjoint-no-h-deferred": ("parml/kernels/torch_chunk.py",
                                    "g = torch.addmm(g, gas[k], weight[k], alpha=h)",
                                    "g = torch.addmm(g, gas[k], weight[k], alpha=1.0)",
                                    "fused Euler adjoint drops h (deferred path: the executor's default)"),
    "fused-adjoint-no-h-inline": ("parml/kernels/torch_chunk.py",
                                  "g = torch.addmm(g, ga, weight[k], alpha=h)",
                                  "g = torch.addmm(g, ga, weight[k], alpha=1.0)",
                                  "fused Euler adjoint drops h (inline path: serial model, --weight-grads inline)"),
    "dg-gradient-evaluated-twice": ("parml/multilevel/mgopt.py",
                                    "if self._cache is not None and self._cache[0] == key:",
                                    "if False:",
                                    "the δg evaluation is not reused as the first coarse step (eq. 10 count)"),
    "linear-last-row-zero": ("parml/multilevel/hierarchy.py",
                             "nxt = torch.cat([c[1:], c[-1:] if after is None else after], dim=0)",
                             "nxt = torch.cat([c[1:], 0 * c[-1:] if after is None else after], dim=0)",
                             "linear prolongation's end row uses c_J := 0 instead of c_{J-1}"),
}


def apply(root: Path, name: str) -> None:
    file, old, new, _ = MUTANTS[name]
    path = root / file
    text = path.read_text()
    if text.count(old) != 1:
        raise SystemExit(f"mutant {name}: the text to replace occurs {text.count(old)} times in {file}")
    path.write_text(text.replace(old, new))


def run(name: str, tests: list[str], keyword: str | None) -> list[str]:
    tmp = Path(tempfile.mkdtemp(prefix=f"parml-mutant-{name}-"))
    try:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        for f in files.split():
            if (ROOT / f).is_file():
                (tmp / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / f, tmp / f)
        apply(tmp, name)
        cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *tests]
        if keyword:
            cmd += ["-k", keyword]
        out = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True,
                             env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}).stdout
        return re.findall(r"^FAILED (\S+)", out, flags=re.M)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help=f"mutants to run (default: all): {', '.join(MUTANTS)}")
    ap.add_argument("--tests", nargs="+", default=TESTS)
    ap.add_argument("-k", dest="keyword", default=None, help="pytest -k expression (e.g. 'not mpi')")
    args = ap.parse_args()
    survivors = []
    for name in args.names or list(MUTANTS):
        failed = run(name, args.tests, args.keyword)
        print(f"## {name}: {MUTANTS[name][3]} -> {'KILLED' if failed else 'SURVIVED'} ({len(failed)} failing)")
        for f in failed:
            print(f"   {f}")
        sys.stdout.flush()
        if not failed:
            survivors.append(name)
    if survivors:
        print("surviving mutants:", ", ".join(survivors))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
