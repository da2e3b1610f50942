"""The pipeline-scaling benchmark runs end to end (``--quick``) and writes complete results."""
import importlib.util
from itertools import product

import pytest

from multiproc import REPO_ROOT, assert_written, benchmark_results, run_benchmark

SCRIPT = REPO_ROOT / "benchmarks" / "pipeline_scaling.py"


def _torch_pipelining_importable() -> bool:
    try:
        import torch.distributed.pipelining  # noqa: F401
    except Exception:
        return False
    return True


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    # P = 2 only: the layer pipeline on both backends and torch pipelining beside it; P = 1 is the
    # same code without messages (and its launches were a third of this test's time)
    stdout, res = benchmark_results(SCRIPT, out, ["--quick"], 280, quick={"P": [2]})
    return out, stdout, res


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_files_and_entries(quick_run):
    out, stdout, res = quick_run
    assert_written(out, ("results.json", "pipeline_scaling.md", "pipeline_scaling.png"))
    cfg = res["config"]
    assert cfg["quick"] and not res["failures"]
    assert "gloo" in cfg["backends"]
    if importlib.util.find_spec("mpi4py") is not None:
        assert "mpi" in cfg["backends"]
    got = {(e["model"], e["P"], e["M"], e["schedule"], e["backend"]): e for e in res["entries"]}
    want = set(product(cfg["models"], cfg["P"], cfg["microbatches"], cfg["schedules"], cfg["backends"]))
    assert want <= set(got), f"missing configurations: {sorted(want - set(got))}"
    for key in want:
        e = got[key]
        assert e["step_s"] > 0 and len(e["per_rank"]) == e["P"], key
        for r in e["per_rank"]:
            assert r["step_s"] > 0 and r["compute_s"] > 0 and r["wait_s"] >= 0 and r["other_s"] >= 0, key
            assert r["peak_saved_bytes"] > 0, key
        assert 0 < e["efficiency"] <= 1.05, (key, e["efficiency"])
        assert e["bound"] == pytest.approx(e["M"] / (e["M"] + e["P"] - 1))
    # one progress line per configuration
    assert sum(line.startswith("[gloo]") or line.startswith("[mpi]") for line in stdout.splitlines()) >= len(want)
    # serial reference for every model and M
    for name, M in product(cfg["models"], cfg["microbatches"]):
        assert res["serial"]["models"][name]["by_M"][str(M)]["step_s"] > 0
    md = (out / "pipeline_scaling.md").read_text()
    for m in cfg["models"].values():
        assert m["label"] in md


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_torch_pipelining_comparison(quick_run):
    if not _torch_pipelining_importable():
        pytest.skip("torch.distributed.pipelining does not import")
    out, _, res = quick_run
    gloo = [e for e in res["entries"] if e["backend"] == "gloo"]
    assert gloo
    for e in gloo:
        t = e["torch"]
        assert t is not None, (e["model"], e["P"], e["M"], e["schedule"])
        if e["schedule"] == "1f1b" and e["M"] < e["P"]:
            assert "error" in t  # Schedule1F1B needs M >= P
            continue
        assert t["step_s"] > 0 and t["parml_over_torch_throughput"] > 0
        # the identical model, split at the identical block boundary: same loss and gradients
        assert t["loss_abs_diff"] < 1e-4
        assert t["grad_max_rel_diff"] < 1e-3
    assert res["goals"]["torch_ratio"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("argv, message", [
    (["--backends", "nccl"], "--backends 'nccl': valid with --device cpu: gloo,mpi"),
    (["--device", "cuda"], "--device cuda: CUDA is not available on this machine"),
])
def test_bad_device_or_backend_is_one_line(argv, message):
    import torch
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = run_benchmark(SCRIPT, ["--quick", *argv], 50)
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr
