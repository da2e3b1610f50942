"""Convolutional ODE ResNets: shapes, shards, transfers on 5-D weights, first-order prolongation,
and one-line errors for bad specs. Layer-parallel exactness: tests/distributed/test_executor_conv.py.

The network is three stages of conv residual blocks (channels 3-4-5) with projections between them
(strided 1x1 convolution, or average pooling + 1x1 convolution), a 3x3 conv opening and a pooled
head (tests/cases.py).
"""
import pytest
import torch

from cases import CONV_BATCH, CONV_SPECS, SHAPE, conv_data, conv_spec
from parml.model import ModelSpec, StageSpec, build_model
from parml.multilevel.hierarchy import (block_mask, level_specs, ordered_parameters, prolongate, prolongate_model,
                                        restrict_gradient, restrict_parameters)
from parml.parallel.sharding import shard_entries

torch.set_num_threads(1)


def test_conv_shapes_and_shards_compose():
    spec = CONV_SPECS["euler"]
    model = build_model(spec, seed=1, dtype=torch.float64)
    assert model.chunks[1].weight.shape == (3, 4, 4, 3, 3) and model.chunks[1].bias.shape == (3, 4)
    x, _ = conv_data()
    assert model(x).shape == (CONV_BATCH, 3)
    assert model(x.flatten(1)).shape == (CONV_BATCH, 3)           # flattened images are reshaped
    shapes = [model.state_shape(k, 6) for k in range(spec.total_blocks)]
    assert shapes == [(6, 3, 8, 8)] * 3 + [(6, 4, 4, 4)] * 3 + [(6, 5, 2, 2)]
    assert model.output_shape(6) == (6, 5, 2, 2)
    # every cut of the network reproduces the full forward, and the boundary state has the planned shape
    for cut in range(1, spec.total_blocks):
        a, b = model.shard(0, cut), model.shard(cut, spec.total_blocks)
        y = a(x)
        assert tuple(y.shape) == model.state_shape(cut, CONV_BATCH)
        torch.testing.assert_close(b(y), model(x), rtol=1e-12, atol=1e-12)
    names = [n for n, _ in model.named_parameters() if not n.startswith("chunks.")]
    entries = [e.key[1] for e in shard_entries(spec, 0, spec.total_blocks) if e.key[0] == "shared"]
    assert sorted(names) == sorted(entries)


def test_dense_model_unchanged_by_conv_options():
    spec = ModelSpec(2, 3, (StageSpec(4, 6), StageSpec(5, 5)), T=1.0, activation="tanh")
    model = build_model(spec, seed=2, dtype=torch.float64)
    assert not spec.conv and model.state_shape(6, 3) == (3, 4) and model.state_shape(7, 3) == (3, 5)
    assert type(model.chunks[0]).__name__ == "BlockChunk"


@pytest.mark.parametrize("interpolation", ["constant", "linear"])
def test_transfers_on_five_dimensional_conv_weights(interpolation):
    fine_spec = conv_spec(blocks=(4, 4, 2))
    coarse_spec = level_specs(fine_spec, 2)[0]
    assert [s.blocks for s in coarse_spec.stages] == [2, 2, 1]
    assert [s.stride for s in coarse_spec.stages] == [1, 2, 2] and coarse_spec.input_shape == SHAPE
    coarse, fine = build_model(coarse_spec, 1, torch.float64), build_model(fine_spec, 2, torch.float64)
    mask = block_mask(coarse)
    c = [p.detach() for p in ordered_parameters(coarse)]
    f = [p.detach() for p in ordered_parameters(fine)]
    up = prolongate(c, mask, interpolation)
    assert [t.shape for t in up] == [t.shape for t in f]
    lhs = sum((r * e).sum() for r, e in zip(restrict_gradient(f, mask, interpolation), c))
    rhs = sum((a * b).sum() for a, b in zip(f, up))
    assert abs(float(lhs - rhs)) < 1e-10
    for a, b in zip(restrict_parameters(up, mask, interpolation), c):
        torch.testing.assert_close(a, b)
    if interpolation == "constant":       # copying each block halves h: the same ODE, first order
        prolongate_model(coarse, fine, interpolation)
        torch.testing.assert_close(fine.chunks[0].weight[1], coarse.chunks[0].weight[0])


def test_prolongated_conv_network_matches_the_coarse_one_to_first_order():
    """Chang et al.: copying each conv block and halving h changes the output by O(h)."""
    x, _ = conv_data()
    base = build_model(conv_spec(blocks=(1, 1, 1)), seed=1, dtype=torch.float64)
    gaps = []
    for k in (4, 8, 16, 32):
        coarse = build_model(conv_spec(blocks=(k, k, k)), seed=1, dtype=torch.float64)
        with torch.no_grad():
            t = torch.arange(k, dtype=torch.float64) / k
            for c, b in zip(coarse.chunks, base.chunks):
                c.weight.copy_(torch.sin(3 * t)[:, None, None, None, None] * b.weight * 4)
                c.bias.copy_(torch.cos(2 * t)[:, None] * 0.3)
            for name in ("opening", "head"):
                getattr(coarse, name).load_state_dict(getattr(base, name).state_dict())
            coarse.projections.load_state_dict(base.projections.state_dict())
        fine = build_model(conv_spec(blocks=(2 * k, 2 * k, 2 * k)), seed=9, dtype=torch.float64)
        prolongate_model(coarse, fine, "constant")
        with torch.no_grad():
            gaps.append(float((fine(x) - coarse(x)).abs().max()))
    ratios = [a / b for a, b in zip(gaps, gaps[1:])]
    assert all(1.6 < r < 2.6 for r in ratios), (gaps, ratios)


def test_bad_conv_input_names_the_option():
    stages = (StageSpec(3, 2, "conv"), StageSpec(4, 2, "conv", 2), StageSpec(5, 2, "conv", 2))
    with pytest.raises(ValueError, match=r"^--strides: stage 2 downsamples the 3x3 state .* does not divide"):
        ModelSpec(2 * 6 * 6, 3, stages, input_shape=(2, 6, 6))
    with pytest.raises(ValueError, match=r"^--arch conv: input_shape \(3, 8, 8\) has 192 values but the data has 128"):
        ModelSpec(128, 3, stages, input_shape=(3, 8, 8))
    with pytest.raises(ValueError, match=r"^--arch conv needs the per-sample input shape"):
        ModelSpec(128, 3, stages)
    with pytest.raises(ValueError, match=r"^--arch: stages mix kinds"):
        ModelSpec(128, 3, (StageSpec(3, 2, "conv"), StageSpec(4, 2)), input_shape=SHAPE)
    with pytest.raises(ValueError, match=r"^--strides: dense stages cannot downsample"):
        ModelSpec(2, 3, (StageSpec(3, 2), StageSpec(4, 2, stride=2)))
    with pytest.raises(ValueError, match=r"^--strides: the first stage cannot downsample"):
        ModelSpec(128, 3, (StageSpec(3, 2, "conv", 2),), input_shape=SHAPE)
    with pytest.raises(ValueError, match="unknown stage kind 'resnet'"):
        ModelSpec(128, 3, (StageSpec(3, 2, "resnet"),), input_shape=SHAPE)
    with pytest.raises(ValueError, match="unknown projection 'maxpool'"):
        ModelSpec(128, 3, stages[:2], input_shape=SHAPE, projection="maxpool")
    model = build_model(CONV_SPECS["euler"], seed=0, dtype=torch.float64)
    with pytest.raises(RuntimeError):       # 3 channels where the opening expects 2
        model(torch.randn(2, 3, 8, 8, dtype=torch.float64))
