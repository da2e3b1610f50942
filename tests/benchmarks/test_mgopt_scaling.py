"""The MG/OPT scaling and cascade benchmarks run end to end (``--quick``) and report consistent numbers."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from parml.multilevel.cascade import theoretical_saving
from parml.multilevel.mgopt import CycleSetup

ROOT = Path(__file__).resolve().parent.parent
MGOPT = ROOT / "benchmarks" / "mgopt_scaling.py"
CASCADE = ROOT / "benchmarks" / "cascade.py"
U_L8 = CycleSetup.parse("[(1),1,1,1,2,2,2,{2}]").cost()


def _run(script, out):
    env = {k: v for k, v in __import__("os").environ.items()}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--out", str(out)], cwd=str(ROOT),
                          capture_output=True, text=True, timeout=230, env=env)
    assert proc.returncode == 0, f"{script.name} failed\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def mgopt_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mgopt")
    stdout = _run(MGOPT, out)
    return out, json.loads((out / "results.json").read_text()), stdout


@pytest.fixture(scope="module")
def cascade_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cascade")
    stdout = _run(CASCADE, out)
    return out, json.loads((out / "results.json").read_text()), stdout


def _one(runs, **kw):
    hits = [r for r in runs if all(r.get(k) == v for k, v in kw.items())]
    assert len(hits) == 1, (kw, len(hits))
    return hits[0]


@pytest.mark.timeout(240)
def test_mgopt_quick_files_and_runs(mgopt_run):
    out, res, stdout = mgopt_run
    for name in ("results.json", "mgopt_scaling.md", "mgopt_scaling.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    cfg, runs = res["config"], res["runs"]
    assert cfg["quick"] and cfg["blocks"] == 128 and cfg["datasets"] == ["circles"] and cfg["P"] == [1, 2]
    assert not res["failures"]
    # L = 1 and 8 on P = 1 and 2, plus the P = 2 run with every level on both ranks
    assert len(runs) == 5
    assert sum(line.startswith("[P=") for line in stdout.splitlines()) == len(runs)   # one line per run
    for r in runs:
        assert r["status"] == "reached" and r["reached_target"] and r["val_acc"] == 1.0, r["key"]
        assert len(r["per_rank"]) == r["P"] and len(r["level_seconds"]) == r["levels"] == len(r["plan"])
        assert all(s > 0 for s in r["level_seconds"])
        assert r["per_rank"][0]["calls"] == r["cycles"]
        assert all(p["compute_s"] > 0 and p["train_s"] >= p["compute_s"] for p in r["per_rank"])
        assert 0 < r["efficiency"] <= 1.05
        assert r["bound"] == pytest.approx(1 / (1 + r["P"] - 1))
        c = r["curve"]
        assert c["cycle"] == list(range(1, r["cycles"] + 1))
        assert c["work_units"][-1] == r["work_units"] and c["val_acc"][-1] == r["val_acc"]
        assert all(a < b for a, b in zip(c["work_units"], c["work_units"][1:]))
        # work units: one per GD step; eq. (10)'s 5.1875 per V-cycle (no cascade)
        if r["levels"] == 1:
            assert r["work_units"] == r["cycles"]
        else:
            assert r["work_units"] == r["cycles"] * U_L8
    # P = 2 gives the P = 1 iterates: same cycles, work units, validation accuracy
    for L in (1, 8):
        a, b = _one(runs, P=1, levels=L, variant="default"), _one(runs, P=2, levels=L, variant="default")
        assert (a["cycles"], a["work_units"], a["val_acc"]) == (b["cycles"], b["work_units"], b["val_acc"])
        assert b["final_loss"] == pytest.approx(a["final_loss"], rel=1e-5)
    # the level plan: coarse levels gathered onto rank 0 with 16 blocks per rank, not with 1
    g, m = (_one(runs, P=2, levels=8, variant=v) for v in ("default", "min1"))
    assert g["min_blocks_per_rank"] == 16 and m["min_blocks_per_rank"] == 1
    assert g["plan"] == [1, 1, 1, 1, 1, 2, 2, 2] and m["plan"] == [1, 1, 2, 2, 2, 2, 2, 2]
    assert (g["cycles"], g["work_units"]) == (m["cycles"], m["work_units"])
    assert _one(runs, P=1, levels=8)["plan"] == [1] * 8


@pytest.mark.timeout(240)
def test_mgopt_quick_analysis_and_report(mgopt_run):
    out, res, _ = mgopt_run
    an, runs = res["analysis"], res["runs"]
    for P in (1, 2):
        e = an["ratios"][f"circles-P{P}"]
        l1, l8 = _one(runs, P=P, levels=1, variant="default"), _one(runs, P=P, levels=8, variant="default")
        assert e["work_ratio"] == pytest.approx(l1["work_units"] / l8["work_units"])
        assert e["wall_ratio"] == pytest.approx(l1["seconds"] / l8["seconds"])
        assert e["goal_work_met"] == (e["work_ratio"] >= 4.0)
        assert e["thresholds"]["1.0"]["work_L1"] == l1["work_units"]
    assert len(an["exactness"]) == 2 and all(x["equal"] for x in an["exactness"])
    assert set(an["efficiency"]) == {"circles-L1", "circles-L8"}
    assert len(an["min_blocks"]["pairs"]) == 1 and set(an["min_blocks"]["pairs"][0]) == {"16", "1"}
    md = (out / "mgopt_scaling.md").read_text()
    for text in ("## circles", "## Goal", "P = 2 against P = 1", "Parallel efficiency", "Time per level",
                 "min blocks per rank"):
        assert text in md, text


@pytest.mark.timeout(240)
def test_cascade_quick(cascade_run):
    out, res, stdout = cascade_run
    for name in ("results.json", "cascade.md", "cascade.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    cfg, runs, an = res["config"], res["runs"], res["analysis"]
    assert cfg["quick"] and cfg["datasets"] == ["circles"]
    s = cfg["setups"]["circles"]
    K, B = s["blocks"], s["budget"]
    assert len(runs) == 2 and len(stdout.strip().splitlines()) >= 2
    d, c = _one(runs, mode="direct"), _one(runs, mode="cascade")
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


def test_bootstrap_interval_of_the_work_ratio():
    """The interval over seeds brackets the ratio of means, shrinks to it when every seed agrees,
    and is the same on every call (fixed resampling seed)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("mgopt_scaling", MGOPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    pairs = [(391, 108.9), (274, 77.8), (521, 155.6), (1006, 191.9), (603, 119.3)]
    lo, hi = mod.ratio_of_means_interval(pairs, draws=4000)
    point = sum(a for a, _ in pairs) / sum(b for _, b in pairs)
    assert lo < point < hi and hi - lo > 0.3
    assert [lo, hi] == mod.ratio_of_means_interval(pairs, draws=4000)
    assert mod.ratio_of_means_interval([(8.0, 2.0)] * 4, draws=500) == [4.0, 4.0]
    assert mod.ratio_of_means_interval([(8.0, 2.0)]) is None
