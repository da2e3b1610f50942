"""Haber et al.: classify across resolutions with Galerkin-restricted / prolongated conv kernels.

    python benchmarks/haber_resolution.py [--data-dir /work/shared/data/mnist] [--epochs 2]

Two conv ODE ResNets are trained independently, one on 28x28 MNIST and one on the same images
restricted to 14x14 (full weighting, ``parml.multiscale.restrict_image``). Then, with no further
training:

* the 28x28 network classifies the 14x14 images with its 3x3 kernels replaced by their Galerkin
  products K_H = R K_h P (``restrict_model``) vs the same kernels unadapted (paper: 94.9 % vs 84.1 %);
* the 14x14 network classifies the 28x28 images with prolongated kernels (``prolongate_model``)
  vs the same kernels unadapted (paper: 91.0 % vs 61.0 %).

Network (both): 3x3 conv opening 1 -> 8 channels, stage of 2 conv blocks (8 channels), average
pooling + 1x1 conv projection to 16 channels at half the resolution, stage of 2 conv blocks, tanh,
T = 1, forward Euler, and a linear classifier on the flattened final state (as in the paper; its
weights are moved between resolutions as images, keeping <W, y>). Adam, lr 0.01, mini-batches
of 100, float32, one process. Data: the t10k file split 8000/2000 (the only MNIST file here; the
paper used 50,000/10,000 and a Gauss-Newton block-coordinate-descent optimizer).

Outputs in ``--out``: ``results.json``, ``haber_resolution.md`` (table), ``haber_resolution.png``.
About two minutes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch

from parml.data import batches, load_dataset
from parml.model import ModelSpec, StageSpec, build_model
from parml.multiscale import prolongate_model, restrict_image, restrict_model

PAPER = {"restricted": 94.9, "restricted_unadapted": 84.1, "prolongated": 91.0, "prolongated_unadapted": 61.0}


def spec_for(size):
    return ModelSpec(size * size, 10, (StageSpec(8, 2, "conv"), StageSpec(16, 2, "conv", 2)), T=1.0,
                     activation="tanh", input_shape=(1, size, size), projection="avgpool", head="flatten")


def train(model, x, y, epochs, lr, seed):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for e in range(epochs):
        for idx in batches(x.shape[0], 100, seed, e):
            opt.zero_grad()
            model.loss(model(x[idx]), y[idx]).backward()
            opt.step()
    return model


@torch.no_grad()
def accuracy(model, x, y):
    return 100.0 * float((model(x).argmax(1) == y).double().mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="/work/shared/data/mnist")
    ap.add_argument("--out", default="benchmarks/results/haber")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    d = load_dataset("mnist", args.data_dir, seed=args.seed, flatten=False)
    fine = {"train": (d.x_train, d.y_train), "val": (d.x_val, d.y_val)}
    coarse = {k: (restrict_image(x), y) for k, (x, y) in fine.items()}
    t0 = time.perf_counter()
    net_h = train(build_model(spec_for(28), seed=args.seed), *fine["train"], args.epochs, args.lr, args.seed)
    t_h = time.perf_counter() - t0
    t0 = time.perf_counter()
    net_H = train(build_model(spec_for(14), seed=args.seed), *coarse["train"], args.epochs, args.lr, args.seed)
    t_H = time.perf_counter() - t0
    res = {
        "fine_native": accuracy(net_h, *fine["val"]),
        "coarse_native": accuracy(net_H, *coarse["val"]),
        "restricted": accuracy(restrict_model(net_h), *coarse["val"]),
        "restricted_unadapted": accuracy(restrict_model(net_h, adapt=False), *coarse["val"]),
        "prolongated": accuracy(prolongate_model(net_H), *fine["val"]),
        "prolongated_unadapted": accuracy(prolongate_model(net_H, adapt=False), *fine["val"]),
    }
    rows = [("28x28 net on 28x28 (native)", "fine_native"), ("14x14 net on 14x14 (native)", "coarse_native"),
            ("28x28 net on 14x14, Galerkin-restricted kernels", "restricted"),
            ("28x28 net on 14x14, unadapted kernels", "restricted_unadapted"),
            ("14x14 net on 28x28, prolongated kernels", "prolongated"),
            ("14x14 net on 28x28, unadapted kernels", "prolongated_unadapted")]
    lines = [f"# Classification across resolutions (MNIST {d.name}, {args.epochs} epochs Adam lr {args.lr}, "
             f"seed {args.seed}; training {t_h:.0f} s at 28x28, {t_H:.0f} s at 14x14)", "",
             "| network / data | val. accuracy % | paper % |", "|---|---|---|"]
    for label, key in rows:
        paper = PAPER.get(key, {"fine_native": 98.18, "coarse_native": 98.28}.get(key))
        lines.append(f"| {label} | {res[key]:.1f} | {paper:.1f} |")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(args.out, "haber_resolution.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"accuracy_percent": res, "paper_percent": PAPER, "seconds": {"train_28": t_h, "train_14": t_H},
                   "spec_28": dataclasses.asdict(spec_for(28)), "epochs": args.epochs, "lr": args.lr,
                   "seed": args.seed, "data": d.name}, f, indent=1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 3.8))
    keys = ["restricted", "restricted_unadapted", "prolongated", "prolongated_unadapted"]
    pos = range(len(keys))
    ax.bar([p - 0.2 for p in pos], [res[k] for k in keys], 0.4, label="parml")
    ax.bar([p + 0.2 for p in pos], [PAPER[k] for k in keys], 0.4, label="Haber et al.")
    ax.set_xticks(list(pos), ["28->14\nrestricted", "28->14\nunadapted", "14->28\nprolongated", "14->28\nunadapted"])
    ax.set_ylabel("validation accuracy %")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "haber_resolution.png"), dpi=110)


if __name__ == "__main__":
    main()
