"""Run folders through the real command line and launchers: a rerun refuses and changes nothing,
--overwrite removes the old run, --resume checks options, click-level mistakes under torchrun are
one line, ``--resume auto`` continues a job that torchrun restarts after a rank was killed, and a
failed write (full disk, file-size limit) ends every rank with exit code 1 and one line."""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from multiproc import REPO_ROOT, base_env
from parml.comm import SelfComm
from parml.config import TrainConfig
from parml.launch import kill_group, run_local
from parml.training.report import read_metrics
from parml.training.trainer import train
from smallfs import LIMITED, small_tmpfs, temporaries

pytestmark = pytest.mark.usefixtures("one_thread")
PARML = [sys.executable, "-m", "parml"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2"]
OPTIONS = {"blocks": 32, "levels": 3, "dtype": "float64", "optimizer": "momentum", "lr": 0.05, "max_cycles": 6,
           "target_accuracy": "none", "min_blocks_per_rank": 4}
FLAGS = [x for k, v in OPTIONS.items() for x in (f"--{k.replace('_', '-')}", str(v))] + ["--no-progress"]


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str

    def ours(self) -> list[str]:
        return [line for line in (self.stdout + self.stderr).splitlines() if line.startswith("parml: error:")]


def run_together(cmds: list[list[str]], cwd, timeout: float, env: dict | None = None) -> list[Done]:
    """Start every command at once (each in its own session), wait for all; on the deadline end
    them (torchrun: SIGTERM first, so that it stops its workers) and fail."""
    procs = [subprocess.Popen(c, cwd=cwd, env=base_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, text=True, start_new_session=True) for c in cmds]
    try:
        done = []
        for p in procs:
            try:
                out, err = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGTERM)
                out, err = p.communicate(timeout=30)
                raise AssertionError(f"{' '.join(p.args)} timed out after {timeout} s\n{err[-3000:]}")
            done.append(Done(p.returncode, out, err))
        return done
    finally:
        for p in procs:
            kill_group(p)


def hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(done: Done, code: int, *needles: str) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == code and len(lines) == 1, (done.returncode, done.stderr[-3000:])
    assert lines[0].startswith("parml: error:") and all(n in lines[0] for n in needles), lines[0]
    return lines[0]


@pytest.mark.timeout(240)
def test_rerun_refuses_overwrite_replaces_and_resume_checks_options(tmp_path):
    train(TrainConfig.from_options({**OPTIONS, "progress": False, "checkpoint_every": 3, "out": str(tmp_path),
                                    "run_name": "a"}), SelfComm())
    a = tmp_path / "a"
    shutil.copytree(a, tmp_path / "b")
    shutil.copytree(a, tmp_path / "c")
    (tmp_path / "b" / "notes.txt").write_text("the old run's")
    (tmp_path / "bad.toml").write_text("blocks = [1, 2]\n")
    before = hashes(a)
    out = ["--out", str(tmp_path)]
    rerun, changed, bad, over, resumed = run_together([
        PARML + ["train", *FLAGS, *out, "--run-name", "a"],
        PARML + ["train", "--resume", str(a), "--lr", "0.5", "--blocks", "64", "--max-cycles", "9"],
        PARML + ["train", "--config", str(tmp_path / "bad.toml"), *out],
        PARML + ["train", *FLAGS, *out, "--run-name", "b", "--overwrite"],
        PARML + ["train", "--resume", str(tmp_path / "c"), "--max-cycles", "9", "--eval-every", "2",
                 "--checkpoint-every", "4", "--keep-checkpoints", "1", "--threads", "1", "--comm-timeout", "60"],
    ], tmp_path, timeout=180)
    one_line(rerun, 2, f"run folder {a} exists", f"--resume {a}", "--run-name NAME", "--overwrite")
    line = one_line(changed, 2, f"--resume {str(a)!r}", "--blocks 32 -> 64", "--lr 0.05 -> 0.5")
    assert "--max-cycles" not in line
    one_line(bad, 2, "bad.toml", "--blocks [1, 2] is not an integer")
    assert hashes(a) == before                          # the refused runs changed nothing
    assert over.returncode == 0, over.stderr[-3000:]
    b = tmp_path / "b"
    assert sorted(os.listdir(b)) == ["config.json", "config.toml", "final.pt", "metrics.jsonl", "plot.png",
                                     "summary.json"]     # old checkpoints and files gone
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {tmp_path / 'c'}/checkpoints/cycle-000006 at cycle 6" in resumed.stdout
    rows = read_metrics(str(tmp_path / "c"))
    assert [r["cycle"] for r in rows] == list(range(1, 10))
    assert [r["cycle"] for r in rows if "val_acc" in r] == [1, 2, 3, 4, 5, 6, 8, 9]
    assert sorted(os.listdir(tmp_path / "c" / "checkpoints")) == ["cycle-000008"]      # kept: 1


CLICK_ERRORS = [(["--arch", "foo"], "--arch 'foo' is not one of: dense, conv"),
                (["--blocks", "abc"], "--blocks 'abc' is not an integer"),
                (["--no-such-option", "1"], "No such option '--no-such-option'")]


@pytest.mark.timeout(240)
def test_click_level_errors_under_torchrun_are_one_line(tmp_path):
    results = run_together([TORCHRUN + ["-m", "parml", "train", *args, "--out", str(tmp_path)]
                            for args, _ in CLICK_ERRORS], tmp_path, timeout=180)
    for (args, needle), r in zip(CLICK_ERRORS, results):
        both = r.stdout + r.stderr
        assert r.returncode != 0 and len(r.ours()) == 1 and needle in r.ours()[0], (args, both[-3000:])
        # torchrun exits 1 and prints its own ChildFailedError report; the worker's own code is 2
        assert re.search(r"exitcode\s*:\s*2 ", both), both[-3000:]
        assert not re.search(r'File ".*[/\\]parml[/\\]', both), both[-3000:]       # no traceback from parml
        assert both.count("Traceback (most recent call last)") <= both.count("ChildFailedError")


@pytest.mark.timeout(300)
def test_resume_auto_continues_a_job_torchrun_restarts_after_a_kill(tmp_path):
    opts = {**OPTIONS, "max_cycles": 12}
    whole = train(TrainConfig.from_options({**opts, "progress": False, "out": str(tmp_path), "run_name": "whole"}),
                  SelfComm())
    marker = tmp_path / "fault-fired"
    flags = [x for k, v in opts.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    [r] = run_together([TORCHRUN + ["--max-restarts", "1", "-m", "parml", "train", *flags, "--no-progress",
                                    "--out", str(tmp_path), "--run-name", "cut", "--resume", "auto",
                                    "--checkpoint-every", "2"]],
                       tmp_path, timeout=240,
                       env={"PARML_TEST_FAULT": "kill:5:1", "PARML_TEST_FAULT_ONCE": str(marker)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert marker.exists() and r.stdout.count("parml: circles") == 2      # killed once, restarted once
    assert f"resumed from {tmp_path / 'cut'}/checkpoints/cycle-000004 at cycle 4" in r.stdout
    cut, ref = read_metrics(str(tmp_path / "cut")), read_metrics(str(tmp_path / "whole"))
    assert [x["cycle"] for x in cut] == list(range(1, 13))
    for x, y in zip(cut, ref):          # 2 ranks against 1: the same sums in another order
        assert abs(x["loss"] - y["loss"]) <= 1e-9 * abs(y["loss"]) and x["val_acc"] == y["val_acc"], (x, y)
    final = json.loads((tmp_path / "cut" / "summary.json").read_text())["final_loss"]
    assert abs(final - whole["final_loss"]) <= 1e-9 * abs(whole["final_loss"])


def two_ranks(cmd: list[str], log: Path) -> tuple[list, str]:
    """`cmd` as two gloo ranks (torchrun's variables, no agent that would kill the survivor), so
    that each rank's own exit code shows; returns the codes and every line they printed."""
    log.mkdir(parents=True, exist_ok=True)
    run = run_local(cmd, 2, "gloo", 150, log, "rank", base_env(), cwd=REPO_ROOT, capture_stdout=True, grace=40)
    assert not run.timed_out, run.tails()
    text = "".join(Path(p).read_text(errors="replace") for _, out, err in run.logs for p in (out, err) if p)
    return run.returncodes, text


def assert_one_line_on_every_rank(codes, text, *needles):
    ours = [line for line in text.splitlines() if line.startswith(("parml: error:", "parml: abort"))]
    assert codes == [1, 1], (codes, text[-3000:])
    assert len(ours) == 1 and ours[0].startswith("parml: error: cannot write "), text[-3000:]
    assert all(n in ours[0] for n in needles), (needles, ours[0])
    assert "Traceback" not in text, text[-3000:]


@pytest.mark.timeout(240)
def test_full_disk_in_a_checkpoint_ends_both_ranks_with_one_line(tmp_path):
    with small_tmpfs(tmp_path / "small", 300 * 1024) as small:
        codes, text = two_ranks(PARML + ["train", "-K", "64", "-L", "3", "--width", "24", "--max-cycles", "10",
                                         "--checkpoint-every", "1", "--no-progress", "--out", small, "--run-name", "r"],
                                tmp_path / "log")
        folder = f"{small}/r/checkpoints"
        assert_one_line_on_every_rank(codes, text, f"{folder}/cycle-000002/rank", "No space left on device (ENOSPC)",
                                      f"last complete checkpoint: {folder}/cycle-000001")
        assert not temporaries(small) and os.listdir(folder) == ["cycle-000001"]


@pytest.mark.timeout(240)
def test_rank_0_write_failures_end_every_rank_with_one_line(tmp_path):
    """metrics.jsonl fails mid-run (the other rank is computing: it is aborted); final.pt fails at
    the end (the other rank has finished: the ranks agree). A file-size limit makes the writes fail."""
    cases = {"metrics.jsonl": ("4000", "40"), "final.pt": ("8000", "4")}
    cmds = {name: [sys.executable, "-c", LIMITED, limit, "train", "-K", "64", "-L", "3", "--width", "8",
                   "--max-cycles", cycles, "--no-progress", "--out", str(tmp_path), "--run-name", name]
            for name, (limit, cycles) in cases.items()}
    with ThreadPoolExecutor(len(cmds)) as pool:
        results = dict(zip(cmds, pool.map(lambda n: two_ranks(cmds[n], tmp_path / f"log-{n}"), cmds)))
    for name, (codes, text) in results.items():
        assert_one_line_on_every_rank(codes, text, f"{tmp_path / name / name}: File too large (EFBIG)",
                                      "last complete checkpoint: none")
        rows = read_metrics(str(tmp_path / name))                 # whole rows only
        assert [r["cycle"] for r in rows] == list(range(1, len(rows) + 1)) and rows
    assert not temporaries(tmp_path)
