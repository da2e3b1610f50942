"""Transfers between levels: restriction is the adjoint of prolongation, constant and linear
interpolation by hand, halved levels, and chunks split at rank boundaries (time halos)."""
import numpy as np
import pytest
import torch

from parml.model import ModelSpec, StageSpec, build_model
from parml.multilevel.hierarchy import (IndexTransfers, block_mask, level_specs, ordered_parameters, prolongate,
                                        restrict_gradient, restrict_parameters)

torch.set_num_threads(1)


@pytest.mark.parametrize("interpolation", ["constant", "linear"])
def test_restriction_is_the_adjoint_of_prolongation(interpolation):
    g = torch.Generator().manual_seed(0)
    mask = [True, True, False]
    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    fine = [r(8, 3, 3), r(8, 3), r(2, 3)]
    coarse = [r(4, 3, 3), r(4, 3), r(2, 3)]
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stages", [((3, 8),), ((3, 8), (4, 4))])
def test_index_transfers_equal_the_list_operators(stages, dtype):
    """``IndexTransfers`` (the constant transfers as index maps on θ, one vector in
    ``ordered_parameters`` order) give bitwise the list operators' results, laid end to end: one
    stage, and two stages with a projection between them (block entries of two chunks first)."""
    spec = ModelSpec(2, 2, tuple(StageSpec(w, k) for w, k in stages))
    fine, coarse = (build_model(sp, seed=0, dtype=dtype) for sp in (spec, spec.coarsened(2)))
    mask = block_mask(coarse)
    assert mask == block_mask(fine) and mask.count(False) == len(mask) - 2 * len(stages)
    maps = IndexTransfers(ordered_parameters(coarse), mask)
    gen = torch.Generator().manual_seed(5)
    f = [torch.randn(p.shape, generator=gen, dtype=dtype) for p in ordered_parameters(fine)]
    c = [torch.randn(p.shape, generator=gen, dtype=dtype) for p in ordered_parameters(coarse)]

    def vector(ts):
        return torch.cat([t.reshape(-1) for t in ts]).numpy()
    for got, want in ((maps.restrict_gradient(vector(f)), restrict_gradient(f, mask)),
                      (maps.restrict_parameters(vector(f)), restrict_parameters(f, mask)),
                      (maps.prolongate(vector(c)), prolongate(c, mask))):
        assert got.dtype == vector(want).dtype and np.array_equal(got, vector(want))
