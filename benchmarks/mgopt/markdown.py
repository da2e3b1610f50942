"""mgopt_scaling.md: per-dataset runs and ratios, the goal, exactness, efficiency, levels."""
from __future__ import annotations

from ..harness import fmt, table
from .analyse import GOAL_WALL, GOAL_WORK, SETUPS, find, mean
from .records import MgResults


def _slash(xs, spec=".1f") -> str:
    return " / ".join(format(x, spec) for x in xs)


def header(res: MgResults) -> list[str]:
    cfg, meta = res.config, res.meta
    L = [f"# MG/OPT scaling: V-cycles vs gradient descent, serial and layer-parallel (K = {cfg.blocks})", ""]
    if cfg.quick:
        L += ["**Quick run** (K = 128, one seed, circles only): a smoke test, not a measurement.", ""]
    return L + [
        f"Command: `{meta.command}`", "",
        f"Machine: {meta.cpu_count} CPU cores shared with other jobs, torch {meta.torch}, float32, one thread per "
        f"rank. Load average before/after: {meta.loadavg_start} / {meta.loadavg_end}. Total time "
        f"{meta.elapsed_s:.0f} s. P = 2 ranks: {cfg.p2_backend} backend, real processes; M = {cfg.microbatches} "
        f"micro-batch(es), 1F1B schedule; metric `{cfg.metric}`." +
        (f" MNIST: folder `{cfg.data.name}` (SHA-256 of its files in results.json)." if cfg.data else ""), "",
        "One launch per P runs every configuration; L = 1 and L = 8 of the same seed run back to back, so ratios "
        "compare runs under the same machine load (the machine is shared: absolute times vary between launches "
        "by up to 2x).", "",
        "*wall s*: `summary[\"seconds\"]` (training plus validation after every cycle, as a user sees it); *train s*: "
        "time inside the V-cycle (L = 8) or GD-step (L = 1) calls only (slowest rank), timed through `train`'s "
        "`around_cycle` hook. *U*: work units (one finest-level gradient = 1; level l costs K_l/K; one V-cycle "
        "costs `CycleSetup.cost()`).", ""]


def dataset_section(res: MgResults, name: str) -> list[str]:
    cfg, an, d = res.config, res.analysis, SETUPS[name]
    runs = [r for r in res.runs if r.status != "diverged"]
    L = [f"## {name}", ""]
    if name == "circles":
        L += [f"Width {d.width}, lr {d.lr}, β {d.beta:g}, full-batch GD, target validation accuracy "
              f"{d.target_accuracy}; at most {cfg.circles_max_cycles[1]} steps (L = 1) / {cfg.circles_max_cycles[8]} "
              "V-cycles (L = 8).", ""]
    else:
        L += [f"MNIST t10k split 8000/2000, width {d.width}, lr {d.lr}, β {d.beta:g}, mini-batches of {d.batch_size}, "
              f"target {d.target_accuracy}; equal work budget of {cfg.mnist_work_budget:g} work units for L = 1 and "
              f"L = 8 (validation every {cfg.mnist_eval_every[1]} steps for L = 1, every V-cycle for L = 8, i.e. about "
              "every 5 work units for both).", ""]
    rows = sorted(find(runs, dataset=name, variant="default"), key=lambda r: (r.P, r.levels, r.seed))
    L += table(["P", "L", "seed", "status", "cycles", "U", "wall s", "train s", "final val acc", "efficiency"],
               [[r.P, r.levels, r.seed, r.status, r.cycles, f"{r.work_units:.1f}", f"{r.seconds:.1f}",
                 f"{r.train_s:.1f}", f"{r.val_acc:.4f}", f"{r.efficiency:.3f}"] for r in rows]) + [""]
    ratios = {P: an.ratios[f"{name}-P{P}"] for P in cfg.P if f"{name}-P{P}" in an.ratios}
    if ratios and all(e.all_reached for e in ratios.values()):
        L += table(["P", "mean U L=1", "mean U L=8", "**U ratio**", "mean wall s L=1", "mean wall s L=8",
                    "**wall ratio**", "train ratio", "per-seed U ratios", "per-seed wall ratios"],
                   [[P, f"{e.mean_L1['work_units']:.1f}", f"{e.mean_L8['work_units']:.1f}", f"**{e.work_ratio:.2f}**",
                     f"{e.mean_L1['seconds']:.1f}", f"{e.mean_L8['seconds']:.1f}", f"**{e.wall_ratio:.2f}**",
                     f"{e.train_ratio:.2f}", ", ".join(f"{s.work_ratio:.2f}" for s in e.per_seed),
                     ", ".join(f"{s.wall_ratio:.2f}" for s in e.per_seed)] for P, e in ratios.items()]) + [""]
    elif ratios:
        L += [f"Not every run reached the target {d.target_accuracy}: runs stopped at the budget, so work units to "
              "the target cannot be compared (at an equal work budget their ratio is 1 by construction). Validation "
              "accuracy at the budget (mean over seeds):", ""]
        cells = []
        for P in cfg.P:
            l1, l8 = (find(runs, dataset=name, P=P, levels=lv, variant="default") for lv in (1, 8))
            if l1 and l8:
                cells.append([P] + [f"{mean([getattr(r, k) for r in rs]):{f}}" for rs in (l1, l8)
                                    for k, f in (("work_units", ".1f"), ("val_acc", ".4f"), ("seconds", ".1f"))])
        L += table(["P", "U L=1", "val acc L=1", "wall s L=1", "U L=8", "val acc L=8", "wall s L=8"], cells) + [""]
    return L + thresholds_table(res, name)


def thresholds_table(res: MgResults, name: str) -> list[str]:
    e1 = res.analysis.ratios.get(f"{name}-P1")
    if not e1 or not e1.thresholds:
        return []
    cells = []
    for t, v in e1.thresholds.items():
        ur = v.work_L1 / v.work_L8 if v.all_reached else None
        sr = v.seconds_L1 / v.seconds_L8 if v.all_reached else None
        u1 = fmt(v.work_L1) if v.work_L1 is not None else f"> {v.budget_L1:.0f}"
        u8 = fmt(v.work_L8) if v.work_L8 is not None else f"> {v.budget_L8:.0f}"
        cells.append([t, u1, u8, fmt(ur, ".2f"), fmt(v.seconds_L1), fmt(v.seconds_L8), fmt(sr, ".2f"),
                      f"{v.reached_L1}/{v.n} / {v.reached_L8}/{v.n}"])
    return ["Work units and wall seconds to first reach a validation accuracy (P = 1; mean over the runs that "
            "reached it, *> U* where none did within the budget U; ratios where every run reached it):", "",
            *table(["val acc ≥", "U L=1", "U L=8", "U ratio", "wall s L=1", "wall s L=8", "wall ratio",
                    "reached L=1 / L=8"], cells), ""]


def goal_section(res: MgResults) -> list[str]:
    cfg = res.config
    L = [f"## Goal (circles, K = {cfg.blocks}, {cfg.seeds} seed(s))", "",
         f"L = 8 needs ≥ {GOAL_WORK:g}x fewer work units (mean) and ≥ {GOAL_WALL:g}x less wall time than L = 1 to "
         "reach validation accuracy 1.0 on the same ranks (paper: 95 / 26 = 3.65x in work units).", ""]
    for P in cfg.P:
        e = res.analysis.ratios.get(f"circles-P{P}")
        if e:
            ci = e.work_ratio_ci95
            L.append(f"* P = {P}: work units {e.work_ratio:.2f}x (**{'met' if e.goal_work_met else 'not met'}**"
                     + (f"; 95 % bootstrap interval over seeds {ci[0]:.2f}–{ci[1]:.2f}" if ci else "")
                     + (f"; seeds 0–2 alone {e.work_ratio_first3:.2f}x" if e.work_ratio_first3 else "")
                     + f"), wall time {e.wall_ratio:.2f}x (**{'met' if e.goal_wall_met else 'not met'}**), "
                     f"training time only {e.train_ratio:.2f}x" + ("" if e.all_reached else
                                                                   "; not every run reached the target"))
    return L


def euclidean_note(e) -> list[str]:
    """The same comparison with ``--metric euclidean`` (results in OUT/euclidean), if there is one."""
    if e is None:
        return []
    return [f"* For comparison, `--metric euclidean` (plain steps on the raw parameters, Tikhonov weight 2^(L−l) as "
            f"in the paper; `euclidean/`, P = 1, seeds {', '.join(map(str, e.seeds))}): mean "
            f"{e.mean_L1['work_units']:.1f} vs {e.mean_L8['work_units']:.1f} work units = {e.work_ratio:.2f}x, wall "
            f"time {e.wall_ratio:.2f}x, training time only {e.train_ratio:.2f}x."]


def exactness_section(res: MgResults) -> list[str]:
    M = res.config.microbatches
    if not res.analysis.exactness:
        return []
    why = ("the ranks run one after the other within every forward and backward, so no speed-up over one process "
           "is possible (P = 2 halves the parameters and activations per rank); a speed-up needs M > 1 micro-batches "
           "in flight (`--microbatches`)." if M == 1 else "speed-up is at most 2 x the bound.")
    return ["## P = 2 against P = 1 (same configuration and seed)", "",
            "Speed-up = P = 1 time / P = 2 time, from two different launches (different machine load). With "
            f"M = {M} micro-batch(es) on 2 ranks the pipeline bound is {M / (M + 1):.2f}: " + why, "",
            *table(["dataset", "L", "seed", "cycles P=1 / P=2", "U P=1 / P=2", "val acc P=1 / P=2",
                    "final loss rel. diff", "equal", "speed-up train", "speed-up wall"],
                   [[x.dataset, x.levels, x.seed, _slash(x.cycles, "d"), _slash(x.work_units, ".4f"),
                     _slash(x.val_acc, ".4f"), f"{x.final_loss_rel_diff:.1e}", "yes" if x.equal else "no",
                     f"{x.speedup_train:.2f}", f"{x.speedup_wall:.2f}"] for x in res.analysis.exactness]), ""]


def efficiency_section(res: MgResults) -> list[str]:
    if not res.analysis.efficiency:
        return []
    cells = []
    for key, row in res.analysis.efficiency.items():
        name, lv = key.rsplit("-L", 1)
        for P in res.config.P:
            v = row.get(f"P{P}")
            if v:
                cells.append([name, lv, P, f"{v.per_call_ms:.1f}", _slash(v.compute_s), _slash(v.wait_s),
                              _slash(v.other_s), _slash(v.comm_wait_s), _slash(v.rest_s), f"**{v.efficiency:.3f}**",
                              f"{v.bound:.2f}"])
    return ["## Parallel efficiency: GD step (L = 1) vs V-cycle (L = 8)", "",
            "Per rank, accumulated over the run (means over seeds): *compute* and *wait* from `LayerParallel.total` "
            "of every level's executor; *other* = training time − compute − wait (restriction, prolongation, "
            "optimizer steps, moving tensors between layouts, and on rank 1 the blocking wait while a gathered "
            "coarse level runs on rank 0). *efficiency* = busiest rank's compute / training wall time; for P = 1 it "
            "is the fraction of the time spent in forward/backward. *bound* = M / (M + P − 1). *all comm. wait*: "
            "time in every blocking communication during the V-cycle / GD-step calls (`Communicator.wait_seconds` "
            "of the world and the level groups: pipeline receives, the loss broadcast and regularization allreduce "
            "of every gradient, transfers to and from gathered levels); *rest* = training time − compute − all "
            "comm. wait (local work: restriction, prolongation, optimizer steps, Python overhead).", "",
            *table(["dataset", "L", "P", "ms per step / V-cycle", "compute s (per rank)", "pipeline wait s",
                    "other s", "all comm. wait s", "rest s", "efficiency", "bound"], cells), ""]


def levels_section(res: MgResults) -> list[str]:
    K = res.config.blocks
    cols = sorted((r for r in res.runs if r.levels == 8 and r.dataset == "circles" and r.seed == 0
                   and r.status != "diverged"), key=lambda r: (r.P, -r.min_blocks_per_rank))
    if not cols:
        return []
    cells = []
    for i in range(8):
        cells.append([i + 1, K >> (7 - i)] + [f"{r.plan[i]} / {r.level_seconds[i]:.2f} / "
                                              f"{fmt(r.level_efficiency[i].efficiency, '.2f')}" for r in cols])
    return ["## Time per level (circles, L = 8, seed 0)", "",
            "`summary[\"level_seconds\"]` (rank 0: gradient evaluations and smoothing steps of the level), the ranks "
            "a level runs on, and the level's forward/backward efficiency (busiest rank's compute / slowest rank's "
            "forward-backward time).", "",
            *table(["level", "blocks"] + [f"P={r.P}{' min1' if r.variant == 'min1' else ''}: ranks / s / eff"
                                          for r in cols], cells), ""]


def min_blocks_section(res: MgResults) -> list[str]:
    mb = res.analysis.min_blocks
    if mb is None:
        return []
    cells = [[v.seed, k, v.plan, v.cycles, f"{v.work_units:.2f}", f"{v.seconds:.1f}", f"{v.train_s:.1f}",
              f"{v.efficiency:.3f}"] for p in mb.pairs for k, v in sorted(p.items(), reverse=True)]
    cells += [["mean", k, "", f"{v.cycles:.1f}", f"{v.work_units:.2f}", f"{v.seconds:.1f}", f"{v.train_s:.1f}",
               f"{v.efficiency:.3f}"] for k, v in sorted(mb.mean.items(), reverse=True)]
    return ["## Coarse levels gathered (min blocks per rank 16) vs every level on both ranks (1)", "",
            "circles, L = 8, P = 2; the two runs of a seed back to back in one launch.", "",
            *table(["seed", "min blocks per rank", "ranks per level (coarsest first)", "cycles", "U", "wall s",
                    "train s", "efficiency"], cells),
            "", f"Training time with every level on both ranks / with coarse levels gathered: "
                f"{mb.train_ratio_1_over_16:.2f}.", ""]


def markdown(res: MgResults, euclidean=None) -> list[str]:
    L = header(res)
    for name in res.config.datasets:
        L += dataset_section(res, name)
    L += goal_section(res) + euclidean_note(euclidean) + [""]
    L += exactness_section(res) + efficiency_section(res) + levels_section(res) + min_blocks_section(res)
    if res.failures:
        L += ["## Failures", ""] + [f"* `{f.splitlines()[0]}`" for f in res.failures] + [""]
    return L + ["Curves: `mgopt_scaling.png`; every number and curve: `results.json`."]
