"""The benchmark harness: typed records through JSON, no machine paths, jobs launched and run
inside an allocation, and timing through the training loop's ``around_cycle`` hook."""
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import (CycleTimer, DataFolder, Job, Launcher, command_line, from_json,  # noqa: E402
                                read_json, timed_train, to_json, write_json)
from benchmarks.harness.launch import Probe, ProbeJob  # noqa: E402
from multiproc import run_ranks  # noqa: E402


@dataclass
class Inner:
    x: float
    tags: list[str] = field(default_factory=list)


@dataclass
class Outer:
    name: str
    by_m: dict[int, Inner] = field(default_factory=dict)
    pairs: list[tuple[int, float]] = field(default_factory=list)
    maybe: Inner | None = None
    extra: int = 7


def test_records_round_trip_through_json(tmp_path):
    rec = Outer("a", {1: Inner(1.5, ["p"]), 8: Inner(2)}, [(4, 0.5)], Inner(3.0))
    write_json(tmp_path / "r.json", rec)
    raw = json.loads((tmp_path / "r.json").read_text())
    assert raw["by_m"]["8"] == {"x": 2, "tags": []} and raw["maybe"]["x"] == 3.0
    back = read_json(tmp_path / "r.json", Outer)
    assert back == Outer("a", {1: Inner(1.5, ["p"]), 8: Inner(2.0)}, [(4, 0.5)], Inner(3.0))
    assert isinstance(back.by_m[8].x, float) and list(back.by_m) == [1, 8]
    # an older record: unknown keys are ignored, missing ones take their defaults
    old = from_json(Outer, {"name": "b", "gone": 1, "maybe": None})
    assert old == Outer("b") and to_json(old)["extra"] == 7


def test_no_machine_paths_in_records(tmp_path):
    data = tmp_path / "mnist"
    data.mkdir()
    (data / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x01")
    ref = DataFolder.of(str(data))
    assert ref.name == "mnist" and ref.files == {"t10k-labels-idx1-ubyte": hashlib.sha256(b"\x00\x01").hexdigest()}
    assert DataFolder.of(str(tmp_path / "missing")) is None
    line = command_line("x.py", ["--out", str(tmp_path / "o"), "--data-dir", str(ROOT / "data"), "--quick"])
    assert str(tmp_path) not in line and str(ROOT) not in line
    assert line == "python benchmarks/x.py --out .../o --data-dir data --quick"


@pytest.mark.timeout(120)
def test_launched_job_returns_typed_records(tmp_path):
    launcher = Launcher(tmp_path)
    assert not launcher.inside and launcher.rank == 0
    got = launcher.run(Job("probe2", "benchmarks.harness.launch:probe", ProbeJob("two"), 2, "torch", timeout=90))
    assert got.error is None and got.of(Probe) == [Probe(2, "gloo", 1.0, "two")]
    bad = launcher.run(Job("bad", "benchmarks.harness.launch:no_such_entry", ProbeJob(), 1, "self", timeout=60))
    assert bad.error and "exit codes" in bad.error and not bad.records


def _inside(comm, tmp):
    launcher = Launcher(Path(tmp), comm=comm)
    out = []
    for ranks, backend in ((2, "torch"), (1, "self"), (3, "torch"), (2, "mpi"), (1, "torch"), (1, "torch")):
        got = launcher.run(Job(f"p{ranks}", "benchmarks.harness.launch:probe", ProbeJob(), ranks, backend))
        out.append((got.of(Probe), got.skipped))
    launcher.close()
    return out


@pytest.mark.timeout(120)
def test_jobs_run_inside_an_allocation(tmp_path):
    """Started by a launcher (torchrun's variables), the harness runs jobs of the allocation's size on
    its ranks, smaller jobs of its backend on a sub-communicator of ranks 0..P-1 (made once), one-rank
    "self" jobs on rank 0, and skips the others."""
    r0, r1 = run_ranks("tests.bench.test_harness:_inside", 2, "gloo", args={"tmp": str(tmp_path)}, timeout=90)
    assert r0[0] == ([Probe(2, "gloo", 1.0)], None) and r1[0] == ([], None)
    assert r0[1] == ([Probe(1, "self", 0.0)], None) and r1[1] == ([], None)
    assert r0[2][0] == [] and "needs 3 ranks (torch), the allocation has 2 (torch)" in r0[2][1]
    assert r0[3][0] == [] and "needs 2 ranks (mpi)" in r0[3][1]
    assert r0[4] == r0[5] == ([Probe(1, "gloo", 0.0)], None) and r1[4] == r1[5] == ([], None)


@pytest.mark.timeout(120)
def test_cycle_timer_sees_every_step_of_a_cascade(tmp_path):
    """``train(..., around_cycle=...)`` wraps every GD step, the cascade's stages included, once."""
    import torch
    from parml.comm import SelfComm
    from parml.config import TrainConfig
    torch.set_num_threads(1)
    cfg = TrainConfig(dataset="circles", blocks=8, width=3, levels=1, lr=0.1, cascade=1, cascade_cycles=4,
                      max_cycles=6, eval_every=2, target_accuracy=None, out=str(tmp_path), run_name="t",
                      progress=False)
    run, levels, timer = timed_train(cfg, SelfComm(), None)
    assert isinstance(timer, CycleTimer) and len(timer.cycles) == run.steps == 4 + 6
    assert [round(c.cost * 8) for c in timer.cycles] == [4] * 4 + [8] * 6
    assert list(timer.by_depth(8)) == [4, 8] and all(c.seconds > 0 for c in timer.cycles)
    assert 0 < run.train_s == pytest.approx(timer.seconds) and run.train_s < run.seconds
    assert run.cycles == 6 and [(s.blocks, s.cycles) for s in run.stages] == [(4, 4)]
    assert run.work_units == pytest.approx(4 * 0.5 + 6) and run.plan == [1]
    assert run.curve.phase[0].startswith("cascade") and run.curve.cycle[-1] == 6
    # the executor's own times: sends and the loss broadcast are parts of wait (no sends on one rank)
    t = levels[-1].executor.total
    assert t.compute > 0 and t.sends == 0.0 and 0 <= t.loss_broadcast <= t.wait


def _step_times(comm):
    import torch
    from parml.model import ModelSpec, StageSpec, build_model
    from parml.parallel.executor import LayerParallel
    torch.set_num_threads(1)
    model = build_model(ModelSpec(4, 3, (StageSpec(6, 8),)), seed=0)
    lp = LayerParallel(model, comm, schedule="1f1b", microbatches=4)
    x, y = torch.randn(16, 4, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 3
    steps = []
    for _ in range(3):
        lp.forward_backward(x, y)
        steps.append(lp.times)
    return steps, lp.total


@pytest.mark.timeout(120)
def test_step_times_split_wait_into_sends_and_loss_broadcast():
    for steps, total in run_ranks("tests.bench.test_harness:_step_times", 2, "gloo", timeout=90):
        for t in steps:
            assert t.step > 0 and t.compute > 0 and t.sends > 0 and t.loss_broadcast > 0
            assert t.sends + t.loss_broadcast <= t.wait + 1e-12 and t.compute + t.wait <= t.step + 1e-9
        for key in ("step", "compute", "wait", "sends", "loss_broadcast"):
            assert getattr(total, key) == pytest.approx(sum(getattr(t, key) for t in steps))


def test_no_absolute_paths_in_committed_results():
    """Issue 15 item 8: committed results name no machine path."""
    for path in (ROOT / "benchmarks" / "results").rglob("*"):
        if path.suffix in (".json", ".md"):
            text = path.read_text()
            for marker in ('"/work', '"/home', '"/tmp', '"/root', "`/tmp", " /tmp/", " /work/"):
                assert marker not in text, (path, marker)
    assert os.sep == "/"
