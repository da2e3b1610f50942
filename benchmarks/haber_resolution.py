"""Haber et al.: classify across resolutions with Galerkin-restricted / prolongated conv kernels.

    python benchmarks/haber_resolution.py [--data-dir ../shared/data/mnist] [--epochs 2]

Two conv ODE ResNets are trained independently, one on 28x28 MNIST and one on the same images
restricted to 14x14 (full weighting, ``parml.multiscale.restrict_image``). Then, with no further
training:

* the 28x28 network classifies the 14x14 images with its 3x3 kernels replaced by their Galerkin
  products K_H = R K_h P (``restrict_model``) vs the same kernels unadapted (paper: 94.9 % vs 84.1 %);
* the 14x14 network classifies the 28x28 images with prolongated kernels (``prolongate_model``)
  vs the same kernels unadapted (paper: 91.0 % vs 61.0 %).

Network (both): 3x3 conv opening 1 -> 8 channels, stage of 2 conv blocks (8 channels), 1x1 conv
projection to 16 channels, stage of 2 conv blocks, tanh, T = 1, forward Euler, and a linear
classifier on the flattened final state (as in the paper; its weights are moved between
resolutions as images, keeping <W, y>). All at the image's resolution: the paper's network has
no pooling ("for simplicity we have ignored the pooling layer"); ``--pool`` puts 2x2 average
pooling before the projection instead (see the diagnosis below for why that breaks the
transfer). Training adds ``--kernel-smoothness`` beta * sum ||D s||^2 (squared differences of
neighbouring entries of every 3x3 stencil s, opening included) to the loss, standing in for the
paper's derivative-based regularization; 0 turns it off. Adam, lr 0.01, mini-batches of 100,
float32, one process. Data: the t10k file split 8000/2000 (the only MNIST file here; the
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

from parml.data import batches, default_mnist_dir, load_dataset
from parml.model import ModelSpec, StageSpec, build_model
from parml.multiscale import prolongate_image, prolongate_kernel, prolongate_model, restrict_image, restrict_model

DIAGNOSIS = """## Why the adapted kernels were worse (diagnosis, seed 0, 2 epochs unless noted)

The transfer operators are right: K_H = R K_h P is exact on coarse images (the restricted network's
opening reproduces R(fine opening on P x_H) to round-off), G scales a stencil's k-th derivative
part by 2^-k (eigenvalues 1, 1/2, 1/4, 1/8, 1/16), so the h-scaling of derivative stencils is
built in, and the flattened classifier moves as <W_H, y_H> = <W, P y_H>. The 28x28 network on the
interpolated coarse images P x_H still scores 89.7 %, so the information is there. Two things
broke the transfer:

1. **Average pooling (was in the network, not in the paper's).** The transfers are vertex-centred
   (coarse pixel i = fine pixel 2i), 2x2 average pooling is cell-centred, so R(pool y) and
   pool(R y) sit half a fine pixel apart: a first-order mismatch on states that are far from
   smooth (|y - P R y| / |y| = 0.5 to 0.7 for the hidden states). Per-layer relative error of
   the restricted network against R(fine network on P x_H): opening 0.00, blocks 0.12, 0.16,
   after the pooling projection 0.29, logits 0.56. Dropping the pooling (the paper's network
   has none): restricted 87.7 % vs unadapted 86.4 % (was 74.8 vs 76.5).
2. **Prolongation inverts a smoothing.** RP is not the identity (1D stencil 1/8, 3/4, 1/8), so
   the Galerkin product of any fine stencil carries that blur, and a coarse stencil that lacks
   it can only come from an oscillating fine one: the coarse identity prolongates to
   (-1/2, 2, -1/2) x (-1/2, 2, -1/2), the 3x3 average to a checkerboard. Trained coarse stencils
   grow by ||G^-1 s|| / ||s|| = 6.5 to 8.5 (5 epochs, no penalty). That is exact on P x_H, but
   the fine images and, after tanh, the hidden states are not in the range of P, and the
   oscillating stencils amplify exactly those components: prolongated 78.5 % vs unadapted
   89.1 % without pooling, and 48.5 % vs 86.7 % after 5 epochs (on P R x: 54.7 %).
   Longer training makes the stencils rougher and both transfers worse (with pooling,
   6 epochs: restricted 60.2 vs 71.0, prolongated 30.3 vs 61.9).

A smoothness penalty on the stencils (beta * sum ||D s||^2, the default 0.1 here) keeps them in
the part of the space that G and G^-1 map without oscillation: without pooling, 2 epochs,
restricted 87.2 vs 86.1 and prolongated 89.5 vs 88.7 (beta 0.3: 87.8 vs 85.5 and 89.3 vs 88.4);
5 epochs, beta 0.1: restricted 89.2 vs 81.8, prolongated 74.7 vs 88.0. A penalty on
||G^-1 s||^2 itself (beta 0.01, 5 epochs) gives prolongated 89.0 % but the unadapted copy 90.6 %.
With pooling the penalty is not enough (beta 0.3: restricted 78.9 vs 76.1, prolongated 83.9
vs 84.5, against the 90.3 % reference). Not helping: smoothness of the classifier weights (paper's regularizer; alpha
1e-3: no change, 1e-2: lower native accuracy) and a Gaussian blur (sigma 1) of all images.

Still not reproduced: the paper's large loss of the *unadapted* kernels (84.1 %, 61.0 %). Here
the unadapted copies stay within a few points of native accuracy, i.e. these small, briefly
trained networks do not rely on scale-specific derivative stencils the way the paper's do;
with no pooling and the penalty the adapted kernels are at least as good as the unadapted ones
in both directions at 2 epochs (not so for prolongation after 5 epochs), but the paper's margin
is not there. Data and optimizer also differ (8000 training images, Adam, 2 epochs, ~90 % native,
vs 50,000 images, Gauss-Newton block-coordinate descent, 98 %). Open: a 4-block network without
pooling with hand-set smooth stencils (average + small gradient), on a blurred digit, gives
restricted logits 0.53 relative error against the fine network (unadapted 0.63), far from the
O(h^2) of a single conv (0.23 vs 1.29 for a Laplacian + gradient stencil); not yet explained.
"""

PAPER = {"restricted": 94.9, "restricted_unadapted": 84.1, "prolongated": 91.0, "prolongated_unadapted": 61.0}


def spec_for(size, pool=False):
    return ModelSpec(size * size, 10, (StageSpec(8, 2, "conv"), StageSpec(16, 2, "conv", 2 if pool else 1)),
                     T=1.0, activation="tanh", input_shape=(1, size, size), projection="avgpool", head="flatten")


def stencil_roughness(model):
    """sum over every 3x3 stencil (opening and blocks) of its squared neighbour differences ||D s||^2."""
    total = 0
    for k in [model.opening.weight] + [c.weight for c in model.chunks]:
        total = total + (k[..., 1:, :] - k[..., :-1, :]).square().sum() + (k[..., 1:] - k[..., :-1]).square().sum()
    return total


def train(model, x, y, epochs, lr, seed, kernel_smoothness=0.0):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for e in range(epochs):
        for idx in batches(x.shape[0], 100, seed, e):
            opt.zero_grad()
            loss = model.loss(model(x[idx]), y[idx])
            if kernel_smoothness:
                loss = loss + kernel_smoothness * stencil_roughness(model)
            loss.backward()
            opt.step()
    return model


def prolongation_gain(model):
    """||prolongate_kernel(s)|| / ||s|| over all 3x3 stencils of `model` (1 would be harmless)."""
    ks = [model.opening.weight.detach()] + [c.weight.detach() for c in model.chunks]
    return float(sum(prolongate_kernel(k).square().sum() for k in ks).sqrt() / sum(k.square().sum() for k in ks).sqrt())


@torch.no_grad()
def accuracy(model, x, y):
    return 100.0 * float((model(x).argmax(1) == y).double().mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=default_mnist_dir())
    ap.add_argument("--out", default="benchmarks/results/haber")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", action="store_true", help="2x2 average pooling before the projection (not the paper's network)")
    ap.add_argument("--kernel-smoothness", type=float, default=0.1,
                    help="beta of the stencil smoothness penalty beta * sum ||D s||^2 (0: off)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    d = load_dataset("mnist", args.data_dir, seed=args.seed, flatten=False)
    fine = {"train": (d.x_train, d.y_train), "val": (d.x_val, d.y_val)}
    coarse = {k: (restrict_image(x), y) for k, (x, y) in fine.items()}
    t0 = time.perf_counter()
    net_h = train(build_model(spec_for(28, args.pool), seed=args.seed), *fine["train"], args.epochs, args.lr, args.seed,
                  args.kernel_smoothness)
    t_h = time.perf_counter() - t0
    t0 = time.perf_counter()
    net_H = train(build_model(spec_for(14, args.pool), seed=args.seed), *coarse["train"], args.epochs, args.lr, args.seed,
                  args.kernel_smoothness)
    t_H = time.perf_counter() - t0
    res = {
        "fine_native": accuracy(net_h, *fine["val"]),
        "coarse_native": accuracy(net_H, *coarse["val"]),
        "restricted": accuracy(restrict_model(net_h), *coarse["val"]),
        "restricted_unadapted": accuracy(restrict_model(net_h, adapt=False), *coarse["val"]),
        "prolongated": accuracy(prolongate_model(net_H), *fine["val"]),
        "prolongated_unadapted": accuracy(prolongate_model(net_H, adapt=False), *fine["val"]),
        # reference: the 28x28 network on the 14x14 images interpolated back (P x_H); no transfer of kernels
        "fine_on_interpolated": accuracy(net_h, prolongate_image(coarse["val"][0]), fine["val"][1]),
    }
    gain = prolongation_gain(net_H)
    rows = [("28x28 net on 28x28 (native)", "fine_native"), ("14x14 net on 14x14 (native)", "coarse_native"),
            ("28x28 net on 14x14, Galerkin-restricted kernels", "restricted"),
            ("28x28 net on 14x14, unadapted kernels", "restricted_unadapted"),
            ("14x14 net on 28x28, prolongated kernels", "prolongated"),
            ("14x14 net on 28x28, unadapted kernels", "prolongated_unadapted"),
            ("28x28 net on 14x14 images interpolated to 28x28 (reference)", "fine_on_interpolated")]
    setup = (f"{'2x2 average pooling before the projection' if args.pool else 'no pooling (paper)'}, "
             f"stencil smoothness beta {args.kernel_smoothness:g}")
    lines = [f"# Classification across resolutions (MNIST {d.name}, {args.epochs} epochs Adam lr {args.lr}, "
             f"seed {args.seed}; {setup}; training {t_h:.0f} s at 28x28, {t_H:.0f} s at 14x14)", "",
             "| network / data | val. accuracy % | paper % |", "|---|---|---|"]
    for label, key in rows:
        paper = PAPER.get(key, {"fine_native": 98.18, "coarse_native": 98.28}.get(key))
        lines.append(f"| {label} | {res[key]:.1f} | {'-' if paper is None else f'{paper:.1f}'} |")
    lines += ["", f"Prolongation gain of the 14x14 network's stencils, ||G^-1 s|| / ||s||: {gain:.2f}.", "", DIAGNOSIS]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(args.out, "haber_resolution.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"accuracy_percent": res, "paper_percent": PAPER, "seconds": {"train_28": t_h, "train_14": t_H},
                   "spec_28": dataclasses.asdict(spec_for(28, args.pool)), "epochs": args.epochs, "lr": args.lr,
                   "kernel_smoothness": args.kernel_smoothness, "pool": args.pool, "prolongation_gain": gain,
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
