"""Checkpoints: a killed run resumes bit-identically, a run resumes on another rank count (the
optimizer state re-cut for the new ranks), a truncated shard falls back to the previous checkpoint.
Failures, NaN guard and determinism across rank counts: tests/distributed/test_trainer.py."""
import os

import pytest
import torch

from cases import close
from multiproc import launch
from parml.training.report import read_metrics

ARGS = ["train", "-K", "32", "-L", "3", "--dtype", "float64", "--optimizer", "momentum", "--lr", "0.05",
        "--max-cycles", "12", "--target-accuracy", "1.0", "--no-progress", "--min-blocks-per-rank", "4"]


def rows(folder):
    return read_metrics(str(folder))


def final(folder):
    return torch.load(folder / "final.pt", weights_only=False)


def run(kind, nprocs, args, tmp, env=None, timeout=150):
    return launch(kind, nprocs, args, tmp, timeout=timeout, env=env)


def assert_same_run(a, b, exact=True):
    ra, rb = rows(a), rows(b)
    assert len(ra) == len(rb)
    for x, y in zip(ra[-5:], rb[-5:]):
        for key in ("cycle", "epoch", "work_units", "val_acc"):
            assert x[key] == y[key], (key, x, y)
        assert x["loss"] == y["loss"] if exact else abs(x["loss"] - y["loss"]) <= 1e-9 * abs(x["loss"])
    fa, fb = final(a), final(b)
    for name in fa:
        if exact:
            assert torch.equal(fa[name], fb[name]), name
        else:
            close(fb[name], fa[name], 1e-9, name)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_run_resumes_bit_identically(tmp_path):
    whole = run("serial", 1, ARGS + ["--out", str(tmp_path), "--run-name", "whole"], tmp_path)
    assert whole.returncode == 0, whole.stderr
    crashed = run("serial", 1, ARGS + ["--out", str(tmp_path), "--run-name", "cut", "--checkpoint-every", "4"],
                  tmp_path, env={"PARML_TEST_FAULT": "kill:10:0"})
    assert crashed.returncode != 0
    assert sorted(os.listdir(tmp_path / "cut" / "checkpoints")) == ["cycle-000004", "cycle-000008"]
    resumed = run("serial", 1, ["train", "--resume", str(tmp_path / "cut"), "--no-progress"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "cycle-000008" in resumed.stdout
    assert_same_run(tmp_path / "whole", tmp_path / "cut", exact=True)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("saved_on,resumed_on", [(1, 2), (2, 1)])
def test_resume_on_another_rank_count(saved_on, resumed_on, tmp_path):
    args = ARGS + ["--out", str(tmp_path)]     # momentum: its buffers are re-cut for the new ranks
    whole = run("serial", 1, args + ["--run-name", "whole"], tmp_path)
    assert whole.returncode == 0, whole.stderr
    def kind(n):
        return "ranks" if n > 1 else "serial"
    first = run(kind(saved_on), saved_on, args + ["--run-name", "cut", "--checkpoint-every", "5",
                                                  "--max-cycles", "5"], tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    second = run(kind(resumed_on), resumed_on, ["train", "--resume", str(tmp_path / "cut"), "--max-cycles", "12",
                                                "--no-progress"], tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    assert_same_run(tmp_path / "whole", tmp_path / "cut", exact=False)


def test_truncated_shard_falls_back_to_the_previous_checkpoint(tmp_path):
    r = run("serial", 1, ARGS + ["--out", str(tmp_path), "--run-name", "ck", "--checkpoint-every", "3",
                                 "--max-cycles", "6"], tmp_path)
    assert r.returncode == 0, r.stderr
    shard = tmp_path / "ck" / "checkpoints" / "cycle-000006" / "rank0.pt"
    shard.write_bytes(shard.read_bytes()[:100])
    from parml.training.checkpoint import load_latest
    with pytest.warns(UserWarning, match="cycle-000006.*unusable"):
        manifest, state, _ = load_latest(str(tmp_path / "ck"))
    assert manifest["cycle"] == 3 and "chunks.0.weight" in state
