"""The dense ODE-ResNet: a block is one ODE step (Euler, RK2), initialization, shards compose."""
import math
from dataclasses import replace

import pytest
import torch

from parml.model import ModelSpec, StageSpec, build_model

torch.set_num_threads(1)


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
