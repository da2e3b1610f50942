"""The cascade on growing rank groups (K = 8 on 1 rank -> 16 on 2 -> 32 with MG/OPT on 2) equals
the single-process run, over gloo and mpirun."""
import pytest
import torch

from cases import close, close_scalar
from multiproc import run_ranks
from parml.comm import SelfComm
from parml.config import TrainConfig
from parml.data import load_dataset
from parml.training.trainer import train

torch.set_num_threads(1)


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
    ranks = run_ranks("tests.distributed.test_cascade:_cascade_worker", 2, backend, timeout=180,
                      args={"out": str(tmp_path)})
    ref_loss, ref_units, ref_state = _cascade_worker(SelfComm(), str(tmp_path))
    loss, units, state = ranks[0]
    close_scalar(loss, ref_loss, 1e-9, "final loss")
    assert abs(units - ref_units) < 1e-12 and abs(ref_units - (4 * 8 / 32 + 4 * 16 / 32 + 3 * 3.0)) < 1e-12
    assert state.keys() == ref_state.keys()
    for name in ref_state:
        close(state[name], ref_state[name], 1e-9, name)
