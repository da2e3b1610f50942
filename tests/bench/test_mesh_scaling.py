"""The mesh benchmark (benchmarks/mesh_scaling.py) runs end to end on 2 and 4 ranks with tiny
settings, its numbers agree with each other, and --report-only redraws the same report."""

import pytest

from multiproc import REPO_ROOT, assert_written, benchmark_results, rerender
from tests.bench.test_renders import png_width

SCRIPT = REPO_ROOT / "benchmarks" / "mesh_scaling.py"
TINY = {"steps": {"circles-gd": 1, "circles-vcycle": 2, "mnist-sgd": 1}, "max_cycles": 2, "launch_timeout": 150}
ARGS = ["--quick", "--workloads", "circles-vcycle", "--kernel", "torch"]


@pytest.fixture(scope="module")
def mesh_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh")
    return out, benchmark_results(SCRIPT, out, ARGS, 170, quick=TINY)[1]


def _row(world, D, P, coarse):
    hits = [r for r in world["rows"] if (r["layout"]["D"], r["layout"]["P"], r["layout"]["coarse"]) == (D, P, coarse)]
    assert len(hits) == 1, (D, P, coarse)
    return hits[0]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_mesh_tiny_run_records_every_layout(mesh_run):
    out, res = mesh_run
    assert_written(out, ("results.json", "mesh_scaling.md", "mesh_scaling.png"))
    assert png_width(out / "mesh_scaling.png") > 800
    cfg = res["config"]
    assert cfg["quick"] and cfg["blocks"] == 128 and cfg["kernel"] == "torch" and not res["failures"]
    assert cfg["workloads"] == ["circles-vcycle"] and sorted(cfg["layouts"]) == ["2", "4"]
    assert [(s["world"], s["layout"]["D"], s["layout"]["P"]) for s in res["samples"]] == \
        [(2, 1, 1), (2, 2, 1), (2, 2, 1), (2, 1, 2), (2, 1, 2), (4, 1, 4), (4, 1, 4), (4, 2, 2), (4, 2, 2),
         (4, 2, 2)]
    for s in res["samples"]:
        assert len(s["ranks"]) == s["world"]
        one = s["layout"]["D"] * s["layout"]["P"] == 1
        assert all((r is None) == (one and i > 0) for i, r in enumerate(s["ranks"])), s["layout"]
        for rank, rows in enumerate(s["ranks"]):
            assert rows is None or len(rows) == 2     # the timed V-cycles (after one untimed)
            for r in rows or []:
                assert r["wall"] > 0 and r["cpu"] > 0 and 0 <= r["blocked"] <= r["wall"]
                # rank 0 works on every level; the others only on the levels spread over them
                assert len(r["levels"]) == 8 and all(x > 0 if rank == 0 else x >= 0 for x in r["levels"])
    two, four = res["worlds"]
    assert (two["ranks"], four["ranks"]) == (2, 4)
    base = _row(two, 1, 1, "gather")
    assert base["speedup"] == base["wall_eff"] == base["cpu_eff"] == 1.0 and base["idle"][1] is None
    for D, P, coarse in ((2, 1, "gather"), (2, 1, "redundant"), (1, 2, "gather"), (1, 2, "replicate")):
        r = _row(two, D, P, coarse)
        assert r["samples"] == 2 and r["speedup"] == pytest.approx(base["wall"] / r["wall"])
        assert r["wall_eff"] == pytest.approx(r["speedup"] / 2)
        assert r["cpu_eff"] == pytest.approx(base["cpu"] / r["cpu"])
        assert len(r["idle"]) == 2 and all(0 <= x <= 1 for x in r["idle"])
    for r in four["rows"]:                            # no one-process row in the 4-rank launch
        assert r["speedup"] is None and len(r["idle"]) == 4 and all(0 <= x <= 1 for x in r["idle"])
    # circles to the target: every 2-rank layout, at most max_cycles V-cycles, speedups against (1, 1)
    assert len(res["targets"]) == 5 and not four["targets"]
    one = next(t for t in two["targets"] if t["layout"]["D"] * t["layout"]["P"] == 1)
    for t in two["targets"]:
        assert 0 < t["seconds"] and all(0 < c <= TINY["max_cycles"] for c in t["cycles"])
        assert t["speedup"] == pytest.approx(one["seconds"] / t["seconds"])
    md = (out / "mesh_scaling.md").read_text()
    for text in ("## 2 ranks: seconds per step / V-cycle, efficiency", "## circles V-cycle to val acc 1.0 (2 ranks)",
                 "## coarse layouts, circles V-cycle, 4 ranks", "| circles-vcycle | (1, 2) | replicate |",
                 "| circles-vcycle | (2, 1) | redundant <256 |",
                 "`--kernel torch`"):
        assert text in md, text


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_mesh_report_only_redraws_the_same_report(mesh_run, tmp_path):
    out, _ = mesh_run
    rerender(SCRIPT, out, tmp_path, [], 60)
    assert (tmp_path / "mesh_scaling.md").read_text() == (out / "mesh_scaling.md").read_text()
    assert png_width(tmp_path / "mesh_scaling.png") > 800
    assert (tmp_path / "results.json").read_bytes() == (out / "results.json").read_bytes()   # numbers untouched
