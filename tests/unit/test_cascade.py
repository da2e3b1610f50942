"""Multilevel initialization (Chang et al.): prolongation accuracy, the saving formula and depths.
On growing rank groups: tests/distributed/test_cascade.py."""
import pytest
import torch

from parml.multilevel.cascade import cascade_depths, theoretical_saving
from parml.multilevel.hierarchy import prolongate_model
from parml.model import ModelSpec, StageSpec, build_model

torch.set_num_threads(1)


@pytest.mark.parametrize("interpolation", ["constant", "linear"])
def test_prolongated_network_matches_the_coarse_one_to_first_order(interpolation):
    """Copying each block and halving h changes the output by O(h): the gap halves as K doubles."""
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gaps = []
    base = build_model(ModelSpec(2, 2, (StageSpec(4, 1),), T=2.0, activation="tanh"), seed=1, dtype=torch.float64)
    for k in (16, 32, 64, 128):
        spec = ModelSpec(2, 2, (StageSpec(4, k),), T=2.0, activation="tanh")
        coarse = build_model(spec, seed=1, dtype=torch.float64)
        with torch.no_grad():                      # a smooth-in-time control, so linear is meaningful
            t = torch.arange(k, dtype=torch.float64)[:, None, None] / k
            coarse.chunks[0].weight.copy_(torch.sin(3 * t) * base.chunks[0].weight * 3)
            coarse.chunks[0].bias.copy_(torch.cos(2 * t[:, 0]) * 0.5)
            for name in ("opening", "head"):
                getattr(coarse, name).load_state_dict(getattr(base, name).state_dict())
        fine = build_model(ModelSpec(2, 2, (StageSpec(4, 2 * k),), T=2.0, activation="tanh"), seed=9,
                           dtype=torch.float64)
        prolongate_model(coarse, fine, interpolation)
        with torch.no_grad():
            gaps.append(float((fine(x) - coarse(x)).abs().max()))
    ratios = [a / b for a, b in zip(gaps, gaps[1:])]
    assert all(1.6 < r < 2.6 for r in ratios), (gaps, ratios)


def test_chang_saving_formula_and_depths():
    assert [round(theoretical_saving(k), 4) for k in (1, 2, 3, 4)] == [0.25, 0.4167, 0.5312, 0.6125]
    assert cascade_depths(2048, 2) == [512, 1024]
    assert cascade_depths(64, 0) == []
