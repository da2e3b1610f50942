"""launch/gpu_check.sh, the one script a lent GPU machine runs: checked here without a GPU.

Static: its step timeouts add up to at most 6 minutes, every training run has --max-cycles,
nothing is installed. Dynamic, with a fake python and mpirun (PARML_PYTHON, PARML_MPIRUN): a
failing step makes the script exit non-zero while the later steps still run, every step prints a
summary line, and the NCCL P = 2 step runs only where there are two GPUs.
"""
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "launch" / "gpu_check.sh"
BUDGET_S = 360


def _logical_lines(text):
    """Lines with backslash continuations joined."""
    return text.replace("\\\n", " ").splitlines()


def _steps(text):
    """(name, timeout seconds, command) of every `step NAME SECONDS COMMAND...` call."""
    out = []
    for line in _logical_lines(text):
        m = re.match(r'\s*step\s+"([^"]*)"\s+(\d+)\s+(.*)', line)
        if m:
            out.append((m.group(1), int(m.group(2)), m.group(3)))
    return out


def test_gpu_check_fits_the_device_budget_and_installs_nothing():
    text = SCRIPT.read_text()
    steps = _steps(text)
    assert len(steps) >= 6
    assert sum(t for _, t, _ in steps) <= BUDGET_S, [(n, t) for n, t, _ in steps]
    # every command runs inside a step (so under its timeout), none outside
    calls = [line for line in _logical_lines(text) if '"$PY"' in line or '"$MPIRUN"' in line]
    assert len(calls) == len(steps) and all(re.match(r'\s*step\s', line) for line in calls), calls
    assert not re.search(r"^\s*(python3?|torchrun|mpirun|pytest)\s", text, re.M)
    assert "pip install" not in text and "pip3 install" not in text and "conda install" not in text
    trains = [cmd for _, _, cmd in steps if "parml.cli train" in cmd]
    assert len(trains) >= 3
    assert all(re.search(r"--max-cycles \d+", cmd) for cmd in trains), trains
    assert any("--backend mpi" in cmd for cmd in trains)
    assert any("--nproc_per_node 2" in cmd for cmd in trains)
    assert any("tests/test_gpu.py" in cmd for _, _, cmd in steps)
    assert any("pipeline_scaling.py" in cmd and "--quick" in cmd for _, _, cmd in steps)
    assert "set -e" not in text          # a failing step must not stop the later ones


FAKE = """#!/usr/bin/env bash
# fake python / mpirun for the gpu_check tests: logs its arguments, fails when told to
echo "$*" >> "$FAKE_LOG"
if [ "$1" = "-c" ] && [[ "$2" == *device_count* ]]; then
    last="${@: -1}"
    echo "${FAKE_GPUS:-1}" > "$last"
fi
if [ -n "${FAKE_FAIL:-}" ] && [[ "$*" == *"$FAKE_FAIL"* ]]; then
    exit 3
fi
exit 0
"""


def _run(tmp_path, fail="", gpus=1):
    fake = tmp_path / "fakepython"
    fake.write_text(FAKE)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "calls.log"
    env = dict(os.environ, PARML_PYTHON=str(fake), PARML_MPIRUN=str(fake), FAKE_LOG=str(log),
               FAKE_FAIL=fail, FAKE_GPUS=str(gpus))
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], cwd=str(ROOT), env=env,
                          capture_output=True, text=True, timeout=60)
    return proc, log.read_text().splitlines() if log.exists() else []


pytestmark_bash = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                     reason="needs bash and coreutils timeout")


@pytestmark_bash
def test_gpu_check_passes_when_every_step_passes(tmp_path):
    proc, calls = _run(tmp_path, gpus=1)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = [line for line in proc.stdout.splitlines() if line.startswith("gpu_check: ")]
    names = [name for name, _, _ in _steps(SCRIPT.read_text())]
    for name in names:
        if "NCCL P=2" in name:
            assert f"gpu_check: {name}: skipped (needs 2 GPUs, found 1)" in summary
        else:
            assert any(line.startswith(f"gpu_check: {name.split('$(')[0]}") and ": ok (" in line
                       for line in summary), (name, summary)
    assert summary[-1] == "gpu_check: all steps passed"
    assert not any("--nproc_per_node 2" in c for c in calls)


@pytestmark_bash
@pytest.mark.parametrize("fail", ["tests/test_gpu.py", "--run-name mpi2", "pipeline_scaling.py"])
def test_gpu_check_propagates_a_failing_step_and_runs_the_rest(tmp_path, fail):
    proc, calls = _run(tmp_path, fail=fail, gpus=2)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = [line for line in proc.stdout.splitlines() if line.startswith("gpu_check: ")]
    failed = [line for line in summary if "FAILED (exit 3)" in line]
    assert len(failed) == 1, summary
    assert summary[-1] == "gpu_check: some steps FAILED"
    # the later steps ran all the same, the NCCL P = 2 run among them (2 GPUs)
    assert any("pipeline_scaling.py" in c for c in calls)
    assert any("--nproc_per_node 2" in c and "--max-cycles" in c for c in calls)
    assert sum(": ok (" in line for line in summary) == len(_steps(SCRIPT.read_text())) - 1
