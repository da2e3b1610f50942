"""``kernels.NetworkGradient``: the loss and every gradient of a whole dense model with no autograd,
against autograd through the model's reference step-by-step loop (no kernel attached) and against
the independent reference (``tests/reference.py``); and where ``LayerParallel`` uses it."""
import pytest
import torch

import reference
from parml.comm import SelfComm
from parml.kernels import attach_kernels
from parml.kernels.network import NetworkGradient
from parml.model import ModelSpec, StageSpec, build_model
from parml.parallel.executor import LayerParallel
from parml.parallel.stage import PipelineStage

RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _spec(task="classification", activation="tanh", stepper="euler", width=3, blocks=9, stages=None, features=5):
    out = 1 if task == "regression" else 4
    return ModelSpec(features, out, stages or (StageSpec(width, blocks),), T=1.0, activation=activation,
                     stepper=stepper, task=task)


def _data(spec, dtype, batch=37):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, spec.in_features, generator=g, dtype=dtype)
    if spec.task == "regression":
        return x, torch.randn(batch, 1, generator=g, dtype=dtype)
    return x, torch.randint(0, spec.out_features, (batch,), generator=g)


def _autograd(spec, dtype, x, y):
    """Loss and gradients by autograd through the reference loop, in float64."""
    model = build_model(spec, seed=4, dtype=dtype).to(torch.float64)
    y = y.to(torch.float64) if spec.task == "regression" else y
    loss = model.loss(model(x.to(torch.float64)), y)
    loss.backward()
    return float(loss.detach()), {n: p.grad for n, p in model.named_parameters()}


def _close(got, want, rtol, what):
    err, atol = float((got.to(want.dtype) - want).abs().max()), rtol * float(want.abs().max())
    assert err <= atol, f"{what}: max error {err:.3g} > {atol:.3g}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("task,activation,stepper", [("classification", "tanh", "euler"),
                                                     ("classification", "relu", "rk2"),
                                                     ("classification", "sigmoid", "euler"),
                                                     ("regression", "relu", "euler"),
                                                     ("regression", "tanh", "rk2")])
@pytest.mark.parametrize("microbatches,threads", [(1, 1), (3, 1), (1, 2)])
def test_loss_and_gradients_equal_autograd(dtype, task, activation, stepper, microbatches, threads):
    spec = _spec(task, activation, stepper)
    x, y = _data(spec, dtype)
    want_loss, want = _autograd(spec, dtype, x, y)
    model = build_model(spec, seed=4, dtype=dtype)
    network = NetworkGradient.build(model, attach_kernels(model, "fused"))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        loss, flat = network.grad(x, y, x.shape[0], microbatches)
    finally:
        torch.set_num_threads(before)
    rtol = RTOL[dtype]
    assert abs(loss - want_loss) <= rtol * abs(want_loss)
    assert float(flat[-1]) == pytest.approx(loss, rel=rtol)
    for name, p in model.named_parameters():
        _close(p.grad, want[name], rtol, name)
    flat.zero_()                          # every .grad is a view of flat (what the data group sums)
    assert all(not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("features", [5, 40])
def test_gradients_equal_the_independent_reference(features):
    spec = _spec(activation="tanh", blocks=6, features=features)
    x, y = _data(spec, torch.float64, batch=50)
    model = build_model(spec, seed=1, dtype=torch.float64)
    params = {n: t.detach().clone() for n, t in model.state_dict().items()}
    want_loss, want = reference.value_and_grad(params, x, y, T=spec.T, activation=spec.activation)
    loss, _ = NetworkGradient.build(model, attach_kernels(model, "auto")).grad(x, y, x.shape[0])
    assert loss == pytest.approx(want_loss, rel=1e-12)
    for name, p in model.named_parameters():
        _close(p.grad, want[name], 1e-10, name)


def test_a_share_of_the_batch_is_scaled_by_the_whole_batch():
    """A data replica's call: its samples' losses over the full batch size, so that the replicas'
    sums are the batch's mean (what the data group's all-reduce adds up)."""
    spec = _spec()
    x, y = _data(spec, torch.float64, batch=40)
    model = build_model(spec, seed=4, dtype=torch.float64)
    network = NetworkGradient.build(model, attach_kernels(model, "fused"))
    parts = [network.grad(xs, ys, 40) for xs, ys in zip(x.tensor_split(2), y.tensor_split(2))]
    summed = parts[0][1] + parts[1][1]
    _, whole = network.grad(x, y, 40)
    assert torch.allclose(summed, whole, rtol=1e-12, atol=1e-15)


def test_a_target_outside_the_classes_is_refused():
    spec = _spec()
    x, y = _data(spec, torch.float64)
    y[5] = spec.out_features
    model = build_model(spec, seed=4, dtype=torch.float64)
    with pytest.raises(ValueError, match="target class is outside"):
        NetworkGradient.build(model, attach_kernels(model, "fused")).grad(x, y, x.shape[0])


@pytest.mark.parametrize("what", ["torch kernel", "two stages", "conv"])
def test_only_one_stage_dense_models_on_the_fused_kernel_qualify(what):
    if what == "conv":
        spec = ModelSpec(2 * 4 * 4, 3, (StageSpec(2, 3, "conv"),), input_shape=(2, 4, 4))
    else:
        spec = _spec(stages=(StageSpec(3, 4), StageSpec(4, 4))) if what == "two stages" else _spec()
    model = build_model(spec, seed=0)
    kernels = attach_kernels(model, "torch" if what == "torch kernel" else "fused")
    assert NetworkGradient.build(model, kernels) is None
    whole = build_model(_spec(), seed=0)
    assert NetworkGradient.build(whole, attach_kernels(whole, "fused")) is not None


@pytest.mark.parametrize("microbatches", [1, 3])
def test_three_shards_chained_by_hand_equal_autograd(microbatches):
    """A pipeline of three shards (opening + blocks, blocks, blocks + head and loss) passed states
    forward and adjoints back by hand, micro-batch by micro-batch (GPipe order)."""
    spec = _spec(blocks=9)
    x, y = _data(spec, torch.float64, batch=31)
    want_loss, want = _autograd(spec, torch.float64, x, y)
    full = build_model(spec, seed=4, dtype=torch.float64)
    shards = [full.shard(a, b) for a, b in ((0, 3), (3, 7), (7, 9))]
    nets = [NetworkGradient.build(s, attach_kernels(s, "fused")) for s in shards]
    assert [(n.first, n.last) for n in nets] == [(True, False), (False, False), (False, True)]
    for n in nets:
        n.begin()
    loss = 0.0
    parts = list(zip(x.tensor_split(microbatches), y.tensor_split(microbatches)))
    for m, (x_m, y_m) in enumerate(parts):
        h = x_m
        for n in nets:
            value, h = n.forward(m, h, y_m, x.shape[0])
        loss += value
    for m in range(len(parts)):
        g = None
        for n in reversed(nets):
            g = n.backward(m, g)
        assert g is None                       # the first shard sends no adjoint
    assert loss == pytest.approx(want_loss, rel=1e-12)
    got = {}
    for s in shards:
        for name, p in s.named_parameters():
            if name.startswith("chunks."):
                got.setdefault(name, []).append(p.grad)
            else:
                got[name] = p.grad
    for name, g in got.items():
        _close(torch.cat(g) if isinstance(g, list) else g, want[name], 1e-10, name)


def test_pipeline_stages_train_without_autograd_where_weight_gradients_stay_inline():
    """``PipelineStage`` uses it where no chunk defers: up to width 8 everywhere under auto, and
    on the first rank at any fused width; a deferring chunk (width 12 where a neighbour waits) or a
    forced ``--weight-grads deferred`` keeps autograd and the deferred sink."""
    class Fake(SelfComm):
        def __init__(self, rank, size):
            super().__init__()
            self.rank, self.size = rank, size

    for width, rank, wg, manual in ((3, 1, "auto", True), (12, 0, "auto", True), (12, 1, "auto", False),
                                    (3, 1, "deferred", False), (12, 1, "inline", True)):
        full = build_model(_spec(width=width, blocks=4), seed=0)
        shard = full.shard(2 * rank, 2 * rank + 2)
        attach_kernels(shard, "auto")
        stage = PipelineStage(shard, Fake(rank, 2), weight_grads=wg)
        assert (stage.manual is not None) == manual, (width, rank, wg)


def test_one_rank_takes_it_and_a_pipeline_does_not():
    """LayerParallel on one rank computes through it (same loss and gradients as autograd);
    ``--kernel torch`` keeps autograd."""
    spec = _spec(width=3, blocks=8)
    x, y = _data(spec, torch.float64)
    want_loss, want = _autograd(spec, torch.float64, x, y)
    for kernel, used in (("auto", True), ("torch", False)):
        lp = LayerParallel(build_model(spec, seed=4, dtype=torch.float64), SelfComm(), microbatches=2, kernel=kernel)
        assert (lp.network is not None) == used
        loss = lp.forward_backward(x, y)
        assert loss == pytest.approx(want_loss, rel=1e-12)
        for name, p in lp.model.named_parameters():
            _close(p.grad, want[name], 1e-10, f"{kernel} {name}")
        assert lp.times.compute > 0 and lp.times.step >= lp.times.compute
