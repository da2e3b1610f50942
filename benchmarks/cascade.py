"""Multilevel initialization (Chang et al.): shallow -> deep training vs direct deep training.

    python benchmarks/cascade.py [--quick] [--out benchmarks/results/cascade] [--seeds 3]

For each dataset and seed, two runs with the same step budget B, the same data and the same seed:

* direct: the depth-K network trained with plain GD / SGD for B steps, learning rate cosine-annealed
  from lr to lr_min over the B steps;
* cascade: parml's multilevel initialization with k = 2 interpolations (``cascade=2``): B/3 steps at
  depth K/4, prolongation (each block copied, h halved), B/3 steps at K/2, prolongation, and B/3
  steps at depth K (``cascade_cycles = max_cycles = B/3``); the cosine learning rate restarts
  for every stage, as implemented in ``parml.cascade``.

Both run to the end of the budget (no target accuracy), validating every few steps. Reported:
final validation accuracy and loss, work units (gradient evaluations weighted by depth / K),
wall time (``summary["seconds"]``, including the validations and the prolongations), training
time (inside the GD-step calls only), the measured time saved 1 - t_cascade / t_direct and,
next to it, Chang et al.'s theoretical saving 1 - (2^(k+1) - 1) / (2^k (k + 1))
(``parml.cascade.theoretical_saving``; 41.7 % for k = 2). Direct and cascade runs of a seed run
back to back in one process (P = 1), in alternating order from seed to seed, so that they see the
same machine load.

Datasets: circles (full batch, K = 1024, B = 300, lr 0.5) and MNIST (t10k split 8000/2000,
mini-batches of 1000, K = 1024, B = 240, lr 0.2). Outputs in ``--out``: ``cascade.md``,
``results.json``, ``cascade.png`` (validation accuracy against seconds for both).
``--quick``: circles only, K = 128, B = 150, one seed (under 60 s).
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

from parml.data import default_mnist_dir  # noqa: E402
from _step_timer import step_timer  # noqa: E402  (benchmarks/, the script's folder)

DOUBLINGS = 2
SETUPS = {
    "circles": {"dataset": "circles", "blocks": 1024, "budget": 300, "width": 3, "lr": 0.5, "lr_min": 0.001,
                "beta": 1e-4, "batch_size": None, "eval_every": 10},
    "mnist": {"dataset": "mnist", "blocks": 1024, "budget": 240, "width": 10, "lr": 0.2, "lr_min": 0.001,
              "beta": 1e-5, "batch_size": 1000, "eval_every": 10},
}
FULL = {"seeds": 3, "mnist_seeds": 3, "datasets": ["circles", "mnist"], "quick": False}
QUICK = {"seeds": 1, "mnist_seeds": 1, "datasets": ["circles"], "quick": True,
         "override": {"circles": {"blocks": 128, "budget": 150, "eval_every": 5}}}
GOAL_SAVED = 0.40
EQUAL_ACC = 0.005          # |accuracy difference| counted as equal


def run_one(setup: dict, mode: str, seed: int, data, data_dir, runs_dir: str) -> dict:
    from parml.comm import SelfComm
    from parml.config import TrainConfig
    from parml.training.report import validation_curve
    from parml.training.trainer import train

    B = setup["budget"]
    extra = ({"max_cycles": B} if mode == "direct" else
             {"cascade": DOUBLINGS, "cascade_cycles": B // (DOUBLINGS + 1), "max_cycles": B // (DOUBLINGS + 1)})
    name = f"{setup['dataset']}-{mode}-K{setup['blocks']}-s{seed}"
    cfg = TrainConfig(overwrite=True, dataset=setup["dataset"], data_dir=data_dir, blocks=setup["blocks"], width=setup["width"],
                      levels=1, lr=setup["lr"], lr_min=setup["lr_min"], lr_schedule="cosine", beta=setup["beta"],
                      batch_size=setup["batch_size"], seed=seed, target_accuracy=None,
                      eval_every=setup["eval_every"], out=runs_dir, run_name=name, backend="self", progress=False,
                      **extra)
    calls = []
    with step_timer(calls), contextlib.redirect_stdout(io.StringIO()):
        summary = train(cfg, SelfComm(), data)
    summary.pop("levels", None)
    folder = summary["folder"]
    with open(os.path.join(folder, "config.json")) as f:
        stages = json.load(f).get("cascade_stages", [])
    curve = validation_curve(folder)
    return {"dataset": setup["dataset"], "mode": mode, "seed": seed, "blocks": setup["blocks"], "budget": B,
            "steps": len(calls), "cycles": summary["cycles"], "work_units": summary["work_units"],
            "cascade_work_units": summary["cascade_work_units"], "seconds": summary["seconds"],
            "train_s": sum(sec for _, sec in calls), "val_acc": summary["val_acc"], "val_loss": summary["val_loss"],
            "final_loss": summary["final_loss"], "best_val_acc": max(curve["val_acc"]),
            "stages": stages, "curve": curve}


def _stage_ms(run: dict) -> list[tuple[int, float]]:
    """(depth, milliseconds per step) of every stage of a cascade run, from its validation rows
    (stage time = from the end of the previous stage to its last row; includes its validations)."""
    c = run["curve"]
    ends, order = {}, []
    for ph, t in zip(c["phase"], c["seconds"]):
        if ph not in ends:
            order.append(ph)
        ends[ph] = t
    depths = [st["blocks"] for st in run["stages"]] + [run["blocks"]]
    steps = [st["cycles"] for st in run["stages"]] + [run["cycles"]]
    if len(order) != len(depths):
        return []
    out, start = [], 0.0
    for ph, d, n in zip(order, depths, steps):
        out.append((d, 1e3 * (ends[ph] - start) / n))
        start = ends[ph]
    return out


def analyse(res: dict) -> dict:
    from parml.multilevel.cascade import theoretical_saving
    out = {"theoretical_saving": theoretical_saving(DOUBLINGS), "pairs": [], "datasets": {}}
    for name in res["config"]["datasets"]:
        pairs = []
        for d in (r for r in res["runs"] if r["dataset"] == name and r["mode"] == "direct"):
            c = [r for r in res["runs"] if r["dataset"] == name and r["mode"] == "cascade" and r["seed"] == d["seed"]]
            if not c:
                continue
            c = c[0]
            p = {"dataset": name, "seed": d["seed"], "acc_direct": d["val_acc"], "acc_cascade": c["val_acc"],
                 "acc_diff": c["val_acc"] - d["val_acc"],
                 "work_saved": 1 - c["work_units"] / d["work_units"],
                 "time_saved": 1 - c["seconds"] / d["seconds"],
                 "train_time_saved": 1 - c["train_s"] / d["train_s"]}
            # seconds per step at each depth of the cascade, and a fit t(depth) = a + b * depth:
            # a step cost that does not scale with depth (data, opening, head, per-step overhead)
            # lowers the saving below Chang's formula, which assumes cost proportional to depth
            stage_ms = _stage_ms(c)
            if len(stage_ms) >= 2:
                xs, ys = [d_ for d_, _ in stage_ms], [t for _, t in stage_ms]
                xm, ym = statistics.fmean(xs), statistics.fmean(ys)
                b = sum((x - xm) * (y - ym) for x, y in zip(xs, ys)) / sum((x - xm) ** 2 for x in xs)
                a = ym - b * xm
                full = a + b * c["blocks"]
                p.update(stage_ms=stage_ms, fit_a_ms=a, fit_b_ms=b, fixed_share=a / full if full > 0 else None,
                         predicted_saving=1 - sum(a + b * x for x in xs) / (len(xs) * full) if full > 0 else None)
            pairs.append(p)
        if not pairs:
            continue
        m = {k: statistics.fmean(p[k] for p in pairs) for k in ("acc_direct", "acc_cascade", "acc_diff", "work_saved",
                                                                  "time_saved", "train_time_saved")}
        ts = [r["seconds"] for r in res["runs"] if r["dataset"] == name]
        m["time_saved_of_means"] = 1 - (statistics.fmean(r["seconds"] for r in res["runs"] if r["dataset"] == name and r["mode"] == "cascade")
                                        / statistics.fmean(r["seconds"] for r in res["runs"] if r["dataset"] == name and r["mode"] == "direct"))
        m["equal_accuracy"] = all(abs(p["acc_diff"]) <= EQUAL_ACC for p in pairs)
        m["goal_met"] = m["equal_accuracy"] and m["time_saved"] >= GOAL_SAVED
        m["n"] = len(pairs)
        m["total_seconds"] = sum(ts)
        out["datasets"][name] = m
        out["pairs"] += pairs
    return out


def pct(x) -> str:
    return f"{100 * x:.1f} %"


def write_markdown(res: dict, path: Path) -> None:
    cfg, an = res["config"], res["analysis"]
    th = an["theoretical_saving"]
    L = ["# Multilevel initialization (shallow -> deep) vs direct deep training", ""]
    if cfg["quick"]:
        L += ["**Quick run** (small K and budget, one seed): a smoke test, not a measurement.", ""]
    L += [f"Command: `{res['meta']['command']}`", "",
          f"Machine: {res['meta']['cpu_count']} CPU cores shared with other jobs, torch {res['meta']['torch']}, float32, "
          f"one process, one thread. Load average before/after: {res['meta']['loadavg_start']} / "
          f"{res['meta']['loadavg_end']}. Total time {res['meta']['elapsed_s']:.0f} s.", "",
          f"Same data, seed and step budget B for both. *direct*: B steps at depth K, cosine learning rate over B. "
          f"*cascade* (parml `cascade={DOUBLINGS}`, Chang et al. with k = {DOUBLINGS} interpolations): B/3 steps at K/4, "
          f"B/3 at K/2, B/3 at K, each stage with its own cosine schedule, each prolongation copying every block "
          f"and halving h. *U*: work units (one depth-K gradient = 1; depth K/4 costs 1/4). *wall s*: "
          f"`summary[\"seconds\"]` (training, validation every few steps, prolongations); *train s*: inside the "
          f"step calls only. *saved* = 1 − t_cascade / t_direct; theoretical (Chang et al.) "
          f"1 − (2^(k+1) − 1)/(2^k (k+1)) = **{pct(th)}** for k = {DOUBLINGS}, which is also the work saved.", ""]
    for name in cfg["datasets"]:
        s = cfg["setups"][name]
        m = an["datasets"].get(name)
        L += [f"## {name}", "",
              f"K = {s['blocks']}, B = {s['budget']} steps, width {s['width']}, lr {s['lr']} → {s['lr_min']} (cosine), "
              f"β {s['beta']:g}, " + ("full batch" if s["batch_size"] is None else f"mini-batches of {s['batch_size']}")
              + f", validation every {s['eval_every']} steps.", "",
              "| seed | run | steps (depths) | final val acc | best val acc | final train loss | U | wall s | train s |",
              "|---|---|---|---|---|---|---|---|---|"]
        for r in sorted((r for r in res["runs"] if r["dataset"] == name), key=lambda r: (r["seed"], r["mode"] != "direct")):
            if r["mode"] == "direct":
                steps = f"{r['cycles']} ({r['blocks']})"
            else:
                steps = " + ".join(f"{st['cycles']}" for st in r["stages"]) + f" + {r['cycles']} (" + \
                    ", ".join(str(st["blocks"]) for st in r["stages"]) + f", {r['blocks']})"
            L.append(f"| {r['seed']} | {r['mode']} | {steps} | {r['val_acc']:.4f} | {r['best_val_acc']:.4f} | "
                     f"{r['final_loss']:.4f} | {r['work_units']:.1f} | {r['seconds']:.1f} | {r['train_s']:.1f} |")
        L.append("")
        pairs = [p for p in an["pairs"] if p["dataset"] == name]
        if pairs:
            L += ["| seed | val acc direct / cascade | work saved | **time saved (wall)** | time saved (train) | theoretical |",
                  "|---|---|---|---|---|---|"]
            for p in pairs:
                L.append(f"| {p['seed']} | {p['acc_direct']:.4f} / {p['acc_cascade']:.4f} | {pct(p['work_saved'])} | "
                         f"**{pct(p['time_saved'])}** | {pct(p['train_time_saved'])} | {pct(th)} |")
            L.append(f"| mean | {m['acc_direct']:.4f} / {m['acc_cascade']:.4f} | {pct(m['work_saved'])} | "
                     f"**{pct(m['time_saved'])}** | {pct(m['train_time_saved'])} | {pct(th)} |")
            L.append("")
            fits = [p for p in pairs if p.get("stage_ms")]
            if fits:
                L += ["Step time per depth in the cascade runs (ms per step, validations included) and the fit "
                      "t(depth) = a + b·depth: *a* is the part of a step that does not shrink with the depth "
                      "(data, opening and head layers, per-step overhead); with it the expected saving is "
                      "1 − Σ t(depth_i) / (3 t(K)) instead of Chang's formula.", "",
                      "| seed | ms per step (" + ", ".join(str(d_) for d_, _ in fits[0]["stage_ms"]) +
                      " blocks) | a ms | b ms per block | a / t(K) | expected saving |", "|---|---|---|---|---|---|"]
                for p in fits:
                    L.append(f"| {p['seed']} | " + ", ".join(f"{t:.1f}" for _, t in p["stage_ms"]) +
                             f" | {p['fit_a_ms']:.2f} | {p['fit_b_ms']:.4f} | {pct(p['fixed_share'])} | "
                             f"{pct(p['predicted_saving'])} |")
                L.append("")
    L += ["## Goal", "", f"≥ {pct(GOAL_SAVED)} of the time saved at equal accuracy (|Δ val acc| ≤ {EQUAL_ACC}).", ""]
    for name, m in an["datasets"].items():
        acc = (f"accuracy equal within {EQUAL_ACC} for every seed" if m["equal_accuracy"] else
               f"accuracy differs by more than {EQUAL_ACC} (mean direct {m['acc_direct']:.4f}, cascade "
               f"{m['acc_cascade']:.4f})")
        L.append(f"* {name}: mean time saved {pct(m['time_saved'])} (train only {pct(m['train_time_saved'])}; "
                 f"theoretical {pct(th)}); {acc}. Goal **{'met' if m['goal_met'] else 'not met'}**.")
    L += ["", "Curves: `cascade.png`; every number and curve: `results.json`."]
    path.write_text("\n".join(L) + "\n")


def write_plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = res["config"]["datasets"]
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        for r in (r for r in res["runs"] if r["dataset"] == name):
            c = r["curve"]
            color = "tab:blue" if r["mode"] == "direct" else "tab:red"
            ax.plot(c["seconds"], c["val_acc"], "-", color=color, alpha=0.9 if r["seed"] == 0 else 0.35,
                    label=f"{r['mode']}" if r["seed"] == 0 else None)
            if r["mode"] == "cascade" and r["seed"] == 0:
                ends = {}
                for ph, t in zip(c["phase"], c["seconds"]):
                    ends[ph] = t
                for ph, t in list(ends.items())[:-1]:
                    ax.axvline(t, color="tab:red", lw=0.6, ls=":")
        s = res["config"]["setups"][name]
        ax.set_xlabel("seconds (wall, incl. validation)")
        ax.set_ylabel("validation accuracy")
        ax.set_title(f"{name}, K={s['blocks']}, B={s['budget']} (cascade: K/4, K/2, K; stage ends dotted)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="circles only, K=128, B=150, one seed (< 60 s)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cascade"))
    ap.add_argument("--seeds", type=int, default=None, help="circles seeds (default 3)")
    ap.add_argument("--mnist-seeds", type=int, default=None, help="MNIST seeds (default 3)")
    ap.add_argument("--datasets", default=None, help="comma-separated: circles,mnist")
    ap.add_argument("--data-dir", default=default_mnist_dir())
    ap.add_argument("--keep-runs", action="store_true", help="keep the run folders under OUT/runs")
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(1)
    from parml.data import load_dataset

    cfg = dict(QUICK if args.quick else FULL)
    if args.seeds is not None:
        cfg["seeds"] = args.seeds
    if args.mnist_seeds is not None:
        cfg["mnist_seeds"] = args.mnist_seeds
    if args.datasets:
        cfg["datasets"] = [d.strip() for d in args.datasets.split(",") if d.strip()]
        bad = [d for d in cfg["datasets"] if d not in SETUPS]
        if bad:
            ap.error(f"unknown dataset {bad[0]!r} (valid: {', '.join(SETUPS)})")
    if "mnist" in cfg["datasets"] and not args.data_dir:
        ap.error("MNIST needs --data-dir (default ../shared/data/mnist not found)")
    setups = {n: {**SETUPS[n], **cfg.get("override", {}).get(n, {})} for n in cfg["datasets"]}
    for n, s in setups.items():
        if s["budget"] % (DOUBLINGS + 1) or s["blocks"] % 2 ** DOUBLINGS:
            ap.error(f"{n}: the budget must divide by {DOUBLINGS + 1} and K by {2 ** DOUBLINGS}")
    cfg["setups"] = setups
    cfg.pop("override", None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="parml-cascade-"))
    runs_dir = str(out / "runs" if args.keep_runs else tmp / "runs")
    meta = {"command": " ".join(["python", "benchmarks/cascade.py"] + (argv if argv is not None else sys.argv[1:])),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    t0 = time.perf_counter()
    runs = []
    try:
        for name in cfg["datasets"]:
            s = setups[name]
            for seed in range(cfg["seeds"] if name == "circles" else cfg["mnist_seeds"]):
                data = load_dataset(name, args.data_dir if name == "mnist" else None, seed=seed)
                if seed == 0:      # untimed warm-up: the first training in a process pays one-off costs
                    small = {**s, "blocks": 16, "budget": 6, "eval_every": 1}
                    for mode in ("direct", "cascade"):
                        run_one(small, mode, seed, data, args.data_dir, os.path.join(runs_dir, "warm-up"))
                # alternate the order, so that a drifting machine load favours neither
                for mode in ("direct", "cascade") if seed % 2 == 0 else ("cascade", "direct"):
                    r = run_one(s, mode, seed, data, args.data_dir, runs_dir)
                    runs.append(r)
                    print(f"{name:7s} K={s['blocks']} B={s['budget']} seed {seed} {mode:7s}: val acc {r['val_acc']:.4f} "
                          f"(best {r['best_val_acc']:.4f}), {r['work_units']:7.1f} U, {r['seconds']:6.1f} s "
                          f"(train {r['train_s']:6.1f} s)", flush=True)
    finally:
        meta["elapsed_s"] = time.perf_counter() - t0
        meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        res = {"config": cfg, "meta": meta, "runs": runs}
        res["analysis"] = analyse(res)
        (out / "results.json").write_text(json.dumps(res, indent=1))
        write_markdown(res, out / "cascade.md")
        write_plot(res, out / "cascade.png")
        shutil.rmtree(tmp, ignore_errors=True)
    for name, m in res["analysis"]["datasets"].items():
        print(f"{name}: time saved {pct(m['time_saved'])} (theoretical {pct(res['analysis']['theoretical_saving'])}), "
              f"val acc direct {m['acc_direct']:.4f} / cascade {m['acc_cascade']:.4f}", flush=True)
    print(f"wrote {out / 'cascade.md'} ({meta['elapsed_s']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
