"""The scaling projection (benchmarks/scaling_projection.py) runs end to end with a tiny sweep on
parml's reference CPU profile and the estimated GPU profile: every series planned at every rank
count, the best layout no slower than the pure layouts, the table one row per series."""
import json

import pytest

from multiproc import REPO_ROOT, assert_written, benchmark_results, rerender
from tests.bench.test_renders import png_width

SCRIPT = REPO_ROOT / "benchmarks" / "scaling_projection.py"
PROFILE = REPO_ROOT / "parml" / "plan" / "profiles" / "reference_cpu.json"
TINY = {"ranks": [1, 2, 4], "blocks": [256], "widths": [3]}


def seconds(pick, levels):
    return pick["predicted_cycle_seconds" if levels > 1 else "predicted_step_seconds"]


@pytest.fixture(scope="module")
def projection_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("projection")
    return out, benchmark_results(SCRIPT, out, ["--quick", "--cpu-profile", PROFILE], 120, quick=TINY)[1]


@pytest.mark.timeout(150)
def test_projection_tiny_sweep(projection_run):
    out, res = projection_run
    assert_written(out, ("results.json", "projection.md", "projection.png", "profile_gpu_estimate.json"))
    assert png_width(out / "projection.png") > 400       # one workload: one column
    assert res["ranks"] == TINY["ranks"] and res["config"]["quick"] and res["seconds"] > 0
    assert str(REPO_ROOT) not in json.dumps(res)
    keys = [(s["profile"], s["scaling"], s["levels"]) for s in res["series"]]
    assert keys == [(p, sc, L) for p in ("cpu", "gpu") for sc in ("strong", "weak") for L in (1, 8)]
    for s in res["series"]:
        L = s["levels"]
        assert s["workload"] == "dense K=256 w=3" and [p["n"] for p in s["points"]] == TINY["ranks"]
        for p in s["points"]:
            b = p["best"]
            assert p["error"] is None and p["candidates"] >= 1 and b["data_parallel"] * b["layer_ranks"] == p["n"]
            pure = [x for x in (p["dp"], p["lp"], p["gather"], p["replicate"]) if x is not None]
            assert all(seconds(b, L) <= seconds(x, L) for x in pure) and seconds(b, L) > 0
            if L > 1:       # the best V-cycle layout is the better of gathered and replicated coarse levels
                assert seconds(b, L) == min(seconds(p[c], L) for c in ("gather", "replicate") if p[c])
            else:
                assert p["gather"] is None and b["coarse_layout"] is None
        one = s["points"][0]["best"]
        assert (one["data_parallel"], one["layer_ranks"]) == (1, 1)
    md = (out / "projection.md").read_text()
    first = md.split("## Gathered")[0]
    assert sum(line.startswith("| cpu |") or line.startswith("| gpu |") for line in first.splitlines()) == 8
    assert "| cpu | dense K=256 w=3 | strong | V-cycle | 4 |" in md


@pytest.mark.timeout(150)
def test_projection_report_only_redraws_the_same(projection_run, tmp_path):
    out, _ = projection_run
    rerender(SCRIPT, out, tmp_path, [], 60)
    assert (tmp_path / "projection.md").read_text() == (out / "projection.md").read_text()
    assert png_width(tmp_path / "projection.png") > 400
    assert (tmp_path / "results.json").read_bytes() == (out / "results.json").read_bytes()
