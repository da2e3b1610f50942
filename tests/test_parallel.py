"""Layer-parallel exactness: real processes (gloo and mpirun) against the serial model.

One launch per (backend, P) runs every schedule x micro-batch count x dtype inside, to keep the
suite fast; the test process recomputes everything serially with plain autograd and compares the
loss and every parameter's gradient on every rank.
"""
import functools
import math

import pytest
import torch

import reference
from multiproc import run_ranks
from parml.comm import SelfComm
from parml.config import TrainConfig
from parml.data import load_dataset
from parml.kernels import attach_kernels
from parml.model import ModelSpec, StageSpec, build_model
from parml.parallel.executor import LayerParallel
from parml.parallel.layout import describe_plan, partition_blocks, plan_levels
from parml.training.build import build_vcycle

torch.set_num_threads(1)

SPEC = ModelSpec(2, 3, (StageSpec(4, 6), StageSpec(5, 5)), T=1.0, activation="tanh")   # K = 11
BATCH = 13
# (schedule, micro-batches, dtype, weight gradients): deferred is the default, inline the ablation
CASES = ([(s, m, d, "deferred") for s in ("gpipe", "1f1b") for m in (1, 3, 4) for d in ("float64", "float32")]
         + [(s, 3, "float64", "inline") for s in ("gpipe", "1f1b")])


def _data(dtype):
    g = torch.Generator().manual_seed(5)
    return torch.randn(BATCH, 2, generator=g, dtype=dtype), torch.randint(0, 3, (BATCH,), generator=g)


def _local_grads(model):
    """Gradients keyed by global identity: ('block', stage, global step) rows or shared names."""
    out = {}
    for c in model.block_chunks():
        out[("chunk", c.stage, c.first)] = (c.weight.grad.clone(), c.bias.grad.clone())
    for name, p in model.named_parameters():
        if not name.startswith("chunks."):
            out[name] = p.grad.clone()
    return out


def _grads_worker(comm):
    results = {}
    for schedule, m, dtype, wg in CASES:
        dt = getattr(torch, dtype)
        lp = LayerParallel(build_model(SPEC, seed=2, dtype=dt), comm, schedule, m, weight_grads=wg)
        x, y = _data(dt)
        lp.forward_backward(x, y)               # twice: the second step reuses the deferred buffers
        loss = lp.forward_backward(x, y)
        val_loss, acc = lp.evaluate(x, y)
        results[(schedule, m, dtype, wg)] = (loss, val_loss, acc, _local_grads(lp.model), lp.partition.bounds)
    return results


def _serial(dtype):
    """The independent reference (tests/reference.py: a plain step-by-step loop, no fused chunk, no
    executor) in float64 from the `dtype` model's initial values: (loss, accuracy, gradients by name)."""
    params = {n: t.detach().to(torch.float64) for n, t in build_model(SPEC, seed=2, dtype=dtype).state_dict().items()}
    x, y = _data(dtype)                  # the same values as the run's (float32 draws differ from float64)
    x = x.to(torch.float64)
    kw = dict(T=SPEC.T, activation=SPEC.activation)
    loss, grads = reference.value_and_grad(params, x, y, **kw)
    with torch.no_grad():
        acc = float((reference.forward(params, x, **kw).argmax(1) == y).double().mean())
    return loss, acc, grads


def _close(got, want, rtol, what):
    """Per tensor: |got - want| <= rtol · max|want| (the README's relative tolerance)."""
    err, atol = float((got.to(want.dtype) - want).abs().max()), rtol * float(want.abs().max())
    assert err <= atol, f"{what}: max error {err:.3g} > {atol:.3g} = {rtol:g} · max|ref|"


def _check_rank_grads(grads, ref_grads, rtol):
    """Every gradient this rank holds against the reference; returns the (stage, block) rows covered."""
    rows = set()
    for key, g in grads.items():
        if isinstance(key, tuple):
            _, stage, first = key
            for field, t in zip(("weight", "bias"), g):
                _close(t, ref_grads[f"chunks.{stage}.{field}"][first:first + t.shape[0]], rtol,
                       f"stage {stage} blocks [{first}, {first + t.shape[0]}) {field}")
            rows |= {(stage, k) for k in range(first, first + g[0].shape[0])}
        else:
            _close(g, ref_grads[key], rtol, key)
    return rows


ALL_BLOCKS = {(s, k) for s, stage in enumerate(SPEC.stages) for k in range(stage.blocks)}


def _blocks_in(start, stop):
    """(stage, row) of the global blocks [start, stop)."""
    offsets = [sum(st.blocks for st in SPEC.stages[:s]) for s in range(len(SPEC.stages))]
    return {(s, k) for s, k in ALL_BLOCKS if start <= offsets[s] + k < stop}
RTOL = {"float64": 1e-10, "float32": 1e-5}


def test_fused_serial_model_equals_the_step_by_step_reference():
    """parml's serial model with the fused Euler chunks attached (autograd elsewhere) against the reference."""
    for dtype in ("float64", "float32"):
        model = build_model(SPEC, seed=2, dtype=getattr(torch, dtype))
        attach_kernels(model)
        x, y = _data(getattr(torch, dtype))
        loss = model.loss(model(x), y)
        loss.backward()
        ref_loss, _, ref_grads = _serial(getattr(torch, dtype))
        assert abs(float(loss) - ref_loss) <= RTOL[dtype] * abs(ref_loss)
        for name, p in model.named_parameters():
            _close(p.grad, ref_grads[name], RTOL[dtype], f"{dtype} {name}")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend,nprocs", [("gloo", 1), ("gloo", 2), ("gloo", 4), ("mpi", 1), ("mpi", 2), ("mpi", 4)])
def test_loss_and_every_gradient_equal_serial(backend, nprocs):
    ranks = run_ranks("tests.test_parallel:_grads_worker", nprocs, backend, timeout=150)
    serial = {d: _serial(getattr(torch, d)) for d in ("float64", "float32")}
    for case in CASES:
        dtype = case[2]
        ref_loss, ref_acc, ref_grads = serial[dtype]
        rtol = RTOL[dtype]
        covered, shared = [], set()
        for rank, res in enumerate(ranks):
            loss, val_loss, acc, grads, bounds = res[case]
            assert abs(loss - ref_loss) <= rtol * abs(ref_loss), (case, rank, loss, ref_loss)
            assert abs(val_loss - ref_loss) <= rtol * abs(ref_loss)
            assert acc == ref_acc
            rows = _check_rank_grads(grads, ref_grads, rtol)
            assert rows == _blocks_in(bounds[rank], bounds[rank + 1]), (case, rank, bounds, sorted(rows))
            covered += sorted(rows)
            shared |= {k for k in grads if isinstance(k, str)}
        # every block of every stage was compared on exactly one rank, every shared parameter somewhere
        assert len(covered) == len(ALL_BLOCKS) and set(covered) == ALL_BLOCKS, (case, covered)
        assert bounds[0] == 0 and bounds[-1] == SPEC.total_blocks and len(bounds) == nprocs + 1
        assert shared == {n for n in ref_grads if not n.startswith("chunks.")}


# --- training: 20 GD steps and 5 MG/OPT V-cycles equal the serial run -------------------------------

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


@pytest.mark.timeout(240)
@pytest.mark.parametrize("backend,nprocs", [("gloo", 2), ("gloo", 4), ("mpi", 2), ("mpi", 4)])
def test_training_iterates_equal_serial(backend, nprocs):
    """GD (L=1, 20 steps) and MG/OPT (L=2, 3, 4; 5 V-cycles) across ranks give the iterates of the
    independent reference (1e-9 per tensor) and of parml's serial run (1e-9)."""
    ranks = run_ranks("tests.test_parallel:_train_worker", nprocs, backend, timeout=220, args={"runs": RUNS})
    for key in RUNS:
        ref_losses, ref_state, ref_units, _ = _run_cycles(SelfComm(), *key)
        losses, state, units, level_ranks = ranks[0][key]
        want_losses, want_state, want_units = _reference_cycles(key[0], key[1], *key[5:])
        assert math.isclose(units, want_units, rel_tol=1e-14), (key, units, want_units)
        for a, b in zip(losses, want_losses, strict=True):
            assert abs(a - b) <= 1e-9 * abs(b), (key, losses, want_losses)
        assert state.keys() == want_state.keys()
        for name in state:
            _close(state[name], want_state[name], 1e-9, f"{key} {name}")
        assert units == ref_units
        if key[4] > 1 and key[0] > 1:
            assert level_ranks[0] < nprocs, level_ranks    # the coarsest level really was gathered
        for a, b in zip(losses, ref_losses):
            assert abs(a - b) <= 1e-9 * abs(b), (key, losses, ref_losses)
        assert state.keys() == ref_state.keys()
        for name in state:
            torch.testing.assert_close(state[name], ref_state[name], rtol=1e-9, atol=1e-12, msg=f"{key} {name}")
        for other in ranks[1:]:
            assert other[key][1] is None and other[key][0] == losses


def test_agglomeration_plan_for_2048_blocks_8_ranks_8_levels():
    blocks = [2048 // 2 ** i for i in range(7, -1, -1)]
    plans = plan_levels(blocks, 8, min_blocks_per_rank=64)
    assert [p.ranks for p in plans] == [1, 1, 1, 2, 4, 8, 8, 8]
    assert plans[-1].partition.bounds == tuple(range(0, 2049, 256))
    assert plans[3].partition.bounds == (0, 64, 128) and plans[4].partition.bounds == (0, 64, 128, 192, 256)
    text = describe_plan(plans)
    assert text.splitlines()[0] == "level 8: 2048 blocks on 8 rank(s), 256 blocks per rank"
    assert text.splitlines()[-1] == "level 1: 16 blocks on 1 rank(s), 16 blocks per rank"
    # every level on all ranks: the coarsest has 2 blocks per rank, chunks aligned by halving
    plans = plan_levels(blocks, 8, min_blocks_per_rank=1)
    assert [p.ranks for p in plans] == [8] * 8
    for coarse, fine in zip(plans, plans[1:]):
        assert fine.partition.bounds == tuple(2 * b for b in coarse.partition.bounds)
    # edge cases: a level with fewer blocks than ranks, and uneven chunks
    plans = plan_levels([1, 2, 4, 8], 4, min_blocks_per_rank=1)
    assert [p.ranks for p in plans] == [1, 1, 2, 4]
    assert plans[2].partition.bounds == (0, 2, 4) and plans[0].partition.bounds == (0, 1)
    plans = plan_levels([3, 6, 12], 5, min_blocks_per_rank=1)
    assert [p.ranks for p in plans] == [3, 3, 5]
    assert all(b % 2 == 0 for b in plans[2].partition.bounds)
    with pytest.raises(ValueError, match=r"more ranks \(5\) than the finest level can use"):
        plan_levels([2, 4, 8], 5)
    with pytest.raises(ValueError, match="--min-blocks-per-rank 0"):
        plan_levels([2, 4], 2, min_blocks_per_rank=0)


def test_partition_is_balanced_and_aligned():
    assert partition_blocks(11, 4).bounds == (0, 2, 5, 8, 11)
    p = partition_blocks(2048, 8, align=128)
    assert p.bounds == tuple(range(0, 2049, 256))
    assert p.coarsened(128).bounds == tuple(range(0, 17, 2))
    with pytest.raises(ValueError, match=r"more ranks \(5\) than blocks \(4\)"):
        partition_blocks(4, 5)
    with pytest.raises(ValueError, match="at most 2 ranks"):
        partition_blocks(16, 4, align=8)


def test_single_rank_layer_parallel_is_the_model():
    lp = LayerParallel(build_model(SPEC, seed=2, dtype=torch.float64), SelfComm(), "gpipe", 4)
    x, y = _data(torch.float64)
    loss = lp.forward_backward(x, y)
    ref_loss, _, ref_grads = _serial(torch.float64)
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
    assert _check_rank_grads(_local_grads(lp.model), ref_grads, 1e-10) == ALL_BLOCKS


def test_deferred_weight_gradients_leave_no_state_behind():
    """After a step the chunks route gradients through autograd again, and both modes agree."""
    x, y = _data(torch.float64)
    grads = {}
    for wg in ("deferred", "inline"):
        lp = LayerParallel(build_model(SPEC, seed=2, dtype=torch.float64), SelfComm(), "1f1b", 3, weight_grads=wg)
        lp.forward_backward(x, y)
        assert all(k.sink is None for k in lp.kernels)
        grads[wg] = _local_grads(lp.model)
        lp.model.zero_grad(set_to_none=True)
        lp.model.loss(lp.model(x), y).backward()          # plain autograd outside the executor
        for c in lp.model.block_chunks():
            torch.testing.assert_close(c.weight.grad, grads[wg][("chunk", c.stage, c.first)][0])
    for key, g in grads["deferred"].items():
        for a, b in zip(g if isinstance(g, tuple) else (g,), grads["inline"][key] if isinstance(g, tuple)
                        else (grads["inline"][key],)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert lp.stage.deferred is None
    with pytest.raises(ValueError, match="weight_grads must be one of deferred, inline"):
        LayerParallel(build_model(SPEC, seed=2), SelfComm(), "gpipe", 1, weight_grads="later")


@pytest.mark.parametrize("kernel, schedule, held_rows, adjoint_rows",
                         [("torch", "gpipe", BATCH, 4), ("torch", "1f1b", 4, 4),
                          ("fused", "gpipe", 4 * 32, 32), ("fused", "1f1b", 32, 32)])
def test_deferred_weight_gradients_keep_the_schedules_memory_bound(kernel, schedule, held_rows, adjoint_rows):
    """A micro-batch's stored states are released at its weight-gradient flush, right after its
    backward: one process with M = 4 (rows 4, 3, 3, 3) holds the states of every micro-batch under
    GPipe but of one at a time under 1F1B, plus one micro-batch's adjoints (4 rows) while it is
    backpropagated: (held rows + adjoint rows) x (6 blocks x width 4 + 5 blocks x width 5) x 8 bytes.
    The fused kernel stores whole tiles (32 samples at least), so each micro-batch holds 32 rows."""
    x, y = _data(torch.float64)
    lp = LayerParallel(build_model(SPEC, seed=2, dtype=torch.float64), SelfComm(), schedule, 4, kernel=kernel)
    for _ in range(2):                   # the second step runs on recycled buffers
        lp.forward_backward(x, y)
    assert lp.stage.deferred.peak_bytes == (held_rows + adjoint_rows) * (6 * 4 + 5 * 5) * 8
    _, _, ref_grads = _serial(torch.float64)
    assert _check_rank_grads(_local_grads(lp.model), ref_grads, 1e-10) == ALL_BLOCKS


def _host_staged_worker(comm):
    """The MPI staging path of CUDA tensors (copy into a pooled host buffer, send; receive into
    one, copy back at completion), forced on CPU tensors by PARML_MPI_STAGE_HOST=1."""
    assert comm.backend == "mpi" and comm.stage_host
    out = {}
    for schedule, m in (("1f1b", 3), ("gpipe", 4)):
        lp = LayerParallel(build_model(SPEC, seed=2, dtype=torch.float64), comm, schedule, m)
        x, y = _data(torch.float64)
        lp.forward_backward(x, y)
        buffers = comm._pinned.allocated
        loss = lp.forward_backward(x, y)
        out[schedule] = (loss, _local_grads(lp.model), comm._pinned.allocated - buffers)
    total = comm.allreduce(torch.tensor([float(comm.rank + 1)], dtype=torch.float64))
    root = comm.broadcast(torch.full((3,), float(comm.rank)), comm.size - 1)
    return out, float(total), root.tolist()


@pytest.mark.timeout(120)
def test_mpi_staging_path_is_exact_on_host_buffers():
    """What the GPU path adds to MPI, run without a GPU: exact gradients, buffers reused."""
    ranks = run_ranks("tests.test_parallel:_host_staged_worker", 2, "mpi", timeout=90,
                      env={"PARML_MPI_STAGE_HOST": "1"})
    ref_loss, _, ref_grads = _serial(torch.float64)
    for schedule in ("1f1b", "gpipe"):
        rows = set()
        for out, _, _ in ranks:
            loss, grads, new_buffers = out[schedule]
            assert abs(loss - ref_loss) <= 1e-10 * abs(ref_loss)
            rows |= _check_rank_grads(grads, ref_grads, 1e-10)
            assert new_buffers == 0                 # the second step ran on the first step's buffers
        assert rows == ALL_BLOCKS
    for _, total, root in ranks:
        assert total == 3.0 and root == [1.0, 1.0, 1.0]
