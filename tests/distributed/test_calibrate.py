"""Calibration (parml.plan.calibrate): the communication worker on 2 real gloo ranks, a quick
compute-only profile that loads and predicts."""
import statistics

import pytest
import torch

from parml.model import ModelSpec, StageSpec
from parml.plan.calibrate_comm import receive_cost, relay_receive
from parml.plan.profile import Profile
from parml.plan.simulate import Layout, Workload, predict


def dense(width, blocks, in_features=2, out_features=2):
    return ModelSpec(in_features, out_features, (StageSpec(width, blocks),))


def test_calibrate_comm_on_two_gloo_ranks():
    """The communication worker runs on 2 real ranks through parml's Communicator."""
    from parml.plan.calibrate import GRIDS, measure_comm
    grid = dict(GRIDS["quick"], p2p_bytes=[8, 4096], p2p_reps=5)
    c = measure_comm(["gloo"], 2, grid, "cpu", log=lambda *a: None)["gloo"]
    assert c.message(8) > 0 and c.bandwidth > 0 and c.allreduce_seconds(8, 2) > 0
    assert [n for n, _ in c.measured["p2p"]] == [8, 4096]
    assert {g for g, _, _ in c.measured["allreduce"]} == {2}
    # the calling thread's CPU per round trip on rank 0 (a send and a receive), less the posting cost
    cpu = c.measured["p2p_cpu"]
    assert [n for n, _ in cpu] == [8, 4096] and all(t > 0 for _, t in cpu)
    assert c.receive == pytest.approx(max(statistics.median(t for _, t in cpu) - c.overhead, 0.0))


def test_an_oversubscribed_calibration_measures_the_receive_cost_in_a_relay():
    """Told the machine has 1 core, the 2-rank run is oversubscribed: the ranks also pass messages
    round a ring, computing on each, and the busy node's receive cost comes from that relay."""
    from parml.plan.calibrate import GRIDS, measure_comm
    grid = dict(GRIDS["quick"], p2p_bytes=[8], p2p_reps=20)
    c = measure_comm(["gloo"], 1, grid, "cpu", log=lambda *a: None)["gloo"]
    (ranks, (msgs, work, wall)), = c.measured["relay"]
    assert ranks == 2 and msgs == 2 * 10 and work > 0
    assert wall >= msgs * work                 # each rank computes `work` on each of its messages
    assert c.receive_busy == relay_receive(c.measured["relay"], 1, c.overhead)
    assert c.receive == receive_cost(c.measured["p2p_cpu"], c.overhead, "gloo")    # a free core's


def test_relay_receive_is_the_cores_time_per_message_less_work_and_posting():
    # 4 ranks x 100 messages on 2 cores in 0.3 s: 1.5 ms of a core per message, 1 ms of it work
    assert relay_receive([[4, [100, 1e-3, 0.3]]], 2, 1e-4) == pytest.approx(0.5e-3 - 1e-4)
    assert relay_receive([[4, [100, 1e-3, 0.3]], [4, [100, 1e-3, 0.26]], [4, [100, 1e-3, 0.4]]], 2, 0.0) \
        == pytest.approx(0.5e-3)                                          # the median
    assert relay_receive([[4, [100, 1e-3, 0.1]]], 2, 0.0) == 0.0          # never negative
    assert relay_receive([], 2, 1e-4) == 0.0                              # no oversubscribed run


def test_receive_cost_is_the_round_trip_cpu_less_the_posting():
    pts = [[8, 4e-4], [1024, 6e-4], [16384, 5e-4], [1 << 20, 9e-3]]     # the 1 MiB copy is bandwidth
    assert receive_cost(pts, 1e-4, "gloo") == pytest.approx(5e-4 - 1e-4)
    assert receive_cost(pts, 1e-3, "mpi") == 0.0                         # never negative
    assert receive_cost(pts, 1e-4, "nccl") == 0.0 and receive_cost([], 0.0, "gloo") == 0.0


def test_calibrate_quick_compute(tmp_path):
    """A quick compute-only calibration writes a loadable profile whose dense fits are positive."""
    from parml.plan.calibrate import calibrate
    out = tmp_path / "prof.json"
    prof = calibrate("cpu", [], str(out), quick=True, log=lambda *a: None)
    back = Profile.load(str(out), device="cpu")
    assert back.device == "cpu" and back.cores >= 1 and back.versions["torch"] == torch.__version__
    k = back.kernels["dense"]
    assert k.forward(n=8, b=64, v=16) > 0 and k.backward(n=8, b=64, v=16) > 0
    assert k.forward.points > 0 and len(k.measured) == k.forward.points
    assert back.date and prof.step["update"](p=1000) > 0
    # the ends again on shards trained without autograd (width 4 <= 8): each end's fit, both kinds
    assert {f"{r}_{k}{m}" for r in ("first", "last") for k in "FB" for m in ("", "_manual")} == set(back.ends)
    pr = predict(Workload(dense(8, 16), batch=32), Layout(1, 1, 2), back)
    assert pr.step_seconds > 0
