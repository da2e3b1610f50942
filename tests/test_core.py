"""Serial core: model, transfers, MG/OPT coherence, work units, GD equivalence."""
import math
from dataclasses import replace

import pytest
import torch

from parml.comm import SelfComm
from parml.config import TrainConfig
from parml.data import load_dataset
from parml.multilevel.hierarchy import (block_mask, level_specs, ordered_parameters, prolongate, restrict_gradient,
                             restrict_parameters)
from parml.multilevel.mgopt import CycleError, CycleSetup
from parml.kernels import DeferredWeightGrads, attach_kernels
from parml.model import ModelSpec, StageSpec, build_model, tikhonov
from parml.training.build import build_levels, build_vcycle

torch.set_num_threads(1)


def small_data(n=64, seed=0):
    return load_dataset("circles", seed=seed, n_train=n, n_val=32, dtype=torch.float64)


def cfg(**kw):
    base = dict(blocks=16, width=3, levels=3, dtype="float64", lr=0.1, beta=1e-3, progress=False)
    base.update(kw)
    return TrainConfig(**base)


# --- model -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stepper", ["euler", "rk2"])
def test_block_is_the_ode_step(stepper):
    spec = ModelSpec(2, 2, (StageSpec(3, 4),), T=2.0, activation="tanh", stepper=stepper)
    model = build_model(spec, seed=1, dtype=torch.float64)
    x = torch.randn(5, 2, dtype=torch.float64)
    y = x @ model.opening.weight.T
    chunk = model.chunks[0]
    h = 0.5
    for k in range(4):
        def f(z, k=k):
            return torch.tanh(z @ chunk.weight[k].T + chunk.bias[k])
        y = y + h * f(y) if stepper == "euler" else y + h * f(y + h / 2 * f(y))
    expected = y @ model.head.weight.T + model.head.bias
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


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
    for got, ref in zip(fused, (x.grad, w.grad, b.grad)):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-13)


def test_biases_start_at_zero_and_seed_fixes_weights():
    spec = ModelSpec(2, 2, (StageSpec(3, 8),))
    a, b = build_model(spec, seed=3), build_model(spec, seed=3)
    assert torch.equal(a.chunks[0].weight, b.chunks[0].weight)
    assert a.chunks[0].bias.abs().sum() == 0 and a.head.bias.abs().sum() == 0
    assert not torch.equal(a.chunks[0].weight, build_model(spec, seed=4).chunks[0].weight)


def test_glorot_init_has_glorot_bounds_and_variance():
    """--init glorot: U(±√(6/(fan_in+fan_out))), variance 2/(fan_in+fan_out) (Keras' default, the
    paper's code); the default stays U(±1/√fan_in). Biases start at zero either way."""
    dense = ModelSpec(2, 2, (StageSpec(3, 4096), StageSpec(5, 8)), init="glorot")
    conv = ModelSpec(16, 2, (StageSpec(4, 512, "conv"), StageSpec(6, 2, "conv", 2)), input_shape=(1, 4, 4),
                     init="glorot")
    for spec, fan in ((dense, 3), (conv, 4 * 9)):
        model = build_model(spec, seed=5, dtype=torch.float64)
        w = model.chunks[0].weight                          # fan_in = fan_out = width (× 3x3 kernel)
        bound = math.sqrt(6 / (2 * fan))
        assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
        assert abs(w.std().item() / math.sqrt(2 / (2 * fan)) - 1) < 0.02
        assert abs(w.mean().item()) < 0.02 * bound
        assert model.chunks[0].bias.abs().sum() == 0 and model.head.bias.abs().sum() == 0
        uniform = build_model(replace(spec, init="uniform"), seed=5, dtype=torch.float64)
        assert uniform.chunks[0].weight.abs().max() <= 1 / math.sqrt(fan) < w.abs().max()
    # every weight of the dense model: opening 2 -> 3, projection 3 -> 5, head 5 -> 2
    model = build_model(dense, seed=5, dtype=torch.float64)
    for weight, fan_in, fan_out in ((model.opening.weight, 2, 3), (model.projections["1"].weight, 3, 5),
                                    (model.chunks[1].weight, 5, 5), (model.head.weight, 5, 2)):
        assert weight.abs().max() <= math.sqrt(6 / (fan_in + fan_out))
    with pytest.raises(ValueError, match="init"):
        ModelSpec(2, 2, init="he")


def test_shards_compose_to_the_full_model():
    spec = ModelSpec(2, 2, (StageSpec(3, 5), StageSpec(4, 3)))
    full = build_model(spec, seed=0, dtype=torch.float64)
    x = torch.randn(6, 2, dtype=torch.float64)
    for cuts in [(0, 2, 8), (0, 5, 6, 8), (0, 1, 4, 7, 8)]:
        y = x
        for a, b in zip(cuts, cuts[1:]):
            shard = full.shard(a, b)
            assert y.shape == (6, *full.state_shape(a, 6)[1:]) or a == 0
            y = shard(y)
        torch.testing.assert_close(y, full(x), rtol=0, atol=1e-14)


# --- transfers ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("interpolation", ["constant", "linear"])
def test_restriction_is_the_adjoint_of_prolongation(interpolation):
    g = torch.Generator().manual_seed(0)
    mask = [True, True, False]
    fine = [torch.randn(8, 3, 3, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64),
            torch.randn(2, 3, generator=g, dtype=torch.float64)]
    coarse = [torch.randn(4, 3, 3, generator=g, dtype=torch.float64),
              torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(2, 3, generator=g, dtype=torch.float64)]
    lhs = sum((r * e).sum() for r, e in zip(restrict_gradient(fine, mask, interpolation), coarse))
    rhs = sum((f * p).sum() for f, p in zip(fine, prolongate(coarse, mask, interpolation)))
    assert abs(float(lhs - rhs)) < 1e-12
    back = restrict_parameters(prolongate(coarse, mask, interpolation), mask, interpolation)
    for a, b in zip(back, coarse):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)


def test_constant_prolongation_copies_blocks():
    c = torch.arange(3.0)
    assert prolongate([c], [True])[0].tolist() == [0, 0, 1, 1, 2, 2]
    assert prolongate([c], [True], "linear")[0].tolist() == [0, 0.5, 1, 1.5, 2, 2]
    assert restrict_gradient([torch.arange(4.0)], [True])[0].tolist() == [1, 5]


# --- MG/OPT -----------------------------------------------------------------------------------------

def _objective(level, data, values):
    """L^l at `values`, recomputed from scratch with autograd off (independent of Level.gradient)."""
    model = level.model
    with torch.no_grad():
        saved = [p.clone() for p in level.params]
        for p, v in zip(level.params, values):
            p.copy_(v)
        loss = model.loss(model(data.x_train), data.y_train) + tikhonov(model, level.beta, level.block_weight)
        for p, v in zip(level.params, saved):
            p.copy_(v)
    return float(loss)


@pytest.mark.parametrize("metric", ["l2", "euclidean"])
def test_level_gradient_matches_autograd_of_the_objective(metric):
    data = small_data()
    levels = build_levels(cfg(metric=metric), data, SelfComm())[0]
    lev = levels[-1]
    loss, grads = lev.gradient((data.x_train, data.y_train), 0)
    model = lev.model
    for p in model.parameters():
        p.grad = None
    total = model.loss(model(data.x_train), data.y_train) + tikhonov(model, lev.beta, lev.block_weight)
    total.backward()
    assert abs(loss - float(total.detach())) < 1e-12
    for g, p in zip(grads, lev.params):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12)


def test_first_order_coherence_by_finite_differences():
    """<∇H^l(Rθ), e> equals the fine directional derivative along I e (δg makes them agree)."""
    data = small_data()
    fine, coarse = build_levels(cfg(levels=2, blocks=8), data, SelfComm())[0][::-1]
    batch = (data.x_train, data.y_train)
    _, g_fine = fine.gradient(batch, 0)
    theta0 = restrict_parameters(fine.values(), fine.mask)
    coarse.assign(theta0)
    _, g_coarse = coarse.gradient(batch, 0)
    dg = [r - c for r, c in zip(restrict_gradient(g_fine, fine.mask), g_coarse)]
    e = [torch.randn_like(t) for t in theta0]
    eps = 1e-6
    def h_coarse(s):
        return _objective(coarse, data, [t + s * d for t, d in zip(theta0, e)]) + \
            sum(float((a * (t + s * d)).sum()) for a, t, d in zip(dg, theta0, e))
    Ie = prolongate(e, coarse.mask)
    theta = fine.values()
    def l_fine(s):
        return _objective(fine, data, [t + s * d for t, d in zip(theta, Ie)])
    d_coarse = (h_coarse(eps) - h_coarse(-eps)) / (2 * eps)
    d_fine = (l_fine(eps) - l_fine(-eps)) / (2 * eps)
    assert abs(d_coarse - d_fine) < 1e-7 * max(1.0, abs(d_fine))
    # and without δg the two differ: the test can fail
    d_plain = (_objective(coarse, data, [t + eps * d for t, d in zip(theta0, e)]) -
               _objective(coarse, data, [t - eps * d for t, d in zip(theta0, e)])) / (2 * eps)
    assert abs(d_plain - d_fine) > 1e-6


TABLE1 = {"[{1}]": 1.00, "[(1),{2}]": 3.00, "[(1),1,2,{2}]": 5.00, "[(1),1,1,2,2,{2}]": 5.25,
          "[(1),1,1,1,2,2,2,{2}]": 5.19}
# eq. (10) values; the paper's Table 2 prints the first two rows' U_c as 5.97 and 5.96 (swapped)
TABLE2 = {"[1,1,1,1,1,1,1,{1}]": 5.96, "[1,1,1,1,1,1,1,{2}]": 5.97, "[1,1,1,1,1,1,1,{5}]": 5.99,
          "[1,1,1,1,1,1,1,{10}]": 6.03, "[1,1,1,1,2,2,2,{2}]": 6.19, "[(1),1,1,1,2,2,2,{2}]": 5.19}


@pytest.mark.parametrize("text,expected", list(TABLE1.items()) + list(TABLE2.items()))
def test_work_units_per_cycle_follow_eq10(text, expected):
    setup = CycleSetup.parse(text)
    assert round(setup.cost(), 2) == expected
    # the engine's own count over a real V-cycle equals eq. (10) exactly
    data = small_data(n=16)
    c = cfg(levels=setup.levels, blocks=2 ** (setup.levels - 1) * 2, cycle=text)
    vcycle = build_vcycle(c, data, SelfComm())
    vcycle((data.x_train, data.y_train))
    assert math.isclose(vcycle.work_units, setup.cost(), rel_tol=1e-12)
    vcycle((data.x_train, data.y_train))
    assert math.isclose(vcycle.work_units, 2 * setup.cost(), rel_tol=1e-12)


def test_cycle_notation_parses_exactly():
    s = CycleSetup.parse("[(1),1,1,2,2,{2}]")
    assert s.steps == ((1, 0), (1, 1), (1, 1), (2, 2), (2, 2)) and s.coarsest == 2 and s.levels == 6
    assert str(s) == "[(1),1,1,2,2,{2}]"
    assert CycleSetup.default(8) == CycleSetup.parse("[(1),1,1,1,2,2,2,{2}]")
    assert CycleSetup.parse("{{1}}") == CycleSetup((), 1)
    for bad in ["", "[1,2]", "[(1),x,{2}]", "[(1),{2},1]"]:
        with pytest.raises(CycleError):
            CycleSetup.parse(bad)


@pytest.mark.parametrize("metric", ["l2", "euclidean"])
def test_one_level_is_plain_gradient_descent(metric):
    data = small_data()
    c = cfg(levels=1, metric=metric)
    vcycle = build_vcycle(c, data, SelfComm())
    ref = build_model(c.model_spec(2, 2, "classification"), seed=c.seed, dtype=torch.float64)
    h = 1.0 / c.blocks
    for _ in range(5):
        vcycle((data.x_train, data.y_train))
        params = ordered_parameters(ref)
        w = h if metric == "l2" else 1.0
        loss = ref.loss(ref(data.x_train), data.y_train) + tikhonov(ref, c.beta, w)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g, blk in zip(params, grads, block_mask(ref)):
                p -= c.lr * (g / h if (blk and metric == "l2") else g)
    for a, b in zip(vcycle.levels[0].params, ordered_parameters(ref)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_mgopt_reduces_the_finest_loss():
    data = small_data()
    vcycle = build_vcycle(cfg(levels=3), data, SelfComm())
    losses = [vcycle((data.x_train, data.y_train)).loss for _ in range(6)]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.9 * losses[0]


def test_level_specs_halve_blocks():
    spec = ModelSpec(2, 2, (StageSpec(3, 64),))
    assert [s.stages[0].blocks for s in level_specs(spec, 4)] == [8, 16, 32, 64]


@pytest.mark.parametrize("interpolation", ["constant", "linear"])
def test_transfers_split_at_rank_boundaries_equal_the_whole(interpolation):
    """Chunks of one stage transferred separately with the time halos (next chunk's first coarse
    row, previous chunk's last fine row) give exactly the transfer of the whole stage."""
    g = torch.Generator().manual_seed(3)
    coarse = torch.randn(8, 3, 2, generator=g, dtype=torch.float64)
    fine = torch.randn(16, 3, 2, generator=g, dtype=torch.float64)
    cuts = [(0, 2), (2, 6), (6, 8)]                      # coarse rows per "rank"; fine rows are twice
    mask = [True] * len(cuts)
    parts_c = [coarse[a:b] for a, b in cuts]
    parts_f = [fine[2 * a:2 * b] for a, b in cuts]
    after = [coarse[b:b + 1] if b < 8 else None for _, b in cuts]
    before = [fine[2 * a - 1:2 * a] if a > 0 else None for a, _ in cuts]
    closes = [b == 8 for _, b in cuts]
    torch.testing.assert_close(torch.cat(prolongate(parts_c, mask, interpolation, after)),
                               prolongate([coarse], [True], interpolation)[0], rtol=0, atol=1e-15)
    torch.testing.assert_close(torch.cat(restrict_gradient(parts_f, mask, interpolation, before, closes)),
                               restrict_gradient([fine], [True], interpolation)[0], rtol=0, atol=1e-15)
