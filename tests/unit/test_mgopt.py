"""MG/OPT on one process: level gradients against autograd, first-order coherence by finite
differences, work units per eq. (10), cycle notation, one level = gradient descent."""
import math

import numpy as np
import pytest
import torch

from cases import close
from parml.comm import SelfComm
from parml.config import TrainConfig
from parml.data import load_dataset
from parml.multilevel.hierarchy import (block_mask, ordered_parameters, prolongate, restrict_gradient,
                             restrict_parameters)
from parml.multilevel.mgopt import LEVEL_OPTIMIZERS, CycleError, CycleSetup, GradientDescent
from parml.model import build_model, tikhonov
from parml.training.build import build_levels, build_vcycle

torch.set_num_threads(1)


def small_data(n=64, seed=0):
    return load_dataset("circles", seed=seed, n_train=n, n_val=32, dtype=torch.float64)


def cfg(**kw):
    base = dict(blocks=16, width=3, levels=3, dtype="float64", lr=0.1, beta=1e-3, progress=False)
    base.update(kw)
    return TrainConfig(**base)


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
    for n, (g, p) in enumerate(zip(grads, lev.params)):
        close(g, p.grad, 1e-10, f"parameter {n}")


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
    Ie = prolongate(e, coarse.mask)
    theta = fine.values()

    def h_coarse(s):
        return _objective(coarse, data, [t + s * d for t, d in zip(theta0, e)]) + \
            sum(float((a * (t + s * d)).sum()) for a, t, d in zip(dg, theta0, e))

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
    for n, (a, b) in enumerate(zip(vcycle.levels[0].params, ordered_parameters(ref))):
        close(a.detach(), b.detach(), 1e-10, f"parameter {n}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_gd_level_optimizer_takes_torch_sgds_steps_bit_for_bit(dtype):
    """"sgd" is parml's GradientDescent (no torch._dynamo import); its iterates are torch.optim.SGD's,
    also after a learning-rate change through param_groups (the cosine schedule) and with a None grad."""
    assert LEVEL_OPTIMIZERS["sgd"] is GradientDescent
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(5, 3, generator=gen, dtype=dtype), torch.randn(7, generator=gen, dtype=dtype),
             torch.randn(2, generator=gen, dtype=dtype)]
    ours = [t.clone().requires_grad_() for t in start]
    ref = [t.clone().requires_grad_() for t in start]
    opt_ours, opt_ref = GradientDescent(ours, lr=0.3), torch.optim.SGD(ref, lr=0.3)
    for step in range(6):
        if step == 3:
            for o in (opt_ours, opt_ref):
                for group in o.param_groups:
                    group["lr"] = 0.0123
        for a, b in zip(ours[:2], ref[:2]):            # the third parameter never gets a gradient
            g = torch.randn(a.shape, generator=gen, dtype=dtype)
            a.grad, b.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_ref.step()
    for a, b in zip(ours, ref):
        assert torch.equal(a.detach(), b.detach())
    assert torch.equal(ours[2].detach(), start[2]) and not torch.equal(ours[0].detach(), start[0])
    assert opt_ours.state == {}


def test_mgopt_reduces_the_finest_loss():
    data = small_data()
    vcycle = build_vcycle(cfg(levels=3), data, SelfComm())
    losses = [vcycle((data.x_train, data.y_train)).loss for _ in range(6)]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.9 * losses[0]


# --- the level's Tikhonov term on one vector ----------------------------------------------------------

def test_a_cpu_levels_parameters_are_slices_of_one_vector():
    """Level rebinds its parameters to consecutive slices of θ with their values kept; optimizer steps,
    ``assign`` and ``load_state_dict`` write through to θ."""
    from parml.multilevel.mgopt import _flatten
    data = small_data()
    lev = build_levels(cfg(), data, SelfComm())[0][-1]
    ref = build_model(cfg().spec_for(data), seed=cfg().seed, dtype=torch.float64)
    for p, q in zip(lev.params, ordered_parameters(ref)):
        assert torch.equal(p.detach(), q.detach())
    theta = torch.from_numpy(lev.theta)
    assert theta.numel() == sum(p.numel() for p in lev.params)
    assert torch.equal(theta, torch.cat([p.detach().reshape(-1) for p in lev.params]))
    lev.gradient((data.x_train, data.y_train), 0)
    lev.smooth(1, None, (data.x_train, data.y_train), 0)
    lev.add([torch.ones_like(p) for p in lev.params])
    lev.model.load_state_dict({k: v + 1 for k, v in lev.model.state_dict().items()})
    assert torch.equal(theta, torch.cat([p.detach().reshape(-1) for p in lev.params]))
    assert _flatten([torch.zeros(2, dtype=torch.float32), torch.zeros(2, dtype=torch.float64)]) is None


@pytest.mark.parametrize("interpolation", ["constant", "linear"])
@pytest.mark.parametrize("metric", ["l2", "euclidean"])
def test_cycles_on_vectors_equal_the_per_parameter_cycle(metric, interpolation, monkeypatch):
    """A one-rank level adds its Tikhonov term to the network's gradient buffer (laid out as θ) and
    takes GD steps as numpy ops on θ (``Level._descend``); with constant transfers the cycle moves
    between levels by index maps on θ (``VCycle._cycle_vectors``). An observer sends the cycle down
    the per-parameter path (list transfers, multi-tensor ops, ``GradientDescent.step``): 3 V-cycles
    of each give the same iterates, and the vector paths are the ones taken without an observer."""
    from parml.multilevel import mgopt
    data = small_data()
    batch = (data.x_train, data.y_train)
    runs = {}
    for path in ("vector", "lists"):
        vc = build_vcycle(cfg(metric=metric, interpolation=interpolation), data, SelfComm())
        assert [m is not None for m in vc._index] == [False] + [interpolation == "constant"] * 2
        for lev in vc.levels:
            assert lev._aligned, "a one-rank level's θ and the network's gradient buffer share a layout"
            assert [id(p) for p in lev.executor.network.layout] == [id(p) for p in ordered_parameters(lev.model)]
        steps, moves = [], []
        descend, vectors = mgopt.Level._descend, mgopt.VCycle._cycle_vectors
        monkeypatch.setattr(mgopt.Level, "_descend", lambda self, *a: (steps.append(1), descend(self, *a))[1])
        monkeypatch.setattr(mgopt.VCycle, "_cycle_vectors", lambda self, *a: (moves.append(1), vectors(self, *a))[1])
        if path == "lists":
            vc.observer = lambda *a: None
        losses = [vc(batch, 0).loss for _ in range(3)]
        assert (len(steps) > 0) == (path == "vector")
        assert (len(moves) > 0) == (path == "vector" and interpolation == "constant")
        runs[path] = (losses, [[p.detach().clone() for p in lev.params] for lev in vc.levels])
        monkeypatch.undo()
    (lv, pv), (ll, pl) = runs["vector"], runs["lists"]
    assert lv == pytest.approx(ll, rel=1e-13)
    for a, b in zip(pv, pl):
        for x, y in zip(a, b):
            close(x, y, 1e-12, "iterate")


def test_a_non_finite_gradient_on_the_vector_path_names_where():
    """A NaN sample makes the loss and the data gradient NaN while θ stays finite: the one-rank level
    (its gradient the network's buffer, laid out as θ) stops with the gradient, not the parameters,
    named; a NaN parameter is named as such."""
    from parml.multilevel.mgopt import NonFiniteError
    data = small_data()
    lev = build_levels(cfg(), data, SelfComm())[0][-1]
    assert lev._aligned
    x = data.x_train.clone()
    x[3, 0] = math.nan
    with pytest.raises(NonFiniteError, match=r"^non-finite gradient at rank 0, level 3, blocks \[0, 16\)$"):
        lev.gradient_vector((x, data.y_train), 0)
    lev.theta[5] = math.nan
    with pytest.raises(NonFiniteError, match=r"^non-finite parameters at rank 0, level 3"):
        lev.gradient_vector((data.x_train, data.y_train), 1)


@pytest.mark.parametrize("bad", [None, "nan_grad", "inf_grad", "nan_param"])
def test_the_tikhonov_term_on_one_vector_equals_the_per_parameter_one(bad):
    """``_tikhonov_flat`` (CPU) and ``_tikhonov_lists`` (other devices) against β Σ w‖θ_i‖² and
    ∇ + 2βwθ written out, and both flag a non-finite gradient."""
    from parml.multilevel.mgopt import _flatten, _tikhonov_flat, _tikhonov_lists
    gen = torch.Generator().manual_seed(3)
    shapes, w = [(4, 3, 3), (4, 3), (3, 2), (2,)], [0.2, 0.2, 1e-3, 1e-3]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]
    grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    if bad == "nan_grad":
        grads[2][1, 0] = math.nan
    elif bad == "inf_grad":
        grads[0][3, 2, 1] = -math.inf
    elif bad == "nan_param":
        params[1].data[0, 0] = math.nan
    want_reg = sum(wi * float((p.detach() ** 2).sum()) for wi, p in zip(w, params))
    want = [g + 2 * wi * p.detach() for g, wi, p in zip(grads, w, params)]
    by_weight = [([0, 1], 0.4), ([2, 3], 2e-3)]
    lists: list = []
    reg_l, finite_l = _tikhonov_lists([p.detach() for p in params], grads, w, by_weight, lists)
    theta = _flatten(params)
    twice_w = torch.cat([torch.full((p.numel(),), 2 * wi, dtype=torch.float64) for p, wi in zip(params, w)]).numpy()
    reg_f, finite_f, t = _tikhonov_flat(theta, twice_w, grads)
    # the gradients as one vector in θ's order (``NetworkGradient``'s buffer): the same values
    reg_v, finite_v, t_v = _tikhonov_flat(theta, twice_w, torch.cat([g.reshape(-1) for g in grads]).numpy())
    assert finite_l == finite_f == finite_v == (bad is None)      # a NaN in θ reaches ∇ + 2βwθ too
    if bad == "nan_param":
        assert math.isnan(reg_l) and math.isnan(reg_f) and math.isnan(reg_v)
        return
    assert reg_l == pytest.approx(want_reg, rel=1e-12) and reg_f == reg_v == pytest.approx(want_reg, rel=1e-12)
    offset = 0
    for b, c in zip(lists, want):        # the vector holds the parameters' results end to end
        a = torch.from_numpy(t[offset:offset + c.numel()]).reshape(c.shape)
        offset += c.numel()
        if bad is None:
            close(a, c, 1e-14, "vector")
            close(b, c, 1e-14, "lists")
    assert offset == t.size and (bad is not None or np.array_equal(t_v, t))
