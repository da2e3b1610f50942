"""`parml plan`, `parml calibrate` and `parml train --layout auto` as a user runs them: a ranked
table or JSON list, the best layout applied and printed, one-line errors for bad profiles and ranks."""
import json
import math
import os
import subprocess
import sys

import pytest

from parml.plan.profile import CommCost, Fit, KernelCost, Profile

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "LOCAL_WORLD_SIZE"):
    ENV.pop(var, None)
KEYS = ("data_parallel", "layer_ranks", "microbatches", "schedule", "coarse_layout", "predicted_step_seconds",
        "predicted_cycle_seconds", "efficiency", "memory_bytes_per_rank", "min_blocks_per_rank")


def parml(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "parml.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def profile(path, device="cpu", per_block=2e-6, per_row=5e-8):
    """Costs where one block call costs more than the rows it runs (overhead-bound, like small widths)."""
    k = KernelCost(Fit(["n", "n*b"], [per_block, per_row]), Fit(["n", "n*b"], [per_block, per_row]),
                   Fit(["n*b"], [1e-8]))
    c = CommCost(3e-5, 2e9, 2e-6, Fit(["log2(g)", "B*(g-1)/g"], [4e-5, 1e-9]))
    Profile(device, {"dense": k, "dense-inline": k}, {"gloo": c}, step={"update": Fit(["p"], [1e-9])},
            cores=2, memory_bytes=math.inf).save(path)
    return str(path)


def one_line(r):
    err = r.stderr.strip()
    assert r.returncode == 2 and err.startswith("parml: error: ") and "\n" not in err, r.stderr
    return err


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def inproc(capsys, monkeypatch):
    """`parml ...` in this process (no interpreter start per call): exit code, stdout, stderr."""
    from parml.cli import main
    for var in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)

    def run(*args):
        capsys.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as e:
            code = e.code or 0
        out = capsys.readouterr()
        return Result(code, out.out, out.err)
    return run


@pytest.mark.timeout(240)
def test_plan_prints_a_ranked_table_and_json(tmp_path, inproc):
    prof = profile(tmp_path / "p.json")
    r = inproc("plan", "--profile", prof, "--ranks", "4", "-K", "256", "-L", "3", "--width", "8",
              "--batch-size", "64")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["#", "D", "x"] and "V-cycle" in lines[0] and "mem/rank" in lines[0]
    assert lines[2].split()[0] == "1"
    r = inproc("plan", "--profile", prof, "--ranks", "4", "-K", "256", "-L", "3", "--width", "8",
               "--batch-size", "64", "--json")
    assert r.returncode == 0, r.stderr
    recs = json.loads(r.stdout)
    assert all(k in rec for rec in recs for k in KEYS)
    assert {(x["data_parallel"], x["layer_ranks"]) for x in recs} == {(4, 1), (2, 2), (1, 4)}
    assert {x["coarse_layout"] for x in recs} == {"gather", "replicate", "redundant"}
    cycles = [x["predicted_cycle_seconds"] for x in recs]
    assert cycles == sorted(cycles) and [x["rank"] for x in recs] == list(range(1, len(recs) + 1))
    # options given fix their candidates
    r = inproc("plan", "--profile", prof, "--ranks", "2", "-K", "64", "-L", "1", "-M", "2", "--schedule", "gpipe",
               "--json")
    recs = json.loads(r.stdout)
    assert {(x["microbatches"], x["schedule"]) for x in recs if x["layer_ranks"] == 2} == {(2, "gpipe")}


def test_plan_errors_are_one_line(tmp_path, inproc):
    parml = inproc
    prof = profile(tmp_path / "p.json")
    r = inproc("plan", "--ranks", "2", "-K", "64", "-L", "1", "--json")       # the reference profile, with a note
    assert r.returncode == 0 and "parml calibrate" in r.stderr and json.loads(r.stdout)[0]["rank"] == 1
    assert "--ranks is required" in one_line(parml("plan", "--profile", prof, "-K", "64", "-L", "1"))
    assert "no such file" in one_line(parml("plan", "--profile", str(tmp_path / "x.json"), "--ranks", "2"))
    (tmp_path / "bad.json").write_text("{\"schema\": 1, ")
    assert "corrupt" in one_line(parml("plan", "--profile", str(tmp_path / "bad.json"), "--ranks", "2"))
    gpu = profile(tmp_path / "gpu.json", device="cuda")
    err = one_line(parml("plan", "--profile", gpu, "--ranks", "2", "-K", "64", "-L", "1", "--device", "cpu"))
    assert "'cuda'" in err and "'cpu'" in err
    # 7 ranks: 7 x 1 needs a batch of 7, 1 x 7 needs 7 blocks; neither fits 4 blocks and a batch of 4
    err = one_line(parml("plan", "--profile", prof, "--ranks", "7", "-K", "4", "-L", "1", "--batch-size", "4"))
    assert "--ranks 7 do not fit" in err
    assert "--ranks-per-node" in one_line(parml("plan", "--profile", prof, "--ranks", "2", "--ranks-per-node", "0"))


@pytest.mark.timeout(240)
def test_train_layout_auto_applies_and_prints_the_best_layout(tmp_path, inproc):
    prof = profile(tmp_path / "p.json")
    r = parml("train", "--layout", "auto", "--profile", prof, "-K", "16", "-L", "2", "--max-cycles", "1",
              "--out", str(tmp_path), "--no-progress")
    assert r.returncode == 0, r.stderr
    line = [x for x in r.stdout.splitlines() if "--layout auto" in x][0]
    assert "D x P = 1 x 1" in line and "M = 1" in line
    saved = (tmp_path / "circles-L2-K16-s0" / "config.toml").read_text()
    assert 'layout = "auto"' in saved and "microbatches = 1" in saved
    missing = str(tmp_path / "none.json")
    assert "no such file" in one_line(inproc("train", "--layout", "auto", "--profile", missing, "-K", "16", "-L", "2",
                                             "--out", str(tmp_path)))
    gpu = profile(tmp_path / "gpu.json", device="cuda")
    err = one_line(inproc("train", "--layout", "auto", "--profile", gpu, "-K", "16", "-L", "2", "--device", "cpu",
                         "--out", str(tmp_path)))
    assert "calibrated on device type 'cuda'" in err


@pytest.mark.timeout(240)
def test_calibrate_quick_writes_a_profile_plan_reads(tmp_path, inproc):
    """Compute only (--backend none): the communication worker has its own test (test_plan.py)."""
    out = tmp_path / "prof.json"
    r = inproc("calibrate", "--quick", "--backend", "none", "--out", str(out))
    assert r.returncode == 0, r.stderr
    back = Profile.load(str(out), device="cpu")
    assert back.comm == {} and back.kernels["dense"].forward.points > 0
    r = inproc("plan", "--profile", str(out), "--ranks", "1", "-K", "64", "-L", "1", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)[0]["rank"] == 1
    assert "--backend" in one_line(inproc("calibrate", "--quick", "--backend", "tcp", "--out", str(out)))
    assert "--device" in one_line(inproc("calibrate", "--device", "tpu", "--out", str(out)))
