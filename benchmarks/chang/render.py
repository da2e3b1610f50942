"""chang_multilevel.md and .png."""
from __future__ import annotations

import statistics

from benchmarks.harness import pct, pyplot, save, table
from benchmarks.multilevel_init import DOUBLINGS, EQUAL_ACC, plot_curves, steps_text

from .records import CHANNELS, Analysis, Results


def step_time_note(an: Analysis) -> str:
    """How the measured step times compare with Chang's cost-proportional-to-depth model."""
    depths = sorted(an.pairs[0].step_ms)
    ratio = [statistics.fmean(p.step_ms[d] / p.step_ms[depths[0]] for p in an.pairs) for d in depths]
    text = (f"Median step times at {', '.join(map(str, depths))} blocks per stage are in the ratio "
            f"{' : '.join(f'{r:.2f}' for r in ratio)} (proportional to the depth: "
            f"{' : '.join(f'{d / depths[0]:.2f}' for d in depths)}); ")
    text += ("the deep steps cost more than proportionally, so the step times predict at least the formula's saving. "
             if an.mean["expected_saving"] >= an.theoretical_saving else
             "the part of a step that does not shrink with the depth (opening, projection, classifier, data) makes "
             "the saving smaller than the formula's. ")
    full = [p.direct_step_ms for p in an.pairs] + [p.step_ms[depths[-1]] for p in an.pairs]
    return text + (f"The same full-depth step took {min(full):.1f} to {max(full):.1f} ms from run to run (median per "
                   "run) with the load of other jobs on this shared machine; single-seed time savings scatter "
                   "accordingly, while the accuracies and work units do not depend on it.")


def markdown(res: Results) -> list[str]:
    cfg, meta, an, s = res.config, res.meta, res.analysis, res.config.setup
    th, third = an.theoretical_saving, s.budget // 3
    L = ["# Chang et al.: multilevel vs direct training of a conv ODE ResNet", ""]
    if cfg.quick:
        L += ["**Quick run** (tiny network, budget and subset, one seed): a smoke test, not a measurement.", ""]
    L += [f"Command: `{meta.command}`", "",
          f"Machine: {meta.cpu_count} CPU cores shared with other jobs, torch {meta.torch}, float32, one process, one "
          f"thread. Load average before/after: {meta.loadavg_start} / {meta.loadavg_end}. Total time "
          f"{meta.elapsed_s:.0f} s (training comparison {res.training_s:.0f} s).", "",
          "## Training: same epochs, multilevel (k = 2 interpolations) vs direct", "",
          f"Data: {res.data_name}, {s.n_train} training / {s.n_val} held-out images at {s.resolution}x{s.resolution} "
          "(a subset, downsampled, so that the benchmark fits a few minutes on one core). Network: 3x3 conv opening, "
          f"conv stages of **K = {s.blocks} blocks each** with channels {s.channels.replace(',', '-')} (strided 1x1 "
          "projections between stages), ReLU, T = 1, forward Euler, "
          + ("a linear classifier on the flattened final state" if s.head == "flatten" else "pooled head")
          + f". SGD with momentum 0.9, mini-batches of {s.batch_size}, weight decay 2e-4 (Tikhonov β = {s.beta:g}), "
          f"lr {s.lr} → {s.lr_min} cosine (Chang: 0.5 → 0.001 with batch norm).", "",
          f"*direct*: N = {s.budget} steps at depth K. *multilevel* (parml `cascade={DOUBLINGS}`): N/3 = {third} steps "
          f"at K/4, {third} at K/2 and {third} at K blocks per stage, each interpolation copying every block and "
          "halving h, the cosine learning rate (and momentum) restarted at every stage. Same data, seed and total "
          f"steps for both. *U*: work units (one depth-K gradient = 1). *wall s*: `summary[\"seconds\"]` (steps, "
          f"validation every {s.eval_every} steps, interpolations); *train s*: inside the step calls only (`train`'s "
          f"`around_cycle` hook). Theoretical saving (Chang et al.) 1 − (2^(k+1) − 1)/(2^k (k+1)) = **{pct(th)}** "
          f"for k = {DOUBLINGS}; *expected*: the saving the measured median step times at K/4, K/2, K predict, "
          "1 − Σ t(depth)/(3 t(K)).", "",
          *table(["seed", "run", "steps (blocks per stage)", "final held-out acc", "best", "final train loss", "U",
                  "wall s", "train s", "ms / step (blocks)"],
                 [[r.seed, r.mode, steps_text(r), f"{r.val_acc:.4f}", f"{r.best_val_acc:.4f}", f"{r.final_loss:.4f}",
                   f"{r.work_units:.1f}", f"{r.seconds:.1f}", f"{r.train_s:.1f}",
                   ", ".join(f"{v:.1f} ({k})" for k, v in r.step_ms.items())]
                  for r in sorted(res.runs, key=lambda r: (r.seed, r.mode != "direct"))]), ""]
    if an.pairs:
        m, sd = an.mean, an.std
        rows = [[p.seed, f"{p.acc_direct:.4f} / {p.acc_multilevel:.4f}", f"{100 * p.acc_diff:+.2f} pt",
                 pct(p.work_saved), f"**{pct(p.time_saved)}**", pct(p.train_time_saved), pct(p.expected_saving),
                 pct(th)] for p in an.pairs]
        rows.append(["mean ± sd", f"{m['acc_direct']:.4f} ± {sd['acc_direct']:.4f} / {m['acc_multilevel']:.4f} ± "
                     f"{sd['acc_multilevel']:.4f}", f"{100 * m['acc_diff']:+.2f} pt", pct(m["work_saved"]),
                     f"**{pct(m['time_saved'])}** ± {100 * sd['time_saved']:.1f}", pct(m["train_time_saved"]),
                     pct(m["expected_saving"]), pct(th)])
        equal = f"{'equal' if an.equal_accuracy else 'not equal'} within {EQUAL_ACC} for every seed"
        L += table(["seed", "held-out acc direct / multilevel", "Δ acc", "work saved", "**time saved (wall)**",
                    "time saved (train)", "expected from step times", "theoretical"], rows)
        L += ["", f"Over {an.n} seed(s): multilevel training saves {pct(m['time_saved'])} of the wall time "
              f"({pct(m['train_time_saved'])} of the training time; {pct(m['work_saved'])} of the work; theoretical "
              f"{pct(th)}) with held-out accuracy {m['acc_multilevel']:.4f} vs {m['acc_direct']:.4f} direct ({equal}). "
              + step_time_note(an), ""]
    g = res.gaps
    ratio = [[f"{a[i - 1][1] / a[i][1]:.2f}" if i else "" for i in range(len(a))] for a in (g["constant"], g["linear"])]
    L += [f"## Interpolation accuracy: conv ODE ResNet (channels {'-'.join(map(str, CHANNELS))}) prolongated from K "
          "to 2K blocks per stage", "",
          *table(["K per stage", "max gap, constant (Chang)", "ratio", "max gap, linear (Haber)", "ratio"],
                 [[f"{k} -> {2 * k}", f"{a:.3e}", ratio[0][i], f"{b:.3e}", ratio[1][i]]
                  for i, ((k, a), (_, b)) in enumerate(zip(g["constant"], g["linear"]))]),
          "", "## Theoretical time saved by k interpolations (equal budget per stage, Chang et al.)", "",
          *table(["k", "saving"], [[k, f"{100 * v:.2f} %"] for k, v in res.theoretical_saving.items()])]
    return L + ["", "Curves: `chang_multilevel.png`; every number and curve: `results.json`."]


def plot(res: Results, path) -> None:
    plt, s = pyplot(), res.config.setup
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    for ax, x in zip(axes, ("work_units", "seconds")):
        plot_curves(ax, res.runs, x, markers=True)
        ax.set_ylabel("held-out accuracy")
        ax.set_ylim(max(0.0, min((min(r.curve.val_acc) for r in res.runs), default=0) - 0.02), 1.0)
        ax.legend(loc="lower right")
    fig.suptitle(f"{res.data_name}, conv {s.channels.replace(',', '-')}, K={s.blocks} per stage, N={s.budget} steps "
                 "(multilevel: K/4, K/2, K; stage ends dotted)", fontsize=11)
    save(fig, path)
