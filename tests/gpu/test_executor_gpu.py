"""GPU paths (skipped without CUDA): NCCL and MPI with pinned host staging, against the serial CPU model.

Run on a GPU machine with: python -m pytest tests/gpu -q (see launch/gpu_check.sh).
"""
import pytest
import torch

from multiproc import run_ranks
from cases import SPEC, check_coverage, check_rank_grads, close_scalar, data, local_grads, serial

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_worker(comm):
    from parml.model import build_model
    from parml.parallel.executor import LayerParallel
    assert comm.device.type == "cuda"
    out = {}
    for schedule, m in (("gpipe", 1), ("1f1b", 3)):
        lp = LayerParallel(build_model(SPEC, seed=2, dtype=torch.float64), comm, schedule, m)
        x, y = data(torch.float64)
        loss = lp.forward_backward(x, y)
        grads = {k: (tuple(t.cpu() for t in v) if isinstance(v, tuple) else v.cpu())
                 for k, v in local_grads(lp.model).items()}
        out[(schedule, m)] = (loss, grads, lp.partition.bounds)
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend,nprocs", [("gloo", 1), ("mpi", 1), ("mpi", 2)])
def test_cuda_layer_parallel_equals_cpu_serial(backend, nprocs):
    """torch backend on cuda = NCCL (one rank per GPU); MPI stages CUDA tensors through pinned memory."""
    ranks = run_ranks("tests.gpu.test_executor_gpu:_cuda_worker", nprocs, backend, timeout=240,
                      env={"PARML_TEST_DEVICE": "cuda"})
    ref_loss, _, ref_grads = serial(torch.float64)
    for case in ranks[0]:
        rows = []
        for res in ranks:
            loss, grads, bounds = res[case]
            close_scalar(loss, ref_loss, 1e-10, f"{case} loss")
            rows.append(check_rank_grads(grads, ref_grads, 1e-9))
        check_coverage(SPEC, rows, bounds)
