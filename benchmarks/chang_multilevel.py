"""Chang et al.: interpolating a conv ODE ResNet to twice the depth, and the time the cascade saves.

    python benchmarks/chang_multilevel.py [--out benchmarks/results/chang]

1. Interpolation accuracy: a conv network with channels 16-32-64 (Chang's widths; strided 1x1
   projections, pooled head, 8x8 inputs) and a control smooth in time is prolongated from K to 2K
   blocks per stage (each block copied and h halved — Chang — or linear in time — Haber); the
   largest output change |f_2K(x) - f_K(x)| should fall like O(h): halve as K doubles.
2. The theoretical time saved by k interpolations with an equal budget per stage,
   1 - (2^(k+1) - 1) / (2^k (k + 1)) (``parml.cascade.theoretical_saving``), for k = 1..4.

Outputs in ``--out``: ``chang_multilevel.md`` and ``results.json``. A few seconds.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from parml.cascade import theoretical_saving
from parml.hierarchy import prolongate_model
from parml.model import ModelSpec, StageSpec, build_model

CHANNELS = (16, 32, 64)


def spec(k):
    return ModelSpec(3 * 8 * 8, 10, tuple(StageSpec(c, k, "conv", 1 if i == 0 else 2) for i, c in enumerate(CHANNELS)),
                     T=1.0, activation="relu", input_shape=(3, 8, 8))


def gaps(interpolation, depths=(2, 4, 8, 16)):
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/chang")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    res = {interp: gaps(interp) for interp in ("constant", "linear")}
    lines = [f"# Conv ODE ResNet (channels {'-'.join(map(str, CHANNELS))}) prolongated from K to 2K blocks per stage", "",
             "| K per stage | max gap, constant (Chang) | ratio | max gap, linear (Haber) | ratio |", "|---|---|---|---|---|"]
    for i, ((k, a), (_, b)) in enumerate(zip(res["constant"], res["linear"])):
        ra = f"{res['constant'][i - 1][1] / a:.2f}" if i else ""
        rb = f"{res['linear'][i - 1][1] / b:.2f}" if i else ""
        lines.append(f"| {k} -> {2 * k} | {a:.3e} | {ra} | {b:.3e} | {rb} |")
    lines += ["", "Theoretical time saved by k interpolations (equal budget per stage, Chang et al.):", "",
              "| k | saving |", "|---|---|"]
    savings = {k: theoretical_saving(k) for k in (1, 2, 3, 4)}
    lines += [f"| {k} | {100 * s:.2f} % |" for k, s in savings.items()]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(args.out, "chang_multilevel.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"gaps": res, "theoretical_saving": savings, "channels": CHANNELS}, f, indent=1)


if __name__ == "__main__":
    main()
