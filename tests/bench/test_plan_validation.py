"""The plan validation (benchmarks/plan_validation.py) runs end to end with tiny cases on 1 and 2
ranks against parml's reference profile: every planned configuration measured and predicted, the
--layout auto choices measured, the errors as the table says; --report-only redraws the same."""
import json
import statistics
import sys

import pytest

from multiproc import REPO_ROOT, assert_written, benchmark_results, rerender
from tests.bench.test_renders import png_width

SCRIPT = REPO_ROOT / "benchmarks" / "plan_validation.py"
PROFILE = REPO_ROOT / "parml" / "plan" / "profiles" / "reference_cpu.json"
TINY = {"worlds": [1, 2], "M": [1, 2], "M_short": [1], "M_data": [1], "steps": {1: 2, 8: 2}, "launch_timeout": 150,
        "sizes": {"overhead": {"blocks": 64, "batch": 32}, "circles": {"blocks": 128, "batch": 200}}}
# per world: overhead and circles GD steps (M_short on 1 rank; M and D = 2 on 2), circles V-cycles
PLANNED = {1: 2 * 1 + 1, 2: 2 * (2 + 1) + (2 + 3)}


@pytest.fixture(scope="module")
def validation_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("validation")
    return out, benchmark_results(SCRIPT, out, ["--quick", "--profile", PROFILE], 170, quick=TINY)[1]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_validation_tiny_run_measures_and_predicts(validation_run):
    out, res = validation_run
    assert_written(out, ("results.json", "validation.md", "validation.png"))
    assert png_width(out / "validation.png") > 600
    assert res["quick"] and not res["failures"] and res["profile_note"] == "given profile reference_cpu.json"
    assert list(res["cases"]) == ["overhead", "circles"] and res["cases"]["circles"]["blocks"] == 128
    assert str(REPO_ROOT) not in json.dumps(res)                     # no machine paths
    rs, cores = res["results"], res["cores"]
    for world, n in PLANNED.items():                                # + at most one auto choice per case and method
        assert n <= sum(m["world"] == world for m in rs) <= n + (3 if world == 2 else 0), world
    for m in rs:
        steps = TINY["steps"][m["levels"]]
        assert len(m["steps_s"]) == len(m["share"]) == len(m["cpu_s"]) == steps
        assert m["step_s"] == pytest.approx(statistics.median(m["steps_s"])) and m["step_s"] > 0
        assert all(len(c) == m["world"] for c in m["cpu_s"]) and all(0 < s <= 1.1 for s in m["share"])
        assert m["background"] == pytest.approx(statistics.median(max(0.0, cores / max(s, 1e-3) - m["world"])
                                                                   for s in m["share"]))
        assert m["predicted_s"] > 0
    errs = [abs(m["predicted_s"] / m["step_s"] - 1) for m in rs]
    e = res["errors"]
    assert e["n"] == len(rs) and e["median"] == pytest.approx(statistics.median(errs)) and e["max"] == max(errs)
    assert e["within_15"] == sum(x <= 0.15 for x in errs) and e["within_30"] == sum(x <= 0.30 for x in errs)
    # --layout auto at 2 ranks: one choice per (case, method), each measured (launched if new)
    assert [(c["case"], c["levels"]) for c in res["auto"]] == [("overhead", 1), ("circles", 1), ("circles", 8)]
    for c in res["auto"]:
        runs = [m for m in rs if (m["case"], m["levels"], m["world"]) == (c["case"], c["levels"], 2)]
        assert c["measured_s"] in [m["step_s"] for m in runs if (m["D"], m["M"]) == (c["D"], c["M"])]
        assert c["fastest_any"]["step_s"] == min(m["step_s"] for m in runs)
        assert c["over_fastest_any"] == pytest.approx(c["measured_s"] / c["fastest_any"]["step_s"])
        assert c["over_fastest_any"] >= 1 - 1e-12
    md = (out / "validation.md").read_text()
    assert "## --layout auto at 2 ranks" in md and f"over {len(rs)} configurations" in md
    assert md.split("## Every configuration")[1].count("\n| overhead |") + \
        md.split("## Every configuration")[1].count("\n| circles |") == len(rs)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_validation_report_only_predicts_the_same(validation_run, tmp_path):
    out, res = validation_run
    rerender(SCRIPT, out, tmp_path, ["--profile", PROFILE], 90)
    assert (tmp_path / "validation.md").read_text() == (out / "validation.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text()) == res
    assert png_width(tmp_path / "validation.png") > 600


def test_validation_json_of_the_old_layout_loads(tmp_path):
    """Results of the script before the harness (validation.json, plain dicts) load as records."""
    sys.path.insert(0, str(REPO_ROOT))
    from benchmarks.plan_validation import load
    entry = {"case": "circles", "levels": 8, "D": 1, "M": 2, "schedule": "1f1b", "mbpr": 16, "coarse": "gather",
             "steps": 3, "warmup": 1, "step_s": 0.2, "steps_s": [0.2, 0.3, 0.1], "cpu_s": [[0.1, 0.1]] * 3,
             "share": [0.9, 0.8, 1.0], "loadavg": [1.0] * 3, "world": 2, "background": 0.3, "predicted_s": 0.25}
    old = {"cases": {"circles": {"dataset": "circles", "in_features": 2, "classes": 2, "blocks": 2048, "width": 3,
                                 "batch": 2000, "lr": 0.1}},
           "results": [entry], "started": "s", "finished": "f", "load_range": [1.0, 2.0], "cores": 2,
           "profile_note": "n", "quick": True, "errors": {"n": 1, "median": 0.25, "max": 0.25, "within_15": 0,
                                                           "within_30": 1},
           "auto": [{"case": "circles", "levels": 8, "background": 0.3, "D": 1, "coarse": "gather", "M": 2,
                     "schedule": "1f1b", "mbpr": 16, "predicted_s": 0.25, "measured_s": 0.2,
                     "fastest_D1": {"D": 1, "M": 2, "schedule": "1f1b", "mbpr": 16, "step_s": 0.2},
                     "fastest_any": {"D": 1, "M": 2, "schedule": "1f1b", "mbpr": 16, "step_s": 0.2},
                     "over_fastest_D1": 1.0, "over_fastest_any": 1.0}]}
    (tmp_path / "validation.json").write_text(json.dumps(old))
    res = load(tmp_path)
    m = res.results[0]
    assert (m.world, m.D, m.M, m.coarse, m.predicted_s) == (2, 1, 2, "gather", 0.25) and m.cpu_s[0] == [0.1, 0.1]
    assert res.cases["circles"].lr == 0.1 and res.auto[0].fastest_D1.step_s == 0.2 and res.meta is None


def test_the_committed_mpi_validation_is_predicted_with_mpi_costs():
    """``--backend mpi`` (results/validation-mpi): the ranks ran on MPI, the calibration measured
    MPI, and every prediction replays MPI's costs: re-evaluated, the committed table comes back."""
    sys.path.insert(0, str(REPO_ROOT))
    from benchmarks.plan_validation import load
    from benchmarks.validation.analyse import evaluate, predicted
    from benchmarks.validation.markdown import markdown
    from parml.plan.profile import Profile, ProfileError
    out = REPO_ROOT / "benchmarks" / "results" / "validation-mpi"
    res = load(out)
    prof = Profile.load(str(out / "profile_cpu.json"), device="cpu")
    assert res.backend == "mpi" and list(prof.comm) == ["mpi"]
    committed = {id(m): m.predicted_s for m in res.results}
    evaluate(res, prof)
    assert "\n".join(markdown(res)) + "\n" == (out / "validation.md").read_text()
    assert all(m.predicted_s == pytest.approx(committed[id(m)], rel=1e-12) for m in res.results)
    two = next(m for m in res.results if m.world == 2 and m.D == 1)
    assert two.predicted_s == predicted(two, prof, res.cases, "mpi")
    with pytest.raises(ProfileError, match="'gloo' was not calibrated"):   # no gloo costs to replay
        predicted(two, prof, res.cases, "gloo")


def test_auto_choices_not_yet_measured_are_configurations_the_ranks_can_build():
    """A GD step's choice has no coarse layout (None); measured, it runs with the default one.
    Choices already measured are not launched again."""
    sys.path.insert(0, str(REPO_ROOT))
    from benchmarks.validation.analyse import unmeasured
    from benchmarks.validation.ranks import config
    from benchmarks.validation.records import AutoChoice, Case, Measured
    gd = AutoChoice("circles", 1, 0.0, 1, None, 8, "1f1b", 16, 0.02)
    cycle = AutoChoice("circles", 8, 0.0, 2, "gather", 1, "1f1b", 16, 0.2)
    done = Measured("circles", 8, 2, 1, "1f1b", 16, "gather", world=2, step_s=0.2)
    confs = unmeasured([gd, cycle], [done], {1: 5, 8: 3}, 1)
    assert [(c.levels, c.D, c.M, c.coarse, c.steps) for c in confs] == [(1, 1, 8, "gather", 5)]
    cfg = config(Case("circles", 2, 2, 64, 3, 200), confs[0])        # TrainConfig validates its options
    assert (cfg.levels, cfg.microbatches, cfg.coarse_layout) == (1, 8, "gather")
