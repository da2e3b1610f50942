"""The networks the exactness tests share (unit, distributed, GPU), their data, the serial
references and the per-tensor comparison.

Tolerances mean what the README says: per tensor, |got - want| <= rtol · max|want|, so a float32
check at 1e-5 is decided by 1e-5 of the tensor's scale, not by an absolute floor. Coverage is
proven by ranges: every (stage, block) row compared exactly once, on the rank whose partition
range holds it.
"""
from __future__ import annotations

import torch

import reference
from parml.model import ModelSpec, StageSpec, build_model

# --- per-tensor comparison ----------------------------------------------------------------------------

RTOL = {"float64": 1e-10, "float32": 1e-5}


def close(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str = "") -> None:
    """Per tensor: |got - want| <= rtol · max|want| (the README's relative tolerance)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err, atol = float((got.to(want.dtype) - want).abs().max()), rtol * float(want.abs().max())
    assert err <= atol, f"{what}: max error {err:.3g} > {atol:.3g} = {rtol:g} · max|ref|"


def close_scalar(got: float, want: float, rtol: float, what: str = "") -> None:
    assert abs(got - want) <= rtol * abs(want), f"{what}: {got!r} vs {want!r} (rtol {rtol:g})"


def local_grads(model) -> dict:
    """Gradients keyed by global identity: ('chunk', stage, first row) -> (weight, bias) rows, or
    the shared parameter's name."""
    out = {}
    for c in model.block_chunks():
        out[("chunk", c.stage, c.first)] = (c.weight.grad.clone(), c.bias.grad.clone())
    for name, p in model.named_parameters():
        if not name.startswith("chunks."):
            out[name] = p.grad.clone()
    return out


def check_rank_grads(grads: dict, ref_grads: dict, rtol: float) -> set:
    """Every gradient one rank holds against the reference (`ref_grads` by parameter name); returns
    the (stage, block) rows it covered."""
    rows = set()
    for key, g in grads.items():
        if isinstance(key, tuple):
            _, stage, first = key
            for field, t in zip(("weight", "bias"), g):
                close(t, ref_grads[f"chunks.{stage}.{field}"][first:first + t.shape[0]], rtol,
                      f"stage {stage} blocks [{first}, {first + t.shape[0]}) {field}")
            rows |= {(stage, k) for k in range(first, first + g[0].shape[0])}
        else:
            close(g, ref_grads[key], rtol, key)
    return rows


def all_blocks(spec: ModelSpec) -> set:
    return {(s, k) for s, stage in enumerate(spec.stages) for k in range(stage.blocks)}


def blocks_in(spec: ModelSpec, start: int, stop: int) -> set:
    """(stage, row) of the global blocks [start, stop)."""
    offsets = [sum(st.blocks for st in spec.stages[:s]) for s in range(len(spec.stages))]
    return {(s, k) for s, k in all_blocks(spec) if start <= offsets[s] + k < stop}


def check_coverage(spec: ModelSpec, rows_per_rank: list, bounds) -> None:
    """Each rank compared exactly the blocks of its partition range, and together every block of
    every stage once."""
    assert bounds[0] == 0 and bounds[-1] == spec.total_blocks and len(bounds) == len(rows_per_rank) + 1, bounds
    for rank, rows in enumerate(rows_per_rank):
        assert rows == blocks_in(spec, bounds[rank], bounds[rank + 1]), (rank, bounds, sorted(rows))
    covered = [r for rows in rows_per_rank for r in rows]
    assert len(covered) == len(all_blocks(spec)) and set(covered) == all_blocks(spec)


# --- the dense network: two stages (widths 4, 5), K = 11 ----------------------------------------------

SPEC = ModelSpec(2, 3, (StageSpec(4, 6), StageSpec(5, 5)), T=1.0, activation="tanh")
# one stage of width 4: every shard trains without autograd (kernels.NetworkGradient) under the
# default --weight-grads auto, the whole model on one rank, a shard on each rank of a pipeline
ONE_STAGE = ModelSpec(2, 3, (StageSpec(4, 11),), T=1.0, activation="tanh")
BATCH = 13
ALL_BLOCKS = all_blocks(SPEC)


def data(dtype, n: int = BATCH):
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 2, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def serial(dtype, spec=SPEC):
    """The independent reference (tests/reference.py: a plain step-by-step loop, no fused chunk, no
    executor) in float64 from the `dtype` model's initial values: (loss, accuracy, gradients by name)."""
    params = {n: t.detach().to(torch.float64) for n, t in build_model(spec, seed=2, dtype=dtype).state_dict().items()}
    x, y = data(dtype)                   # the same values as the run's (float32 draws differ from float64)
    x = x.to(torch.float64)
    kw = dict(T=spec.T, activation=spec.activation)
    loss, grads = reference.value_and_grad(params, x, y, **kw)
    with torch.no_grad():
        acc = float((reference.forward(params, x, **kw).argmax(1) == y).double().mean())
    return loss, acc, grads


# --- the conv network: three stages of conv blocks (channels 3-4-5), 2x8x8 images -----------------------

SHAPE = (2, 8, 8)
CONV_BATCH = 7


def conv_spec(stepper="euler", projection="conv", norm="none", blocks=(2, 3, 2), activation="tanh"):
    return ModelSpec(2 * 8 * 8, 3, (StageSpec(3, blocks[0], "conv"), StageSpec(4, blocks[1], "conv", 2),
                                    StageSpec(5, blocks[2], "conv", 2)),
                     T=1.0, activation=activation, stepper=stepper, input_shape=SHAPE, projection=projection,
                     norm=norm)


# spec name -> spec: Euler with strided projections, RK2 with pooled projections and the norm on
CONV_SPECS = {"euler": conv_spec("euler", "conv"), "rk2": conv_spec("rk2", "avgpool", "layer")}


def conv_data(dtype=torch.float64, n: int = CONV_BATCH):
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, *SHAPE, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def conv_serial(name: str):
    """Plain autograd through parml's serial conv network (no executor): (loss, accuracy, gradients
    by name)."""
    model = build_model(CONV_SPECS[name], seed=2, dtype=torch.float64)
    x, y = conv_data()
    loss = model.loss(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).double().mean())
    return float(loss.detach()), acc, {n: g for (n, _), g in zip(model.named_parameters(), grads)}
