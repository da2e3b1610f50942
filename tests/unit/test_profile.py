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
