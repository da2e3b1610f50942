"""Zang's regression study: shallow vs deep vs multilevel ODE ResNets, Euler vs RK2.

    python benchmarks/zang_regression.py [--quick] [--out benchmarks/results/zang] [--activation tanh]

The thesis (§5.1, §6.1): f(x) = cos²(x)·sin(x²) on [0, 2π], 2000 training points with Gaussian noise
of standard deviation 1/500, 1500 noise-free test points; width 32, sigmoid, MSE, Adam with
learning rate 0.005, 50 epochs of mini-batches of 256. The shallow network has the coarse number
of residual blocks (h = 1), the deep one twice as many (h = 1/2); the multilevel run trains the
shallow network for the first half of the epochs, copies each block (h halved) and trains the deep
one for the second half (``--cascade 1``; K = 4 -> 8 -> 16 with thirds for ``--cascade 2``).

Deviations, measured: with one-layer blocks F(y) = σ(W y + b) (the thesis's blocks have two linear
layers) neither sigmoid nor tanh leaves the constant fit (test MSE 0.14) in 50 epochs, so the
default is tanh and 300 epochs (``--activation``, ``--epochs``); the cascade's learning rate is
cosine-annealed per stage, the single-level runs keep it constant. The RK2 study repeats deep and
multilevel training with the midpoint rule on f(x) = cos(x²)·cos(x)·sin(x²) (the thesis: 8000
epochs at lr 0.001; here the same budget as above). Depth is a power of two so that the hierarchy
halves it: shallow K = 2, deep K = 4 (the thesis's 2 and 3 blocks), and K = 8 / 16 for a deeper
pair; MG/OPT (multilevel SGD, L = 2 and 3) runs on the deep networks with the same epoch budget.

Every run is ``parml.training.trainer.train`` on one process (float32), timed through its
``around_cycle`` hook. Outputs in ``--out``: ``results.json``, ``zang_regression.md`` (final test
MSE, seconds, work units) and ``zang_regression.png`` (the fitted curves against the truth).
About three minutes; ``--quick`` (10 epochs) takes seconds and only checks that it runs.
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parml.comm import SelfComm  # noqa: E402
from parml.config import TrainConfig  # noqa: E402
from parml.data import REGRESSION_FUNCTIONS, load_dataset  # noqa: E402

from benchmarks.harness import (Machine, add_kernel_option, command_line, pyplot, save, table,  # noqa: E402
                                timed_train, write_outputs)

BATCH, LR, WIDTH, T = 256, 0.005, 32, 2.0
EPOCHS, QUICK_EPOCHS = 300, 10


@dataclass
class Setup:
    epochs: int
    activation: str
    seed: int
    batch: int = BATCH
    lr: float = LR
    width: int = WIDTH
    T: float = T
    optimizer: str = "adam"
    quick: bool = False
    kernel: str | None = None       # --kernel (None: results from before the option, torch chunks)


@dataclass
class Row:
    function: str
    stepper: str
    run: str
    test_mse: float
    test_l2_error: float
    seconds: float          # the whole train() call
    train_s: float          # inside the step / V-cycle calls
    work_units: float
    epochs: int


@dataclass
class Results:
    setup: Setup
    meta: Machine
    rows: list[Row] = field(default_factory=list)
    curves: dict[str, list[float]] = field(default_factory=dict)   # "function-stepper|run" -> f on the grid


def plan(activation: str, epochs: int) -> list[tuple[str, str, dict]]:
    """(name, function-stepper, TrainConfig overrides): the thesis's comparisons."""
    base = dict(levels=1, optimizer="adam", lr=LR, batch_size=BATCH, activation=activation, T=T, beta=0.0)
    per_epoch = math.ceil(2000 / BATCH)
    out = []
    for fn, stepper in (("cos2sin", "euler"), ("coscos_sin", "euler"), ("coscos_sin", "rk2")):
        b, tag = dict(base, stepper=stepper), f"{fn}-{stepper}"
        if fn == "cos2sin":
            out.append(("shallow K=2", tag, dict(b, blocks=2, max_epochs=epochs)))
        out.append(("deep K=4", tag, dict(b, blocks=4, max_epochs=epochs)))
        out.append(("multilevel K=2->4 (cascade)", tag, dict(b, blocks=4, cascade=1, cascade_cycles=(epochs // 2)
                                                             * per_epoch, max_epochs=epochs - epochs // 2)))
        if fn == "cos2sin":
            out.append(("deep K=16", tag, dict(b, blocks=16, max_epochs=epochs)))
            out.append(("multilevel K=4->8->16 (cascade)", tag,
                        dict(b, blocks=16, cascade=2, cascade_cycles=(epochs // 3) * per_epoch,
                             max_epochs=epochs - 2 * (epochs // 3))))
            out.append(("MG/OPT L=2 K=4", tag, dict(b, blocks=4, levels=2, max_epochs=epochs)))
            out.append(("MG/OPT L=3 K=16", tag, dict(b, blocks=16, levels=3, max_epochs=epochs)))
    return out


def run(setup: Setup, runs_dir: str, argv) -> Results:
    res = Results(setup, Machine.now(command_line("zang_regression.py", argv)))
    data = {fn: load_dataset("regression", seed=setup.seed, function=fn) for fn in ("cos2sin", "coscos_sin")}
    grid = torch.linspace(0, 2 * math.pi, 600, dtype=torch.float64)[:, None]
    for name, tag, over in plan(setup.activation, setup.epochs):
        fn, stepper = tag.split("-")
        cfg = TrainConfig(overwrite=True, dataset="regression", width=WIDTH, seed=setup.seed, target_accuracy=None,
                          max_cycles=10 ** 6, eval_every=80, progress=False, out=runs_dir,
                          run_name=f"{tag}-{name.split(' (')[0].replace(' ', '').replace('/', '').replace('>', '')}",
                          kernel=setup.kernel or "auto", **over)
        r, levels, _ = timed_train(cfg, SelfComm(), data[fn])
        model, d = levels[-1].executor.model, data[fn]
        with torch.no_grad():
            mse = float(torch.nn.functional.mse_loss(model(d.x_val.float()), d.y_val.float()))
            res.curves[f"{tag}|{name}"] = model(grid.float()).squeeze(1).tolist()
        res.rows.append(Row(fn, stepper, name, mse, math.sqrt(mse * d.x_val.shape[0]), r.seconds, r.train_s,
                            r.work_units, setup.epochs))
        print(f"{tag:18s} {name:34s} test MSE {mse:.2e}  {r.seconds:5.1f} s  {r.work_units:7.1f} U", flush=True)
    res.meta.finish()
    return res


def markdown(res: Results) -> list[str]:
    s = res.setup
    return [f"# Zang's regression study (width {s.width}, {s.activation}, Adam lr {s.lr}, {s.epochs} epochs of "
            f"{s.batch}, T = {s.T}, seed {s.seed}, float32, 1 process)", "",
            *(["**Quick run** (10 epochs): checks that every run trains, not a measurement.", ""] if s.quick else []),
            f"Command: `{res.meta.command}`; {res.meta.load_text()}.", "",
            "Test MSE on the 1500 noise-free test points; work units = gradient evaluations in units of one "
            "full-depth gradient (cascade stages count K_stage/K); *seconds*: the whole run, *train s*: inside the "
            "step / V-cycle calls (`train`'s `around_cycle` hook).", "",
            *table(["function", "stepper", "run", "test MSE", "seconds", "train s", "work units"],
                   [[r.function, r.stepper, r.run, f"{r.test_mse:.2e}", f"{r.seconds:.1f}", f"{r.train_s:.1f}",
                     f"{r.work_units:.0f}"] for r in res.rows])]


def plot(res: Results, path) -> None:
    plt = pyplot()
    grid = torch.linspace(0, 2 * math.pi, 600, dtype=torch.float64)[:, None]
    tags = list(dict.fromkeys(f"{r.function}-{r.stepper}" for r in res.rows))
    fig, axes = plt.subplots(1, len(tags), figsize=(6.4 * len(tags), 5.0), squeeze=False, layout="constrained")
    for ax, tag in zip(axes[0], tags):
        ax.plot(grid[:, 0], REGRESSION_FUNCTIONS[tag.split("-")[0]](grid)[:, 0], "k", lw=2.5, alpha=0.35,
                label="truth")
        for r in (r for r in res.rows if f"{r.function}-{r.stepper}" == tag):
            ax.plot(grid[:, 0], res.curves[f"{tag}|{r.run}"], lw=1.2, label=f"{r.run} (MSE {r.test_mse:.1e})")
        ax.set_title(tag)
        ax.set_xlabel("x")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=9)
    save(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/zang")
    ap.add_argument("--activation", default="tanh")
    ap.add_argument("--epochs", type=int, default=None,
                    help=f"epochs per run (default {EPOCHS}; --quick {QUICK_EPOCHS})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_EPOCHS} epochs: checks that every run trains")
    add_kernel_option(ap)
    ap.add_argument("--keep-runs", action="store_true", help="keep the run folders under OUT/runs")
    args = ap.parse_args(argv)
    epochs = args.epochs if args.epochs is not None else (QUICK_EPOCHS if args.quick else EPOCHS)
    if epochs < 3:
        ap.error(f"--epochs {epochs} must be at least 3 (the cascade trains thirds)")
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="parml-zang-"))
    try:
        res = run(Setup(epochs, args.activation, args.seed, quick=args.quick, kernel=args.kernel),
                  str(Path(args.out) / "runs" if args.keep_runs else tmp), argv)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_outputs(Path(args.out), "zang_regression", res, markdown, plot)
    print("\n".join(markdown(res)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
