"""Multilevel initialization: prolongation accuracy, Chang's saving formula, parallel = serial."""
import pytest
import torch

from multiproc import run_ranks
from parml.multilevel.cascade import cascade_depths, theoretical_saving
from parml.comm import SelfComm
from parml.config import TrainConfig
from parml.data import load_dataset
from parml.multilevel.hierarchy import prolongate_model
from parml.model import ModelSpec, StageSpec, build_model
from parml.training.trainer import train

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


def _cascade_cfg(out):
    return TrainConfig(blocks=32, width=3, levels=2, dtype="float64", lr=0.1, beta=1e-3, cascade=2,
                       cascade_cycles=4, max_cycles=3, min_blocks_per_rank=8, progress=False,
                       target_accuracy=None, out=out, run_name="c")


def _cascade_worker(comm, out):
    data = load_dataset("circles", seed=0, n_train=40, n_val=8, dtype=torch.float64)
    summary = train(_cascade_cfg(out + f"/{comm.size}-{comm.rank}"), comm, data)
    return summary["final_loss"], summary["work_units"], summary["levels"][-1].executor.gather_state()


@pytest.mark.timeout(200)
@pytest.mark.parametrize("backend", ["gloo", "mpi"])
def test_cascade_on_growing_rank_groups_equals_serial(backend, tmp_path):
    """K = 8 on 1 rank -> 16 on 2 ranks -> 32 with 2-level MG/OPT on 2 ranks, versus one process."""
    ranks = run_ranks("tests.test_cascade:_cascade_worker", 2, backend, timeout=180, args={"out": str(tmp_path)})
    ref_loss, ref_units, ref_state = _cascade_worker(SelfComm(), str(tmp_path))
    loss, units, state = ranks[0]
    assert abs(loss - ref_loss) <= 1e-9 * abs(ref_loss)
    assert abs(units - ref_units) < 1e-12 and abs(ref_units - (4 * 8 / 32 + 4 * 16 / 32 + 3 * 3.0)) < 1e-12
    for name in ref_state:
        torch.testing.assert_close(state[name], ref_state[name], rtol=1e-9, atol=1e-12)
