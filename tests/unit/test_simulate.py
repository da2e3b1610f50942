"""The scaling model's simulator (parml.plan.simulate): against the bubble bound and hand-built
timelines, V-cycle work units against eq. (10), transfers against transfer.Mover's pieces.
Profiles: test_profile.py; the planner: test_planner.py; calibration: tests/distributed/test_calibrate.py."""
import math

import numpy as np
import pytest

from parml.config import TrainConfig
from parml.data import load_dataset
from parml.multilevel.mgopt import CycleSetup
from parml.model import ModelSpec, StageSpec, build_model
from parml.parallel.transfer import _pieces
from parml.training.build import plan_run
from parml.plan.planner import workload_for
from parml.parallel.layout import Partition
from parml.plan.profile import Fit, KernelCost, uniform_profile
from parml.plan.simulate import (
    Context,
    Layout,
    Programs,
    Workload,
    cycle_trace,
    exposed_seconds,
    gradient_programs,
    level_layouts,
    move_messages,
    predict,
    run_programs,
)


def dense(width, blocks, in_features=2, out_features=2):
    return ModelSpec(in_features, out_features, (StageSpec(width, blocks),))


# --- the pipeline against theory -------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_uniform_costs_reproduce_the_bubble_bound(schedule):
    """F = B = 1 per block and row, no W, free messages: speedup over one rank = M·P/(M+P−1) exactly."""
    prof = uniform_profile(forward=1.0, backward=1.0, weight=0.0)
    for P in range(1, 7):
        for M in range(1, 9):
            n, rows = 3, 5
            work = Workload(dense(2, n * P), batch=M * rows)
            serial = predict(work, Layout(1, 1, 1, schedule), prof).step_seconds
            pr = predict(work, Layout(1, P, M, schedule), prof)
            assert serial == 2 * n * P * M * rows
            assert pr.step_seconds == 2 * (M + P - 1) * n * rows          # exact: integer costs
            assert serial / pr.step_seconds == pytest.approx(M * P / (M + P - 1), rel=1e-15)
            assert pr.bubble == pytest.approx((P - 1) / (M + P - 1), rel=1e-12, abs=1e-15)


def hand_profile(F, B, W, latency, bandwidth=math.inf):
    """Costs per block call (independent of rows): one block per rank makes them per action."""
    return uniform_profile(forward=F, backward=B, weight=W, latency=latency, bandwidth=bandwidth, per_row=False)


def timeline(pr, rank):
    return [(label, start, end) for label, start, end in pr.step_run.timeline(rank)]


def test_two_rank_1f1b_timeline_by_hand():
    # F = 1, B = 2, W = 0.5 per action, latency 0.25, free bandwidth. 1F1B, P = 2, M = 2:
    # stage 0 runs F0 F1 B0 B1, stage 1 runs F0 B0 F1 B1 (warm-up min(P-s-1, M)).
    pr = predict(Workload(dense(2, 2), batch=4), Layout(1, 2, 2, "1f1b", weight_grads="deferred"),
                 hand_profile(1, 2, 0.5, 0.25), keep_run=True)
    assert timeline(pr, 1) == [("1F0", 1.25, 2.25), ("1B0", 2.25, 4.25), ("1W0", 4.25, 4.75),
                               ("1F1", 4.75, 5.75), ("1B1", 5.75, 7.75), ("1W1", 7.75, 8.25)]
    assert timeline(pr, 0) == [("0F0", 0.0, 1.0), ("0F1", 1.0, 2.0), ("0B0", 4.5, 6.5), ("0W0", 6.5, 7.0),
                               ("0B1", 8.0, 10.0), ("0W1", 10.0, 10.5)]
    # then one all-reduce of the loss with Level.gradient's sums: latency · log2(2)
    assert pr.step_seconds == 10.5 + 0.25
    assert pr.step_ranks[1].wait == pytest.approx(1.25 + (10.5 - 8.25))
    assert pr.step_ranks[0].wait == pytest.approx(2.5 + 1.0)


def test_auto_weight_gradients_defer_where_the_kernel_does():
    """--weight-grads auto (the default) as ``ChunkKernel`` routes it on CPU: the fused kernel (up to
    width 16) computes weight gradients inline (B = 2 + 0.5, no W) up to width 8 and on the first
    rank, and defers them from width 9 where a neighbour waits; wider chunks (torch) always defer."""
    prof = hand_profile(1, 2, 0.5, 0.25)
    narrow = predict(Workload(dense(2, 2), batch=4), Layout(1, 2, 2, "1f1b"), prof, keep_run=True)
    assert timeline(narrow, 1) == [("1F0", 1.25, 2.25), ("1B0", 2.25, 4.75), ("1F1", 4.75, 5.75),
                                   ("1B1", 5.75, 8.25)]
    assert timeline(narrow, 0) == [("0F0", 0.0, 1.0), ("0F1", 1.0, 2.0), ("0B0", 5.0, 7.5), ("0B1", 8.5, 11.0)]
    for width, rank0, rank1 in ((12, False, True), (32, True, True)):
        pr = predict(Workload(dense(width, 2), batch=4), Layout(1, 2, 2, "1f1b"), prof, keep_run=True)
        assert [any("W" in a for a, _, _ in timeline(pr, r)) for r in (0, 1)] == [rank0, rank1], width


def test_one_rank_whole_models_cost_the_measured_network_path():
    """``LayerParallel`` on one rank computes a whole narrow dense model without autograd
    (``kernels.NetworkGradient``): where the profile measured that path ("network": 7 per call
    here), a one-rank stage costs it per micro-batch and nothing else; a pipeline stage, a forced
    ``--weight-grads deferred``, a wide model and a profile without it keep the kernel rows."""
    prof = hand_profile(1, 2, 0.5, 0.25)
    zero = Fit.constant(0.0)
    prof.kernels["network"] = KernelCost(Fit.constant(7.0), zero, zero)
    work = Workload(dense(3, 2), batch=4)
    for layout, want in ((Layout(1, 1, 1), [("0F0", 0.0, 7.0)]),
                         (Layout(1, 1, 2), [("0F0", 0.0, 7.0), ("0F1", 7.0, 14.0)]),
                         (Layout(2, 1, 1), [("0F0", 0.0, 7.0)])):
        assert timeline(predict(work, layout, prof, keep_run=True), 0) == want, layout
    assert predict(work, Layout(2, 1, 1), prof).step_seconds == 7.0 + 0.25       # then the data all-reduce
    deferred = predict(work, Layout(1, 1, 1, weight_grads="deferred"), prof, keep_run=True)
    assert [a for a, _, _ in timeline(deferred, 0)] == ["0F0", "0B0", "0W0"]
    pipeline = predict(work, Layout(1, 2, 1), prof, keep_run=True)
    assert timeline(pipeline, 0)[0] == ("0F0", 0.0, 1.0)
    wide = predict(Workload(dense(32, 2), batch=4), Layout(1, 1, 1), prof, keep_run=True)
    assert [a for a, _, _ in timeline(wide, 0)] == ["0F0", "0B0", "0W0"]
    del prof.kernels["network"]
    assert timeline(predict(work, Layout(1, 1, 1), prof, keep_run=True), 0) == [("0F0", 0.0, 2.0), ("0B0", 2.0, 7.0)]


def test_shards_trained_without_autograd_pay_their_own_ends():
    """The opening's extra cost as calibrated on shards without autograd ("first_F_manual") where
    ``PipelineStage.manual`` holds (width 3 under auto), the autograd one elsewhere (deferred)."""
    prof = hand_profile(1, 2, 0.5, 0.25)
    prof.ends.update({"first_F": Fit.constant(5.0), "first_F_manual": Fit.constant(0.5)})
    work = Workload(dense(3, 2), batch=4)
    auto = predict(work, Layout(1, 2, 1), prof, keep_run=True)
    deferred = predict(work, Layout(1, 2, 1, weight_grads="deferred"), prof, keep_run=True)
    assert timeline(auto, 0)[0] == ("0F0", 0.0, 1.5) and timeline(deferred, 0)[0] == ("0F0", 0.0, 6.0)


def test_two_rank_1f1b_timeline_with_message_cpu_on_both_ends():
    # As above, plus LogP's o: the sender posts for 0.125 before each message leaves, the receiver
    # spends 0.0625 on it once it is there (CommCost.overhead / .receive), both before its next action.
    prof = hand_profile(1, 2, 0.5, 0.25)
    prof.comm["gloo"].overhead, prof.comm["gloo"].receive = 0.125, 0.0625
    pr = predict(Workload(dense(2, 2), batch=4), Layout(1, 2, 2, "1f1b", weight_grads="deferred"), prof, keep_run=True)
    assert timeline(pr, 0) == [("0F0", 0.0, 1.0), ("0F1", 1.125, 2.125), ("0B0", 4.875, 6.875),
                               ("0W0", 6.875, 7.375), ("0B1", 8.5625, 10.5625), ("0W1", 10.5625, 11.0625)]
    assert timeline(pr, 1) == [("1F0", 1.4375, 2.4375), ("1B0", 2.4375, 4.4375), ("1W0", 4.5625, 5.0625),
                               ("1F1", 5.125, 6.125), ("1B1", 6.125, 8.125), ("1W1", 8.25, 8.75)]
    assert pr.step_seconds == 11.0625 + 0.25


def test_two_rank_gpipe_timeline_with_bandwidth_and_link_queueing():
    # F = 0.25, B = 1, W = 0.5; latency 0.25; each message 16 bytes at 32 B/s = 0.5 s on the wire,
    # so rank 0's second state queues behind the first on the link.
    pr = predict(Workload(dense(2, 2), batch=4), Layout(1, 2, 2, "gpipe", weight_grads="deferred"),
                 hand_profile(0.25, 1, 0.5, 0.25, 32.0), keep_run=True)
    assert timeline(pr, 0)[:2] == [("0F0", 0.0, 0.25), ("0F1", 0.25, 0.5)]
    assert timeline(pr, 1) == [("1F0", 1.0, 1.25), ("1F1", 1.5, 1.75), ("1B0", 1.75, 2.75), ("1W0", 2.75, 3.25),
                               ("1B1", 3.25, 4.25), ("1W1", 4.25, 4.75)]
    assert timeline(pr, 0)[2:] == [("0B0", 3.5, 4.5), ("0W0", 4.5, 5.0), ("0B1", 5.0, 6.0), ("0W1", 6.0, 6.5)]
    # the all-reduce of the loss with Level.gradient's two sums (3 float64: 0.25 + 24 B / 32 B/s
    # over the 2-rank all-reduce model = 1.0) ends the step on both ranks
    assert pr.step_run.finish[1] == pr.step_run.finish[0] == 6.5 + 1.0


def test_three_rank_1f1b_timeline_by_hand():
    # F = 1, B = 2, W = 0.5, latency 0.5. Stage 0: F0 F1 B0 B1; stage 1: F0 F1 B0 B1; stage 2: F0 B0 F1 B1.
    pr = predict(Workload(dense(2, 3), batch=4), Layout(1, 3, 2, "1f1b", weight_grads="deferred"),
                 hand_profile(1, 2, 0.5, 0.5), keep_run=True)
    assert timeline(pr, 0) == [("0F0", 0, 1), ("0F1", 1, 2), ("0B0", 9, 11), ("0W0", 11, 11.5),
                               ("0B1", 12.5, 14.5), ("0W1", 14.5, 15)]
    assert timeline(pr, 1) == [("1F0", 1.5, 2.5), ("1F1", 2.5, 3.5), ("1B0", 6.5, 8.5), ("1W0", 8.5, 9),
                               ("1B1", 10, 12), ("1W1", 12, 12.5)]
    assert timeline(pr, 2) == [("2F0", 3, 4), ("2B0", 4, 6), ("2W0", 6, 6.5), ("2F1", 6.5, 7.5),
                               ("2B1", 7.5, 9.5), ("2W1", 9.5, 10)]
    assert pr.step_seconds == pytest.approx(15 + 0.5 * math.log2(3))


def test_shared_engine_agrees_with_the_exact_one():
    """Processor sharing with enough cores is the same timeline as the max-plus evaluation."""
    prof = uniform_profile(forward=0.7, backward=1.3, weight=0.4, latency=0.3, bandwidth=100.0)
    work = Workload(dense(3, 12), batch=24)
    for sched in ("gpipe", "1f1b"):
        for P, M, D in ((3, 4, 1), (4, 3, 2), (2, 5, 2)):
            lay = Layout(D, P, M, sched, ranks_per_node=64)
            ctx = Context(prof, "gloo", D * P, 64)
            progs, _ = gradient_programs(level_layouts(work, lay)[-1], work, lay, ctx)
            fast = run_programs(progs)
            shared = run_programs(progs, {r: {q: 1 for q in progs} for r in progs}, cores=1000)
            assert shared.end == pytest.approx(fast.end, rel=1e-12)
            for r in progs:
                assert [(s.kind, s.label) for s in shared.spans[r]] == [(s.kind, s.label) for s in fast.spans[r]]
                for a, b in zip(shared.spans[r], fast.spans[r]):
                    assert (a.start, a.end) == pytest.approx((b.start, b.end), rel=1e-12, abs=1e-12)


def test_oversubscribed_replicas_share_the_cores():
    """Two data replicas on one core compute at half speed; the profile's cores decide."""
    work = Workload(dense(2, 8), batch=8)
    one = predict(work, Layout(1, 1, 1), uniform_profile(cores=1))
    two = predict(work, Layout(2, 1, 1, ranks_per_node=2), uniform_profile(cores=1))
    roomy = predict(work, Layout(2, 1, 1, ranks_per_node=2), uniform_profile(cores=2))
    assert roomy.step_seconds == one.step_seconds / 2
    assert two.step_seconds == pytest.approx(one.step_seconds)
    # three other busy processes on a 2-core machine: one rank gets half a core
    busy = predict(work, Layout(1, 1, 1, background=3.0), uniform_profile(cores=2))
    assert busy.step_seconds == pytest.approx(2 * one.step_seconds)


def _received(programs, r, x, busy_extra):
    """A message's receive cost on rank r: `x` seconds, `busy_extra` more on a node with no free core."""
    from parml.plan.engine import COMPUTE, KIND
    programs.extend_rows([r], [COMPUTE], [KIND["post"]], [x], [busy_extra], [-1], [-1])


def test_a_message_costs_its_extra_only_on_a_node_with_no_free_core():
    """One core. Rank 1 receives (1 ms, 4 ms more on a full node) while rank 0 computes 10 ms:
    the core is taken, so 5 ms of work at half speed each until t = 10 ms, then rank 0's last 5 ms
    alone. With rank 0 computing after it, the receive costs 1 ms; the exact evaluation (every rank
    its own core) never adds the extra."""
    share = {0: {0: 1, 1: 1}, 1: {0: 1, 1: 1}}
    busy = Programs(labels=False)
    busy.compute(0, 10e-3)
    _received(busy, 1, 1e-3, 4e-3)
    run = run_programs(busy, share, cores=1)
    assert run.finish[1] == pytest.approx(10e-3) and run.finish[0] == pytest.approx(15e-3)
    free = Programs(labels=False)
    free.compute(0, 0.0)
    _received(free, 1, 1e-3, 4e-3)
    free.compute(1, 1e-3)
    assert run_programs(free, share, cores=1).finish[1] == pytest.approx(2e-3)
    assert run_programs(busy).finish[1] == pytest.approx(1e-3)       # exact: never busy
    # a rank's own computing does not make its node busy; two cores leave one free for rank 1
    assert run_programs(busy, share, cores=2).finish[1] == pytest.approx(1e-3)


def test_pipeline_and_move_receives_carry_the_busy_node_extra():
    """CommCost.receive_busy reaches every receive row the simulator builds (y = busy - receive)."""
    from parml.plan.engine import COMPUTE, KIND
    prof = uniform_profile(cores=1)
    over = prof.comm["gloo"]
    over.receive, over.receive_busy = 1e-4, 6e-4
    over.oversubscribed = None                   # the same costs on a full node
    work = Workload(dense(2, 8), batch=8)
    lay = Layout(1, 4, 2, "1f1b", ranks_per_node=4)
    progs, _ = gradient_programs(level_layouts(work, lay)[-1], work, lay, Context(prof, "gloo", 4, 4))
    _, _, code, kind, x, y, *_ = progs.arrays()
    rows = (code == COMPUTE) & (kind == KIND["post"]) & (x == 1e-4)
    assert rows.sum() == 2 * 2 * 3 and (y[rows] == pytest.approx(5e-4))    # M=2, F and B, 3 links
    busy = predict(work, lay, prof).step_seconds
    over.receive_busy = 0.0
    assert predict(work, lay, prof).step_seconds < busy


def test_gradient_allreduce_overlaps_the_pipeline_tail():
    prof = uniform_profile(forward=1.0, backward=1.0, latency=0.0, bandwidth=1e9)
    prof.comm["gloo"].allreduce = Fit(["B"], [0.05])      # 0.05 s per byte
    pr = predict(Workload(dense(2, 8), batch=32), Layout(2, 4, 4, "1f1b"), prof, keep_run=True)
    # rank s's last backward ends 2·(P-1-s)·(2 blocks · 4 rows) before rank 0's: its gradients'
    # all-reduce runs while the ranks before it still compute; rank 0's cannot hide
    h = pr.step_run.handles
    ready = h[(0, "grad-allreduce")][0]                 # rank 0 finishes its pipeline last
    assert ready == max(v[0] for v in h.values())
    assert h[(3, "grad-allreduce")][1] < ready and h[(2, "grad-allreduce")][1] < ready
    exposed = exposed_seconds(h)
    assert exposed[(3, "grad-allreduce")] == exposed[(2, "grad-allreduce")] == 0.0
    posted, done, _ = h[(0, "grad-allreduce")]
    assert exposed[(0, "grad-allreduce")] == pytest.approx(done - posted) and done > posted   # all of it
    assert 0.0 < pr.allreduce["overlap"] < 1.0


# --- the V-cycle -----------------------------------------------------------------------------------

SETUPS = ["[(1),{2}]", "[(1),1,2,{2}]", "[2,1,{3}]", "[(0),1,{1}]", str(CycleSetup.default(6)),
          str(CycleSetup.default(8))]


@pytest.mark.parametrize("text", SETUPS)
def test_vcycle_work_units_equal_eq10(text):
    setup = CycleSetup.parse(text)
    events, wu = cycle_trace(text)
    assert wu == setup.cost()
    L = setup.levels
    K = 2 ** (L + 2)
    work = Workload(dense(2, K), batch=6, levels=L, cycle=setup)
    pr = predict(work, Layout(1, 1, 1), uniform_profile())     # costs ∝ blocks, nothing else
    assert pr.cycle_seconds / pr.step_seconds == setup.cost()
    assert pr.work_units == setup.cost()
    grads = [lv for kind, lv in events if kind == "grad"]
    assert sum(2.0 ** (lv - L) for lv in grads) == setup.cost()


def test_vcycle_levels_on_gather_and_replicate_layouts():
    work = Workload(dense(2, 64), batch=64, levels=4)
    g = level_layouts(work, Layout(2, 4, 1, coarse_layout="gather", min_blocks_per_rank=8))
    r = level_layouts(work, Layout(2, 4, 1, coarse_layout="replicate", min_blocks_per_rank=8))
    assert [(lv.ranks, lv.replicas) for lv in g] == [(1, 2), (2, 2), (4, 2), (4, 2)]
    assert [(lv.ranks, lv.replicas) for lv in r] == [(1, 8), (2, 4), (4, 2), (4, 2)]
    prof = uniform_profile(latency=0.01, bandwidth=1e6)
    pg = predict(work, Layout(2, 4, 2, coarse_layout="gather", min_blocks_per_rank=8), prof)
    pr = predict(work, Layout(2, 4, 2, coarse_layout="replicate", min_blocks_per_rank=8), prof)
    assert pr.level_seconds[0] < pg.level_seconds[0]          # 8 replicas split the coarsest batch
    assert sum(s.idle for s in pg.cycle_ranks) > sum(s.idle for s in pr.cycle_ranks)


def test_a_redundant_level_runs_the_whole_batch_without_an_allreduce():
    """--coarse-layout redundant: each replica's gradient program on a redundant level is the one
    process's program of the whole batch (no all-reduce rows, no shares), while a level split over
    the replicas runs half the rows and ends in the data group's all-reduce."""
    prof = uniform_profile(forward=1.0, backward=1.0, latency=0.01, bandwidth=1e6)
    work = Workload(dense(2, 64), batch=64, levels=3)
    red = level_layouts(work, Layout(2, 1, 1, coarse_layout="redundant", min_blocks_per_rank=64))
    assert [(lv.ranks, lv.replicas, lv.redundant) for lv in red] == [(1, 2, True), (1, 2, True), (1, 2, False)]
    one = level_layouts(work, Layout(1, 1, 1))
    for lv, alone in zip(red, one):
        mesh, _ = gradient_programs(lv, work, Layout(2, 1, 1), Context(prof, "gloo", 2, 2))
        serial, _ = gradient_programs(alone, work, Layout(1, 1, 1), Context(prof, "gloo", 1, 1))
        *_, labels = mesh.arrays()
        assert ("gradient all-reduce" in labels) == (not lv.redundant)
        if lv.redundant:
            assert [list(a) for a in mesh.arrays()[2:]] == [list(a) for a in serial.arrays()[2:]]
    pr = predict(work, Layout(2, 1, 1, coarse_layout="redundant", min_blocks_per_rank=64), prof)
    pg = predict(work, Layout(2, 1, 1, coarse_layout="gather"), prof)
    p1 = predict(work, Layout(1, 1, 1), prof)
    assert pr.level_seconds[:2] == pytest.approx(p1.level_seconds[:2])    # the whole batch, no sums
    assert pr.level_seconds[2] == pytest.approx(pg.level_seconds[2])      # the finest level splits
    assert pg.level_seconds[0] < pr.level_seconds[0]       # compute-bound costs: halving the rows pays


@pytest.mark.parametrize("width, rows, activation, blocks", [
    (3, 100, "relu", 64), (12, 2000, "relu", 16), (3, 1000, "tanh", 32), (3, 2000, "relu", 2048)])
def test_activation_memory_is_what_the_fused_kernel_holds(width, rows, activation, blocks):
    """The planner's states per micro-batch against the buffers a training ``cpu.ChunkRun`` holds
    between its forward and backward: y_k (and σ_k) exactly; run in segments, each segment's input
    (the rows as they are) and the one segment the backward reruns (padded: within 1 %)."""
    import dataclasses

    import torch

    from parml.kernels import cpu
    from parml.plan.costs import StageCost
    spec = dataclasses.replace(dense(width, blocks), activation=activation)
    held, _ = StageCost(spec, 0, blocks, uniform_profile(), "auto").activation_bytes(rows, 4)
    x = torch.randn(rows, width).numpy()
    W, b = torch.randn(blocks, width, width) * 0.1, torch.zeros(blocks, width)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)              # the profile's thread count
    try:
        run = cpu.ChunkRun(x, W, b, 0.1, activation, "euler", True)
        if run.segments is None:
            _, _, Y, S = run.keep
            assert held == Y.numel() * 4 + (0 if S is None else S.numel() * 4)
        else:
            n_y, seg = run.meta[4], run.segments[0][1]
            assert held == pytest.approx(sum(i.nbytes for i in run.inputs) + seg * width * n_y * 4, rel=0.01)
        run.backward(np.ones((rows, width), np.float32))
    finally:
        torch.set_num_threads(threads)


def test_memory_counts_the_largest_activations_of_any_level():
    """A redundant coarse level holds the whole batch: at D = 4 its 32 blocks x 256 rows are twice
    the finest level's 64 blocks x 64 rows, and the memory per rank says so (gathered: the finest
    level's peak; one process: 64 blocks x 256 rows)."""
    work = Workload(dense(2, 64), batch=256, levels=2)
    prof = uniform_profile()
    gather = predict(work, Layout(4, 1, 1, coarse_layout="gather"), prof)
    red = predict(work, Layout(4, 1, 1, coarse_layout="redundant", min_blocks_per_rank=64), prof)
    one = predict(work, Layout(1, 1, 1), prof)
    assert red.activation_bytes[0] == 2 * gather.activation_bytes[0] == one.activation_bytes[0] / 2 > 0
    assert red.memory_bytes[0] - gather.memory_bytes[0] == red.activation_bytes[0] - gather.activation_bytes[0]


def test_every_received_message_costs_the_receiver_its_cpu():
    """With free messages but for the receiver's CPU r (CommCost.receive), each rank's comm time over
    a gathered V-cycle (pipeline messages and the moves between levels) is r times its receives."""
    work = Workload(dense(2, 64), batch=64, levels=3)
    layout = Layout(1, 2, 2, coarse_layout="gather", min_blocks_per_rank=32)
    prof = uniform_profile()
    base = predict(work, layout, prof)
    prof.comm["gloo"].receive = r = 0.25
    pr = predict(work, layout, prof)
    for rank in pr.cycle_ranks:
        n = rank.comm / r
        assert n == round(n) >= 1, (rank.rank, rank.comm)
    # the pipeline's receives are symmetric here; rank 0 also receives rank 1's pieces when the
    # coarse levels are gathered onto it
    assert pr.cycle_ranks[0].comm > pr.cycle_ranks[1].comm
    assert pr.cycle_seconds > base.cycle_seconds


def mover_pieces(spec, src, dst):
    """(src rank, dst rank, elements) of every piece transfer.Mover sends between partitions."""
    from parml.parallel.sharding import shard_entries
    sizes = {n: p[0].numel() if n.startswith("chunks.") else p.numel()
             for n, p in build_model(spec).named_parameters()}
    entries = [shard_entries(spec, *src.range(r)) for r in range(src.ranks)]
    out = []
    for p, q, a, _, rows in _pieces(spec, src, dst):
        key = entries[p][a].key
        if key[0] == "shared":
            out.append((p, q, sizes[key[1]]))
        else:
            out.append((p, q, (rows[1] - rows[0]) * sizes[f"chunks.{key[1]}.{key[2]}"]))
    return sorted(out)


def test_move_messages_are_the_movers_pieces():
    """D = 1, gather: the simulated transfer pieces are transfer.Mover's (src, dst, elements)."""
    fine_spec = dense(3, 32, 5, 4)
    for P, mbpr in ((4, 8), (3, 4), (4, 16)):
        work = Workload(fine_spec, batch=8, levels=3)
        levs = level_layouts(work, Layout(1, P, 1, min_blocks_per_rank=mbpr))
        for i in (1, 2):
            fine, coarse = levs[i], levs[i - 1]
            fic = Partition(tuple(b // 2 for b in fine.partition.bounds))
            down = move_messages(coarse.spec, fine, coarse, fic, coarse.partition, range(P))
            assert sorted(down) == mover_pieces(coarse.spec, fic, coarse.partition)
            up = move_messages(coarse.spec, coarse, fine, coarse.partition, fic, range(P))
            assert sorted(up) == mover_pieces(coarse.spec, coarse.partition, fic)


@pytest.mark.parametrize("coarse", ["gather", "replicate", "redundant"])
def test_level_layouts_are_the_runs_mesh(coarse):
    """The simulator's layouts are the mesh ``parml train`` builds (``training.build.plan_run``):
    partitions, replicas and strides on every level, for every (D, P) of 8 ranks."""
    data = load_dataset("circles", None, 0)
    for D, mbpr in ((1, 16), (2, 8), (4, 1), (1, 1)):
        cfg = TrainConfig.from_options({"blocks": "128", "levels": "5", "data_parallel": str(D),
                                        "coarse_layout": coarse, "min_blocks_per_rank": str(mbpr)}).validate()
        mesh = plan_run(cfg, 8, data)
        work = workload_for(cfg, len(data.x_train))
        sim = level_layouts(work, Layout(D, 8 // D, 1, coarse_layout=coarse, min_blocks_per_rank=mbpr))
        assert [(lv.partition, lv.replicas, lv.stride, lv.redundant) for lv in sim] == \
            [(lv.partition, lv.replicas, lv.stride, lv.redundant) for lv in mesh.levels]
        assert [lv.spec.total_blocks for lv in sim] == [128 >> (5 - i) for i in range(1, 6)]


def test_activation_memory_follows_what_the_kernels_keep():
    """Per micro-batch and block, in units of one state (columns · width · bytes): the fused CPU
    kernel with inline weight gradients keeps y_k (relu at width 3 recomputes σ) and, past
    ``cpu.SEGMENT_ABOVE_BYTES``, only each segment's input and one segment; it keeps σ too above
    width 8; its states hold the rows padded to whole tiles (100 rows: one tile of 128; 2000 rows:
    two of 1024 at width 3, where σ is recomputed, and four of 512 at width 12, where it is kept).
    Deferred weight gradients (and widths past the fused kernel's) keep y_k, σ_k and the blocks'
    adjoints of the rows as they are."""
    from parml.kernels.cpu import segment_blocks
    from parml.plan.costs import StageCost
    prof = uniform_profile()
    assert prof.threads == 1

    def units(spec, rows, cols, weight_grads="auto", a=0):
        held, gas = StageCost(spec, a, spec.total_blocks, prof, weight_grads).activation_bytes(rows, 4)
        per = cols * spec.stages[0].width * 4
        return held / per, gas / per

    assert units(dense(3, 64), 100, 128) == (64, 0)               # y_k only, far below the threshold
    seg = segment_blocks(2048, 3, 2048, 4)
    assert 32 < seg < 2048 and units(dense(3, 2048), 2000, 2048) == (-(-2048 // seg) + seg, 0)
    assert units(dense(3, 2048), 100, 128) == (2048, 0)           # 3.1 MB of states: one piece
    assert units(dense(12, 64), 100, 128) == (128, 0)             # σ kept above width 8
    assert units(dense(12, 64), 2000, 2048) == (128, 0)
    assert units(dense(3, 64), 100, 100, "deferred") == (128, 64)  # the deferred sink's adjoints
    assert units(dense(64, 64), 100, 100) == (128, 64)            # wider: torch's kernel, deferred
