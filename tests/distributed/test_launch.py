"""`parml train` under the real launchers (torchrun, mpirun) equals the single-process run; one-line
errors from rank 0; a deadline kills every process a launcher started."""
import json
import sys
import time

import pytest

from multiproc import base_env, launch, run_cmd

ARGS = ["train", "-K", "64", "-L", "4", "--dtype", "float64", "--min-blocks-per-rank", "16", "-M", "2",
        "--no-progress", "--max-cycles", "12"]


def summary(tmp, name):
    return json.loads((tmp / name / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(200)
@pytest.mark.parametrize("kind", ["torchrun", "mpirun"])
def test_two_rank_training_equals_serial(kind, tmp_path):
    serial = launch("serial", 1, ARGS + ["--out", str(tmp_path), "--run-name", "serial"], tmp_path)
    assert serial.returncode == 0, serial.stderr
    par = launch(kind, 2, ARGS + ["--out", str(tmp_path), "--run-name", "par", "--ranks", "2"], tmp_path)
    assert par.returncode == 0, par.stderr[-3000:]
    a, b = summary(tmp_path, "serial"), summary(tmp_path, "par")
    assert a["cycles"] == b["cycles"] and a["work_units"] == b["work_units"]
    assert abs(a["final_loss"] - b["final_loss"]) <= 1e-9 * abs(a["final_loss"])
    assert a["val_acc"] == b["val_acc"]
    config = json.loads((tmp_path / "par" / "config.json").read_text())
    assert config["world_size"] == 2 and [p["ranks"] for p in config["plan"]] == [1, 1, 2, 2]
    assert par.stdout.count("parml:") == 1        # rank 0 alone prints
    assert "level 4: 64 blocks on 2 layer rank(s) x 1 replica(s)" in par.stdout


@pytest.mark.timeout(200)
@pytest.mark.parametrize("kind", ["torchrun", "mpirun"])
@pytest.mark.parametrize("args,needle", [
    (["--ranks", "3"], "--ranks 3 does not match the launcher's world size 2"),
    (["-K", "1", "-L", "1"], "more layer ranks (2 = 2 ranks / --data-parallel 1) than"),
    (["-K", "64", "-L", "8"], "--levels 8 is too deep"),
])
def test_bad_input_under_launchers_is_one_line_from_rank_0(kind, args, needle, tmp_path):
    r = launch(kind, 2, ["train", *args, "--out", str(tmp_path), "--no-progress"], tmp_path, timeout=90)
    assert r.returncode != 0
    ours = [line for line in r.stderr.splitlines() if line.startswith("parml: error:")]
    assert len(ours) == 1 and needle in ours[0], r.stderr[-2000:]
    assert 'parml/' not in r.stderr.split("parml: error:")[0]   # no traceback from parml's own code


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its reaper counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(60)
def test_a_deadline_kills_processes_in_sessions_of_their_own(tmp_path):
    """What torchrun does with its workers (start_new_session=True), a launcher killed at the
    deadline would leave behind: run_cmd kills them too."""
    pidfile = tmp_path / "pid"
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n"
            "open(sys.argv[1], 'w').write(str(p.pid))\n"
            "time.sleep(600)\n")
    with pytest.raises(AssertionError, match="timed out after 8 s; every process killed"):
        run_cmd([sys.executable, "-c", code, str(pidfile)], 8, env=base_env())
    pid = int(pidfile.read_text())
    for _ in range(100):
        if not _alive(pid):
            break
        time.sleep(0.05)
    assert not _alive(pid), f"process {pid} outlived the deadline"
