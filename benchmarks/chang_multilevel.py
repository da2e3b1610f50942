"""Chang et al.: multilevel training of a conv ODE ResNet vs direct deep training, same epochs.

    python benchmarks/chang_multilevel.py [--quick] [--seeds 3] [--data-dir CIFAR_DIR]
                                          [--out benchmarks/results/chang]

1. Training comparison (Chang et al., "Multi-level residual networks from dynamical systems
   view"). For every seed, two runs with the same data, seed and step budget N, both through
   ``parml.training.trainer.train`` with ``arch="conv"``, one process:

   * direct: the conv network with K blocks per stage trained N steps, learning rate
     cosine-annealed from lr to lr_min over the N steps;
   * multilevel: parml's cascade with k = 2 interpolations (``cascade=2``), Chang's equal budget
     per stage: N/3 steps at K/4 blocks per stage, interpolation (each block copied, h halved),
     N/3 steps at K/2, interpolation, N/3 steps at K; the cosine learning rate restarts at every
     stage (a fresh momentum buffer too).

   Both use SGD with momentum 0.9 and Chang's weight decay 2e-4 (parml's Tikhonov term with
   β = 1e-4: gradient 2βθ in the L2(0,T) metric). Reported: final held-out accuracy, work units
   (one full-depth gradient = 1; the multilevel run needs 7/12 of the direct run's), wall time
   (``summary["seconds"]``: steps, validations and interpolations), training time (inside the
   step calls only), the measured time saved 1 - t_multilevel / t_direct next to the theoretical
   1 - (2^(k+1) - 1) / (2^k (k + 1)) = 41.7 % for k = 2, and the saving expected from the
   measured step time at each depth (a step also pays for the opening, projections, head and
   data, which do not shrink with the depth).

   Data: MNIST from ``--mnist-dir`` (only the t10k file is here: a seeded 8000/2000 split),
   downsampled to 14x14; with ``--data-dir``, CIFAR-10 binary batches (8000/2000 images,
   downsampled to 16x16). Network: 3x3 conv opening, two conv stages of K = 16 blocks each
   (8 then 16 channels, the second at half the resolution after a strided 1x1 projection),
   ReLU, T = 1, forward Euler, and a linear classifier on the flattened final state (a pooled
   head trains too slowly in this budget without Chang's batch norm). N = 900 steps of 100
   images (about 11 epochs), lr 0.2 -> 0.001 (Chang: 0.5 -> 0.001 with batch norm), float32,
   one thread, 3 seeds. The small network, subset and resolution keep the whole benchmark to
   about 5 minutes on one core.
2. Interpolation accuracy: a conv network with channels 16-32-64 (Chang's widths; strided 1x1
   projections, pooled head, 8x8 inputs) and a control smooth in time is prolongated from K to 2K
   blocks per stage (each block copied and h halved — Chang — or linear in time — Haber); the
   largest output change |f_2K(x) - f_K(x)| should fall like O(h): halve as K doubles.
3. The theoretical time saved by k interpolations with an equal budget per stage,
   1 - (2^(k+1) - 1) / (2^k (k + 1)) (``parml.cascade.theoretical_saving``), for k = 1..4.

Outputs in ``--out``: ``chang_multilevel.md`` (tables), ``results.json`` (every number and
curve), ``chang_multilevel.png`` (held-out accuracy against work units and against seconds).
``--quick``: 2000/1000 images, K = 4 blocks per stage, N = 60, one seed (well under a minute).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from parml.multilevel.cascade import theoretical_saving  # noqa: E402
from parml.data import default_mnist_dir  # noqa: E402
from parml.multilevel.hierarchy import prolongate_model  # noqa: E402
from parml.model import ModelSpec, StageSpec, build_model  # noqa: E402
from parml.training.report import validation_curve  # noqa: E402
from _step_timer import step_timer  # noqa: E402  (benchmarks/, the script's folder)

CHANNELS = (16, 32, 64)
DOUBLINGS = 2
# one training setup per dataset; --quick overrides a few entries
SETUPS = {
    "mnist": {"resolution": 14, "n_train": 8000, "n_val": 2000, "channels": "8,16", "head": "flatten",
              "blocks": 16, "budget": 900, "batch_size": 100, "lr": 0.2, "lr_min": 0.001, "beta": 1e-4,
              "eval_every": 50},
    "cifar10": {"resolution": 16, "n_train": 8000, "n_val": 2000, "channels": "16,32", "head": "flatten",
                "blocks": 16, "budget": 900, "batch_size": 100, "lr": 0.1, "lr_min": 0.001, "beta": 1e-4,
                "eval_every": 50},
}
QUICK = {"n_train": 2000, "n_val": 1000, "blocks": 4, "budget": 60, "eval_every": 10}
EQUAL_ACC = 0.005          # |accuracy difference| counted as equal


# --------------------------------------------------------------------------- interpolation accuracy
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


# --------------------------------------------------------------------------- training comparison


def load_data(name: str, data_dir: str, setup: dict, seed: int):
    """The held-out split of `name` as float32 images [n, C, H, W], downsampled to the setup's resolution."""
    from parml.data import load_dataset
    if name == "mnist":
        return load_dataset("mnist", data_dir, seed=seed, flatten=False, n_train=setup["n_train"],
                            n_val=setup["n_val"], resolution=setup["resolution"])
    import dataclasses
    d = load_dataset("cifar10", data_dir, seed=seed, flatten=False, n_train=setup["n_train"], n_val=setup["n_val"])
    k = d.input_shape[-1] // setup["resolution"]
    if k > 1:
        xt, xv = (torch.nn.functional.avg_pool2d(x, k) for x in (d.x_train, d.x_val))
        d = dataclasses.replace(d, x_train=xt, x_val=xv, input_shape=tuple(xt.shape[1:]),
                                name=f"{d.name}@{setup['resolution']}x{setup['resolution']}")
    return d


def run_one(name: str, setup: dict, mode: str, seed: int, data, runs_dir: str) -> dict:
    """One training run through ``parml.training.trainer.train``: mode "direct" or "multilevel"."""
    from parml.comm import SelfComm
    from parml.config import TrainConfig
    from parml.training.trainer import train

    n = setup["budget"]
    per_stage = n // (DOUBLINGS + 1)
    extra = ({"max_cycles": n} if mode == "direct" else
             {"cascade": DOUBLINGS, "cascade_cycles": per_stage, "max_cycles": per_stage})
    cfg = TrainConfig(overwrite=True, dataset=name, arch="conv", channels=setup["channels"], head=setup["head"],
                      blocks=setup["blocks"], levels=1, optimizer="momentum", lr=setup["lr"], lr_min=setup["lr_min"],
                      lr_schedule="cosine", beta=setup["beta"], cascade_interpolation="constant",
                      batch_size=setup["batch_size"], seed=seed, target_accuracy=None,
                      eval_every=setup["eval_every"], out=runs_dir, run_name=f"{name}-{mode}-K{setup['blocks']}-s{seed}",
                      backend="self", progress=False, **extra)
    calls = []
    with step_timer(calls), contextlib.redirect_stdout(io.StringIO()):
        summary = train(cfg, SelfComm(), data)
    summary.pop("levels", None)
    with open(os.path.join(summary["folder"], "config.json")) as f:
        stages = json.load(f).get("cascade_stages", [])
    curve = validation_curve(summary["folder"])
    by_depth = {}
    for cost, s in calls:
        by_depth.setdefault(round(cost * setup["blocks"]), []).append(s)
    return {"dataset": name, "mode": mode, "seed": seed, "blocks": setup["blocks"], "budget": n,
            "steps": len(calls), "cycles": summary["cycles"], "work_units": summary["work_units"],
            "cascade_work_units": summary["cascade_work_units"], "seconds": summary["seconds"],
            "train_s": sum(s for _, s in calls), "val_acc": summary["val_acc"], "val_loss": summary["val_loss"],
            "final_loss": summary["final_loss"], "best_val_acc": max(curve["val_acc"]),
            "step_ms": {str(d): 1e3 * statistics.median(v) for d, v in sorted(by_depth.items())},
            "stages": stages, "curve": curve}


def analyse(runs: list[dict]) -> dict:
    th = theoretical_saving(DOUBLINGS)
    pairs = []
    for d in (r for r in runs if r["mode"] == "direct"):
        m = [r for r in runs if r["mode"] == "multilevel" and r["seed"] == d["seed"]]
        if not m:
            continue
        m = m[0]
        ms = m["step_ms"]
        depths = sorted(int(k) for k in ms)
        expected = 1 - sum(ms[str(k)] for k in depths) / (len(depths) * ms[str(m["blocks"])]) if depths else None
        pairs.append({"seed": d["seed"], "acc_direct": d["val_acc"], "acc_multilevel": m["val_acc"],
                      "acc_diff": m["val_acc"] - d["val_acc"], "work_saved": 1 - m["work_units"] / d["work_units"],
                      "time_saved": 1 - m["seconds"] / d["seconds"],
                      "train_time_saved": 1 - m["train_s"] / d["train_s"], "expected_saving": expected,
                      "step_ms": ms, "direct_step_ms": d["step_ms"][str(d["blocks"])]})
    out = {"theoretical_saving": th, "pairs": pairs}
    if pairs:
        keys = ("acc_direct", "acc_multilevel", "acc_diff", "work_saved", "time_saved", "train_time_saved",
                "expected_saving")
        out["mean"] = {k: statistics.fmean(p[k] for p in pairs) for k in keys}
        out["std"] = {k: statistics.stdev(p[k] for p in pairs) if len(pairs) > 1 else 0.0 for k in keys}
        out["equal_accuracy"] = all(abs(p["acc_diff"]) <= EQUAL_ACC for p in pairs)
        out["n"] = len(pairs)
    return out


# --------------------------------------------------------------------------- outputs
def pct(x) -> str:
    return f"{100 * x:.1f} %"


def _step_time_note(an: dict) -> str:
    """One sentence on how the measured step times compare with Chang's cost-proportional-to-depth model."""
    depths = sorted(int(k) for k in an["pairs"][0]["step_ms"])
    ratio = [statistics.fmean(p["step_ms"][str(d)] / p["step_ms"][str(depths[0])] for p in an["pairs"]) for d in depths]
    text = (f"Median step times at {', '.join(map(str, depths))} blocks per stage are in the ratio "
            f"{' : '.join(f'{r:.2f}' for r in ratio)} (proportional to the depth: "
            f"{' : '.join(f'{d / depths[0]:.2f}' for d in depths)}); ")
    if an["mean"]["expected_saving"] >= an["theoretical_saving"]:
        text += "the deep steps cost more than proportionally, so the step times predict at least the formula's saving. "
    else:
        text += ("the part of a step that does not shrink with the depth (opening, projection, classifier, data) "
                 "makes the saving smaller than the formula's. ")
    full = [p["direct_step_ms"] for p in an["pairs"]] + [p["step_ms"][str(depths[-1])] for p in an["pairs"]]
    return text + (f"The same full-depth step took {min(full):.1f} to {max(full):.1f} ms from run to run "
                   f"(median per run) with the load of other jobs on this shared machine; single-seed time savings "
                   f"scatter accordingly, while the accuracies and work units do not depend on it.")


def write_markdown(res: dict, path: Path) -> None:
    cfg, meta, an = res["config"], res["meta"], res["analysis"]
    s, th = cfg["setup"], an["theoretical_saving"]
    L = ["# Chang et al.: multilevel vs direct training of a conv ODE ResNet", ""]
    if cfg["quick"]:
        L += ["**Quick run** (tiny network, budget and subset, one seed): a smoke test, not a measurement.", ""]
    L += [f"Command: `{meta['command']}`", "",
          f"Machine: {meta['cpu_count']} CPU cores shared with other jobs, torch {meta['torch']}, float32, one "
          f"process, one thread. Load average before/after: {meta['loadavg_start']} / {meta['loadavg_end']}. "
          f"Total time {meta['elapsed_s']:.0f} s (training comparison {meta['training_s']:.0f} s).", "",
          "## Training: same epochs, multilevel (k = 2 interpolations) vs direct", "",
          f"Data: {res['data_name']}, {s['n_train']} training / {s['n_val']} held-out images at "
          f"{s['resolution']}x{s['resolution']} (a subset, downsampled, so that the benchmark fits a few minutes "
          f"on one core). Network: 3x3 conv opening, conv stages of **K = {s['blocks']} blocks each** with "
          f"channels {s['channels'].replace(',', '-')} (strided 1x1 projections between stages), ReLU, T = 1, "
          f"forward Euler, {'a linear classifier on the flattened final state' if s['head'] == 'flatten' else 'pooled head'}"
          f". SGD with momentum 0.9, mini-batches of {s['batch_size']}, weight decay 2e-4 (Tikhonov β = "
          f"{s['beta']:g}), lr {s['lr']} → {s['lr_min']} cosine (Chang: 0.5 → 0.001 with batch norm).", "",
          f"*direct*: N = {s['budget']} steps at depth K. *multilevel* (parml `cascade={DOUBLINGS}`): "
          f"N/3 = {s['budget'] // 3} steps at K/4, {s['budget'] // 3} at K/2 and {s['budget'] // 3} at K blocks per "
          f"stage, each interpolation copying every block and halving h, the cosine learning rate (and momentum) "
          f"restarted at every stage. Same data, seed and total steps for both. *U*: work units (one depth-K "
          f"gradient = 1). *wall s*: `summary[\"seconds\"]` (steps, validation every {s['eval_every']} steps, "
          f"interpolations); *train s*: inside the step calls only. Theoretical saving (Chang et al.) "
          f"1 − (2^(k+1) − 1)/(2^k (k+1)) = **{pct(th)}** for k = {DOUBLINGS}; *expected*: the saving the "
          f"measured median step times at K/4, K/2, K predict, 1 − Σ t(depth)/(3 t(K)).", "",
          "| seed | run | steps (blocks per stage) | final held-out acc | best | final train loss | U | wall s | train s | ms / step (blocks) |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(res["runs"], key=lambda r: (r["seed"], r["mode"] != "direct")):
        if r["mode"] == "direct":
            steps = f"{r['cycles']} ({r['blocks']})"
        else:
            steps = " + ".join(str(st["cycles"]) for st in r["stages"]) + f" + {r['cycles']} (" + \
                ", ".join(str(st["blocks"]) for st in r["stages"]) + f", {r['blocks']})"
        ms = ", ".join(f"{v:.1f} ({k})" for k, v in r["step_ms"].items())
        L.append(f"| {r['seed']} | {r['mode']} | {steps} | {r['val_acc']:.4f} | {r['best_val_acc']:.4f} | "
                 f"{r['final_loss']:.4f} | {r['work_units']:.1f} | {r['seconds']:.1f} | {r['train_s']:.1f} | {ms} |")
    L.append("")
    if an["pairs"]:
        L += ["| seed | held-out acc direct / multilevel | Δ acc | work saved | **time saved (wall)** | "
              "time saved (train) | expected from step times | theoretical |", "|---|---|---|---|---|---|---|---|"]
        for p in an["pairs"]:
            L.append(f"| {p['seed']} | {p['acc_direct']:.4f} / {p['acc_multilevel']:.4f} | {100 * p['acc_diff']:+.2f} pt | "
                     f"{pct(p['work_saved'])} | **{pct(p['time_saved'])}** | {pct(p['train_time_saved'])} | "
                     f"{pct(p['expected_saving'])} | {pct(th)} |")
        m, sd = an["mean"], an["std"]
        L.append(f"| mean ± sd | {m['acc_direct']:.4f} ± {sd['acc_direct']:.4f} / {m['acc_multilevel']:.4f} ± "
                 f"{sd['acc_multilevel']:.4f} | {100 * m['acc_diff']:+.2f} pt | {pct(m['work_saved'])} | "
                 f"**{pct(m['time_saved'])}** ± {100 * sd['time_saved']:.1f} | {pct(m['train_time_saved'])} | "
                 f"{pct(m['expected_saving'])} | {pct(th)} |")
        L += ["", f"Over {an['n']} seed(s): multilevel training saves {pct(m['time_saved'])} of the wall time "
              f"({pct(m['train_time_saved'])} of the training time; {pct(m['work_saved'])} of the work; theoretical "
              f"{pct(th)}) with held-out accuracy {m['acc_multilevel']:.4f} vs {m['acc_direct']:.4f} direct "
              f"({'equal within ' + str(EQUAL_ACC) + ' for every seed' if an['equal_accuracy'] else 'not equal within ' + str(EQUAL_ACC) + ' for every seed'}). "
              + _step_time_note(an), ""]
    g = res["gaps"]
    L += [f"## Interpolation accuracy: conv ODE ResNet (channels {'-'.join(map(str, CHANNELS))}) prolongated "
          "from K to 2K blocks per stage", "",
          "| K per stage | max gap, constant (Chang) | ratio | max gap, linear (Haber) | ratio |", "|---|---|---|---|---|"]
    for i, ((k, a), (_, b)) in enumerate(zip(g["constant"], g["linear"])):
        ra = f"{g['constant'][i - 1][1] / a:.2f}" if i else ""
        rb = f"{g['linear'][i - 1][1] / b:.2f}" if i else ""
        L.append(f"| {k} -> {2 * k} | {a:.3e} | {ra} | {b:.3e} | {rb} |")
    L += ["", "## Theoretical time saved by k interpolations (equal budget per stage, Chang et al.)", "",
          "| k | saving |", "|---|---|"]
    L += [f"| {k} | {100 * v:.2f} % |" for k, v in res["theoretical_saving"].items()]
    L += ["", "Curves: `chang_multilevel.png`; every number and curve: `results.json`."]
    path.write_text("\n".join(L) + "\n")


def write_plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = res["config"]["setup"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    first = min((r["seed"] for r in res["runs"]), default=0)
    for ax, x in zip(axes, ("work_units", "seconds")):
        for r in res["runs"]:
            c = r["curve"]
            color = "tab:blue" if r["mode"] == "direct" else "tab:red"
            ax.plot(c[x], c["val_acc"], "o-" if r["seed"] == first else "-", ms=2.5, color=color,
                    alpha=0.9 if r["seed"] == first else 0.35, label=r["mode"] if r["seed"] == first else None)
            if r["mode"] == "multilevel" and r["seed"] == first:
                ends = {}
                for ph, t in zip(c["phase"], c[x]):
                    ends[ph] = t
                for t in list(ends.values())[:-1]:
                    ax.axvline(t, color="tab:red", lw=0.6, ls=":")
        ax.set_xlabel("work units (one depth-K gradient = 1)" if x == "work_units" else "seconds (wall, incl. validation)")
        ax.set_ylabel("held-out accuracy")
        ax.set_ylim(max(0.0, min((min(r["curve"]["val_acc"]) for r in res["runs"]), default=0) - 0.02), 1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{res['data_name']}, conv {s['channels'].replace(',', '-')}, K={s['blocks']} per stage, "
                 f"N={s['budget']} steps (multilevel: K/4, K/2, K; stage ends dotted)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2000/1000 images, K=4 per stage, N=60, one seed")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "chang"))
    ap.add_argument("--seeds", type=int, default=None, help="seeds (default 3; --quick 1)")
    ap.add_argument("--data-dir", default=None, help="CIFAR-10 binary batches (data_batch_*.bin / test_batch.bin); "
                    "default: MNIST from --mnist-dir")
    ap.add_argument("--mnist-dir", default=default_mnist_dir(), help="MNIST IDX files (used without --data-dir)")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(1)
    from parml.data import DataError

    name, data_dir = ("cifar10", args.data_dir) if args.data_dir else ("mnist", args.mnist_dir)
    if not os.path.isdir(data_dir):
        ap.error(f"--{'data' if name == 'cifar10' else 'mnist'}-dir {data_dir!r} is not a directory")
    setup = {**SETUPS[name], **(QUICK if args.quick else {})}
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    if seeds < 1:
        ap.error(f"--seeds {seeds} must be at least 1")
    try:
        datasets = [load_data(name, data_dir, setup, seed) for seed in range(seeds)]
    except DataError as e:
        ap.error(str(e))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(["python", "benchmarks/chang_multilevel.py"] + (argv if argv is not None else sys.argv[1:])),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="parml-chang-"))
    runs = []
    try:
        # untimed warm-up: the first training in a process pays one-off costs
        small = {**setup, "blocks": 4, "budget": 6, "eval_every": 3}
        for mode in ("direct", "multilevel"):
            run_one(name, small, mode, 0, datasets[0], str(tmp / "warm-up"))
        for seed, data in enumerate(datasets):
            # alternate the order, so that a drifting machine load favours neither
            for mode in ("direct", "multilevel") if seed % 2 == 0 else ("multilevel", "direct"):
                r = run_one(name, setup, mode, seed, data, str(tmp / "runs"))
                runs.append(r)
                print(f"{name} K={setup['blocks']} N={setup['budget']} seed {seed} {mode:10s}: held-out acc "
                      f"{r['val_acc']:.4f} (best {r['best_val_acc']:.4f}), {r['work_units']:6.1f} U, "
                      f"{r['seconds']:6.1f} s (train {r['train_s']:6.1f} s)", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta["training_s"] = time.perf_counter() - t0
    res_gaps = {interp: gaps(interp, (2, 4, 8) if args.quick else (2, 4, 8, 16)) for interp in ("constant", "linear")}
    meta["elapsed_s"] = time.perf_counter() - start
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    res = {"config": {"quick": args.quick, "dataset": name, "data_dir": data_dir, "seeds": seeds, "setup": setup,
                      "doublings": DOUBLINGS},
           "data_name": datasets[0].name, "meta": meta, "runs": runs, "analysis": analyse(runs),
           "gaps": res_gaps, "theoretical_saving": {k: theoretical_saving(k) for k in (1, 2, 3, 4)},
           "channels": CHANNELS}
    (out / "results.json").write_text(json.dumps(res, indent=1))
    write_markdown(res, out / "chang_multilevel.md")
    write_plot(res, out / "chang_multilevel.png")
    an = res["analysis"]
    m = an["mean"]
    print(f"{name}: time saved {pct(m['time_saved'])} (train {pct(m['train_time_saved'])}, expected "
          f"{pct(m['expected_saving'])}, theoretical {pct(an['theoretical_saving'])}), held-out acc direct "
          f"{m['acc_direct']:.4f} / multilevel {m['acc_multilevel']:.4f}", flush=True)
    print(f"wrote {out / 'chang_multilevel.md'} ({meta['elapsed_s']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
