"""The planner (parml.plan.planner): rankings on synthetic profiles, candidates, its command line."""
import json
import math

import pytest

from parml.model import ModelSpec, StageSpec
from parml.parallel.layout import LayoutError
from parml.plan.planner import candidates, format_table, plan, to_json
from parml.plan.profile import CommCost, Fit, KernelCost, Profile
from parml.plan.simulate import Layout, Workload, predict
from tests.unit.test_profile import one_line, synthetic_profile


def dense(width, blocks, in_features=2, out_features=2):
    return ModelSpec(in_features, out_features, (StageSpec(width, blocks),))


def test_ranks_that_do_not_fit_the_blocks_are_one_line():
    with pytest.raises(LayoutError) as e:       # batch 2 allows D <= 2, and 4 blocks in pairs P <= 2
        plan(Workload(dense(2, 4), batch=2, levels=2), 8, synthetic_profile())
    assert "--ranks 8" in one_line(e)
    with pytest.raises(LayoutError) as e:
        predict(Workload(dense(2, 4), batch=64), Layout(1, 8, 1), synthetic_profile())
    one_line(e)


def test_planner_main_prints_a_table_or_one_line(tmp_path, capsys):
    from parml.plan.planner import main
    path = tmp_path / "p.json"
    planner_profile().save(path)
    assert main(["--profile", str(path), "--ranks", "2", "-K", "64", "--width", "4", "-L", "2",
                 "--microbatches", "1,2"]) == 0
    out = capsys.readouterr().out
    assert "D x P" in out and "2 x 1" in out
    assert main(["--profile", str(tmp_path / "none.json"), "--ranks", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("parml: error: --profile") and "\n" not in err


def planner_profile(memory=math.inf):
    k = KernelCost(Fit(["n", "n*b*v^2*s"], [5e-6, 1e-9]), Fit(["n", "n*b*v^2*s"], [5e-6, 1e-9]),
                   Fit(["n*b*v^2*s"], [1e-9]))
    c = CommCost(2e-5, 5e9, 2e-6, Fit(["log2(g)", "B*(g-1)/g"], [3e-5, 4e-10]))
    return Profile("cpu", {"dense": k, "dense-inline": k}, {"gloo": c},
                   step={"update": Fit(["p"], [2e-10]), "gradient": Fit(["1"], [1e-5])}, cores=64,
                   memory_bytes=memory)


def test_planner_prefers_data_parallel_for_tiny_width_and_large_batch():
    recs = plan(Workload(dense(3, 256), batch=4096), 8, planner_profile())
    top = recs[0]
    assert (top["data_parallel"], top["layer_ranks"]) == (8, 1)
    assert top["fits_memory"] and top["efficiency"] == max(r["efficiency"] for r in recs)
    for key in ("data_parallel", "layer_ranks", "microbatches", "schedule", "coarse_layout",
                "predicted_step_seconds", "predicted_cycle_seconds", "efficiency", "memory_bytes_per_rank"):
        assert key in top
    times = [r["predicted_step_seconds"] for r in recs if r["fits_memory"]]
    assert times == sorted(times)
    table = format_table(recs, 5)
    assert "8 x 1" in table.splitlines()[2]
    assert json.loads(to_json(recs))[0]["data_parallel"] == 8


def test_planner_picks_layer_parallel_when_replicas_do_not_fit_memory():
    work = Workload(dense(512, 64), batch=64)
    full = predict(work, Layout(1, 1, 1), planner_profile()).memory_bytes[0]
    recs = plan(work, 4, planner_profile(memory=full * 0.4))
    top = recs[0]
    assert top["fits_memory"] and top["layer_ranks"] == 4
    assert not any(r["fits_memory"] for r in recs if r["layer_ranks"] < 4)


def test_planner_candidates_cover_the_mesh_and_coarse_layouts():
    work = Workload(dense(2, 256), batch=64, levels=4)
    cands = candidates(work, 4, "gloo")
    pairs = {(c.data_parallel, c.layer_ranks) for c in cands}
    assert pairs == {(4, 1), (2, 2), (1, 4)}
    assert {c.coarse_layout for c in cands} == {"gather", "replicate", "redundant"}
    assert {c.schedule for c in cands if c.layer_ranks > 1} == {"gpipe", "1f1b"}
    recs = plan(work, 4, planner_profile(), microbatches=[1, 4])
    assert all(r["predicted_cycle_seconds"] > r["predicted_step_seconds"] for r in recs)
