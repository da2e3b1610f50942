"""The plan validation's analysis: ``parml.plan``'s prediction of every measured configuration at
the load it ran under, the errors, and ``--layout auto``'s choice at 2 ranks against the fastest
measured layouts."""
from __future__ import annotations

import statistics

from parml.config import TrainConfig
from parml.model import ModelSpec, StageSpec
from parml.plan.planner import plan
from parml.plan.predict import predict
from parml.plan.profile import Profile
from parml.plan.simulate import Layout, Workload

from .records import AutoChoice, Case, Conf, Errors, Fastest, Measured, ValResults

TARGET_MEDIAN, TARGET_MAX = 0.15, 0.30
VCYCLE_LEVELS = TrainConfig().levels            # the V-cycle cases: parml's default hierarchy


def workload(case: Case, levels: int) -> Workload:
    spec = ModelSpec(case.in_features, case.classes, (StageSpec(case.width, case.blocks),))
    return Workload(spec, case.batch, levels, TrainConfig(levels=levels).setup)


def background(m: Measured, cores: int) -> float:
    """Other busy processes while the configuration ran: from the share of a core each of its
    `world` ranks got while they all spun (median over the timed steps)."""
    return statistics.median(max(0.0, cores / max(s, 1e-3) - m.world) for s in m.share)


def layout_of(m: Measured, cores: int, backend: str = "gloo") -> Layout:
    return Layout(m.D, m.world // m.D, m.M, m.schedule, m.coarse, m.mbpr, "auto", backend,
                  ranks_per_node=m.world, background=background(m, cores))


def predicted(m: Measured, prof: Profile, cases: dict[str, Case], backend: str = "gloo") -> float:
    pr = predict(workload(cases[m.case], m.levels), layout_of(m, prof.cores, backend), prof)
    return pr.cycle_seconds if m.levels > 1 else pr.step_seconds


def same(m: Conf, ch: AutoChoice) -> bool:
    """`m` is the layout `ch` picked (min-blocks and coarse layout matter for V-cycles only)."""
    return (m.case, m.levels, m.D, m.M, m.schedule) == (ch.case, ch.levels, ch.D, ch.M, ch.schedule) and \
        (m.levels == 1 or (m.mbpr, m.coarse) == (ch.mbpr, ch.coarse))


def auto_choices(results: list[Measured], prof: Profile, cases: dict[str, Case],
                 backend: str = "gloo") -> list[AutoChoice]:
    """``--layout auto`` at 2 ranks per case (every D x P, M, schedule and coarse layout), at the
    median background of that case's 2-rank runs."""
    out = []
    for case, levels in sorted({(m.case, m.levels) for m in results}, key=lambda k: (k[1], list(cases).index(k[0]))):
        runs = [m for m in results if m.case == case and m.levels == levels and m.world == 2]
        if not runs:
            continue
        b = statistics.median(background(m, prof.cores) for m in runs)
        best = plan(workload(cases[case], levels), 2, prof, backend, ranks_per_node=2, background=b,
                    max_microbatches=8)[0]
        out.append(AutoChoice(case, levels, b, best["data_parallel"], best["coarse_layout"], best["microbatches"],
                              best["schedule"], best["min_blocks_per_rank"] or 16,
                              best["predicted_cycle_seconds" if levels > 1 else "predicted_step_seconds"]))
    return out


def unmeasured(choices: list[AutoChoice], results: list[Measured], steps: dict, warmup: int) -> list[Conf]:
    """The configurations ``--layout auto`` picked that were not measured yet; a GD step has no
    coarse level (its choice says None) and runs with the default coarse layout."""
    return [Conf(c.case, c.levels, c.D, c.M, c.schedule, c.mbpr, c.coarse or TrainConfig.coarse_layout,
                 steps[c.levels], warmup) for c in choices if not any(same(m, c) for m in results)]


def _fastest(m: Measured) -> Fastest:
    return Fastest(m.D, m.M, m.schedule, m.mbpr, m.step_s)


def judge_auto(choices: list[AutoChoice], results: list[Measured]) -> list[AutoChoice]:
    """The measured time of each choice over the fastest measured D = 1 and any-D layouts."""
    for ch in choices:
        runs = [m for m in results if m.case == ch.case and m.levels == ch.levels and m.world == 2]
        mine = [m for m in runs if same(m, ch)]
        d1 = [m for m in runs if m.D == 1]
        best1 = min(d1, key=lambda m: m.step_s) if d1 else None
        bestall = min(runs, key=lambda m: m.step_s)
        ch.measured_s = mine[-1].step_s if mine else None
        ch.fastest_D1 = _fastest(best1) if best1 else None
        ch.fastest_any = _fastest(bestall)
        ch.over_fastest_D1 = ch.measured_s / best1.step_s if mine and best1 else None
        ch.over_fastest_any = ch.measured_s / bestall.step_s if mine else None
    return choices


def errors(results: list[Measured]) -> Errors:
    errs = [abs(m.predicted_s / m.step_s - 1) for m in results if m.predicted_s is not None and m.step_s > 0]
    return Errors(len(errs), statistics.median(errs) if errs else None, max(errs) if errs else None,
                  sum(x <= TARGET_MEDIAN for x in errs), sum(x <= TARGET_MAX for x in errs))


def evaluate(res: ValResults, prof: Profile) -> ValResults:
    """Background, prediction and error of every configuration, and the ``--layout auto`` verdicts."""
    for m in res.results:
        m.background = background(m, prof.cores)
        m.predicted_s = predicted(m, prof, res.cases, res.backend)
    res.errors = errors(res.results)
    res.auto = judge_auto(auto_choices(res.results, prof, res.cases, res.backend), res.results)
    return res
