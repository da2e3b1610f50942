"""Haber et al.: classify across resolutions with Galerkin-restricted / prolongated conv kernels.

    python benchmarks/haber_resolution.py [--data-dir ../shared/data/mnist] [--seeds 0 1 2 3 4] [--quick]

Per seed, two conv ODE ResNets are trained independently, one on 28x28 MNIST and one on the same
images restricted to 14x14 (full weighting, ``parml.multiscale.restrict_image``). As in the paper,
the images are convolved with a Gaussian (``--blur`` sigma, in 28x28 pixels) before they are
restricted; here the 28x28 images are the same blurred images, so both resolutions sample one
image (``--blur 0``: raw digits). Then, with no further training:

* the 28x28 network classifies the 14x14 images with its 3x3 kernels replaced by their Galerkin
  products K_H = R K_h P (``restrict_model``) vs the same kernels unadapted (paper: 94.9 % vs 84.1 %);
* the 14x14 network classifies the 28x28 images with prolongated kernels (``prolongate_model``)
  vs the same kernels unadapted (paper: 91.0 % vs 61.0 %), also on the unblurred 28x28 digits.

Network (both): 3x3 conv opening 1 -> 8 channels, stage of 2 conv blocks (8 channels), 1x1 conv
projection to 16 channels, stage of 2 conv blocks, tanh, T = 1, forward Euler, and a linear
classifier on the flattened final state (as in the paper; its weights are moved between
resolutions as images, keeping <W, y>). No pooling ("for simplicity we have ignored the pooling
layer"); ``--pool`` puts 2x2 average pooling before the projection instead. Training adds
``--kernel-smoothness`` beta * sum ||D s_h||^2 to the loss, the squared neighbour differences of
every 3x3 stencil *at the 28x28 resolution*: s itself for the 28x28 network, its prolongation
G^-1 s for the 14x14 one (the kernels prolongation will produce), standing in for the paper's
derivative-based regularization. Adam, mini-batches of 100, float32, one process. Data: the t10k
file split 8000/2000 (the only MNIST file here; the paper used 50,000/10,000 and Gauss-Newton
block-coordinate descent).

Outputs in ``--out``: ``results.json`` (every seed), ``haber_resolution.md`` (mean and range over
seeds, per-seed rows), ``haber_resolution.png``. About 65 s per seed; ``--quick`` (1 seed, 1000
images, 1 epoch) takes seconds and only checks that the pipeline runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parml.data import DataError, batches, default_mnist_dir, load_dataset  # noqa: E402
from parml.model import ModelSpec, StageSpec, build_model  # noqa: E402
from parml.multilevel.multiscale import (gaussian_blur, prolongate_image, prolongate_kernel,  # noqa: E402
                                         prolongate_model, prolongation_matrix, restrict_image, restrict_model)

from benchmarks.haber.records import PAPER, ROWS, Config, Results, SeedRun, Spread, Summary  # noqa: E402, F401
from benchmarks.haber.render import plot, report  # noqa: E402
from benchmarks.harness import DataFolder, Machine, command_line, from_json, write_outputs  # noqa: E402

QUICK = {"epochs": 1, "n_train": 1000, "n_val": 500}


def spec_for(size, pool=False):
    return ModelSpec(size * size, 10, (StageSpec(8, 2, "conv"), StageSpec(16, 2, "conv", 2 if pool else 1)),
                     T=1.0, activation="tanh", input_shape=(1, size, size), projection="avgpool", head="flatten")


def stencils(model):
    return [model.opening.weight] + [c.weight for c in model.chunks]


def fine_scale_roughness(model, ginv=None):
    """sum over every 3x3 stencil of ||D s_h||^2, s_h the stencil at the 28x28 resolution: s itself,
    or, for a 14x14 network, G^-1 s (``ginv`` = ``prolongation_matrix()``), the kernel
    ``prolongate_kernel`` will produce."""
    total = 0
    for k in stencils(model):
        if ginv is not None:
            k = (k.reshape(-1, 9) @ ginv.T).reshape(k.shape)
        total = total + (k[..., 1:, :] - k[..., :-1, :]).square().sum() + (k[..., 1:] - k[..., :-1]).square().sum()
    return total


def train(model, x, y, epochs, lr, seed, beta, coarse):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    ginv = prolongation_matrix(model.opening.weight.dtype) if coarse else None
    for e in range(epochs):
        for idx in batches(x.shape[0], 100, seed, e):
            opt.zero_grad()
            loss = model.loss(model(x[idx]), y[idx])
            if beta:
                loss = loss + beta * fine_scale_roughness(model, ginv)
            loss.backward()
            opt.step()
    return model


def prolongation_gain(model):
    """||prolongate_kernel(s)|| / ||s|| over all 3x3 stencils of `model` (1 would be harmless)."""
    ks = [k.detach() for k in stencils(model)]
    return float(sum(prolongate_kernel(k).square().sum() for k in ks).sqrt() / sum(k.square().sum() for k in ks).sqrt())


def non_smooth_fraction(x):
    """|(I - P R) x| / |x|: the part of 28x28 images that no 14x14 image interpolates to."""
    return float((x - prolongate_image(restrict_image(x))).norm() / x.norm())


@torch.no_grad()
def accuracy(model, x, y):
    return 100.0 * float((model(x).argmax(1) == y).double().mean())


def run_seed(seed: int, args, sizes: dict) -> SeedRun:
    """Train both networks for one seed and evaluate every transfer."""
    d = load_dataset("mnist", args.data_dir, seed=seed, flatten=False, **sizes)
    fine = {k: (gaussian_blur(x, args.blur), y) for k, (x, y) in
            {"train": (d.x_train, d.y_train), "val": (d.x_val, d.y_val)}.items()}
    coarse = {k: (restrict_image(x), y) for k, (x, y) in fine.items()}
    t0 = time.perf_counter()
    net_h = train(build_model(spec_for(28, args.pool), seed=seed), *fine["train"], args.epochs, args.lr, seed,
                  args.kernel_smoothness, coarse=False)
    t_h = time.perf_counter() - t0
    t0 = time.perf_counter()
    net_H = train(build_model(spec_for(14, args.pool), seed=seed), *coarse["train"], args.epochs, args.lr, seed,
                  args.kernel_smoothness, coarse=True)
    t_H = time.perf_counter() - t0
    up, up_copy = prolongate_model(net_H), prolongate_model(net_H, adapt=False)
    acc = {
        "fine_native": accuracy(net_h, *fine["val"]),
        "coarse_native": accuracy(net_H, *coarse["val"]),
        "restricted": accuracy(restrict_model(net_h), *coarse["val"]),
        "restricted_unadapted": accuracy(restrict_model(net_h, adapt=False), *coarse["val"]),
        "prolongated": accuracy(up, *fine["val"]),
        "prolongated_unadapted": accuracy(up_copy, *fine["val"]),
        "prolongated_raw": accuracy(up, d.x_val, d.y_val),
        "prolongated_unadapted_raw": accuracy(up_copy, d.x_val, d.y_val),
        "fine_on_interpolated": accuracy(net_h, prolongate_image(coarse["val"][0]), fine["val"][1]),
    }
    return SeedRun(seed, acc, {"train_28": t_h, "train_14": t_H}, prolongation_gain(net_H), d.name,
                   {"val_28": non_smooth_fraction(fine["val"][0]), "val_28_unblurred": non_smooth_fraction(d.x_val)})


def summarize(runs: list[SeedRun]) -> Summary:
    """Mean, min and max over seeds of every accuracy, and how many seeds the adapted kernels won."""
    out = Summary()
    for key in runs[0].accuracy_percent:
        v = [r.accuracy_percent[key] for r in runs]
        out.accuracy[key] = Spread(statistics.fmean(v), min(v), max(v))
    for adapted, copy in (("restricted", "restricted_unadapted"), ("prolongated", "prolongated_unadapted"),
                          ("prolongated_raw", "prolongated_unadapted_raw")):
        setattr(out, f"{adapted}_wins", sum(r.accuracy_percent[adapted] > r.accuracy_percent[copy] for r in runs))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=default_mnist_dir())
    ap.add_argument("--out", default="benchmarks/results/haber")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--blur", type=float, default=1.5,
                    help="sigma (28x28 pixels) of the Gaussian applied to the images before restricting (0: none)")
    ap.add_argument("--pool", action="store_true",
                    help="2x2 average pooling before the projection (not the paper's network)")
    ap.add_argument("--kernel-smoothness", type=float, default=0.001,
                    help="beta of the penalty beta * sum ||D s_h||^2 on the stencils at the 28x28 resolution (0: off)")
    ap.add_argument("--quick", action="store_true", help="1 seed, 1000/500 images, 1 epoch: checks the pipeline only")
    ap.add_argument("--render", action="store_true", help="only rewrite the outputs from OUT/results.json")
    args = ap.parse_args(argv)
    if args.render:
        res = from_json(Results, json.loads((Path(args.out) / "results.json").read_text()))
        res.summary = summarize(res.runs)
        return write_outputs(Path(args.out), "haber_resolution", res, report, plot)
    if args.blur < 0 or args.blur > 4:
        ap.error(f"--blur {args.blur:g} must be in [0, 4] (pixels of the 28x28 image)")
    if args.epochs < 1:
        ap.error(f"--epochs {args.epochs} must be at least 1")
    if args.lr <= 0 or args.kernel_smoothness < 0:
        ap.error("--lr must be positive and --kernel-smoothness non-negative")
    if any(s < 0 for s in args.seeds) or len(set(args.seeds)) != len(args.seeds):
        ap.error(f"--seeds {args.seeds}: seeds must be distinct and non-negative")
    if not args.data_dir or not os.path.isdir(args.data_dir):     # last: the other checks need no data
        ap.error(f"--data-dir {args.data_dir!r} is not a directory (it needs the MNIST IDX files)")
    sizes = {}
    if args.quick:
        args.seeds, args.epochs = args.seeds[:1], QUICK["epochs"]
        sizes = {"n_train": QUICK["n_train"], "n_val": QUICK["n_val"]}
    torch.set_num_threads(1)
    res = Results(Config(args.seeds, args.epochs, args.lr, args.blur, args.pool, args.kernel_smoothness, args.quick,
                         DataFolder.of(args.data_dir)), Machine.now(command_line("haber_resolution.py", argv)),
                  dataclasses.asdict(spec_for(28, args.pool)))
    for i, seed in enumerate(args.seeds):
        try:
            res.runs.append(run_seed(seed, args, sizes))
        except DataError as e:
            ap.error(str(e))
        a = res.runs[-1].accuracy_percent
        print(f"[{i + 1}/{len(args.seeds)}] seed {seed}: restricted {a['restricted']:.1f} vs "
              f"{a['restricted_unadapted']:.1f}, prolongated {a['prolongated']:.1f} vs "
              f"{a['prolongated_unadapted']:.1f}", flush=True)
    res.summary = summarize(res.runs)
    res.meta.finish()
    write_outputs(Path(args.out), "haber_resolution", res, report, plot)
    print("\n".join(report(res)))


if __name__ == "__main__":
    main()
