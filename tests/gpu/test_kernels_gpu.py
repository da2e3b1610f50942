"""CUDA-graph chunk kernel against plain autograd (skipped without CUDA).

Run on a GPU machine: python -m pytest tests/gpu -q
"""
import pytest
import torch

import parml.kernels as pk
from parml.model import BlockChunk, ModelSpec, StageSpec, build_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ACT = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}


def _reference(y, weight, bias, h, activation, stepper):
    sigma = ACT[activation]
    for w, b in zip(weight.unbind(0), bias.unbind(0)):
        def f(z, w=w, b=b):
            return sigma(z @ w.t() + b)
        y = y + h * f(y) if stepper == "euler" else y + h * f(y + (h / 2) * f(y))
    return y


def _close(a, ref, rtol, what):
    err, scale = (a - ref).abs().max().item(), ref.abs().max().item()
    assert err <= rtol * scale, f"{what}: max error {err:.3e} > {rtol:g} * {scale:.3e}"


def _grads(fn, x, W, b, w_out):
    xs = x.clone().requires_grad_()
    out = fn(xs)
    (out * w_out).sum().backward()
    return out.detach().clone(), xs.grad


@pytest.mark.parametrize("stepper", ["euler", "rk2"])
@pytest.mark.parametrize("act", ["relu", "tanh", "sigmoid"])
def test_graphed_chunk_equals_autograd(stepper, act):
    """Captured once, replayed on new data and new parameter values (in-place update): every replay
    equals autograd; .grad accumulates through autograd as usual."""
    dev, dt = torch.device("cuda"), torch.float64
    kernel, why = pk.select_kernel("fused", dev, dt, 3, stepper, act)
    assert why is None
    kernel.clear()
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(6, 3, 3, generator=g, dtype=dt) * 0.8).to(dev)
    b = (torch.randn(6, 3, generator=g, dtype=dt) * 0.3).to(dev)
    chunk = BlockChunk(W.clone(), b.clone(), 0.3, act, stepper)
    for it in range(3):
        x = torch.randn(17, 3, generator=g, dtype=dt).to(dev)
        w_out = torch.randn(17, 3, generator=g, dtype=dt).to(dev)
        chunk.zero_grad(set_to_none=True)
        out, gx = _grads(lambda y: kernel.apply(chunk, y), x, W, b, w_out)
        Wr, br = chunk.weight.detach().clone().requires_grad_(), chunk.bias.detach().clone().requires_grad_()
        ref_out, ref_gx = _grads(lambda y, Wr=Wr, br=br: _reference(y, Wr, br, 0.3, act, stepper), x, Wr, br, w_out)
        _close(out, ref_out, 1e-12, f"y_K replay {it}")
        _close(gx, ref_gx, 1e-12, f"input adjoint replay {it}")
        _close(chunk.weight.grad, Wr.grad, 1e-12, f"weight grad replay {it}")
        _close(chunk.bias.grad, br.grad, 1e-12, f"bias grad replay {it}")
        with torch.no_grad():
            chunk.weight.mul_(0.9)          # an optimizer step in place: the graph sees it
    assert len(kernel) == 1                      # backward done before the next forward: one graph


def test_microbatches_in_flight_get_their_own_graphs():
    """Two micro-batches in flight (forward, forward, backward, backward): the second forward finds
    the first graph busy and captures another; the gradients do not alias static buffers."""
    dev, dt = torch.device("cuda"), torch.float64
    kernel = pk.select_kernel("fused", dev, dt, 4)[0]
    kernel.clear()
    g = torch.Generator().manual_seed(1)
    chunk = BlockChunk(torch.randn(5, 4, 4, generator=g, dtype=dt).to(dev) * 0.5,
                       torch.randn(5, 4, generator=g, dtype=dt).to(dev) * 0.2, 0.2, "tanh", "euler")
    xs = [torch.randn(8, 4, generator=g, dtype=dt).to(dev).requires_grad_() for _ in range(2)]
    outs = [kernel.apply(chunk, x) for x in xs]
    assert len(kernel) == 2
    for out in reversed(outs):
        out.square().sum().backward()
    grads = [x.grad.clone() for x in xs]
    del outs
    kernel.apply(chunk, xs[0].detach().clone().requires_grad_()).sum().backward()   # a third replay
    assert len(kernel) == 2                      # a free graph was reused
    for x, g in zip(xs, grads):
        assert torch.equal(x.grad, g)            # .grad is not a graph buffer that replay overwrote
    W, b = chunk.weight.detach().clone().requires_grad_(), chunk.bias.detach().clone().requires_grad_()
    refs = [x.detach().clone().requires_grad_() for x in xs]
    for x in refs:
        _reference(x, W, b, 0.2, "tanh", "euler").square().sum().backward()
    for x, r in zip(xs, refs):
        _close(x.grad, r.grad, 1e-12, "input adjoint")
    _close(chunk.weight.grad, W.grad, 1e-12, "weight grad")
    _close(chunk.bias.grad, b.grad, 1e-12, "bias grad")


def test_whole_model_on_gpu_equals_cpu_autograd():
    spec = ModelSpec(2, 3, (StageSpec(3, 16), StageSpec(5, 8)), activation="relu", stepper="rk2")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 2, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (40,), generator=g)
    ref = build_model(spec, seed=4, dtype=torch.float64)
    ref.loss(ref(x), labels).backward()
    model = build_model(spec, seed=4, dtype=torch.float64).cuda()
    kernel = pk.select_kernel("fused", "cuda", torch.float64, 3)[0]
    pk.attach_kernels(model, kernel)
    for _ in range(2):              # capture, then replay
        model.zero_grad(set_to_none=True)
        loss = model.loss(model(x.cuda()), labels.cuda())
        loss.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        _close(p.grad.cpu(), ref_params[name].grad, 1e-12, name)
    with torch.no_grad():           # evaluation: a forward-only capture
        _close(model(x.cuda()).cpu(), ref(x), 1e-12, "eval logits")
