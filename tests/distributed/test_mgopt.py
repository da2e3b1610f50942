"""MG/OPT across ranks: V-cycle iterates on 2 and 4 ranks (gloo and mpirun), every level on all
ranks or the coarse levels gathered (movers) with time halos, against the independent reference
(tests/reference.py, Algorithm 1 with the plain-loop network) and parml's serial run; and the
coherence of eq. (9) observed at run time on 2 ranks (helpers in tests/unit/test_mgopt_reference.py).
"""
import functools
import math

import pytest
import torch

import reference
from cases import close, close_scalar
from multiproc import run_ranks
from parml.comm import SelfComm
from parml.config import TrainConfig
from parml.data import load_dataset
from parml.model import build_model
from parml.training.build import build_vcycle
from tests.unit import test_mgopt_reference as mgref

torch.set_num_threads(1)


# --- training: 20 GD steps and 5 MG/OPT V-cycles equal the reference -------------------------------

def _run_cycles(comm, levels, cycles, microbatches=1, schedule="1f1b", min_blocks_per_rank=1,
                interpolation="constant"):
    data = load_dataset("circles", seed=0, n_train=40, n_val=8, dtype=torch.float64)
    cfg = TrainConfig(blocks=32, width=3, levels=levels, dtype="float64", lr=0.1, beta=1e-3,
                      microbatches=microbatches, schedule=schedule, min_blocks_per_rank=min_blocks_per_rank,
                      interpolation=interpolation, progress=False)
    vcycle = build_vcycle(cfg, data, comm)
    losses = [vcycle((data.x_train, data.y_train)).loss for _ in range(cycles)]
    finest = vcycle.levels[-1].executor
    return losses, finest.gather_state(), vcycle.work_units, [p.ranks for p in vcycle.plans]


# CycleSetup.default(L) in the reference's terms: (pre, post) per level, finest first; coarsest steps
DEFAULT_SETUPS = {1: ((), 1), 2: (((1, 0),), 2), 3: (((1, 0), (1, 1)), 2), 4: (((1, 0), (1, 1), (2, 2)), 2)}


@functools.cache
def _reference_cycles(levels, cycles, interpolation="constant"):
    """The same run by the independent reference (Algorithm 1 from the paper, plain loop network)."""
    data = load_dataset("circles", seed=0, n_train=40, n_val=8, dtype=torch.float64)
    theta = dict(build_model(TrainConfig(blocks=32, width=3).spec_for(data), seed=0, dtype=torch.float64).state_dict())
    mg = reference.MGOPT(32, *DEFAULT_SETUPS[levels], interpolation, "l2", lr=0.1, beta=1e-3, activation="relu")
    batch, losses = (data.x_train, data.y_train), []
    for _ in range(cycles):
        losses.append(mg.loss(theta, batch))
        theta = mg.cycle(theta, batch)
    return losses, theta, mg.work


def _train_worker(comm, runs):
    return {key: _run_cycles(comm, *key) for key in runs}


# (levels, cycles, micro-batches, schedule, min blocks per rank[, interpolation]): min 1 keeps every
# level on all ranks; min 4 gathers the coarse levels of K = 32 onto fewer ranks (agglomeration);
# "linear" reads one row across every rank boundary (time halos)
RUNS = [(1, 20, 3, "1f1b", 1), (2, 5, 1, "gpipe", 1), (4, 5, 2, "1f1b", 1), (2, 5, 1, "1f1b", 16),
        (4, 5, 1, "gpipe", 4), (4, 5, 1, "gpipe", 1, "linear"), (3, 5, 2, "1f1b", 8, "linear")]


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("backend,nprocs", [("gloo", 2), ("gloo", 4), ("mpi", 2), ("mpi", 4)])
def test_training_iterates_equal_serial(backend, nprocs):
    """GD (L=1, 20 steps) and MG/OPT (L=2, 3, 4; 5 V-cycles) across ranks give the iterates of the
    independent reference and of parml's serial run (1e-9 per tensor)."""
    ranks = run_ranks("tests.distributed.test_mgopt:_train_worker", nprocs, backend, timeout=220,
                      args={"runs": RUNS})
    for key in RUNS:
        ref_losses, ref_state, ref_units, _ = _run_cycles(SelfComm(), *key)
        losses, state, units, level_ranks = ranks[0][key]
        want_losses, want_state, want_units = _reference_cycles(key[0], key[1], *key[5:])
        assert math.isclose(units, want_units, rel_tol=1e-14), (key, units, want_units)
        assert len(losses) == len(want_losses) == len(ref_losses) == key[1]
        for a, b, c in zip(losses, want_losses, ref_losses):
            close_scalar(a, b, 1e-9, f"{key} loss vs reference")
            close_scalar(a, c, 1e-9, f"{key} loss vs serial")
        assert state.keys() == want_state.keys() == ref_state.keys()
        for name in state:
            close(state[name], want_state[name], 1e-9, f"{key} {name} vs reference")
            close(state[name], ref_state[name], 1e-9, f"{key} {name} vs serial")
        assert units == ref_units
        if key[4] > 1 and key[0] > 1:
            assert level_ranks[0] < nprocs, level_ranks    # the coarsest level really was gathered
        for other in ranks[1:]:
            assert other[key][1] is None and other[key][0] == losses


# --- coherence (eq. 9) at run time on 2 ranks -----------------------------------------------------

# (K, cycle, interpolation, min blocks per rank): every level on both ranks (linear reads halos
# across the boundary), and the coarsest level gathered onto rank 0 (movers)
PARALLEL_RUNS = [(8, "[(1),1,{2}]", "constant", 1), (8, "[1,2,{2}]", "linear", 1),
                 (16, "[(1),1,{2}]", "linear", 4), (16, "[1,2,{2}]", "constant", 8)]


def _parallel_worker(comm, runs):
    return [mgref._observed_run(comm, K, cycle, interpolation=interp, min_blocks_per_rank=mb)
            for K, cycle, interp, mb in runs]


@pytest.mark.timeout(120)
def test_coherence_at_run_time_on_two_ranks():
    ranks = run_ranks("tests.distributed.test_mgopt:_parallel_worker", 2, "gloo", timeout=100,
                      args={"runs": PARALLEL_RUNS})
    d = mgref.data()
    batch = (d.x_train, d.y_train)
    for n, (K, cycle, interp, mb) in enumerate(PARALLEL_RUNS):
        runs = [r[n] for r in ranks]
        cfg = mgref.config(K, cycle, interpolation=interp, min_blocks_per_rank=mb)
        expected = {1: [2, 2, 2], 4: [1, 2, 2], 8: [1, 1, 2]}[mb]
        assert runs[0]["ranks"] == expected, runs[0]["ranks"]
        mgref._check_coherence(mgref._merge(runs), cfg, K, batch)
        mgref._check_iterates(runs[0], cfg, K, batch)
        # every rank reports the loss; work units are complete on rank 0 only (which holds every level)
        assert runs[1]["states"] == [None, None]
        assert [r[0] for r in runs[1]["results"]] == [r[0] for r in runs[0]["results"]]
