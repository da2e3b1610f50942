"""The fused Euler chunk (parml.kernels): its hand-written adjoint against autograd of the plain
step-by-step loop, inline and with deferred weight gradients, and parml's serial model with the
kernels attached against the independent reference (tests/reference.py)."""
import pytest
import torch

from cases import RTOL, SPEC, close, close_scalar, data, serial
from parml.kernels import DeferredWeightGrads, attach_kernels
from parml.model import ModelSpec, StageSpec, build_model

torch.set_num_threads(1)


@pytest.mark.parametrize("deferred", [None, "each", "end"])
@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
def test_fused_euler_chunk_gradients_equal_step_by_step_autograd(activation, deferred):
    """The hand-written adjoint of a dense Euler chunk against autograd of the plain loop (h = 1/7);
    deferred: 3 micro-batches whose weight gradients are formed after each one's backward ("each",
    as a pipeline stage does) or all at the step's end ("end"), on the second of two steps (so the
    recycled buffers are used)."""
    spec = ModelSpec(2, 2, (StageSpec(5, 7),), T=1.0, activation=activation)
    model = build_model(spec, seed=4, dtype=torch.float64)
    (kernel,), chunk = attach_kernels(model, "torch"), model.chunks[0]
    with torch.no_grad():
        chunk.bias.normal_()
    y0 = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randn(6, 5, dtype=torch.float64)
    if deferred:
        kernel.sink = sink = DeferredWeightGrads()
        for _ in range(2):
            for t in (y0, chunk.weight, chunk.bias):
                t.grad = None
            for m, rows in enumerate(torch.arange(6).tensor_split(3)):
                sink.microbatch = m
                (chunk(y0[rows]) * target[rows]).sum().backward()
                if deferred == "each":
                    assert sink.pending() == 1 + (m > 0)      # m's (y, g_a), plus the sums of 0..m-1
                    sink.flush(m)
            assert chunk.weight.grad is None and sink.pending() == (3 if deferred == "end" else 1)
            sink.finish()
        held = 3 if deferred == "end" else 1                   # micro-batches stored at once
        assert sink.pending() == 0 and sink.peak_bytes == held * 2 * 7 * 2 * 5 * 8   # states + adjoints
    else:
        (chunk(y0) * target).sum().backward()
    fused = [t.grad.clone() for t in (y0, chunk.weight, chunk.bias)]
    w, b = chunk.weight.detach().clone().requires_grad_(), chunk.bias.detach().clone().requires_grad_()
    x = y0.detach().clone().requires_grad_()
    y, sigma = x, {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}[activation]
    for k in range(7):
        y = y + chunk.h * sigma(y @ w[k].T + b[k])
    (y * target).sum().backward()
    for what, got, ref in zip(("input", "weight", "bias"), fused, (x.grad, w.grad, b.grad)):
        close(got, ref, 1e-12, f"{activation} {deferred} {what}")


def test_fused_serial_model_equals_the_step_by_step_reference():
    """parml's serial model with the fused Euler chunks attached (autograd elsewhere) against the reference."""
    for dtype in ("float64", "float32"):
        model = build_model(SPEC, seed=2, dtype=getattr(torch, dtype))
        attach_kernels(model)
        x, y = data(getattr(torch, dtype))
        loss = model.loss(model(x), y)
        loss.backward()
        ref_loss, _, ref_grads = serial(getattr(torch, dtype))
        close_scalar(float(loss.detach()), ref_loss, RTOL[dtype], f"{dtype} loss")
        for name, p in model.named_parameters():
            close(p.grad, ref_grads[name], RTOL[dtype], f"{dtype} {name}")
