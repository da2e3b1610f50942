"""Layer-parallel exactness: real processes (gloo and mpirun) against the independent reference.

One launch per (backend, P) runs every schedule x micro-batch count x dtype inside, to keep the
suite fast; the test process computes the loss and gradients with tests/reference.py (a plain
step-by-step loop, no fused chunk, no executor) and compares the loss and every parameter's
gradient on every rank, per tensor, and proves by the partition ranges that every block of every
stage was compared exactly once.
"""
import pytest
import torch

from cases import ONE_STAGE, RTOL, SPEC, check_coverage, check_rank_grads, close_scalar, data, local_grads, serial
from multiproc import run_ranks
from parml.model import build_model
from parml.parallel.executor import LayerParallel

torch.set_num_threads(1)

# (schedule, micro-batches, dtype, weight gradients): deferred everywhere (the fused kernel's deferred
# path inside the pipeline), inline, and auto (the default; at these widths the fused kernel inline)
CASES = ([(s, m, d, "deferred") for s in ("gpipe", "1f1b") for m in (1, 3, 4) for d in ("float64", "float32")]
         + [(s, 3, "float64", wg) for s in ("gpipe", "1f1b") for wg in ("inline", "auto")])
# the one-stage network, whose shards train without autograd (kernels.NetworkGradient) under auto
ONE_STAGE_CASES = [(s, m, d, "auto", "one-stage") for s in ("gpipe", "1f1b") for m in (1, 3)
                   for d in ("float64", "float32")]
SPECS = {"two-stage": SPEC, "one-stage": ONE_STAGE}


def _grads_worker(comm):
    results = {}
    for schedule, m, dtype, wg, *name in CASES + ONE_STAGE_CASES:
        dt = getattr(torch, dtype)
        spec = SPECS[name[0] if name else "two-stage"]
        lp = LayerParallel(build_model(spec, seed=2, dtype=dt), comm, schedule, m, weight_grads=wg)
        manual = lp.network is not None or lp.stage.manual is not None
        x, y = data(dt)
        lp.forward_backward(x, y)               # twice: the second step reuses the deferred buffers
        loss = lp.forward_backward(x, y)
        val_loss, acc = lp.evaluate(x, y)
        results[(schedule, m, dtype, wg, *name)] = (loss, val_loss, acc, local_grads(lp.model), lp.partition.bounds,
                                                    manual)
    return results


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend,nprocs", [("gloo", 1), ("gloo", 2), ("gloo", 4), ("mpi", 1), ("mpi", 2), ("mpi", 4)])
def test_loss_and_every_gradient_equal_serial(backend, nprocs):
    ranks = run_ranks("tests.distributed.test_executor:_grads_worker", nprocs, backend, timeout=150)
    reference = {(d, name): serial(getattr(torch, d), spec)
                 for d in ("float64", "float32") for name, spec in SPECS.items()}
    for case in CASES + ONE_STAGE_CASES:
        dtype, name = case[2], (case[4] if len(case) > 4 else "two-stage")
        ref_loss, ref_acc, ref_grads = reference[(dtype, name)]
        rtol = RTOL[dtype]
        rows, shared = [], set()
        for rank, res in enumerate(ranks):
            loss, val_loss, acc, grads, bounds, manual = res[case]
            close_scalar(loss, ref_loss, rtol, f"{case} rank {rank} loss")
            close_scalar(val_loss, ref_loss, rtol, f"{case} rank {rank} evaluate")
            assert acc == ref_acc
            assert manual == (name == "one-stage"), (case, rank)       # which path computed it
            rows.append(check_rank_grads(grads, ref_grads, rtol))
            shared |= {k for k in grads if isinstance(k, str)}
        # every block of every stage was compared on exactly one rank, every shared parameter somewhere
        check_coverage(SPECS[name], rows, bounds)
        assert shared == {n for n in ref_grads if not n.startswith("chunks.")}


def _host_staged_worker(comm):
    """The MPI staging path of CUDA tensors (copy into a pooled host buffer, send; receive into
    one, copy back at completion), forced on CPU tensors by PARML_MPI_STAGE_HOST=1."""
    assert comm.backend == "mpi" and comm.stage_host
    out = {}
    for schedule, m in (("1f1b", 3), ("gpipe", 4)):
        lp = LayerParallel(build_model(SPEC, seed=2, dtype=torch.float64), comm, schedule, m)
        x, y = data(torch.float64)
        lp.forward_backward(x, y)
        buffers = comm._pinned.allocated
        loss = lp.forward_backward(x, y)
        out[schedule] = (loss, local_grads(lp.model), comm._pinned.allocated - buffers, lp.partition.bounds)
    total = comm.allreduce(torch.tensor([float(comm.rank + 1)], dtype=torch.float64))
    root = comm.broadcast(torch.full((3,), float(comm.rank)), comm.size - 1)
    return out, float(total), root.tolist()


@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_mpi_staging_path_is_exact_on_host_buffers():
    """What the GPU path adds to MPI, run without a GPU: exact gradients, buffers reused."""
    ranks = run_ranks("tests.distributed.test_executor:_host_staged_worker", 2, "mpi", timeout=90,
                      env={"PARML_MPI_STAGE_HOST": "1"})
    ref_loss, _, ref_grads = serial(torch.float64)
    for schedule in ("1f1b", "gpipe"):
        rows = []
        for out, _, _ in ranks:
            loss, grads, new_buffers, bounds = out[schedule]
            close_scalar(loss, ref_loss, 1e-10, f"{schedule} loss")
            rows.append(check_rank_grads(grads, ref_grads, 1e-10))
            assert new_buffers == 0                 # the second step ran on the first step's buffers
        check_coverage(SPEC, rows, bounds)
    for _, total, root in ranks:
        assert total == 3.0 and root == [1.0, 1.0, 1.0]
