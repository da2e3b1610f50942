"""Chang et al.'s multilevel training benchmark runs end to end (``--quick``) and reports real numbers.

The quick run trains on the MNIST fixture (tests/fixtures/mnist: 400 training / 200 held-out
images instead of --quick's 2000 / 1000), so it runs in a fresh clone.
"""
import json
import math
import struct

import pytest

from multiproc import REPO_ROOT, assert_written, benchmark_results, run_benchmark
from parml.multilevel.cascade import theoretical_saving

SCRIPT = REPO_ROOT / "benchmarks" / "chang_multilevel.py"
FIXTURE_SIZES = {"n_train": 400, "n_val": 200}


def _run(*args, timeout=150, quick=None):
    return run_benchmark(SCRIPT, list(args), timeout, quick=quick)


@pytest.fixture(scope="module")
def quick(tmp_path_factory, mnist_fixture):
    out = tmp_path_factory.mktemp("chang")
    stdout, res = benchmark_results(SCRIPT, out, ["--quick", "--mnist-dir", mnist_fixture], 150, quick=FIXTURE_SIZES)
    return out, res, stdout


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_quick_files(quick):
    out, res, stdout = quick
    assert_written(out, ("results.json", "chang_multilevel.md", "chang_multilevel.png"))
    assert (out / "chang_multilevel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "chang_multilevel.md").read_text()
    assert "Quick run" in md and "| 0 | direct |" in md and "| 0 | multilevel |" in md and "41.7 %" in md
    assert res["config"]["quick"] and res["config"]["dataset"] == "mnist" and res["config"]["seeds"] == 1
    assert res["data_name"] == "mnist(t10k split 400/200)@14x14"
    assert "time saved" in stdout


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_quick_multilevel_work_is_the_theoretical_fraction(quick):
    _, res, _ = quick
    s = res["config"]["setup"]
    runs = {r["mode"]: r for r in res["runs"]}
    assert set(runs) == {"direct", "multilevel"}
    d, m = runs["direct"], runs["multilevel"]
    n, k = s["budget"], s["blocks"]
    # direct: N steps at depth K; multilevel: N/3 steps at K/4, K/2 and K
    assert d["steps"] == d["cycles"] == n and d["work_units"] == pytest.approx(n)
    assert m["steps"] == n and m["cycles"] == n // 3
    assert [st["blocks"] for st in m["stages"]] == [k // 4, k // 2]
    assert [st["cycles"] for st in m["stages"]] == [n // 3, n // 3]
    assert m["cascade_work_units"] == pytest.approx(n / 3 * (1 / 4 + 1 / 2))
    assert m["work_units"] / d["work_units"] == pytest.approx(1 - theoretical_saving(2))
    p = res["analysis"]["pairs"][0]
    assert p["work_saved"] == pytest.approx(theoretical_saving(2)) == pytest.approx(5 / 12)
    # the step times were measured at every depth
    assert sorted(int(x) for x in m["step_ms"]) == [k // 4, k // 2, k] and list(d["step_ms"]) == [str(k)]
    assert all(v > 0 for v in m["step_ms"].values())


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_quick_accuracies_and_times_are_real(quick):
    _, res, _ = quick
    for r in res["runs"]:
        assert math.isfinite(r["final_loss"]) and math.isfinite(r["val_loss"])
        assert 0.3 < r["val_acc"] <= 1.0, (r["mode"], r["val_acc"])        # chance is 0.1
        assert r["seconds"] > 0 and 0 < r["train_s"] <= r["seconds"]
        c = r["curve"]
        assert len(c["val_acc"]) >= 3 and c["work_units"] == sorted(c["work_units"])
        assert c["work_units"][-1] == pytest.approx(r["work_units"])
    p = res["analysis"]["pairs"][0]
    for key in ("time_saved", "train_time_saved", "expected_saving"):
        assert math.isfinite(p[key]) and -1 < p[key] < 1, key
    assert p["acc_diff"] == pytest.approx(p["acc_multilevel"] - p["acc_direct"])
    # the interpolation part is kept: copying blocks changes the output by O(h)
    gaps = [g for _, g in res["gaps"]["constant"]]
    assert all(a > b > 0 for a, b in zip(gaps, gaps[1:]))
    assert float(res["theoretical_saving"]["2"]) == pytest.approx(theoretical_saving(2))


@pytest.mark.timeout(60)
def test_bad_data_dir_is_one_line_error(tmp_path):
    proc = _run("--quick", "--out", tmp_path / "o", "--data-dir", tmp_path / "missing", timeout=60)
    assert proc.returncode == 2 and "--data-dir" in proc.stderr and "Traceback" not in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _run("--quick", "--out", tmp_path / "o", "--data-dir", empty, timeout=60)
    assert proc.returncode == 2 and "cifar10" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("chang_multilevel.py: error:")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_cifar_batches_are_used(tmp_path):
    """--data-dir with CIFAR-10 binary batches (here: random records) trains on them."""
    import numpy as np
    rng = np.random.default_rng(0)
    data = tmp_path / "cifar"
    data.mkdir()
    for name, n in (("data_batch_1.bin", 400), ("test_batch.bin", 200)):
        rec = rng.integers(0, 256, size=(n, 3073), dtype=np.uint8)
        rec[:, 0] = rng.integers(0, 10, size=n)
        (data / name).write_bytes(rec.tobytes())
    out = tmp_path / "o"
    proc = _run("--quick", "--out", out, "--data-dir", data, "--seeds", "1", timeout=110,
                quick={"n_train": 400, "n_val": 200, "budget": 20})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["dataset"] == "cifar10" and res["data_name"].startswith("cifar10")
    assert len(res["runs"]) == 2 and all(math.isfinite(r["val_loss"]) for r in res["runs"])
    assert struct.unpack(">I", (out / "chang_multilevel.png").read_bytes()[16:20])[0] > 0   # PNG width
