"""Convolutional ODE ResNets: shapes, transfers, bad input, and layer-parallel exactness.

The network is three stages of conv residual blocks (channels 3-4-5) with projections between them
(strided 1x1 convolution, or average pooling + 1x1 convolution), a 3x3 conv opening and a pooled
head. Layer-parallel loss and gradients (Euler and RK2, both schedules, M = 1, 3) and 3 MG/OPT
V-cycles across ranks are compared with the serial model in float64.
"""
import dataclasses

import pytest
import torch

from multiproc import run_ranks
from test_parallel import _local_grads
from parml.comm import SelfComm
from parml.config import TrainConfig
from parml.data import Dataset, load_dataset
from parml.multilevel.hierarchy import (block_mask, level_specs, ordered_parameters, prolongate, prolongate_model,
                             restrict_gradient, restrict_parameters)
from parml.model import ModelSpec, StageSpec, build_model
from parml.parallel.sharding import shard_entries
from parml.parallel.executor import LayerParallel
from parml.training.build import build_vcycle

torch.set_num_threads(1)

SHAPE = (2, 8, 8)
BATCH = 7


def conv_spec(stepper="euler", projection="conv", norm="none", blocks=(2, 3, 2), activation="tanh"):
    return ModelSpec(2 * 8 * 8, 3, (StageSpec(3, blocks[0], "conv"), StageSpec(4, blocks[1], "conv", 2),
                                    StageSpec(5, blocks[2], "conv", 2)),
                     T=1.0, activation=activation, stepper=stepper, input_shape=SHAPE, projection=projection,
                     norm=norm)


# spec name -> spec: Euler with strided projections, RK2 with pooled projections and the norm on
SPECS = {"euler": conv_spec("euler", "conv"), "rk2": conv_spec("rk2", "avgpool", "layer")}
CASES = [(n, s, m) for n in SPECS for s in ("gpipe", "1f1b") for m in (1, 3)]


def _data(dtype=torch.float64, n=BATCH):
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, *SHAPE, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


# --- shapes, structure, transfers -----------------------------------------------------------------

def test_conv_shapes_and_shards_compose():
    spec = SPECS["euler"]
    model = build_model(spec, seed=1, dtype=torch.float64)
    assert model.chunks[1].weight.shape == (3, 4, 4, 3, 3) and model.chunks[1].bias.shape == (3, 4)
    x, _ = _data()
    assert model(x).shape == (BATCH, 3)
    assert model(x.flatten(1)).shape == (BATCH, 3)           # flattened images are reshaped
    shapes = [model.state_shape(k, 6) for k in range(spec.total_blocks)]
    assert shapes == [(6, 3, 8, 8)] * 3 + [(6, 4, 4, 4)] * 3 + [(6, 5, 2, 2)]
    assert model.output_shape(6) == (6, 5, 2, 2)
    # every cut of the network reproduces the full forward, and the boundary state has the planned shape
    for cut in range(1, spec.total_blocks):
        a, b = model.shard(0, cut), model.shard(cut, spec.total_blocks)
        y = a(x)
        assert tuple(y.shape) == model.state_shape(cut, BATCH)
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
    x, _ = _data()
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
    model = build_model(SPECS["euler"], seed=0, dtype=torch.float64)
    with pytest.raises(RuntimeError):       # 3 channels where the opening expects 2
        model(torch.randn(2, 3, 8, 8, dtype=torch.float64))


# --- layer-parallel exactness ----------------------------------------------------------------------

def _serial(name):
    model = build_model(SPECS[name], seed=2, dtype=torch.float64)
    x, y = _data()
    loss = model.loss(model(x), y)
    loss.backward()
    return float(loss.detach()), float((model(x).argmax(1) == y).double().mean()), model


class ConvConfig(TrainConfig):
    """TrainConfig whose network is the conv test network (what ``--arch conv`` would build)."""

    def model_spec(self, in_features, out_features, task, input_shape=None):
        return dataclasses.replace(conv_spec(self.stepper, blocks=(2, 4, 2)), in_features=in_features,
                                   out_features=out_features, task=task)


def _conv_data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, *SHAPE, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    return Dataset("conv-random", x[:8], y[:8], x[8:], y[8:], 3, "classification", SHAPE)


def _mgopt_runs():
    """(kind, stepper, min blocks per rank): conv Euler and RK2 with L = 2 on all ranks, conv with
    the coarse level gathered onto one rank (moves projections between layouts), dense RK2."""
    return [("conv", "euler", 1), ("conv", "rk2", 1), ("conv", "euler", 4), ("dense", "rk2", 1)]


def _run_mgopt(comm, kind, stepper, min_blocks):
    common = dict(levels=2, dtype="float64", lr=0.05, beta=1e-3, stepper=stepper, activation="tanh",
                  min_blocks_per_rank=min_blocks, progress=False, microbatches=2)
    if kind == "conv":
        cfg, data = ConvConfig(blocks=8, width=3, **common), _conv_data()
    else:
        cfg = TrainConfig(blocks=16, width=3, **common)
        data = load_dataset("circles", seed=0, n_train=40, n_val=8, dtype=torch.float64)
    vcycle = build_vcycle(cfg, data, comm)
    losses = [vcycle((data.x_train, data.y_train)).loss for _ in range(3)]
    return losses, vcycle.levels[-1].executor.gather_state(), [p.ranks for p in vcycle.plans]


def _worker(comm, mgopt=False):
    results = {}
    for name, schedule, m in CASES:
        lp = LayerParallel(build_model(SPECS[name], seed=2, dtype=torch.float64), comm, schedule, m)
        x, y = _data()
        loss = lp.forward_backward(x, y)
        val_loss, acc = lp.evaluate(x, y)
        results[(name, schedule, m)] = (loss, val_loss, acc, _local_grads(lp.model))
    if mgopt:
        results["mgopt"] = {key: _run_mgopt(comm, *key) for key in _mgopt_runs()}
    return results


def _check_grads(grads, serial_model):
    named = dict(serial_model.named_parameters())
    for key, g in grads.items():
        if isinstance(key, tuple):
            _, stage, first = key
            ref = serial_model.chunks[stage]
            n = g[0].shape[0]
            torch.testing.assert_close(g[0], ref.weight.grad[first:first + n], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(g[1], ref.bias.grad[first:first + n], rtol=1e-10, atol=1e-12)
        else:
            torch.testing.assert_close(g, named[key].grad, rtol=1e-10, atol=1e-12)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend,nprocs", [("gloo", 1), ("gloo", 2), ("gloo", 4), ("mpi", 2)])
def test_conv_loss_gradients_and_mgopt_equal_serial(backend, nprocs):
    mgopt = nprocs == 2
    ranks = run_ranks("tests.test_conv:_worker", nprocs, backend, timeout=280, args={"mgopt": mgopt})
    serial = {n: _serial(n) for n in SPECS}
    for case in CASES:
        ref_loss, ref_acc, ref_model = serial[case[0]]
        seen = set()
        for rank, res in enumerate(ranks):
            loss, val_loss, acc, grads = res[case]
            assert abs(loss - ref_loss) <= 1e-10 * abs(ref_loss), (case, rank, loss, ref_loss)
            assert abs(val_loss - ref_loss) <= 1e-10 * abs(ref_loss)
            assert acc == ref_acc
            _check_grads(grads, ref_model)
            seen |= {k if isinstance(k, str) else k[:2] for k in grads}
        expected = {n for n, _ in ref_model.named_parameters() if not n.startswith("chunks.")}
        assert expected | {("chunk", i) for i in range(3)} == seen, (case, seen)
    if not mgopt:
        return
    for key in _mgopt_runs():
        ref_losses, ref_state, _ = _run_mgopt(SelfComm(), *key)
        losses, state, level_ranks = ranks[0]["mgopt"][key]
        if key[2] > 1:
            assert level_ranks == [1, 2], level_ranks      # the coarse level really was gathered
        for a, b in zip(losses, ref_losses):
            assert abs(a - b) <= 1e-9 * abs(b), (key, losses, ref_losses)
        assert state.keys() == ref_state.keys()
        for name in state:
            torch.testing.assert_close(state[name], ref_state[name], rtol=1e-9, atol=1e-12, msg=f"{key} {name}")
        assert ranks[1]["mgopt"][key][1] is None and ranks[1]["mgopt"][key][0] == losses


def test_single_rank_conv_is_the_model():
    lp = LayerParallel(build_model(SPECS["rk2"], seed=2, dtype=torch.float64), SelfComm(), "gpipe", 3)
    x, y = _data()
    loss = lp.forward_backward(x, y)
    ref_loss, _, ref_model = _serial("rk2")
    assert abs(loss - ref_loss) < 1e-12
    _check_grads(_local_grads(lp.model), ref_model)
