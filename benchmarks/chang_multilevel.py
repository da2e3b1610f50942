"""Chang et al.: multilevel training of a conv ODE ResNet vs direct deep training, same epochs.

    python benchmarks/chang_multilevel.py [--quick] [--seeds 3] [--data-dir CIFAR_DIR]
                                          [--out benchmarks/results/chang]

1. Training comparison (Chang et al., "Multi-level residual networks from dynamical systems view"):
   per seed, *direct* (K blocks per stage, N steps, cosine lr) vs *multilevel* (parml ``cascade=2``:
   N/3 steps at K/4, interpolation — each block copied, h halved —, N/3 at K/2, N/3 at K; lr and
   momentum restart each stage), both ``train`` with ``arch="conv"``, SGD momentum 0.9, weight
   decay 2e-4 (Tikhonov β = 1e-4), one process. Reported: held-out accuracy, work units, wall and
   training time (``train``'s ``around_cycle`` hook, median step time per depth), the time saved
   next to 1 - (2^(k+1) - 1) / (2^k (k + 1)) = 41.7 % and the saving the step times predict.
   Data: MNIST t10k (8000/2000) at 14x14 from ``--mnist-dir``, or CIFAR-10 binary batches at 16x16
   with ``--data-dir``. Network: 3x3 conv opening, two conv stages of K = 16 blocks (8, 16
   channels), ReLU, T = 1, forward Euler, linear classifier on the flattened state; N = 900 steps
   of 100 images, lr 0.2 -> 0.001, 3 seeds.
2. Interpolation accuracy: a conv network (channels 16-32-64, a control smooth in time)
   prolongated from K to 2K blocks per stage (copy — Chang — or linear — Haber); the largest output
   change should fall like O(h).
3. The theoretical saving of k = 1..4 interpolations (``parml.multilevel.cascade.theoretical_saving``).

Outputs in ``--out``: ``chang_multilevel.md``, ``results.json``, ``chang_multilevel.png``.
``--quick``: 2000/1000 images, K = 4 blocks per stage, N = 60, one seed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from parml.data import default_mnist_dir  # noqa: E402
from parml.model import ModelSpec, StageSpec, build_model  # noqa: E402
from parml.multilevel.cascade import theoretical_saving  # noqa: E402
from parml.multilevel.hierarchy import prolongate_model  # noqa: E402

from benchmarks.chang.records import CHANNELS, Analysis, Config, Pair, Results, Setup  # noqa: E402
from benchmarks.chang.render import markdown, plot  # noqa: E402
from benchmarks.harness import DataFolder, Machine, command_line, from_json, pct, write_outputs  # noqa: E402
from benchmarks.multilevel_init import (EQUAL_ACC, CascadeRun, budget_options, pair_run, saved)  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETUPS = {"mnist": Setup(14, "8,16", 0.2), "cifar10": Setup(16, "16,32", 0.1)}
QUICK = {"n_train": 2000, "n_val": 1000, "blocks": 4, "budget": 60, "eval_every": 10}


# --------------------------------------------------------------------------- interpolation accuracy
def spec(k):
    return ModelSpec(3 * 8 * 8, 10, tuple(StageSpec(c, k, "conv", 1 if i == 0 else 2) for i, c in enumerate(CHANNELS)),
                     T=1.0, activation="relu", input_shape=(3, 8, 8))


def gaps(interpolation, depths=(2, 4, 8, 16)) -> list[tuple[int, float]]:
    """max |f_2K(x) - f_K(x)| for a control smooth in time, prolongated K -> 2K blocks per stage."""
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    base = build_model(spec(1), seed=1, dtype=torch.float64)
    out = []
    for k in depths:
        coarse = build_model(spec(k), seed=1, dtype=torch.float64)
        with torch.no_grad():
            t = torch.arange(k, dtype=torch.float64) / k
            for c, b in zip(coarse.chunks, base.chunks):
                c.weight.copy_(torch.sin(3 * t)[:, None, None, None, None] * b.weight * 4)
                c.bias.copy_(torch.cos(2 * t)[:, None] * 0.3)
            for name in ("opening", "head", "projections"):
                getattr(coarse, name).load_state_dict(getattr(base, name).state_dict())
        fine = build_model(spec(2 * k), seed=9, dtype=torch.float64)
        prolongate_model(coarse, fine, interpolation)
        with torch.no_grad():
            out.append((k, float((fine(x) - coarse(x)).abs().max())))
    return out


# --------------------------------------------------------------------------- training comparison
def load_data(name: str, data_dir: str, s: Setup, seed: int):
    """The held-out split of `name` as float32 images [n, C, H, W] at the setup's resolution."""
    from parml.data import load_dataset
    if name == "mnist":
        return load_dataset("mnist", data_dir, seed=seed, flatten=False, n_train=s.n_train, n_val=s.n_val,
                            resolution=s.resolution)
    d = load_dataset("cifar10", data_dir, seed=seed, flatten=False, n_train=s.n_train, n_val=s.n_val)
    k = d.input_shape[-1] // s.resolution
    if k > 1:
        xt, xv = (torch.nn.functional.avg_pool2d(x, k) for x in (d.x_train, d.x_val))
        d = dataclasses.replace(d, x_train=xt, x_val=xv, input_shape=tuple(xt.shape[1:]),
                                name=f"{d.name}@{s.resolution}x{s.resolution}")
    return d


def run_one(name: str, s: Setup, mode: str, seed: int, data, runs_dir: str) -> CascadeRun:
    from parml.config import TrainConfig
    cfg = TrainConfig(overwrite=True, dataset=name, arch="conv", channels=s.channels, head=s.head, blocks=s.blocks,
                      levels=1, optimizer="momentum", lr=s.lr, lr_min=s.lr_min, lr_schedule="cosine", beta=s.beta,
                      cascade_interpolation="constant", batch_size=s.batch_size, seed=seed, target_accuracy=None,
                      eval_every=s.eval_every, out=runs_dir, run_name=f"{name}-{mode}-K{s.blocks}-s{seed}",
                      backend="self", progress=False, **budget_options(mode, s.budget))
    return pair_run(cfg, data, dataset=name, mode=mode, seed=seed, blocks=s.blocks, budget=s.budget)


def analyse(runs: list[CascadeRun]) -> Analysis:
    an = Analysis()
    for d in (r for r in runs if r.mode == "direct"):
        for m in [r for r in runs if r.mode == "multilevel" and r.seed == d.seed][:1]:
            ms, depths = m.step_ms, sorted(m.step_ms)
            expected = 1 - sum(ms[k] for k in depths) / (len(depths) * ms[m.blocks]) if depths else None
            an.pairs.append(Pair(d.seed, d.val_acc, m.val_acc, m.val_acc - d.val_acc,
                                 saved(d.work_units, m.work_units), saved(d.seconds, m.seconds),
                                 saved(d.train_s, m.train_s), expected, ms, d.step_ms[d.blocks]))
    if an.pairs:
        keys = ("acc_direct", "acc_multilevel", "acc_diff", "work_saved", "time_saved", "train_time_saved",
                "expected_saving")
        vals = {k: [getattr(p, k) for p in an.pairs] for k in keys}
        an.mean = {k: statistics.fmean(v) for k, v in vals.items()}
        an.std = {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in vals.items()}
        an.equal_accuracy, an.n = all(abs(p.acc_diff) <= EQUAL_ACC for p in an.pairs), len(an.pairs)
    return an


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2000/1000 images, K=4 per stage, N=60, one seed")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "chang"))
    ap.add_argument("--seeds", type=int, default=None, help="seeds (default 3; --quick 1)")
    ap.add_argument("--data-dir", default=None, help="CIFAR-10 binary batches (data_batch_*.bin / test_batch.bin); "
                    "default: MNIST from --mnist-dir")
    ap.add_argument("--mnist-dir", default=default_mnist_dir(), help="MNIST IDX files (used without --data-dir)")
    ap.add_argument("--render", action="store_true", help="only rewrite the outputs from OUT/results.json")
    args = ap.parse_args(argv)
    if args.render:                      # results written before the harness kept training_s in meta
        data = json.loads((Path(args.out) / "results.json").read_text())
        res = from_json(Results, {"training_s": data["meta"].get("training_s", 0.0), **data})
        res.analysis = analyse(res.runs)
        write_outputs(Path(args.out), "chang_multilevel", res, markdown, plot)
        return 0
    torch.set_num_threads(1)
    from parml.data import DataError
    name, data_dir = ("cifar10", args.data_dir) if args.data_dir else ("mnist", args.mnist_dir)
    if not data_dir or not os.path.isdir(data_dir):
        ap.error(f"--{'data' if name == 'cifar10' else 'mnist'}-dir {data_dir!r} is not a directory")
    setup = dataclasses.replace(SETUPS[name], **(QUICK if args.quick else {}))
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    if seeds < 1:
        ap.error(f"--seeds {seeds} must be at least 1")
    try:
        datasets = [load_data(name, data_dir, setup, seed) for seed in range(seeds)]
    except DataError as e:
        ap.error(str(e))
    res = Results(Config(name, seeds, setup, args.quick, data=DataFolder.of(data_dir)),
                  Machine.now(command_line("chang_multilevel.py", argv)), datasets[0].name)
    tmp = Path(tempfile.mkdtemp(prefix="parml-chang-"))
    try:  # untimed warm-up first: the first training in a process pays one-off costs
        for mode in ("direct", "multilevel"):
            run_one(name, dataclasses.replace(setup, blocks=4, budget=6, eval_every=3), mode, 0, datasets[0],
                    str(tmp / "warm-up"))
        for seed, data in enumerate(datasets):     # alternate the order: a drifting load favours neither
            for mode in ("direct", "multilevel") if seed % 2 == 0 else ("multilevel", "direct"):
                r = run_one(name, setup, mode, seed, data, str(tmp / "runs"))
                res.runs.append(r)
                print(f"{name} K={setup.blocks} N={setup.budget} seed {seed} {mode:10s}: held-out acc "
                      f"{r.val_acc:.4f} (best {r.best_val_acc:.4f}), {r.work_units:6.1f} U, {r.seconds:6.1f} s "
                      f"(train {r.train_s:6.1f} s)", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res.training_s = res.meta.finish().elapsed_s
    res.gaps = {i: gaps(i, (2, 4, 8) if args.quick else (2, 4, 8, 16)) for i in ("constant", "linear")}
    res.theoretical_saving = {k: theoretical_saving(k) for k in (1, 2, 3, 4)}
    res.analysis = analyse(res.runs)
    res.meta.finish()
    write_outputs(Path(args.out), "chang_multilevel", res, markdown, plot)
    an, m = res.analysis, res.analysis.mean
    print(f"{name}: time saved {pct(m['time_saved'])} (train {pct(m['train_time_saved'])}, expected "
          f"{pct(m['expected_saving'])}, theoretical {pct(an.theoretical_saving)}), held-out acc direct "
          f"{m['acc_direct']:.4f} / multilevel {m['acc_multilevel']:.4f}", flush=True)
    print(f"wrote {Path(args.out) / 'chang_multilevel.md'} ({res.meta.elapsed_s:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
