"""The pipeline study's goals from its entries: parml >= 1.1x torch pipelining at every M where
every rank has a core (or GPU) of its own, and efficiency >= 0.9 x the bubble bound."""
from __future__ import annotations

from .records import EfficiencyRow, Goals, PipelineResults, RatioRow

GOAL_RATIO, GOAL_EFFICIENCY = 1.1, 0.9


def torch_backend(res: PipelineResults) -> str:
    """The torch.distributed backend of this run: gloo on CPU, NCCL with ``--device cuda``."""
    return "nccl" if res.config.device == "cuda" else "gloo"


def goals(res: PipelineResults) -> Goals:
    g = Goals()
    tb, top = torch_backend(res), max(res.config.microbatches)
    for e in res.entries:
        t = e.torch
        if e.backend == tb and t is not None and t.parml_over_torch_throughput is not None:
            g.torch_ratio.append(RatioRow(e.model, e.P, e.M, e.schedule, e.oversubscribed,
                                          t.parml_over_torch_throughput, t.parml_over_torch_paired))
        if e.model == "compute" and e.P == 2 and e.M == top:
            g.efficiency.append(EfficiencyRow(e.backend, e.schedule, e.efficiency, e.bound, e.eff_over_bound))
    # the goal is judged where every rank has a core of its own; oversubscribed rows (ranks
    # time-slicing, so a bubble is filled by another rank's work) are reported beside it
    pp = [r for r in g.torch_ratio if r.P > 1 and not r.oversubscribed]
    over = [r for r in g.torch_ratio if r.P > 1 and r.oversubscribed]
    for rows, low, high in ((pp, g.torch_ratio_min_by_M_pipelined, g.torch_ratio_max_by_M_pipelined),
                            (over, g.torch_ratio_min_by_M_oversubscribed, {})):
        for M in sorted({r.M for r in rows}):
            low[M] = min(r.ratio for r in rows if r.M == M)
            high[M] = max(r.ratio for r in rows if r.M == M)
    paired = sorted(r.paired_ratio for r in pp)
    g.torch_ratio_paired_median_pipelined = paired[len(paired) // 2] if paired else None
    g.torch_ratio_goal_met = bool(pp) and all(r.ratio >= GOAL_RATIO for r in pp)
    # where the margin comes from: deferred vs inline weight gradients, and inline vs torch
    abl = [e for e in res.entries if e.inline is not None and e.P > 1]
    for M in sorted({e.M for e in abl}):
        at = [e for e in abl if e.M == M]
        g.deferred_over_inline_by_M[M] = sorted(e.inline.deferred_over_inline_paired for e in at)
        g.inline_over_torch_by_M[M] = sorted(e.torch.step_s / e.inline.step_s for e in at
                                             if e.torch is not None and e.torch.step_s)
    g.efficiency_goal_met = bool(g.efficiency) and all(r.eff_over_bound >= GOAL_EFFICIENCY for r in g.efficiency)
    return g
