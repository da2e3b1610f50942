"""`parml reproduce`: the paper's setups and U_c, the quick table end to end, determinism, one-line errors."""
import json
import os

import pytest

from multiproc import launch, parml_batch
from parml.comm import SelfComm
from parml.config import ConfigError
from parml.multilevel.mgopt import CycleSetup
from parml.reproduce.run import run_config
from parml.reproduce import (PAPER_SENSITIVITY, PAPER_TABLE1, PAPER_TABLE2, TASK_SETUP, Plan, Row,
                             build_plan, load_results, render_markdown, reproduce, sensitivity_summary, table1_rows,
                             table2_rows)

# --- the paper's numbers, typed in from Tables 1 and 2 (not computed) ------------------------------
TABLE1_SETUP = {1: "[{1}]", 2: "[(1),{2}]", 4: "[(1),1,2,{2}]", 6: "[(1),1,1,2,2,{2}]", 8: "[(1),1,1,1,2,2,2,{2}]"}
TABLE1_UC = {1: "1.00", 2: "3.00", 4: "5.00", 6: "5.25", 8: "5.19"}
TABLE1_CYCLES = {"circles": {1: 95, 2: 32, 4: 12, 6: 7, 8: 5}, "mnist": {1: 460, 2: 152, 4: 55, 6: 33, 8: 28}}
TABLE1_U = {"circles": {1: 95, 2: 96, 4: 60, 6: 37, 8: 26}, "mnist": {1: 460, 2: 456, 4: 275, 6: 173, 8: 145}}
TABLE2_SETUP = ["[1,1,1,1,1,1,1,{1}]", "[1,1,1,1,1,1,1,{2}]", "[1,1,1,1,1,1,1,{5}]", "[1,1,1,1,1,1,1,{10}]",
                "[1,1,1,1,2,2,2,{2}]", "[(1),1,1,1,2,2,2,{2}]"]
TABLE2_PRINTED_UC = ["5.97", "5.96", "5.99", "6.03", "6.19", "5.19"]     # as printed in the paper
TABLE2_EQ10_UC = ["5.96", "5.97", "5.99", "6.03", "6.19", "5.19"]        # eq. (10) by hand
TABLE2_CYCLES = [7, 7, 6, 5, 5, 5]
TABLE2_U = [42, 42, 36, 30, 31, 26]


def parml(*args, timeout=300, cwd=None):
    """`parml ARGS` in one process, a clean environment, killed with its children at the deadline."""
    return launch("serial", 1, list(args), cwd, timeout=timeout)


def table_rows(md: str) -> list[list[str]]:
    """Cells of the first markdown table's body rows."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| L / setup"))
    out = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        out.append([c.strip() for c in line.strip("|").split("|")])
    return out


# --- paper data and plans -----------------------------------------------------------------------------

@pytest.mark.timeout(30)
@pytest.mark.parametrize("task", ["circles", "mnist"])
def test_table1_setups_and_paper_numbers(task):
    rows = table1_rows(task)
    assert {r.levels: r.cycle for r in rows} == TABLE1_SETUP
    assert {r.levels: f"{r.paper_uc:.2f}" for r in rows} == TABLE1_UC
    assert {r.levels: f"{r.eq10:.2f}" for r in rows} == TABLE1_UC
    assert {r.levels: r.paper_cycles for r in rows} == TABLE1_CYCLES[task]
    assert {r.levels: r.paper_u for r in rows} == TABLE1_U[task]
    for L, cycle in TABLE1_SETUP.items():           # the trainer's default for --levels L is the paper's
        assert str(CycleSetup.default(L)) == cycle
    assert {L: v[0] for L, v in PAPER_TABLE1[task].items()} == TABLE1_SETUP


@pytest.mark.timeout(30)
def test_table2_shows_eq10_and_keeps_the_printed_values():
    rows = table2_rows()
    assert [r.cycle for r in rows] == TABLE2_SETUP
    assert [f"{r.paper_uc:.2f}" for r in rows] == TABLE2_EQ10_UC
    assert [f"{r.paper_uc_printed:.2f}" for r in rows] == TABLE2_PRINTED_UC
    assert [f"{r.eq10:.2f}" for r in rows] == TABLE2_EQ10_UC
    assert [r.paper_cycles for r in rows] == TABLE2_CYCLES and [r.paper_u for r in rows] == TABLE2_U
    assert [r.note for r in rows] == ["[a]", "[a]", "", "", "", ""]
    assert [f"{uc:.2f}" for _, _, uc, _ in PAPER_TABLE2] == TABLE2_PRINTED_UC


@pytest.mark.timeout(30)
def test_plans_follow_the_paper(tmp_path):
    c = build_plan("table1", "circles")
    assert c.base["blocks"] == 2048 and c.seeds == [0, 1, 2] and c.base["batch_size"] is None
    assert c.base["width"] == 3 and c.base["target_accuracy"] == 1.0
    assert {(r.lr, r.beta) for r in c.rows} == {(0.1, 1e-4)}
    m = build_plan("table1", "mnist", data_dir=str(tmp_path))
    assert m.base["width"] == 10 and m.base["batch_size"] == 1000 and m.base["target_accuracy"] == 0.93
    assert {(r.lr, r.beta) for r in m.rows} == {(0.01, 1e-5)} and m.base["data_dir"] == str(tmp_path)
    assert any("8000" in n for n in m.notes)
    assert build_plan("table1", "mnist", data_dir=str(tmp_path), target_accuracy=0.9).base["target_accuracy"] == 0.9
    q = build_plan("table1", "circles", quick=True)
    assert q.base["blocks"] == 128 and q.seeds == [0, 1] and [r.levels for r in q.rows] == [1, 2, 4]
    assert q.base["max_cycles"] < 2000
    s = build_plan("sensitivity")
    grid = {(r.lr, r.beta) for r in s.rows}
    assert grid == {(a, b) for a in (0.05, 0.1, 0.5) for b in (1e-3, 1e-4, 1e-5)}
    assert sorted({(r.levels, r.cycle) for r in s.rows}) == [(1, "[{1}]"), (8, "[(1),1,1,1,2,2,2,{2}]")]
    assert len(s.rows) == 18 and PAPER_SENSITIVITY["mean_ratio"] == 3.54 and PAPER_SENSITIVITY["rsd_percent"] == 8.02
    assert TASK_SETUP["circles"]["lr"] == 0.1 and TASK_SETUP["mnist"]["beta"] == 1e-5


@pytest.mark.timeout(30)
def test_sensitivity_statistics():
    def fake(lr, beta, L, u):
        run = {"work_units": u, "seconds": u / 10, "reached_target": True, "status": "reached"}
        return {"row": Row(f"{lr}-{beta}-{L}", "", L, "[{1}]" if L == 1 else "[(1),1,1,1,2,2,2,{2}]", lr, beta),
                "runs": [run], "median": {"work_units": u, "seconds": u / 10, "reached": 1, "n": 1}}
    rows = []
    for (lr, beta), ratio in zip([(0.1, 1e-4), (0.5, 1e-3), (0.05, 1e-5)], [3.0, 4.0, 5.0]):
        rows += [fake(lr, beta, 1, 100 * ratio), fake(lr, beta, 8, 100)]
    s = sensitivity_summary({"plan": Plan("sensitivity", "circles", [], [0], {}), "rows": rows})
    assert [round(c["U_ratio"], 9) for c in s["cells"]] == [3.0, 4.0, 5.0]
    assert s["mean_U_ratio"] == pytest.approx(4.0)
    assert s["rsd_percent"] == pytest.approx(25.0)     # sample std 1.0 / mean 4.0


@pytest.mark.timeout(30)
def test_work_budget_caps_each_setup_by_its_cost(tmp_path):
    plan = build_plan("table1", "circles", max_cycles=2500, max_work_units=2500)
    caps = {r.levels: run_config(plan, r, 0, str(tmp_path)).max_cycles for r in plan.rows}
    assert caps == {1: 2500, 2: 834, 4: 500, 6: 477, 8: 482}      # ⌈2500 / U_c⌉, U_c = 1, 3, 5, 5.25, 5.1875
    assert run_config(build_plan("table1"), plan.rows[0], 0, str(tmp_path)).max_cycles == 3000


@pytest.mark.timeout(120)
def test_reuse_keeps_a_finished_run_of_the_same_config(tmp_path):
    kw = dict(quick=True, seeds=1, levels=[4], out=str(tmp_path), progress=False)
    first = reproduce("table1", max_cycles=3, comm=SelfComm(), **kw)["rows"][0]["runs"][0]
    again = reproduce("table1", max_cycles=3, comm=SelfComm(), reuse=True, **kw)["rows"][0]["runs"][0]
    assert again["reused"] and not first.get("reused")
    assert (again["cycles"], again["work_units"], again["final_loss"]) == (3, first["work_units"], first["final_loss"])
    with pytest.raises(ConfigError, match="exists: continue it with --resume"):   # never replaced silently
        reproduce("table1", max_cycles=4, comm=SelfComm(), reuse=True, **kw)
    other = reproduce("table1", max_cycles=4, comm=SelfComm(), reuse=True, overwrite=True, **kw)["rows"][0]["runs"][0]
    assert not other.get("reused") and other["cycles"] == 4         # another config is trained again


# --- U_c as parml prints it: measured by the trainer, in the table --------------------------------

def _printed_uc(md: str) -> list[tuple[str, str, str]]:
    """(setup, paper U_c, parml U_c) per body row."""
    return [(r[0].split(" ", 1)[1], r[2], r[5]) for r in table_rows(md)]


@pytest.mark.timeout(240)
def test_table1_uc_printed_by_parml_equals_the_paper(tmp_path):
    res = reproduce("table1", "circles", seeds=1, quick=True, out=str(tmp_path), max_cycles=2, progress=False,
                    levels=[1, 2, 4, 6, 8], comm=SelfComm())
    printed = _printed_uc(res["files"]["table"])
    assert [p[0] for p in printed] == list(TABLE1_SETUP.values())
    assert [p[1] for p in printed] == list(TABLE1_UC.values())       # the paper's column
    assert [p[2] for p in printed] == list(TABLE1_UC.values())       # measured by the trainer


@pytest.mark.timeout(240)
def test_table2_uc_printed_by_parml_equals_eq10_with_the_swap_footnoted(tmp_path):
    res = reproduce("table2", seeds=1, quick=True, out=str(tmp_path), max_cycles=2, progress=False, comm=SelfComm())
    md = res["files"]["table"]
    printed = _printed_uc(md)
    assert [p[0] for p in printed] == TABLE2_SETUP
    assert [p[1].split()[0] for p in printed] == TABLE2_EQ10_UC
    assert [p[1].endswith("[a]") for p in printed] == [True, True, False, False, False, False]
    assert [p[2] for p in printed] == TABLE2_EQ10_UC
    assert "[a] eq. (10) gives U_c = 5.96" in md and "swapped" in md
    data = json.loads((tmp_path / "table2.json").read_text())
    assert [f"{r['paper']['uc_printed']:.2f}" for r in data["rows"]] == TABLE2_PRINTED_UC


# --- the command end to end ----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_table1_writes_files_and_is_deterministic(tmp_path):
    out = tmp_path / "a"
    r = parml("reproduce", "table1", "--quick", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "| L / setup | paper V-cycles | paper U_c | paper U | parml V-cycles (median, min–max)" in r.stdout
    assert "U(L=1)/U(L=4)" in r.stdout
    for name in ("table1-circles.md", "table1-circles.json"):
        assert (out / name).stat().st_size > 500
    for name in ("table1-circles-cycles.png", "table1-circles-work-units.png"):
        assert (out / name).stat().st_size > 10_000
    data = json.loads((out / "table1-circles.json").read_text())
    assert data["quick"] and data["seeds"] == [0, 1] and data["config"]["blocks"] == 128
    assert [row["levels"] for row in data["rows"]] == [1, 2, 4]
    for row in data["rows"]:
        assert len(row["runs"]) == 2
        for run in row["runs"]:
            assert run["reached_target"] and run["val_acc"] == 1.0
            assert os.path.isfile(os.path.join(run["folder"], "metrics.jsonl"))
            assert run["uc"] == pytest.approx(row["eq10_uc"])
    assert data["ratio"]["U"] > 1 and data["ratio"]["seconds"] > 0
    assert (out / "table1-circles.md").read_text() in r.stdout
    assert "U / U(1 [{1}])" in r.stdout and "val acc ≥ 1" in r.stdout
    for row in data["rows"]:                      # accuracy 1.0 is first reached where the run stopped
        for run in row["runs"]:
            assert run["first_reach"]["1"] == [run["cycles"], pytest.approx(run["work_units"])]
    again_md = render_markdown(load_results(str(out / "table1-circles.json")), data["command"])
    assert again_md == (out / "table1-circles.md").read_text()       # the JSON holds every number of the table

    # the same config again, for seed 0 (L = 2, 4): the same V-cycle counts
    again = tmp_path / "b"
    r = parml("reproduce", "table1", "--quick", "--seeds", "1", "--levels", "2,4", "--out", str(again), "--no-progress")
    assert r.returncode == 0, r.stderr
    second = json.loads((again / "table1-circles.json").read_text())
    first = {row["levels"]: row["runs"][0] for row in data["rows"]}
    for row in second["rows"]:
        run = row["runs"][0]
        assert run["seed"] == 0
        assert run["cycles"] == first[row["levels"]]["cycles"]
        assert run["work_units"] == first[row["levels"]]["work_units"]


BAD = [
    (["table3"], "unknown table 'table3'"),
    (["table1", "--seeds", "0"], "--seeds 0"),
    (["table1", "--seeds", "-2"], "--seeds -2"),
    (["table1", "--task", "cifar"], "--task 'cifar'"),
    (["table2", "--task", "mnist"], "--task mnist"),
    (["table1", "--levels", "3"], "--levels 3"),
    (["table2", "--levels", "1"], "--levels"),
    (["table1", "--max-cycles", "0"], "--max-cycles 0"),
    (["table1", "--target-accuracy", "1.5"], "--target-accuracy 1.5"),
    (["table1", "--task", "mnist", "--quick", "--data-dir", "/nonexistent/mnist"], "/nonexistent/mnist"),
]


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """Every BAD command line, each with its own --out folder, in one process (parml_batch)."""
    root = tmp_path_factory.mktemp("bad")
    return parml_batch([["reproduce", *args, "--out", str(root / str(i)), "--no-progress"]
                        for i, (args, _) in enumerate(BAD)], timeout=240)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", range(len(BAD)), ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_and_exit_2(case, bad_runs):
    needle, r = BAD[case][1], bad_runs[case]
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("parml: error:"), r.stderr
    assert needle in lines[0]
    assert "Traceback" not in r.stderr
