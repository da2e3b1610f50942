"""Multilevel initialization (Chang et al.): shallow -> deep training vs direct deep training.

    python benchmarks/cascade.py [--quick] [--out benchmarks/results/cascade] [--seeds 3]

Per dataset and seed, two runs with the same step budget B, data and seed, back to back in one
process (alternating order): *direct* (depth K, B steps, cosine lr) and *cascade* (parml
``cascade=2``: B/3 steps at K/4, K/2 and K, each prolongation copying every block and halving h,
the cosine restarted per stage). Reported: validation accuracy, work units, wall time, training
time (``train``'s ``around_cycle`` hook) and the time saved next to Chang et al.'s
1 - (2^(k+1) - 1) / (2^k (k + 1)) = 41.7 % for k = 2. Circles: K = 1024, B = 300, lr 0.5; MNIST
(8000/2000, mini-batches of 1000): K = 1024, B = 240, lr 0.2. Outputs in ``--out``: ``cascade.md``,
``results.json``, ``cascade.png``. ``--quick``: circles only, K = 128, B = 150, one seed.
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
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parml.data import default_mnist_dir  # noqa: E402
from parml.multilevel.cascade import theoretical_saving  # noqa: E402

from benchmarks.harness import (DataFolder, Machine, add_kernel_option, command_line, from_json, pct,  # noqa: E402
                                pyplot, save, table, write_outputs)
from benchmarks.multilevel_init import (DOUBLINGS, EQUAL_ACC, CascadeRun, budget_options, depth_fit,  # noqa: E402
                                        pair_run, plot_curves, saved, stage_ms, steps_text)

ROOT, GOAL_SAVED = Path(__file__).resolve().parents[1], 0.40


@dataclass
class Setup:
    dataset: str
    blocks: int
    budget: int
    width: int
    lr: float
    lr_min: float
    beta: float
    batch_size: int | None
    eval_every: int


SETUPS = {"circles": Setup("circles", 1024, 300, 3, 0.5, 0.001, 1e-4, None, 10),
          "mnist": Setup("mnist", 1024, 240, 10, 0.2, 0.001, 1e-5, 1000, 10)}
QUICK_CIRCLES = {"blocks": 128, "budget": 150, "eval_every": 5}


@dataclass
class Config:
    seeds: int
    mnist_seeds: int
    datasets: list[str]
    setups: dict[str, Setup]
    quick: bool = False
    data: DataFolder | None = None
    kernel: str | None = None       # --kernel (None: results from before the option, torch chunks)


@dataclass
class Pair:
    dataset: str
    seed: int
    acc_direct: float
    acc_cascade: float
    acc_diff: float
    work_saved: float
    time_saved: float
    train_time_saved: float
    stage_ms: list[tuple[int, float]] = field(default_factory=list)
    fit_a_ms: float | None = None
    fit_b_ms: float | None = None
    fixed_share: float | None = None
    predicted_saving: float | None = None


@dataclass
class Summary:        # means over a dataset's seeds
    acc_direct: float
    acc_cascade: float
    acc_diff: float
    work_saved: float
    time_saved: float
    train_time_saved: float
    time_saved_of_means: float
    equal_accuracy: bool
    goal_met: bool
    n: int
    total_seconds: float


@dataclass
class Analysis:
    theoretical_saving: float = 0.0
    pairs: list[Pair] = field(default_factory=list)
    datasets: dict[str, Summary] = field(default_factory=dict)


@dataclass
class Results:
    config: Config
    meta: Machine
    runs: list[CascadeRun] = field(default_factory=list)
    analysis: Analysis = field(default_factory=Analysis)


def run_one(s: Setup, mode: str, seed: int, data, data_dir, runs_dir: str, kernel: str = "auto") -> CascadeRun:
    from parml.config import TrainConfig
    cfg = TrainConfig(overwrite=True, dataset=s.dataset, data_dir=data_dir, blocks=s.blocks, width=s.width, levels=1,
                      lr=s.lr, lr_min=s.lr_min, lr_schedule="cosine", beta=s.beta, batch_size=s.batch_size, seed=seed,
                      target_accuracy=None, eval_every=s.eval_every, out=runs_dir, backend="self", progress=False,
                      run_name=f"{s.dataset}-{mode}-K{s.blocks}-s{seed}", kernel=kernel,
                      **budget_options(mode, s.budget))
    return pair_run(cfg, data, dataset=s.dataset, mode=mode, seed=seed, blocks=s.blocks, budget=s.budget)


def run(cfg: Config, data_dir, runs_dir: str, argv) -> Results:
    from parml.data import load_dataset
    res = Results(cfg, Machine.now(command_line("cascade.py", argv)))
    for name in cfg.datasets:
        s = cfg.setups[name]
        for seed in range(cfg.seeds if name == "circles" else cfg.mnist_seeds):
            data = load_dataset(name, data_dir if name == "mnist" else None, seed=seed)
            if seed == 0:      # untimed warm-up: the first training in a process pays one-off costs
                for mode in ("direct", "cascade"):
                    run_one(dataclasses.replace(s, blocks=16, budget=6, eval_every=1), mode, seed, data, data_dir,
                            os.path.join(runs_dir, "warm-up"), cfg.kernel or "auto")
            # alternate the order, so that a drifting machine load favours neither
            for mode in ("direct", "cascade") if seed % 2 == 0 else ("cascade", "direct"):
                r = run_one(s, mode, seed, data, data_dir, runs_dir, cfg.kernel or "auto")
                res.runs.append(r)
                print(f"{name:7s} K={s.blocks} B={s.budget} seed {seed} {mode:7s}: val acc {r.val_acc:.4f} "
                      f"(best {r.best_val_acc:.4f}), {r.work_units:7.1f} U, {r.seconds:6.1f} s "
                      f"(train {r.train_s:6.1f} s)", flush=True)
    res.meta.finish()
    return res


def analyse(res: Results) -> Analysis:
    an = Analysis(theoretical_saving(DOUBLINGS))
    for name in res.config.datasets:
        runs = [r for r in res.runs if r.dataset == name]
        pairs = []
        for d in (r for r in runs if r.mode == "direct"):
            for c in [r for r in runs if r.mode == "cascade" and r.seed == d.seed][:1]:
                p = Pair(name, d.seed, d.val_acc, c.val_acc, c.val_acc - d.val_acc, saved(d.work_units, c.work_units),
                         saved(d.seconds, c.seconds), saved(d.train_s, c.train_s), stage_ms(c))
                if len(p.stage_ms) >= 2:
                    for k, v in depth_fit(p.stage_ms, c.blocks).items():
                        setattr(p, k, v)
                pairs.append(p)
        if not pairs:
            continue
        m = {k: statistics.fmean(getattr(p, k) for p in pairs)
             for k in ("acc_direct", "acc_cascade", "acc_diff", "work_saved", "time_saved", "train_time_saved")}
        secs = {mode: statistics.fmean(r.seconds for r in runs if r.mode == mode) for mode in ("direct", "cascade")}
        equal = all(abs(p.acc_diff) <= EQUAL_ACC for p in pairs)
        an.datasets[name] = Summary(**m, time_saved_of_means=saved(secs["direct"], secs["cascade"]),
                                    equal_accuracy=equal, goal_met=equal and m["time_saved"] >= GOAL_SAVED,
                                    n=len(pairs), total_seconds=sum(r.seconds for r in runs))
        an.pairs += pairs
    return an


def markdown(res: Results) -> list[str]:
    cfg, an, meta = res.config, res.analysis, res.meta
    th = an.theoretical_saving
    L = ["# Multilevel initialization (shallow -> deep) vs direct deep training", ""]
    if cfg.quick:
        L += ["**Quick run** (small K and budget, one seed): a smoke test, not a measurement.", ""]
    L += [f"Command: `{meta.command}`", "",
          f"Machine: {meta.cpu_count} CPU cores shared with other jobs, torch {meta.torch}, float32, one process, one "
          f"thread. Load average before/after: {meta.loadavg_start} / {meta.loadavg_end}. Total time "
          f"{meta.elapsed_s:.0f} s.", "",
          "Same data, seed and step budget B for both. *direct*: B steps at depth K, cosine learning rate over B. "
          f"*cascade* (parml `cascade={DOUBLINGS}`, Chang et al. with k = {DOUBLINGS} interpolations): B/3 steps at "
          "K/4, B/3 at K/2, B/3 at K, each stage with its own cosine schedule, each prolongation copying every block "
          "and halving h. *U*: work units (one depth-K gradient = 1; depth K/4 costs 1/4). *wall s*: "
          "`summary[\"seconds\"]` (training, validation every few steps, prolongations); *train s*: inside the step "
          "calls only (`train`'s `around_cycle` hook). *saved* = 1 − t_cascade / t_direct; theoretical (Chang et "
          f"al.) 1 − (2^(k+1) − 1)/(2^k (k+1)) = **{pct(th)}** for k = {DOUBLINGS}, which is also the work saved.", ""]
    for name in cfg.datasets:
        L += dataset_section(res, name)
    L += ["## Goal", "", f"≥ {pct(GOAL_SAVED)} of the time saved at equal accuracy (|Δ val acc| ≤ {EQUAL_ACC}).", ""]
    for name, m in an.datasets.items():
        acc = (f"accuracy equal within {EQUAL_ACC} for every seed" if m.equal_accuracy else
               f"accuracy differs by more than {EQUAL_ACC} (mean direct {m.acc_direct:.4f}, cascade "
               f"{m.acc_cascade:.4f})")
        L.append(f"* {name}: mean time saved {pct(m.time_saved)} (train only {pct(m.train_time_saved)}; theoretical "
                 f"{pct(th)}); {acc}. Goal **{'met' if m.goal_met else 'not met'}**.")
    return L + ["", "Curves: `cascade.png`; every number and curve: `results.json`."]


def dataset_section(res: Results, name: str) -> list[str]:
    s, th, m = res.config.setups[name], res.analysis.theoretical_saving, res.analysis.datasets.get(name)
    runs = sorted((r for r in res.runs if r.dataset == name), key=lambda r: (r.seed, r.mode != "direct"))
    L = [f"## {name}", "",
         f"K = {s.blocks}, B = {s.budget} steps, width {s.width}, lr {s.lr} → {s.lr_min} (cosine), β {s.beta:g}, "
         + ("full batch" if s.batch_size is None else f"mini-batches of {s.batch_size}")
         + f", validation every {s.eval_every} steps.", "",
         *table(["seed", "run", "steps (depths)", "final val acc", "best val acc", "final train loss", "U", "wall s",
                 "train s"], [[r.seed, r.mode, steps_text(r), f"{r.val_acc:.4f}", f"{r.best_val_acc:.4f}",
                               f"{r.final_loss:.4f}", f"{r.work_units:.1f}", f"{r.seconds:.1f}", f"{r.train_s:.1f}"]
                              for r in runs]), ""]
    pairs = [p for p in res.analysis.pairs if p.dataset == name]
    if not pairs:
        return L
    rows = [[p.seed, f"{p.acc_direct:.4f} / {p.acc_cascade:.4f}", pct(p.work_saved), f"**{pct(p.time_saved)}**",
             pct(p.train_time_saved), pct(th)] for p in pairs]
    rows.append(["mean", f"{m.acc_direct:.4f} / {m.acc_cascade:.4f}", pct(m.work_saved), f"**{pct(m.time_saved)}**",
                 pct(m.train_time_saved), pct(th)])
    L += table(["seed", "val acc direct / cascade", "work saved", "**time saved (wall)**", "time saved (train)",
                "theoretical"], rows) + [""]
    fits = [p for p in pairs if p.fit_a_ms is not None]
    if fits:
        L += ["Step time per depth in the cascade runs (ms per step, validations included) and the fit t(depth) = "
              "a + b·depth: *a* is the part of a step that does not shrink with the depth (data, opening and head "
              "layers, per-step overhead); with it the expected saving is 1 − Σ t(depth_i) / (3 t(K)) instead of "
              "Chang's formula.", "",
              *table(["seed", "ms per step (" + ", ".join(str(d) for d, _ in fits[0].stage_ms) + " blocks)", "a ms",
                      "b ms per block", "a / t(K)", "expected saving"],
                     [[p.seed, ", ".join(f"{t:.1f}" for _, t in p.stage_ms), f"{p.fit_a_ms:.2f}",
                       f"{p.fit_b_ms:.4f}", pct(p.fixed_share), pct(p.predicted_saving)] for p in fits]), ""]
    return L


def plot(res: Results, path) -> None:
    plt = pyplot()
    names = res.config.datasets
    fig, axes = plt.subplots(1, len(names), figsize=(6.8 * len(names), 4.6), squeeze=False, layout="constrained")
    for ax, name in zip(axes[0], names):
        s = res.config.setups[name]
        plot_curves(ax, [r for r in res.runs if r.dataset == name], "seconds")
        ax.set_ylabel("validation accuracy")
        ax.set_title(f"{name}, K={s.blocks}, B={s.budget}\n(cascade: K/4, K/2, K; stage ends dotted)")
        ax.legend(loc="lower right")
    save(fig, path)


def finish(res: Results, out: Path) -> int:
    res.analysis = analyse(res)
    write_outputs(out, "cascade", res, markdown, plot)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="circles only, K=128, B=150, one seed (< 60 s)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cascade"))
    ap.add_argument("--seeds", type=int, default=None, help="circles seeds (default 3)")
    ap.add_argument("--mnist-seeds", type=int, default=None, help="MNIST seeds (default 3)")
    ap.add_argument("--datasets", default=None, help="comma-separated: circles,mnist")
    ap.add_argument("--data-dir", default=default_mnist_dir())
    add_kernel_option(ap)
    ap.add_argument("--keep-runs", action="store_true", help="keep the run folders under OUT/runs")
    ap.add_argument("--render", action="store_true", help="only rewrite the outputs from OUT/results.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.render:
        return finish(from_json(Results, json.loads((out / "results.json").read_text())), out)
    datasets = ["circles"] if args.quick else ["circles", "mnist"]
    if args.datasets:
        datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
        if any(d not in SETUPS for d in datasets):
            ap.error(f"--datasets {args.datasets!r}: valid: {', '.join(SETUPS)}")
    if "mnist" in datasets and not args.data_dir:
        ap.error("MNIST needs --data-dir (default ../shared/data/mnist not found)")
    setups = {n: dataclasses.replace(SETUPS[n], **(QUICK_CIRCLES if args.quick and n == "circles" else {}))
              for n in datasets}
    for n, s in setups.items():
        if s.budget % (DOUBLINGS + 1) or s.blocks % 2 ** DOUBLINGS:
            ap.error(f"{n}: the budget must divide by {DOUBLINGS + 1} and K by {2 ** DOUBLINGS}")
    default_seeds = 1 if args.quick else 3
    cfg = Config(args.seeds or default_seeds, args.mnist_seeds or default_seeds, datasets, setups, args.quick,
                 DataFolder.of(args.data_dir) if "mnist" in datasets else None, args.kernel)
    import torch
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="parml-cascade-"))
    try:
        res = run(cfg, args.data_dir, str(out / "runs" if args.keep_runs else tmp / "runs"), argv)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    finish(res, out)
    for name, m in res.analysis.datasets.items():
        print(f"{name}: time saved {pct(m.time_saved)} (theoretical {pct(res.analysis.theoretical_saving)}), "
              f"val acc direct {m.acc_direct:.4f} / cascade {m.acc_cascade:.4f}", flush=True)
    print(f"wrote {out / 'cascade.md'} ({res.meta.elapsed_s:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
