"""GPU paths (skipped without CUDA): NCCL and MPI with pinned host staging, against the serial CPU model.

Run on a GPU machine with: python -m pytest tests/test_gpu.py -q (see launch/gpu_check.sh). NCCL
("gloo" launches on device cuda pick the torch backend's NCCL) needs one GPU per rank, so its P = 2
case runs where there are two GPUs; MPI at P = 2 shares one GPU through host staging.
"""
import pytest
import torch

from multiproc import run_ranks
from test_parallel import RUNS, SPEC, _check_rank_grads, _data, _local_grads, _run_cycles, _serial

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
# 4 levels with the coarse ones gathered, and linear transfers with time halos (movers on the GPU)
GPU_RUNS = [RUNS[4], RUNS[6]]


def _cuda_worker(comm):
    from parml.model import build_model
    from parml.parallel.executor import LayerParallel
    assert comm.device.type == "cuda"
    out = {}
    for schedule, m in (("gpipe", 1), ("1f1b", 3), ("1f1b", 4)):
        lp = LayerParallel(build_model(SPEC, seed=2, dtype=torch.float64), comm, schedule, m)
        x, y = _data(torch.float64)
        lp.forward_backward(x, y)
        loss = lp.forward_backward(x, y)
        assert lp.times.compute > 0 and lp.times.step >= lp.times.compute
        grads = {k: (tuple(t.cpu() for t in v) if isinstance(v, tuple) else v.cpu())
                 for k, v in _local_grads(lp.model).items()}
        out[(schedule, m)] = (loss, grads)
    if comm.size > 1:
        out["cycles"] = {}
        for key in GPU_RUNS:
            losses, state, units, _ = _run_cycles(comm, *key)
            out["cycles"][key] = (losses, {k: v.cpu() for k, v in state.items()} if state else None)
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend,nprocs", [
    ("gloo", 1), ("mpi", 1), ("mpi", 2),
    pytest.param("gloo", 2, marks=pytest.mark.skipif(GPUS < 2, reason="NCCL at P = 2 needs 2 GPUs"))])
def test_cuda_layer_parallel_equals_cpu_serial(backend, nprocs):
    """torch backend on cuda = NCCL (one rank per GPU); MPI stages CUDA tensors through pinned memory."""
    ranks = run_ranks("tests.test_gpu:_cuda_worker", nprocs, backend, timeout=100,
                      env={"PARML_TEST_DEVICE": "cuda"})
    ref_loss, _, ref_grads = _serial(torch.float64)
    for res in ranks:
        for case, (loss, grads) in res.items():
            if case == "cycles":
                continue
            assert abs(loss - ref_loss) <= 1e-10 * abs(ref_loss)
            _check_rank_grads(grads, ref_grads, 1e-9)
    if nprocs > 1:
        from parml.comm import SelfComm
        for key in GPU_RUNS:
            ref_losses, ref_state, _, _ = _run_cycles(SelfComm(), *key)
            losses, state = ranks[0]["cycles"][key]
            for a, b in zip(losses, ref_losses):
                assert abs(a - b) <= 1e-9 * abs(b), (key, losses, ref_losses)
            for name in ref_state:
                torch.testing.assert_close(state[name], ref_state[name], rtol=1e-9,
                                           atol=1e-9 * float(ref_state[name].abs().max()))


def _placement_worker(comm):
    return comm.device


@pytest.mark.timeout(60)
@pytest.mark.skipif(GPUS != 1, reason="needs exactly one GPU")
def test_two_nccl_ranks_on_one_gpu_is_a_one_line_error():
    with pytest.raises(AssertionError, match=r"needs one GPU per local rank: 2 local ranks, 1 GPU\(s\).*--backend mpi"):
        run_ranks("tests.test_gpu:_placement_worker", 2, "gloo", timeout=50, env={"PARML_TEST_DEVICE": "cuda"})


def test_stage_timer_measures_device_time_not_launch_time():
    from parml.parallel.timing import StageTimer, synchronize
    timer = StageTimer(torch.device("cuda"))
    synchronize("cuda")
    t = timer.start()
    torch.cuda._sleep(50_000_000)                     # a kernel that spins ~tens of ms
    assert timer.stop(t, "compute") == 0.0            # nothing is known before the device is done
    synchronize("cuda")
    seconds = timer.collect()["compute"]
    assert seconds > 1e-3 and timer.collect() == {}
