"""The executor on one process (SelfComm): the model's loss and gradients, deferred weight
gradients that leave no state behind, and the schedules' memory bound. Multi-process exactness:
tests/distributed/test_executor.py."""
import pytest
import torch

from cases import (ALL_BLOCKS, BATCH, CONV_SPECS, SPEC, check_coverage, check_rank_grads, close, close_scalar,
                   conv_data, conv_serial, data, local_grads, serial)
from parml.comm import SelfComm
from parml.model import build_model
from parml.parallel.executor import LayerParallel

torch.set_num_threads(1)


def test_single_rank_layer_parallel_is_the_model():
    lp = LayerParallel(build_model(SPEC, seed=2, dtype=torch.float64), SelfComm(), "gpipe", 4)
    x, y = data(torch.float64)
    loss = lp.forward_backward(x, y)
    ref_loss, _, ref_grads = serial(torch.float64)
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
    assert check_rank_grads(local_grads(lp.model), ref_grads, 1e-10) == ALL_BLOCKS


def test_deferred_weight_gradients_leave_no_state_behind():
    """After a step the chunks route gradients through autograd again, and both modes agree."""
    x, y = data(torch.float64)
    grads = {}
    for wg in ("deferred", "inline"):
        lp = LayerParallel(build_model(SPEC, seed=2, dtype=torch.float64), SelfComm(), "1f1b", 3, weight_grads=wg)
        lp.forward_backward(x, y)
        assert all(k.sink is None for k in lp.kernels)
        grads[wg] = local_grads(lp.model)
        lp.model.zero_grad(set_to_none=True)
        lp.model.loss(lp.model(x), y).backward()          # plain autograd outside the executor
        for c in lp.model.block_chunks():
            close(grads[wg][("chunk", c.stage, c.first)][0], c.weight.grad, 1e-12, f"{wg} stage {c.stage}")
    for key, g in grads["deferred"].items():
        for a, b in zip(g if isinstance(g, tuple) else (g,), grads["inline"][key] if isinstance(g, tuple)
                        else (grads["inline"][key],)):
            close(a, b, 1e-12, f"deferred vs inline {key}")
    assert lp.stage.deferred is None
    with pytest.raises(ValueError, match="weight_grads must be one of auto, deferred, inline"):
        LayerParallel(build_model(SPEC, seed=2), SelfComm(), "gpipe", 1, weight_grads="later")


@pytest.mark.parametrize("kernel, schedule, held_rows, adjoint_rows",
                         [("torch", "gpipe", BATCH, 4), ("torch", "1f1b", 4, 4),
                          ("fused", "gpipe", 4 * 32, 32), ("fused", "1f1b", 32, 32)])
def test_deferred_weight_gradients_keep_the_schedules_memory_bound(kernel, schedule, held_rows, adjoint_rows):
    """A micro-batch's stored states are released at its weight-gradient flush, right after its
    backward: one process with M = 4 (rows 4, 3, 3, 3) holds the states of every micro-batch under
    GPipe but of one at a time under 1F1B, plus one micro-batch's adjoints (4 rows) while it is
    backpropagated: (held rows + adjoint rows) x (6 blocks x width 4 + 5 blocks x width 5) x 8 bytes.
    The fused kernel stores whole tiles (32 samples at least), so each micro-batch holds 32 rows."""
    x, y = data(torch.float64)
    lp = LayerParallel(build_model(SPEC, seed=2, dtype=torch.float64), SelfComm(), schedule, 4, kernel=kernel,
                       weight_grads="deferred")
    for _ in range(2):                   # the second step runs on recycled buffers
        lp.forward_backward(x, y)
    assert lp.stage.deferred.peak_bytes == (held_rows + adjoint_rows) * (6 * 4 + 5 * 5) * 8
    _, _, ref_grads = serial(torch.float64)
    assert check_rank_grads(local_grads(lp.model), ref_grads, 1e-10) == ALL_BLOCKS


@pytest.mark.parametrize("kernel, deferred", [("fused", False), ("torch", True)])
def test_auto_weight_gradients_on_one_rank(kernel, deferred):
    """--weight-grads auto (the default): on the first (here the only) rank nobody waits for the
    adjoint, so the fused kernel forms every weight gradient inline and the sink stays empty;
    torch's kernel still defers (one batched GEMM per chunk). Gradients equal the reference."""
    x, y = data(torch.float64)
    lp = LayerParallel(build_model(SPEC, seed=2, dtype=torch.float64), SelfComm(), "1f1b", 4, kernel=kernel)
    lp.forward_backward(x, y)
    assert (lp.stage.deferred.peak_bytes > 0) == deferred
    _, _, ref_grads = serial(torch.float64)
    assert check_rank_grads(local_grads(lp.model), ref_grads, 1e-10) == ALL_BLOCKS


def test_single_rank_conv_is_the_model():
    lp = LayerParallel(build_model(CONV_SPECS["rk2"], seed=2, dtype=torch.float64), SelfComm(), "gpipe", 3)
    x, y = conv_data()
    loss = lp.forward_backward(x, y)
    ref_loss, _, ref_grads = conv_serial("rk2")
    close_scalar(loss, ref_loss, 1e-12, "loss")
    rows = check_rank_grads(local_grads(lp.model), ref_grads, 1e-10)
    check_coverage(CONV_SPECS["rk2"], [rows], lp.partition.bounds)
