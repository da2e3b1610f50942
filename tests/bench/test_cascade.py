"""The cascade benchmark (benchmarks/cascade.py) runs end to end (``--quick``): equal step budgets,
Chang's work saving, consistent curves and report."""

import pytest

from multiproc import REPO_ROOT, assert_written, benchmark_results
from parml.multilevel.cascade import theoretical_saving
from tests.bench.test_mgopt_scaling import one

CASCADE = REPO_ROOT / "benchmarks" / "cascade.py"


@pytest.fixture(scope="module")
def cascade_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cascade")
    stdout, res = benchmark_results(CASCADE, out, ["--quick"], 230)
    return out, res, stdout


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_cascade_quick(cascade_run):
    out, res, stdout = cascade_run
    assert_written(out, ("results.json", "cascade.md", "cascade.png"))
    cfg, runs, an = res["config"], res["runs"], res["analysis"]
    assert cfg["quick"] and cfg["datasets"] == ["circles"]
    s = cfg["setups"]["circles"]
    K, B = s["blocks"], s["budget"]
    assert len(runs) == 2 and len(stdout.strip().splitlines()) >= 2
    d, c = one(runs, mode="direct"), one(runs, mode="cascade")
    # same budget of steps: B at depth K vs B/3 at K/4, K/2 and K
    assert d["cycles"] == d["steps"] == B and d["work_units"] == B and d["cascade_work_units"] == 0
    assert [st["blocks"] for st in c["stages"]] == [K // 4, K // 2]
    assert [st["cycles"] for st in c["stages"]] == [B // 3, B // 3] and c["cycles"] == B // 3
    assert c["steps"] == B
    assert c["cascade_work_units"] == pytest.approx(B / 3 * (1 / 4 + 1 / 2))
    assert c["work_units"] == pytest.approx(B / 3 * (1 / 4 + 1 / 2 + 1))
    assert an["theoretical_saving"] == pytest.approx(theoretical_saving(2))
    p = an["pairs"][0]
    assert p["work_saved"] == pytest.approx(theoretical_saving(2))   # equal budget per stage: Chang's formula
    assert p["time_saved"] == pytest.approx(1 - c["seconds"] / d["seconds"])
    assert p["acc_diff"] == pytest.approx(c["val_acc"] - d["val_acc"])
    for r in (d, c):
        assert r["seconds"] >= r["train_s"] > 0 and 0 <= r["val_acc"] <= 1
        assert r["curve"]["val_acc"][-1] == r["val_acc"]
        assert all(a <= b for a, b in zip(r["curve"]["seconds"], r["curve"]["seconds"][1:]))
    assert c["curve"]["phase"][0].startswith("cascade") and c["curve"]["phase"][-1] == "train"
    md = (out / "cascade.md").read_text()
    assert "## circles" in md and "## Goal" in md and "41.7 %" in md
