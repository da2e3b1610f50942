"""Mutation check: each mutant is a plausible MG/OPT, executor, mover or checkpoint bug; every one
must be killed by the default suite.

    python tests/mutants/run_mutants.py [NAME ...] [--tests FILE ...] [-k EXPR] [--markdown]

Copies the tracked files of this checkout to a temporary folder per mutant, applies one textual
replacement (which must match exactly once), runs the mutant's relevant test files (or --tests)
and prints which tests failed; --markdown prints the table (mutant -> killing tests) at the end.
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
MGOPT_TESTS = ["tests/unit/test_mgopt_reference.py", "tests/unit/test_mgopt.py", "tests/unit/test_hierarchy.py",
               "tests/distributed/test_mgopt.py"]
EXECUTOR_TESTS = ["tests/unit/test_executor.py", "tests/unit/test_torch_chunk.py", "tests/unit/test_model.py",
                  "tests/distributed/test_executor.py"]
MOVER_TESTS = ["tests/distributed/test_mgopt.py", "tests/distributed/test_executor_conv.py"]
CHECKPOINT_TESTS = ["tests/unit/test_checkpoint.py", "tests/distributed/test_checkpoint.py"]
MESH_TESTS = ["tests/distributed/test_mesh.py"]
MESH_TRAINING_TESTS = ["tests/unit/test_layout.py", "tests/distributed/test_mesh_training.py"]
# the relevant tests of each mutated file (--tests overrides)
TESTS = {"parml/multilevel/mgopt.py": MGOPT_TESTS, "parml/multilevel/hierarchy.py": MGOPT_TESTS,
         "parml/kernels/torch_chunk.py": EXECUTOR_TESTS, "parml/model/network.py": EXECUTOR_TESTS,
         "parml/parallel/executor.py": EXECUTOR_TESTS, "parml/parallel/stage.py": EXECUTOR_TESTS,
         "parml/parallel/transfer.py": MOVER_TESTS, "parml/training/checkpoint.py": CHECKPOINT_TESTS,
         "parml/parallel/replicas.py": MESH_TESTS, "parml/parallel/layout.py": MESH_TRAINING_TESTS,
         "parml/training/build.py": MESH_TRAINING_TESTS,
         "parml/kernels/__init__.py": ["tests/unit/test_kernels.py", "tests/unit/test_executor.py"],
         "parml/comm/base.py": ["tests/unit/test_comm.py"],
         "parml/kernels/network.py": ["tests/unit/test_network_gradient.py", "tests/distributed/test_executor.py"],
         "parml/kernels/_numba_network.py": ["tests/unit/test_network_gradient.py"]}

# name: (file, old text, new text, what the bug is)
MUTANTS = {
    "dg-dropped": ("parml/multilevel/mgopt.py",
                   "self._cycle(i - 1, torch._foreach_sub(rg, g_coarse), batch, batch_id)",
                   "self._cycle(i - 1, None, batch, batch_id)",
                   "δg dropped from the coarse objective"),
    "dg-sign": ("parml/multilevel/mgopt.py",
                "self._cycle(i - 1, torch._foreach_sub(rg, g_coarse), batch, batch_id)",
                "self._cycle(i - 1, torch._foreach_sub(g_coarse, rg), batch, batch_id)",
                "δg sign flipped"),
    "dg-not-in-restricted-gradient": (
        "parml/multilevel/mgopt.py",
        "        g = gl if dg is None else torch._foreach_add(gl, dg)\n"
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
    # the rest of issue 16's table (caught before it was written; kept so that they stay caught)
    "shard-off-by-one": ("parml/model/network.py",
                         "lo, hi = max(start, offset), min(stop, offset + s.blocks)",
                         "lo, hi = max(start, offset), min(stop + 1, offset + s.blocks)",
                         "off-by-one at rank boundaries in ODEResNet.shard (one block on two ranks)"),
    "loss-per-microbatch": ("parml/parallel/stage.py",
                            'loss = self.shard.loss(out, y_m, reduction="sum") / total if self.last else None',
                            'loss = self.shard.loss(out, y_m, reduction="sum") / y_m.shape[0] if self.last else None',
                            "loss divided by the micro-batch size instead of the full batch"),
    "restriction-mean": ("parml/multilevel/hierarchy.py",
                         "    if interpolation == \"constant\":\n        return pairs.sum(1)",
                         "    if interpolation == \"constant\":\n        return pairs.mean(1)",
                         "restriction of gradients = mean instead of I^T"),
    # three more: the executor, the agglomeration movers, the checkpoint re-partitioning
    "executor-loss-of-last-microbatch": ("parml/parallel/executor.py",
                                         "loss += loss_m.detach()",
                                         "loss = loss_m.detach()",
                                         "executor reports the last micro-batch's loss, not the sum (gradients "
                                         "stay exact)"),
    "executor-evaluate-from-rank-0": ("parml/parallel/executor.py",
                                      "self.comm.broadcast(stats, self.comm.size - 1)",
                                      "self.comm.broadcast(stats, 0)",
                                      "evaluate broadcasts the loss and accuracy from rank 0, not from the last "
                                      "rank that computed them"),
    "mover-destination-rows": ("parml/parallel/transfer.py",
                               "r, i, j, (lo - a.lo, hi - a.lo, lo - b.lo, hi - b.lo)))",
                               "r, i, j, (lo - a.lo, hi - a.lo, lo - a.lo, hi - a.lo)))",
                               "a Mover writes each piece at the source's row offset, not the destination's "
                               "(gathered levels get the wrong rows)"),
    "checkpoint-optimizer-rows": ("parml/training/checkpoint.py",
                                  "value = torch.cat([st[name] for _, st in parts])[e.lo:e.hi]",
                                  "value = torch.cat([st[name] for _, st in parts])[:e.hi - e.lo]",
                                  "resuming on another rank count cuts the optimizer state from row 0, not "
                                  "from this rank's first row"),
    # the collectives a gradient shares (one per group): the loss in the last bucket, the level's sums
    "reducer-loss-not-written-back": ("parml/parallel/replicas.py",
                                      "                extra.copy_(flat[-1])\n",
                                      "                pass\n",
                                      "the data group's loss sum is not written back (each replica keeps "
                                      "its share of the loss)"),
    "level-sums-not-reduced": ("parml/parallel/executor.py",
                               "        self.comm.allreduce(values)\n",
                               "",
                               "the final all-reduce is skipped (the loss stays on the last rank, the "
                               "Tikhonov terms and non-finite flags stay per rank)"),
    # --coarse-layout redundant: the whole batch on every replica, no sums, replica 0 writes
    "redundant-level-splits-the-batch": ("parml/parallel/layout.py",
                                         "return 1 if self.redundant else self.replicas",
                                         "return self.replicas",
                                         "a redundant level still splits the batch and all-reduces its gradients "
                                         "(the same iterates, the cost it exists to avoid)"),
    "redundant-replicas-all-write": ("parml/training/build.py",
                                     "replica=layout.position(comm.rank)[0])",
                                     "replica=0)",
                                     "every replica of a redundant level counts as replica 0, so every one "
                                     "writes its level's optimizer state into the checkpoint"),
    # --weight-grads auto: the fused kernel forms weight gradients inline where deferring only costs
    "fused-kernel-always-defers": ("parml/kernels/__init__.py",
                                   "return waited and width > FUSED_INLINE_MAX_WIDTH",
                                   "return True",
                                   "the fused kernel defers every chunk's weight gradients (exact, 2.8x the "
                                   "backward's cost at width 3)"),
    "fused-kernel-defers-on-the-first-rank": ("parml/kernels/__init__.py",
                                              "return waited and width > FUSED_INLINE_MAX_WIDTH",
                                              "return width > FUSED_INLINE_MAX_WIDTH",
                                              "the fused kernel defers wide chunks on a first rank, where "
                                              "nobody waits for the adjoint"),
    "tikhonov-unweighted": ("parml/multilevel/mgopt.py",
                            "reg = 0.5 * float(t @ theta)",
                            "reg = float(theta @ theta)",
                            "the level objective's Tikhonov term without β and the block weight"),
    # smoothing on the CPU: GD steps as numpy ops on θ (``Level._descend``)
    "vector-step-without-dg": ("parml/multilevel/mgopt.py",
                               "g = gl + dg if dg is not None else gl.copy()",
                               "g = gl.copy()",
                               "the vector GD step drops δg (coarse levels descend L^l, not H^l)"),
    "vector-step-without-metric": ("parml/multilevel/mgopt.py",
                                   "            g *= self._scale_flat\n",
                                   "            pass\n",
                                   "the vector GD step ignores the L2(0,T) metric's 1/h"),
    # the cycle between CPU levels on the same ranks: constant transfers as index maps on θ
    "vector-dg-sign": ("parml/multilevel/mgopt.py",
                       "self._cycle(i - 1, rg - g_coarse, batch, batch_id)",
                       "self._cycle(i - 1, g_coarse - rg, batch, batch_id)",
                       "δg sign flipped (vector cycle)"),
    "vector-dg-not-in-restricted-gradient": ("parml/multilevel/mgopt.py",
                                             "g = gl if dg is None else gl + dg",
                                             "g = gl",
                                             "δg left out of R∇H on middle levels (vector cycle)"),
    "vector-post-smoothing-without-dg": ("parml/multilevel/mgopt.py",
                                         "        lev.smooth(post, dg, batch, batch_id)\n",
                                         "        lev.smooth(post, None, batch, batch_id)\n",
                                         "post-smoothing ignores δg (vector cycle)"),
    "vector-restriction-mean": ("parml/multilevel/hierarchy.py",
                                "        out[:self.blocks] += g[self.odd]\n        return out",
                                "        out[:self.blocks] += g[self.odd]\n        out[:self.blocks] /= 2\n"
                                "        return out",
                                "restriction of gradients = mean instead of I^T (index maps)"),
    "mpi-waits-sleep-at-once": ("parml/comm/base.py",
                                "if now - start < YIELD_SECONDS:",
                                "if False:",
                                "a wait sleeps from its first poll (and oversleeps the partner's arrival)"),
    "network-head-bias-gradient-dropped": ("parml/kernels/_numba_network.py", "gc[j] += s", "gc[j] += 0.0",
                                           "the no-autograd path loses the head bias gradient"),
    "network-middle-shard-gradient-slot": ("parml/kernels/network.py", "i = 1 if self.first else 0", "i = 1",
                                           "a shard without an opening writes its block gradients one slot on"),
    "network-loss-over-microbatch-rows": ("parml/kernels/network.py",
                                          "gy, scale = np.empty_like(out), 1.0 / total",
                                          "gy, scale = np.empty_like(out), 1.0 / out.shape[0]",
                                          "the no-autograd loss is a mean over the micro-batch, not over the batch"),
}


def apply(root: Path, name: str) -> None:
    file, old, new, _ = MUTANTS[name]
    path = root / file
    text = path.read_text()
    if text.count(old) != 1:
        raise SystemExit(f"mutant {name}: the text to replace occurs {text.count(old)} times in {file}")
    path.write_text(text.replace(old, new))


def run(name: str, tests: list[str] | None, keyword: str | None) -> list[str]:
    tmp = Path(tempfile.mkdtemp(prefix=f"parml-mutant-{name}-"))
    try:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        for f in files.split():
            if (ROOT / f).is_file():
                (tmp / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / f, tmp / f)
        cache = ROOT / "parml" / "kernels" / "__pycache__"     # numba's compiled kernels (copy2 keeps the
        for f in [*cache.glob("*.nbi"), *cache.glob("*.nbc")]:  # source stamps they are keyed by): no recompile
            (tmp / f.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, tmp / f.relative_to(ROOT))
        apply(tmp, name)
        cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider",
               *(tests or TESTS[MUTANTS[name][0]])]
        if keyword:
            cmd += ["-k", keyword]
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True,
                              env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        if proc.returncode not in (0, 1):     # collection errors, usage: the mutant broke the code, not a test
            raise SystemExit(f"mutant {name}: the tests did not run (pytest exit {proc.returncode}):\n"
                             f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        return re.findall(r"^FAILED (\S+)", proc.stdout, flags=re.M)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help=f"mutants to run (default: all): {', '.join(MUTANTS)}")
    ap.add_argument("--tests", nargs="+", default=None, help="test files (default: each mutant's relevant ones)")
    ap.add_argument("-k", dest="keyword", default=None, help="pytest -k expression (e.g. 'not mpi')")
    ap.add_argument("--markdown", action="store_true", help="print the table mutant -> killing tests at the end")
    args = ap.parse_args()
    unknown = [n for n in args.names if n not in MUTANTS]
    if unknown:
        ap.error(f"unknown mutant {unknown[0]!r} (valid: {', '.join(MUTANTS)})")
    survivors, table = [], []
    for name in args.names or list(MUTANTS):
        failed = run(name, args.tests, args.keyword)
        print(f"## {name}: {MUTANTS[name][3]} -> {'KILLED' if failed else 'SURVIVED'} ({len(failed)} failing)")
        for f in failed:
            print(f"   {f}")
        sys.stdout.flush()
        table.append((name, failed))
        if not failed:
            survivors.append(name)
    if args.markdown:
        print("\n| mutant | file | killed by |\n|---|---|---|")
        for name, failed in table:
            print(f"| {name}: {MUTANTS[name][3]} | {MUTANTS[name][0]} | "
                  f"{'<br>'.join(failed) if failed else '**SURVIVED**'} |")
    if survivors:
        print("surviving mutants:", ", ".join(survivors))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
