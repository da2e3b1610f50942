"""The scaling model's engine: compiled and plain evaluations agree, rank groups built once equal
rank-by-rank programs, and V-cycle predictions at many ranks stay exact on uniform costs."""
import math

import pytest

from parml.model import ModelSpec, StageSpec
from parml.plan import engine
from parml.plan.profile import CommCost, uniform_profile
from parml.plan.simulate import Context, Layout, Workload, gradient_programs, level_layouts, predict, run_exact


def dense(width, blocks):
    return ModelSpec(2, 2, (StageSpec(width, blocks),))


def cluster_profile():
    """Costs per row, messages with latency and bandwidth, slower links between nodes of 4."""
    prof = uniform_profile(forward=1e-3, backward=2e-3, weight=5e-4, latency=1e-4, bandwidth=1e6, cores=4)
    c = prof.comm["gloo"]
    c.inter_node = CommCost(1e-3, 1e5, 0.0, c.allreduce)
    return prof


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_grouped_programs_equal_rank_by_rank_programs_and_engines_agree(schedule):
    prof = cluster_profile()
    work = Workload(dense(3, 96), batch=48)
    lay = Layout(2, 12, 6, schedule, ranks_per_node=4)
    ctx = Context(prof, "gloo", 24, 4)
    lev = level_layouts(work, lay)[-1]
    alone, peaks_alone = gradient_programs(lev, work, lay, ctx, labels=True)      # one group per rank
    grouped, peaks = gradient_programs(lev, work, lay, ctx, labels=False)
    assert peaks == peaks_alone
    runs = [run_exact(alone, compiled=False), run_exact(grouped, compiled=False)]
    if engine.numba is not None:
        runs.append(run_exact(grouped, compiled=True))
    ref = runs[0]
    for run in runs[1:]:
        assert run.end == pytest.approx(ref.end, rel=1e-12)
        for r in ref.finish:
            assert run.finish[r] == pytest.approx(ref.finish[r], rel=1e-12)
            for k, v in ref.sums[r].items():
                assert run.sums[r][k] == pytest.approx(v, rel=1e-9, abs=1e-15)
        assert run.handles.keys() == ref.handles.keys()
        for h, v in ref.handles.items():
            assert run.handles[h] == pytest.approx(v, rel=1e-12, abs=1e-15)
    # node boundaries: rank 3 -> 4 crosses nodes, so its messages are slower than 2 -> 3
    assert ctx.link(3, 4).latency > ctx.link(2, 3).latency


def test_large_pipeline_on_uniform_costs_meets_the_bubble_bound():
    """P = 256, M = 32 with free messages: the compiled engine gives 2(M+P-1)·n·rows exactly."""
    prof = uniform_profile(forward=1.0, backward=1.0)
    n, rows, P, M = 2, 3, 256, 32
    pr = predict(Workload(dense(2, n * P), batch=M * rows), Layout(1, P, M, "1f1b", ranks_per_node=P), prof)
    assert pr.step_seconds == 2 * (M + P - 1) * n * rows
    assert pr.bubble == pytest.approx((P - 1) / (M + P - 1), rel=1e-12)


def test_vcycle_on_many_ranks_costs_eq10_with_replicated_coarse_levels():
    """Uniform costs, free messages, every level on enough ranks: the cycle is U_c fine steps'
    compute divided by the ranks on the finest level; replicate keeps coarse levels busy."""
    prof = uniform_profile(forward=1.0, backward=1.0)
    work = Workload(dense(2, 1024), batch=64, levels=4)
    g = predict(work, Layout(1, 64, 1, coarse_layout="gather", min_blocks_per_rank=16, ranks_per_node=64), prof)
    r = predict(work, Layout(1, 64, 1, coarse_layout="replicate", min_blocks_per_rank=16, ranks_per_node=64), prof)
    assert g.levels[0]["layer_ranks"] == 8 and r.levels[0]["replicas"] == 8
    assert r.cycle_seconds < g.cycle_seconds
    assert math.isclose(g.work_units, work.setup.cost())


def test_per_width_fits_interpolate_geometrically_and_extrapolate_with_the_global_fit():
    from parml.plan.profile import Fit, KernelCost
    glob = Fit(["n*b*v^2*s"], [1.0])
    k = KernelCost(glob, glob, glob, by_width={"4": [Fit(["n*b"], [10.0])] * 3, "16": [Fit(["n*b"], [90.0])] * 3})
    x = {"n": 2, "b": 3}
    assert k.time(0, v=4, **x) == pytest.approx(60.0) and k.time(1, v=16, **x) == pytest.approx(540.0)
    assert k.time(0, v=8, **x) == pytest.approx(math.sqrt(60.0 * 540.0))        # halfway in log v
    assert k.time(2, v=32, **x) == pytest.approx(540.0 * 32 ** 2 / 16 ** 2)    # nearest width, global shape
    assert KernelCost(glob, glob).time(0, v=8, **x) == glob(v=8, **x)           # no per-width fits
