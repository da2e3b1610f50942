"""Training under failures: an injected NaN stops the run with its location and keeps a checkpoint;
a failing or killed rank ends the whole job; the loss curve is the same on 1, 2 and 4 ranks.
Each case runs `parml train` under the real launchers (process groups killed at the deadline)."""
import os
import re
import signal
import subprocess
import time

import pytest

from multiproc import base_env, launch, parml_cmd
from parml.training.report import read_metrics

ARGS = ["train", "-K", "32", "-L", "3", "--dtype", "float64", "--lr", "0.05",
        "--max-cycles", "12", "--target-accuracy", "1.0", "--no-progress", "--min-blocks-per-rank", "4"]


def rows(folder):
    return read_metrics(str(folder))


def run(kind, nprocs, args, tmp, env=None, timeout=150):
    return launch(kind, nprocs, args, tmp, timeout=timeout, env=env)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("kind,nprocs", [("serial", 1), ("torchrun", 2), ("mpirun", 2)])
def test_injected_nan_stops_with_location_and_keeps_a_checkpoint(kind, nprocs, tmp_path):
    rank = nprocs - 1
    r = run(kind, nprocs, ARGS + ["--out", str(tmp_path), "--run-name", "nan", "--checkpoint-every", "2"],
            tmp_path, env={"PARML_TEST_FAULT": f"nan:5:{rank}"})
    assert r.returncode != 0
    line = [x for x in r.stderr.splitlines() if x.startswith("parml: error:")]
    assert len(line) == 1, r.stderr[-2000:]
    blocks = "[0, 32)" if nprocs == 1 else "[16, 32)"
    assert f"non-finite parameters at rank {rank}, level 3, blocks {blocks} in cycle 5" in line[0]
    assert "last good checkpoint:" in line[0] and "cycle-000004" in line[0]
    assert (tmp_path / "nan" / "checkpoints" / "cycle-000004" / "manifest.json").exists()


@pytest.mark.timeout(200)
@pytest.mark.parametrize("kind", ["torchrun", "mpirun"])
@pytest.mark.parametrize("fault", ["kill", "raise"])
def test_failing_or_killed_rank_ends_the_job(kind, fault, tmp_path):
    """Rank 1 dies (SIGKILL) or raises before cycle 3 of a run that would go on for 400 cycles: the
    job ends (a rank left hanging would be killed at the 90 s deadline, far past --comm-timeout 8,
    and fail the test), after two complete cycles were logged, and the output names the dead rank
    (or the timeout). No wall-clock bound: on a loaded machine starting two ranks alone takes 30 s."""
    r = run(kind, 2, ARGS + ["--out", str(tmp_path), "--comm-timeout", "8", "--max-cycles", "400",
                             "--target-accuracy", "1.0"],
            tmp_path, env={"PARML_TEST_FAULT": f"{fault}:3:1"}, timeout=90)
    assert r.returncode != 0
    # the fault came after two complete cycles, and no cycle was logged after it
    assert [row["cycle"] for row in rows(tmp_path / "circles-L3-K32-s0")] == [1, 2], r.stderr[-2000:]
    if fault == "raise":
        assert "injected failure at cycle 3" in r.stderr
    text = " ".join(r.stderr.split())
    if kind == "torchrun":
        # rank 0 reports, once, which peer it lost (or that it timed out waiting for it); or, where
        # torchrun's SIGTERM reaches it first, that the launcher stopped it, and torchrun's report
        # names rank 1 as the root cause
        ours = [line for line in r.stderr.splitlines() if line.startswith("parml: error:")]
        assert len(ours) == 1 and ours[0].startswith("parml: error: rank 0:"), r.stderr[-3000:]
        if "stopped by the launcher (SIGTERM)" in ours[0]:
            assert re.search(r"Root Cause \(first observed failure\): \[0\]: .*? rank : 1 \(local_rank: 1\)",
                             text), r.stderr[-3000:]
        else:
            assert re.search(r"\bfrom rank 1\b|\brank 1\b.*(died|failed|lost)|timed out|timeout", ours[0]), ours[0]
    elif fault == "kill":
        # Open MPI ends the surviving ranks at once (SIGTERM: rank 0 may say it was stopped); its
        # launcher names the dead rank
        assert len([line for line in r.stderr.splitlines() if line.startswith("parml: error:")]) <= 1
        assert re.search(r"process rank 1 .*exited on signal 9", text), r.stderr[-3000:]
    else:
        assert re.search(r"MPI_ABORT was invoked on rank 1\b", text), r.stderr[-3000:]


@pytest.mark.timeout(150)
def test_a_cancelled_torchrun_job_ends_with_one_line_from_rank_0(tmp_path):
    """A cancel (Slurm's scancel signals the launcher): torchrun passes SIGTERM on to its workers,
    rank 0 says in one line that the launcher stopped it, and the job ends (torchrun returns once
    its workers are gone)."""
    cmd = parml_cmd("torchrun", 2, ARGS + ["--max-cycles", "100000", "--out", str(tmp_path)])   # the last value wins
    p = subprocess.Popen(cmd, cwd=tmp_path, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        folder, deadline = tmp_path / "circles-L3-K32-s0", time.monotonic() + 90
        while time.monotonic() < deadline and p.poll() is None:
            if (folder / "metrics.jsonl").is_file() and len(rows(folder)) >= 2:
                break
            time.sleep(0.2)
        assert p.poll() is None and len(rows(folder)) >= 2, "the job did not start training"
        os.kill(p.pid, signal.SIGTERM)                     # the launcher only, as scancel does
        _, err = p.communicate(timeout=45)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert p.returncode != 0
    ours = [line for line in err.splitlines() if line.startswith("parml: error:")]
    assert len(ours) == 1 and ours[0].startswith("parml: error: rank 0: stopped by the launcher (SIGTERM)"), err[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_loss_curve_is_the_same_on_1_2_4_ranks(tmp_path):
    # momentum: its buffers live with each rank's blocks, so they too must follow the serial run
    args = ARGS + ["--out", str(tmp_path), "--max-cycles", "6", "-M", "3", "--optimizer", "momentum"]
    curves = {}
    for n in (1, 2, 4):
        r = run("serial" if n == 1 else "ranks", n, args + ["--run-name", f"p{n}"], tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        curves[n] = [x["loss"] for x in rows(tmp_path / f"p{n}")]
    for n in (2, 4):
        assert len(curves[n]) == len(curves[1])
        for a, b in zip(curves[n], curves[1]):
            assert abs(a - b) <= 1e-9 * abs(b)
