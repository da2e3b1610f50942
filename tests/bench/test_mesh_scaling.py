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


def test_layouts_interleave_in_rounds(monkeypatch):
    """``measure`` builds every layout once and runs their steps in rounds: each layout, in the
    order rotated for the repeat, takes one untimed step and then up to ``BLOCK`` timed ones on the
    same batches as every other layout (so a slow spell of the machine falls on all layouts alike);
    warm-up steps and the untimed step of a round are not recorded."""
    from types import SimpleNamespace

    from benchmarks.mesh import ranks
    from benchmarks.mesh.records import Layout, MeshJob
    from parml.comm import SelfComm
    from parml.data import load_dataset

    calls, built = [], []

    class Cycle:                      # stands in for build_vcycle's V-cycle: records its calls
        def __init__(self, cfg, data, comm):
            self.k, self.groups = len(built), SimpleNamespace(communicators=lambda: [])
            built.append(cfg)

        def __call__(self, batch, bid):
            calls.append((self.k, bid))
            return SimpleNamespace(level_seconds=[0.001])

    monkeypatch.setattr(ranks, "build_vcycle", Cycle)
    monkeypatch.setattr(ranks, "BLOCK", 2)
    layouts = [Layout(1, 1), Layout(1, 1, "replicate"), Layout(1, 1, "redundant", 256)]
    job = MeshJob(["mnist-sgd"], layouts, 16, 2, {"mnist-sgd": 3}, 1, False, 1, "torch", None, None)
    x = load_dataset("circles", None, seed=0, flatten=True)
    data = SimpleNamespace(x_train=x.x_train[:2500], y_train=x.y_train[:2500])
    rows = ranks.measure(SelfComm(), job, "mnist-sgd", data)       # mini-batches of 1000: ids (epoch, i)
    assert [c.coarse_layout for c in built] == ["gather", "replicate", "redundant"]
    assert sorted(rows) == [(k, rep) for k in range(3) for rep in range(2)]
    assert all(len(r) == 3 for r in rows.values())                   # the timed steps only
    ids = [bid for _, bid in calls]
    warm, rest = calls[:3], calls[3:]
    assert [k for k, _ in warm] == [0, 1, 2] and len({b for _, b in warm}) == 1
    expect = []                       # repeat 0: batches 1-3, repeat 1: batches 4-6, blocks of 2 and 1
    for rep, order in ((0, [0, 1, 2]), (1, [1, 2, 0])):
        for block in ([1 + 3 * rep, 2 + 3 * rep], [3 + 3 * rep]):
            for k in order:
                expect += [(k, block[0])] + [(k, b) for b in block]
    plan = sorted(set(ids), key=ids.index)                            # batch ids in order of first use
    assert [(k, plan.index(b)) for k, b in rest] == expect
