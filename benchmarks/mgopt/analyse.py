"""The MG/OPT study's analysis: L = 1 vs L = 8 ratios (with a bootstrap interval over seeds and
thresholds on the way), P = 2 against P = 1, parallel efficiency, gathered coarse levels."""
from __future__ import annotations

import random
import statistics

from .records import (Analysis, Efficiency, Exactness, MgResults, MgRun, MinBlocks, MinBlocksSide, Ratio,
                      SeedRatio, Setup, Threshold)

GOAL_WORK, GOAL_WALL = 4.0, 3.5
CYCLE_L8 = "[(1),1,1,1,2,2,2,{2}]"
SETUPS = {
    "circles": Setup("circles", 3, 0.1, 1e-4, None, 1.0, [0.9, 0.95, 0.99, 1.0]),
    "mnist": Setup("mnist", 10, 0.01, 1e-5, 1000, 0.93, [0.7, 0.75, 0.8, 0.82, 0.85, 0.88, 0.9, 0.93]),
}


def mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def ratio_of_means_interval(pairs, draws: int = 20000, level: float = 0.95, seed: int = 0):
    """Percentile bootstrap interval of mean(a) / mean(b) over (a, b) pairs resampled by seed: how
    far the ratio of a handful of seeds can be from the ratio the method has on average."""
    rng, n = random.Random(seed), len(pairs)
    if n < 2:
        return None
    rs = sorted(sum(a for a, _ in draw) / sum(b for _, b in draw)
                for draw in ([pairs[rng.randrange(n)] for _ in range(n)] for _ in range(draws)))
    lo = int((1 - level) / 2 * draws)
    return [rs[lo], rs[draws - 1 - lo]]


def first_reaching(run: MgRun, thr: float, key: str):
    for acc, x in zip(run.curve.val_acc, getattr(run.curve, key)):
        if acc is not None and acc >= thr - 1e-12:
            return x
    return None


def find(runs, **kw) -> list[MgRun]:
    return [r for r in runs if all(getattr(r, k) == v for k, v in kw.items())]


def _thresholds(name: str, l1: list[MgRun], l8: list[MgRun]) -> dict[float, Threshold]:
    out = {}
    for t in SETUPS[name].thresholds:
        u1, u8 = ([first_reaching(r, t, "work_units") for r in rs] for rs in (l1, l8))
        s1, s8 = ([first_reaching(r, t, "seconds") for r in rs] for rs in (l1, l8))
        # means over the runs that reached the threshold; ratios only where every run did
        out[t] = Threshold(mean(u1), mean(u8), mean(s1), mean(s8), sum(u is not None for u in u1),
                           sum(u is not None for u in u8), len(u1), None not in u1 + u8,
                           max(r.work_units for r in l1), max(r.work_units for r in l8))
    return out


def ratio(name: str, l1: list[MgRun], l8: list[MgRun]) -> Ratio:
    keys = ("work_units", "seconds", "train_s", "cycles")
    m1 = {k: mean([getattr(r, k) for r in l1]) for k in keys}
    m8 = {k: mean([getattr(r, k) for r in l8]) for k in keys}
    per_seed, pairs = [], []           # (U of L = 1, U of L = 8) per seed, for the interval
    for a in l1:
        for b in find(l8, seed=a.seed)[:1]:
            per_seed.append(SeedRatio(a.seed, a.work_units / b.work_units, a.seconds / b.seconds,
                                      a.train_s / b.train_s))
            pairs.append((a.work_units, b.work_units))
    e = Ratio(sorted({r.seed for r in l1} & {r.seed for r in l8}), all(r.reached_target for r in l1 + l8), m1, m8,
              m1["work_units"] / m8["work_units"], m1["seconds"] / m8["seconds"], m1["train_s"] / m8["train_s"],
              per_seed, ratio_of_means_interval(pairs), thresholds=_thresholds(name, l1, l8))
    if len(pairs) > 3:                 # the 3 seeds: the first three of this run
        e.work_ratio_first3 = sum(a for a, _ in pairs[:3]) / sum(b for _, b in pairs[:3])
    if name == "circles":
        e.goal_work_met = e.all_reached and e.work_ratio >= GOAL_WORK
        e.goal_wall_met = e.all_reached and e.wall_ratio >= GOAL_WALL
    return e


def exactness(runs: list[MgRun]) -> list[Exactness]:
    out = []
    for b in find(runs, P=2, variant="default"):
        for a in find(runs, P=1, dataset=b.dataset, levels=b.levels, seed=b.seed, variant="default")[:1]:
            out.append(Exactness(b.dataset, b.levels, b.seed, [a.cycles, b.cycles], [a.work_units, b.work_units],
                                 [a.val_acc, b.val_acc], abs(a.final_loss - b.final_loss) / abs(a.final_loss),
                                 (a.cycles, a.work_units, a.val_acc) == (b.cycles, b.work_units, b.val_acc),
                                 a.train_s / b.train_s, a.seconds / b.seconds))
    return out


def efficiency(rs: list[MgRun], P: int) -> Efficiency:
    """Means over seeds, per rank."""
    def ranks(key):
        return [mean([getattr(r.per_rank[i], key) for r in rs]) for i in range(P)]
    return Efficiency(mean([r.efficiency for r in rs]), rs[0].bound, mean([r.train_s for r in rs]),
                      mean([1e3 * r.train_s / r.cycles for r in rs]), ranks("compute_s"), ranks("wait_s"),
                      ranks("other_s"), ranks("comm_wait_s"), ranks("rest_s"), len(rs))


def min_blocks(runs: list[MgRun]) -> MinBlocks | None:
    pairs = []
    for b in find(runs, P=2, dataset="circles", levels=8, variant="min1"):
        for a in find(runs, P=2, dataset="circles", levels=8, seed=b.seed, variant="default")[:1]:
            pairs.append({r.min_blocks_per_rank: MinBlocksSide(r.cycles, r.work_units, r.seconds, r.train_s,
                                                               r.efficiency, r.seed, r.plan, r.level_seconds,
                                                               r.val_acc) for r in (a, b)})
    if not pairs:
        return None
    keys = ("cycles", "work_units", "seconds", "train_s", "efficiency")
    avg = {k: MinBlocksSide(*(mean([getattr(p[k], q) for p in pairs]) for q in keys)) for k in (16, 1)}
    return MinBlocks(pairs, avg, avg[1].train_s / avg[16].train_s)


def analyse(res: MgResults) -> Analysis:
    runs = [r for r in res.runs if r.status != "diverged"]
    an = Analysis(exactness=exactness(runs), min_blocks=min_blocks(runs))
    for name in res.config.datasets:
        for P in res.config.P:
            l1, l8 = (find(runs, dataset=name, P=P, levels=L, variant="default") for L in (1, 8))
            if l1 and l8:
                an.ratios[f"{name}-P{P}"] = ratio(name, l1, l8)
        for L in (1, 8):
            row = {f"P{P}": efficiency(rs, P) for P in res.config.P
                   if (rs := find(runs, dataset=name, P=P, levels=L, variant="default"))}
            if row:
                an.efficiency[f"{name}-L{L}"] = row
    return an
