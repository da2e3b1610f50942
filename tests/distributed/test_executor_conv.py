"""Convolutional ODE ResNets across ranks: loss and every gradient (Euler and RK2, both schedules,
M = 1, 3) per tensor against plain autograd of the serial network, every block of every stage
covered by the ranks' ranges, and 3 MG/OPT V-cycles across ranks equal to the serial run
(float64). The network: tests/cases.py; its shapes and transfers: tests/unit/test_model_conv.py.
"""
import dataclasses

import pytest
import torch

from cases import (CONV_SPECS, SHAPE, check_coverage, check_rank_grads, close, close_scalar, conv_data, conv_serial,
                   conv_spec, local_grads)
from multiproc import run_ranks
from parml.comm import SelfComm
from parml.config import TrainConfig
from parml.data import Dataset, load_dataset
from parml.model import build_model
from parml.parallel.executor import LayerParallel
from parml.training.build import build_vcycle

torch.set_num_threads(1)

CASES = [(n, s, m) for n in CONV_SPECS for s in ("gpipe", "1f1b") for m in (1, 3)]
RTOL = 1e-10


class ConvConfig(TrainConfig):
    """TrainConfig whose network is the conv test network (what ``--arch conv`` would build)."""

    def model_spec(self, in_features, out_features, task, input_shape=None):
        return dataclasses.replace(conv_spec(self.stepper, blocks=(2, 4, 2)), in_features=in_features,
                                   out_features=out_features, task=task)


def _conv_dataset():
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
        cfg, data = ConvConfig(blocks=8, width=3, **common), _conv_dataset()
    else:
        cfg = TrainConfig(blocks=16, width=3, **common)
        data = load_dataset("circles", seed=0, n_train=40, n_val=8, dtype=torch.float64)
    vcycle = build_vcycle(cfg, data, comm)
    losses = [vcycle((data.x_train, data.y_train)).loss for _ in range(3)]
    return losses, vcycle.levels[-1].executor.gather_state(), [p.ranks for p in vcycle.plans]


def _worker(comm, mgopt=False):
    results = {}
    for name, schedule, m in CASES:
        lp = LayerParallel(build_model(CONV_SPECS[name], seed=2, dtype=torch.float64), comm, schedule, m)
        x, y = conv_data()
        loss = lp.forward_backward(x, y)
        val_loss, acc = lp.evaluate(x, y)
        results[(name, schedule, m)] = (loss, val_loss, acc, local_grads(lp.model), lp.partition.bounds)
    if mgopt:
        results["mgopt"] = {key: _run_mgopt(comm, *key) for key in _mgopt_runs()}
    return results


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend,nprocs", [("gloo", 1), ("gloo", 2), ("gloo", 4), ("mpi", 2)])
def test_conv_loss_gradients_and_mgopt_equal_serial(backend, nprocs):
    mgopt = nprocs == 2
    ranks = run_ranks("tests.distributed.test_executor_conv:_worker", nprocs, backend, timeout=280,
                      args={"mgopt": mgopt})
    serial = {n: conv_serial(n) for n in CONV_SPECS}
    for case in CASES:
        ref_loss, ref_acc, ref_grads = serial[case[0]]
        rows, shared = [], set()
        for rank, res in enumerate(ranks):
            loss, val_loss, acc, grads, bounds = res[case]
            close_scalar(loss, ref_loss, RTOL, f"{case} rank {rank} loss")
            close_scalar(val_loss, ref_loss, RTOL, f"{case} rank {rank} evaluate")
            assert acc == ref_acc
            rows.append(check_rank_grads(grads, ref_grads, RTOL))
            shared |= {k for k in grads if isinstance(k, str)}
        check_coverage(CONV_SPECS[case[0]], rows, bounds)
        assert shared == {n for n in ref_grads if not n.startswith("chunks.")}, (case, shared)
    if not mgopt:
        return
    for key in _mgopt_runs():
        ref_losses, ref_state, _ = _run_mgopt(SelfComm(), *key)
        losses, state, level_ranks = ranks[0]["mgopt"][key]
        if key[2] > 1:
            assert level_ranks == [1, 2], level_ranks      # the coarse level really was gathered
        assert len(losses) == len(ref_losses) == 3
        for a, b in zip(losses, ref_losses):
            close_scalar(a, b, 1e-9, f"{key} loss")
        assert state.keys() == ref_state.keys()
        for name in state:
            close(state[name], ref_state[name], 1e-9, f"{key} {name}")
        assert ranks[1]["mgopt"][key][1] is None and ranks[1]["mgopt"][key][0] == losses

