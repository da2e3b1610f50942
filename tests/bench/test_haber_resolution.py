"""Haber et al.'s resolution benchmark: its penalty, blur and summary are right, and it runs end to end.

The quick run trains on the MNIST fixture (tests/fixtures/mnist: 400 training / 200 held-out
images instead of --quick's 1000 / 500), so it runs in a fresh clone; so do the bad-input cases,
which name the fixture as --data-dir so that the argument under test is the one rejected.
"""
import importlib.util
import json
import statistics

import pytest
import torch

from multiproc import REPO_ROOT, run_benchmark
from parml.model import build_model
from parml.multilevel.multiscale import gaussian_blur, prolongate_model, prolongation_matrix

SCRIPT = REPO_ROOT / "benchmarks" / "haber_resolution.py"
FIXTURE_SIZES = {"n_train": 400, "n_val": 200}

torch.set_num_threads(1)


def _module():
    spec = importlib.util.spec_from_file_location("haber_resolution", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(*args, timeout=120, quick=None):
    return run_benchmark(SCRIPT, list(args), timeout, quick=quick)


def test_coarse_penalty_is_the_roughness_of_the_prolongated_kernels():
    """The 14x14 network's penalty equals the plain roughness of the network prolongate_model builds."""
    hr = _module()
    net = build_model(hr.spec_for(14), seed=3, dtype=torch.float64)
    with torch.no_grad():
        for k in hr.stencils(net):
            k.normal_()
    want = hr.fine_scale_roughness(prolongate_model(net))
    got = hr.fine_scale_roughness(net, prolongation_matrix())
    torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-10, atol=0)
    # by hand for one stencil: squared differences of neighbours along both axes
    s = torch.tensor([[0.0, 1, 0], [2, 0, 0], [0, 0, 3]])
    by_hand = (2 ** 2 + 1 + 0) + (2 ** 2 + 0 + 3 ** 2) + (1 + 1) + (2 ** 2 + 0) + (0 + 3 ** 2)   # rows, then columns
    net1 = build_model(hr.spec_for(14), seed=0)
    with torch.no_grad():
        for k in hr.stencils(net1):
            k.zero_()
        net1.opening.weight[0, 0] = s
    assert float(hr.fine_scale_roughness(net1).detach()) == pytest.approx(by_hand)
    # and it is differentiable: the penalty's gradient reaches the stencils
    hr.fine_scale_roughness(net, prolongation_matrix()).backward()
    assert net.opening.weight.grad is not None and net.opening.weight.grad.abs().sum() > 0


def test_gaussian_blur_keeps_mass_and_smooths():
    hr = _module()
    x = torch.zeros(1, 1, 28, 28, dtype=torch.float64)
    x[0, 0, 14, 14] = 1
    b = gaussian_blur(x, 1.5)
    assert float(b.sum()) == pytest.approx(1.0, abs=1e-12) and float(b.max()) < 0.1
    assert torch.equal(gaussian_blur(x, 0), x)
    assert hr.non_smooth_fraction(b) < hr.non_smooth_fraction(x)


def test_summary_counts_wins_and_means():
    hr = _module()
    keys = [k for _, k in hr.ROWS]
    runs = [hr.SeedRun(i, {k: 50.0 + i for k in keys}, {}, 1.0, "", {}) for i in range(3)]
    runs[0].accuracy_percent["prolongated"] = 90.0          # adapted wins only for seed 0
    s = hr.summarize(runs)
    assert s.accuracy["prolongated"].mean == pytest.approx(statistics.fmean([90.0, 51.0, 52.0]))
    assert (s.accuracy["restricted"].min, s.accuracy["restricted"].max) == (50.0, 52.0)
    assert s.prolongated_wins == 1 and s.restricted_wins == 0


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_quick_run_writes_consistent_files(tmp_path, mnist_fixture):
    proc = _run("--quick", "--out", tmp_path, "--data-dir", mnist_fixture, quick=FIXTURE_SIZES)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert len(res["runs"]) == 1 and res["config"]["quick"] and res["config"]["blur"] == 1.5
    acc = res["runs"][0]["accuracy_percent"]
    assert all(0 <= v <= 100 for v in acc.values()) and acc["fine_native"] > 30   # 10 classes: chance is 10 %
    assert res["summary"]["accuracy"]["restricted"]["mean"] == acc["restricted"]
    f = res["runs"][0]["non_smooth_fraction"]
    assert 0 < f["val_28"] < f["val_28_unblurred"] < 1
    md = (tmp_path / "haber_resolution.md").read_text()
    assert "Quick run" in md and "| 14x14 net on 28x28, prolongated kernels |" in md and "| 0 |" in md
    assert (tmp_path / "haber_resolution.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "[1/1] seed 0" in proc.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args, message", [
    (["--blur", "9"], "--blur 9 must be in [0, 4]"),
    (["--seeds", "1", "1"], "--seeds [1, 1]: seeds must be distinct"),
    (["--epochs", "0"], "--epochs 0 must be at least 1"),
    (["--data-dir", "/nonexistent/mnist"], "--data-dir '/nonexistent/mnist' is not a directory"),
])
def test_bad_input_is_one_line(args, message, tmp_path, mnist_fixture):
    data = [] if "--data-dir" in args else ["--data-dir", mnist_fixture]
    proc = _run(*data, *args, "--out", tmp_path, timeout=50)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
