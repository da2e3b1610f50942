"""Profiles of the scaling model (parml.plan.profile): fitted costs, JSON round trip, one-line errors."""
import json

import pytest
import torch

from parml.model import ModelSpec, StageSpec
from parml.plan.profile import CommCost, Fit, KernelCost, Profile, ProfileError, check_device
from parml.plan.simulate import Layout, Workload, predict


def dense(width, blocks, in_features=2, out_features=2):
    return ModelSpec(in_features, out_features, (StageSpec(width, blocks),))


def synthetic_profile(**kw):
    k = KernelCost(Fit(["n", "n*b*v*s"], [2e-6, 1e-9], 0.05, 0.1, 12), Fit(["n"], [3e-6]), Fit(["n*b*v^2*s"], [1e-10]))
    c = CommCost(5e-5, 1e9, 1e-6, Fit(["log2(g)", "B*(g-1)/g"], [1e-4, 2e-9]))
    c.oversubscribed = CommCost(1e-4, 5e8)
    base = {"device": "cpu", "kernels": {"dense": k, "dense-inline": k}, "comm": {"gloo": c},
                "ends": {"first_F": Fit(["1"], [1e-5])}, "step": {"update": Fit(["1", "p"], [1e-5, 1e-9])},
                "cores": 2, "memory_bytes": 1e9, "machine": {"cpus": 2}, "versions": {"torch": torch.__version__},
                "date": "2025-01-01T00:00:00+00:00"}
    base.update(kw)
    return Profile(**base)


def test_profile_round_trip(tmp_path):
    prof = synthetic_profile()
    path = tmp_path / "p.json"
    prof.save(path)
    back = Profile.load(str(path), device="cpu")
    assert back.to_dict() == prof.to_dict()
    assert back.kernels["dense"].forward(n=4, b=10, v=3) == pytest.approx(4 * 2e-6 + 4 * 10 * 3 * 1e-9)
    assert back.comm["gloo"].oversubscribed.latency == 1e-4
    work = Workload(dense(4, 16), batch=32)
    assert predict(work, Layout(1, 2, 4), back).step_seconds == predict(work, Layout(1, 2, 4), prof).step_seconds


def one_line(exc):
    msg = str(exc.value)
    assert "\n" not in msg and msg
    return msg


def test_profile_errors_are_one_line(tmp_path):
    with pytest.raises(ProfileError) as e:
        Profile.load(str(tmp_path / "missing.json"))
    assert "no such file" in one_line(e) and "parml calibrate" in one_line(e)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ProfileError) as e:
        Profile.load(str(bad))
    assert "corrupt" in one_line(e)
    bad.write_text(json.dumps({"schema": 1, "device": "cpu", "kernels": {"dense": {"forward": 3}}, "comm": {}}))
    with pytest.raises(ProfileError) as e:
        Profile.load(str(bad))
    assert "corrupt" in one_line(e)
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ProfileError) as e:
        Profile.load(str(bad))
    assert "not a parml profile" in one_line(e)
    gpu = tmp_path / "gpu.json"
    synthetic_profile(device="cuda").save(gpu)
    with pytest.raises(ProfileError) as e:
        Profile.load(str(gpu), device="cpu")
    assert "'cuda'" in one_line(e) and "'cpu'" in one_line(e)
    with pytest.raises(ProfileError) as e:
        check_device(synthetic_profile(), "tpu")
    one_line(e)
    with pytest.raises(ProfileError) as e:
        predict(Workload(dense(2, 8), batch=8), Layout(1, 2, 1, backend="mpi"), synthetic_profile())
    assert "--backend 'mpi'" in one_line(e)


def test_width_fits_are_corrected_to_the_measured_grid():
    """Where the three-term fit misses the calibration grid (chunks whose states leave the caches),
    the grid's measurements win: exact at grid points, geometric between them, held beyond."""
    fit = Fit(["n*b"], [1e-9])
    measured = [[n, b, 3, 1, t, 0.0, 0.0] for n, b, t in
                [(4, 16, 64e-12 * 1e3), (4, 2000, 8e-6), (2048, 16, 32.768e-6), (2048, 2000, 8.192e-3)]]
    k = KernelCost(fit, Fit.constant(0.0), Fit.constant(0.0), measured=measured, by_width={"3": [fit] * 3})
    assert k.time(0, n=2048, b=2000, v=3, s=1) == pytest.approx(8.192e-3)          # fit 4.096e-3: ratio 2
    assert k.time(0, n=4, b=2000, v=3, s=1) == pytest.approx(8e-6)                 # ratio 1
    # halfway in log n at b = 2000: ratio sqrt(1 * 2); beyond the grid: the edge's ratio (2)
    assert k.time(0, n=90.51, b=2000, v=3, s=1) == pytest.approx(90.51 * 2000e-9 * 2 ** 0.5, rel=1e-3)
    assert k.time(0, n=8192, b=4000, v=3, s=1) == pytest.approx(8192 * 4000e-9 * 2)
    assert k.time(1, n=2048, b=2000, v=3, s=1) == pytest.approx(4.096e-3)          # nothing measured: the fit


def test_message_fits_estimate_the_mean_cost_not_the_cheapest_point():
    """Message times carry additive stalls (~1 ms whatever the size): the absolute fit is ordinary
    least squares (a constant fit is the mean); the relative fit weights the cheapest point most."""
    sizes = [8, 1024, 16384, 262144]
    seconds = [3e-4, 1.5e-3, 1.3e-3, 1.1e-3]
    points = [{"B": b} for b in sizes]
    mean = sum(seconds) / len(seconds)
    absolute = Fit.fitted(["1"], points, seconds, absolute=True)
    assert absolute.coef[0] == pytest.approx(mean, rel=1e-12)
    relative = Fit.fitted(["1"], points, seconds)
    assert relative.coef[0] < 0.75 * mean
    # exact data is recovered either way, and the errors stay relative to each point
    exact = [2e-4 + 1e-9 * b for b in sizes]
    for fit in (Fit.fitted(["1", "B"], points, exact, absolute=True), Fit.fitted(["1", "B"], points, exact)):
        assert fit.coef == pytest.approx([2e-4, 1e-9], rel=1e-9) and fit.max_rel_error < 1e-9
    assert absolute.max_rel_error == pytest.approx(abs(mean - 3e-4) / 3e-4)
