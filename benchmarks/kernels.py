"""Fused chunk kernels vs the torch reference and eager PyTorch: one training step, one thread.

    python benchmarks/kernels.py [--quick] [--reps 7] [--out benchmarks/results/kernels]
    python benchmarks/kernels.py --device cuda        # GPU node: CUDA-graph kernel vs torch / eager

A step of the default-style dense network (opening 2 -> v, one stage of K relu Euler blocks,
linear head, cross-entropy, float32) is forward + backward + an SGD update of every parameter, as
in training. Three implementations of the blocks, timed round-robin inside one process so that the
other load of the machine hits them alike (ratios within one run; median and min of ``--reps``):

* eager: the plain autograd loop, 3 ops per block forward and autograd's backward;
* torch: ``--kernel torch``, today's fused torch chunk (``model._EulerDense``, hand adjoint);
* fused: ``--kernel fused`` (numba on CPU, CUDA graphs on GPU); ``auto`` = what auto selects.

Grid: width 3 with K = 2048 (the paper's network) and widths 8 / 32 / 128 with K = 256 (the
torchbraid-style benchmark depth: wide blocks at K = 2048 would take minutes per eager step
without telling more, the cost per block being what is compared), batches 100 ... 2000. Extra
rows: the other steppers / activations, float64, the deferred weight-gradient path (sink + flush)
and the activation-storage policy (keep σ(z) vs recompute z) that ``cpu.keep_activations`` encodes.

Outputs in ``--out``: results.json (every time), kernels.md (tables, goals), kernels.png.
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import parml.kernels as pk  # noqa: E402
from parml.kernels import DeferredWeightGrads, cpu  # noqa: E402
from parml.kernels.base import _plain  # noqa: E402
from parml.model import ModelSpec, StageSpec, build_model  # noqa: E402

GRID = {3: 2048, 8: 256, 32: 256, 64: 256, 128: 256}
BATCHES = [100, 250, 500, 1000, 2000]
QUICK_BATCHES = [100, 250, 2000]


class EagerKernel(pk.Kernel):
    """The plain step-by-step autograd loop (what a user's nn.Sequential of blocks does)."""
    name = "eager"

    def apply(self, chunk, y, sink=None):
        return _plain(chunk, y)


EAGER = EagerKernel()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_step(width, blocks, batch, kernel, device, dtype=torch.float32, activation="relu", stepper="euler",
              deferred=False, seed=0):
    """A closure running one training step of a fresh model with `kernel` installed."""
    spec = ModelSpec(2, 2, (StageSpec(width, blocks),), activation=activation, stepper=stepper)
    model = build_model(spec, seed=seed, dtype=dtype).to(device)
    pk.attach_kernels(model, kernel)
    sink = DeferredWeightGrads() if deferred else None
    for chunk in model.block_chunks():
        chunk.kernel.sink = sink
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 2, generator=g, dtype=dtype).to(device)
    y = torch.randint(0, 2, (batch,), generator=g).to(device)
    params = list(model.parameters())

    def step():
        for p in params:
            p.grad = None
        loss = model.loss(model(x), y)
        loss.backward()
        if sink is not None:
            sink.finish()
        with torch.no_grad():
            torch._foreach_add_(params, [p.grad for p in params], alpha=-1e-3)
        return loss
    return step


def _clock(device):
    """CPU: this thread's CPU time — the machine is shared, and wall time counts the time the
    scheduler gives to others (one compute thread: CPU time is the step's cost). GPU: wall time."""
    return time.perf_counter if device.type == "cuda" else time.thread_time


def time_round_robin(steps: dict, reps: int, device, burst: int = 2) -> dict:
    """{name: [seconds]}: one warm-up each, then `reps` rounds; a round runs every step `burst`
    times in a row and times the last (a training loop repeats the same step, so its states may
    stay in cache; interleaving the implementations spreads the machine's other load over them).
    Also {name + "_wall": [seconds]}."""
    for f in steps.values():
        f()
        _sync(device)
    clock = _clock(device)
    out = {name: [] for name in steps}
    wall = {name + "_wall": [] for name in steps}
    for _ in range(reps):
        for name, f in steps.items():
            for _ in range(burst - 1):
                f()
            _sync(device)
            t0, w0 = clock(), time.perf_counter()
            f()
            _sync(device)
            out[name].append(clock() - t0)
            wall[name + "_wall"].append(time.perf_counter() - w0)
    return {**out, **wall}


def summary(ts):
    return {"median": statistics.median(ts), "min": min(ts), "all": ts}


def fused_kernel(device, dtype, width):
    return pk.select_kernel("fused", device, dtype, width)[0]


def run_grid(args, device):
    rows = []
    batches = QUICK_BATCHES if args.quick else BATCHES
    for width, blocks in GRID.items():
        auto, why = pk.select_kernel("auto", device, torch.float32, width)
        for batch in batches:
            if width >= 64 and batch > 1000 and args.quick:
                continue
            kinds = {"eager": EAGER, "torch": pk.TORCH, "fused": fused_kernel(device, torch.float32, width)}
            steps = {n: make_step(width, blocks, batch, k, device) for n, k in kinds.items()}
            reps = args.reps if width * width * blocks * batch < 2e9 else max(3, args.reps // 2)
            ts = time_round_robin(steps, reps, device)
            choice = auto.choose(batch) if isinstance(auto, pk.AutoCPUKernel) else auto
            row = {"width": width, "blocks": blocks, "batch": batch, "auto": choice.name, "auto_reason": why,
                   **{n: summary(t) for n, t in ts.items()}}
            rows.append(row)
            print(f"width {width:4d} K {blocks:5d} batch {batch:5d}: " + "  ".join(
                f"{n} {row[n]['median'] * 1e3:8.1f} ms" for n in kinds)
                + f"  torch/fused {row['torch']['median'] / row['fused']['median']:5.2f}x", flush=True)
    return rows


VARIANTS = [  # (label, stepper, activation, dtype, deferred)
    ("euler tanh", "euler", "tanh", torch.float32, False),
    ("euler sigmoid", "euler", "sigmoid", torch.float32, False),
    ("rk2 relu", "rk2", "relu", torch.float32, False),
    ("rk2 tanh", "rk2", "tanh", torch.float32, False),
    ("euler relu float64", "euler", "relu", torch.float64, False),
    ("euler relu deferred", "euler", "relu", torch.float32, True),
    ("rk2 tanh deferred", "rk2", "tanh", torch.float32, True),
]


def run_variants(args, device, width=3, blocks=2048, batch=1000):
    rows = []
    for label, stepper, act, dtype, deferred in VARIANTS:
        kinds = {"torch": pk.TORCH, "fused": fused_kernel(device, dtype, width)}
        steps = {n: make_step(width, blocks, batch, k, device, dtype, act, stepper, deferred) for n, k in kinds.items()}
        ts = time_round_robin(steps, max(3, args.reps // 2), device)
        row = {"label": label, "width": width, "blocks": blocks, "batch": batch,
               **{n: summary(t) for n, t in ts.items()}}
        rows.append(row)
        print(f"{label:22s} width {width} K {blocks} batch {batch}: torch {row['torch']['median'] * 1e3:7.1f} ms "
              f"fused {row['fused']['median'] * 1e3:7.1f} ms  {row['torch']['median'] / row['fused']['median']:5.2f}x",
              flush=True)
    return rows


def run_chunk_scaling(args, device, width=3, blocks=2048, batches=(250, 500, 1000, 2000)):
    """The fused chunk alone (forward + backward of y_K · w): the kernel's cost per sample, without
    the step's fixed costs (opening, head, loss, optimizer: ~1 ms of torch ops here)."""
    rows = []
    kernel = fused_kernel(device, torch.float32, width)
    for batch in batches:
        spec = ModelSpec(2, 2, (StageSpec(width, blocks),))
        chunk = build_model(spec, seed=0).to(device).chunks[0]
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, width, generator=g).to(device).requires_grad_()
        w = torch.randn(batch, width, generator=g).to(device)

        def step(chunk=chunk, x=x, w=w):
            chunk.zero_grad(set_to_none=True)
            (kernel.apply(chunk, x) * w).sum().backward()
        ts = time_round_robin({"fused": step}, args.reps, device)["fused"]
        rows.append({"width": width, "blocks": blocks, "batch": batch, "fused": summary(ts)})   # same keys as grid rows
        print(f"chunk only width {width} K {blocks} batch {batch}: {rows[-1]['fused']['median'] * 1e3:.2f} ms",
              flush=True)
    return rows


def _fixed_policy(keep, activation, width):
    return keep


def run_policy(args):
    """Keep σ(z) vs recompute z = W y + b in the backward, relu, fused only (cpu.keep_activations)."""
    rows = []
    original = cpu.keep_activations
    try:
        for width, blocks, batch in ((3, 2048, 2000), (3, 2048, 250), (8, 256, 1000), (16, 256, 500), (32, 256, 100)):
            # the policy is read at each forward: set it before each call
            steps = {name: make_step(width, blocks, batch, pk.FUSED_CPU, torch.device("cpu"))
                     for name in ("recompute", "keep")}
            ts = {"recompute": [], "keep": []}
            for _ in range(max(3, args.reps // 2) + 1):
                for name, keep in (("recompute", False), ("keep", True)):
                    cpu.keep_activations = functools.partial(_fixed_policy, keep)
                    t0 = time.thread_time()
                    steps[name]()
                    ts[name].append(time.thread_time() - t0)
            row = {"width": width, "blocks": blocks, "batch": batch, **{n: summary(t[1:]) for n, t in ts.items()}}
            rows.append(row)
            print(f"policy width {width} K {blocks} batch {batch}: recompute {row['recompute']['median'] * 1e3:.1f} ms "
                  f"keep {row['keep']['median'] * 1e3:.1f} ms", flush=True)
    finally:
        cpu.keep_activations = original
    return rows


def auto_choice(width, batch, device="cpu"):
    """The implementation ``--kernel auto`` runs at this width and batch (derived from the current
    selector, so --report-only follows a changed policy)."""
    kernel = pk.select_kernel("auto", device, torch.float32, width)[0]
    return (kernel.choose(batch) if isinstance(kernel, pk.AutoCPUKernel) else kernel).name


def per_sample_ratio(rows, stat):
    """(time per sample at batch 2000) / (at batch 250), fused, width 3."""
    a = next((r for r in rows if r["width"] == 3 and r["batch"] == 250), None)
    b = next((r for r in rows if r["width"] == 3 and r["batch"] == 2000), None)
    return None if not (a and b) else (b["fused"][stat] / 2000) / (a["fused"][stat] / 250)


def goals(rows, chunk_rows=()):
    def find(w, b):
        return next((r for r in rows if r["width"] == w and r["batch"] == b), None)
    out = []
    r = find(3, 2000)
    if r:
        s = r["torch"]["median"] / r["fused"]["median"]
        out.append(("width 3, K 2048, batch 2000: fused >= 4x faster than torch", f"{s:.2f}x", s >= 4))
    r = find(32, 100)
    if r:
        s = r["torch"]["median"] / r["fused"]["median"]
        out.append(("width 32, K 256, batch 100: fused >= 2x faster than torch", f"{s:.2f}x", s >= 2))
    def auto_time(r):
        return r[auto_choice(r["width"], r["batch"])]["median"]
    for r in (x for x in rows if x["width"] == 128):
        s = r["torch"]["median"] / auto_time(r)
        out.append((f"width 128, batch {r['batch']}: auto ({auto_choice(128, r['batch'])}) never slower than torch",
                    f"{s:.2f}x", s >= 0.95))
    worst = min(rows, key=lambda x: x["torch"]["median"] / auto_time(x))
    s = worst["torch"]["median"] / auto_time(worst)
    out.append((f"auto never slower than torch (worst: width {worst['width']}, batch {worst['batch']})",
                f"{s:.2f}x", s >= 0.9))
    # the proportionality goal, by median and by minimum: on the shared machine the other processes
    # evict the L3-resident states of a small batch (a large one streams from memory anyway)
    for what, rs in (("step", rows), ("chunk (forward + backward)", chunk_rows)):
        for stat in ("median", "min"):
            q = per_sample_ratio(rs, stat)
            if q is not None:
                out.append((f"width 3: fused {what} time per sample, batch 2000 / batch 250 within 25 % ({stat})",
                            f"{q:.2f}", 0.75 <= q <= 1.25))
    return out


def write_markdown(res, path):
    lines = ["# Fused chunk kernels: one training step (forward + backward + SGD), one thread", "",
             (f"{res['machine']}; torch {res['torch']}; device {res['device']}; float32 unless noted; "
              f"median of {res['reps']} round-robin repetitions of the step's CPU time (thread time: the "
              "2-core machine is shared; wall times and minima in results.json). "
              "Speedup = eager or torch time / fused time; auto = the kernel `--kernel auto` selects."), "",
             "| width | K | batch | eager ms | torch ms | fused ms | eager/fused | torch/fused | auto |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|:--|"]
    for r in res["grid"]:
        e, t, f = (r[n]["median"] * 1e3 for n in ("eager", "torch", "fused"))
        lines.append(f"| {r['width']} | {r['blocks']} | {r['batch']} | {e:.1f} | {t:.1f} | {f:.1f} | "
                     f"{e / f:.2f} | {t / f:.2f} | {auto_choice(r['width'], r['batch'])} |")
    lines += ["", "## Goals (issue 18)", "", "| goal | measured | met |", "|:--|--:|:-:|"]
    for text, value, ok in goals(res["grid"], res.get("chunk", ())):
        lines.append(f"| {text} | {value} | {'yes' if ok else 'NO'} |")
    if res.get("chunk"):
        lines += ["", "## The fused chunk alone (width 3, K 2048): forward + backward, no other layers", "",
                  "| batch | ms | µs per sample |", "|---:|---:|---:|"]
        for r in res["chunk"]:
            med = r["fused"]["median"]
            lines.append(f"| {r['batch']} | {med * 1e3:.2f} | {med / r['batch'] * 1e6:.2f} |")
    if res.get("variants"):
        lines += ["", "## Steppers, activations, float64, deferred weight gradients (width 3, K 2048, batch 1000)", "",
                  "| variant | torch ms | fused ms | torch/fused |", "|:--|---:|---:|---:|"]
        for r in res["variants"]:
            t, f = r["torch"]["median"] * 1e3, r["fused"]["median"] * 1e3
            lines.append(f"| {r['label']} | {t:.1f} | {f:.1f} | {t / f:.2f} |")
    if res.get("policy"):
        lines += ["", "## relu: keep σ(z) or recompute z in the backward (fused)", "",
                  "| width | K | batch | recompute ms | keep ms | chosen |", "|---:|---:|---:|---:|---:|:--|"]
        for r in res["policy"]:
            chosen = "keep" if cpu.keep_activations("relu", r["width"]) else "recompute"
            lines.append(f"| {r['width']} | {r['blocks']} | {r['batch']} | {r['recompute']['median'] * 1e3:.1f} | "
                         f"{r['keep']['median'] * 1e3:.1f} | {chosen} |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(res, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    widths = sorted({r["width"] for r in res["grid"]})
    fig, axes = plt.subplots(1, len(widths) + 1, figsize=(4 * (len(widths) + 1), 3.6))
    for ax, w in zip(axes, widths):
        rows = [r for r in res["grid"] if r["width"] == w]
        bs = [r["batch"] for r in rows]
        for n, style in (("eager", "s:"), ("torch", "o--"), ("fused", "^-")):
            ax.plot(bs, [r[n]["median"] * 1e3 for r in rows], style, label=n)
        ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="step ms", title=f"width {w}, K {rows[0]['blocks']}")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend()
    ax = axes[-1]
    for w in widths:
        rows = [r for r in res["grid"] if r["width"] == w]
        ax.plot([r["batch"] for r in rows], [r["torch"]["median"] / r["fused"]["median"] for r in rows], "o-",
                label=f"width {w}")
    ax.axhline(1, color="k", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="torch / fused", title="speedup over --kernel torch")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batches 100, 250, 2000 only; no variants or policy rows")
    ap.add_argument("--reps", type=int, default=7, help="round-robin repetitions per configuration (default 7)")
    ap.add_argument("--device", default="cpu", help="cpu (numba kernel) or cuda (CUDA-graph kernel)")
    ap.add_argument("--out", type=Path, default=None, help="folder for results.json, kernels.md, kernels.png")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite kernels.md and kernels.png from OUT/results.json")
    args = ap.parse_args()
    if args.reps < 1:
        ap.error(f"--reps {args.reps} must be at least 1")
    device = torch.device(args.device)
    out = args.out or HERE / "results" / ("kernels" if device.type == "cpu" else f"kernels_{device.type}")
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        res = json.loads((out / "results.json").read_text())
    else:
        torch.set_num_threads(1)
        machine = f"{platform.machine()} {platform.processor() or ''} ({torch.get_num_threads()} thread)"
        res = {"machine": machine.replace("  ", " "),
               "torch": torch.__version__, "device": str(device), "reps": args.reps}
        res["grid"] = run_grid(args, device)
        res["chunk"] = run_chunk_scaling(args, device)
        if not args.quick:
            res["variants"] = run_variants(args, device)
            if device.type == "cpu":
                res["policy"] = run_policy(args)
        (out / "results.json").write_text(json.dumps(res, indent=1))
    write_markdown(res, out / "kernels.md")
    write_plot(res, out / "kernels.png")
    for text, value, ok in goals(res["grid"], res.get("chunk", ())):
        print(f"{'met' if ok else 'NOT MET'}: {text}: {value}")


if __name__ == "__main__":
    main()
