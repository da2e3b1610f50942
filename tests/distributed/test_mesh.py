"""The data x layer mesh: loss and every gradient equal the serial model on every (D, P) shape.

(D, P) in {(2,1), (1,2), (2,2), (4,1), (2,4)} on gloo and MPI (real processes, 8 oversubscribed
for (2,4); launched by ``test_mesh_training`` together with the V-cycles, one launch per world size)
and on the NCCL-semantics model communicator (``tests/nccl_model.py``: tag-blind FIFO
streams, per-pair and per-rank, buffered and rendezvous), both schedules, M = 1 and 3, float64 and
float32, against the independent reference (``tests/reference.py``; atol = rtol * max|ref| per
tensor). The batch of 13 splits unevenly over replicas (7/6, 4/3/3/3) and micro-batches.
"""
import pytest
import torch

import reference
from cases import local_grads
from nccl_model import run_model
from parml.comm import SelfComm
from parml.model import ModelSpec, StageSpec, build_model
from parml.multilevel.mgopt import Level, level_optimizer
from parml.parallel.executor import LayerParallel
from parml.parallel.layout import batch_share, plan_mesh
from parml.parallel.mesh import MeshGroups
from parml.parallel.replicas import GradientReducer

torch.set_num_threads(1)

SPEC = ModelSpec(2, 3, (StageSpec(4, 6), StageSpec(5, 5)), T=1.0, activation="tanh")   # K = 11
BATCH = 13
SHAPES = {2: [(2, 1), (1, 2)], 4: [(2, 2), (4, 1)], 8: [(2, 4)]}
CASES = [(s, m, d) for s in ("gpipe", "1f1b") for m in (1, 3) for d in ("float64", "float32")]
RTOL = {"float64": 1e-10, "float32": 1e-5}
ALL_BLOCKS = {(s, k) for s, st in enumerate(SPEC.stages) for k in range(st.blocks)}
SHARED = {"opening.weight", "projections.1.weight", "head.weight", "head.bias"}


def _data(dtype):
    g = torch.Generator().manual_seed(5)
    return torch.randn(BATCH, 2, generator=g, dtype=dtype), torch.randint(0, 3, (BATCH,), generator=g)


def grads_worker(comm, shapes=None, kernel="auto"):
    """Every case on every (D, P) of this world size; gradient buckets of 64 bytes under GPipe
    (many all-reduces per step), the default (one per step) under 1F1B. `kernel`: ``--kernel``."""
    results = {}
    for D, P in shapes or SHAPES[comm.size]:
        layout = plan_mesh([SPEC.total_blocks], comm.size, D).levels[-1]
        layer, data = MeshGroups(comm).of(layout)
        for schedule, m, dtype in CASES:
            dt = getattr(torch, dtype)
            lp = LayerParallel(build_model(SPEC, seed=2, dtype=dt), layer, schedule, m, layout.partition,
                               data=data, world_rank=comm.rank, kernel=kernel)
            if kernel != "auto":
                assert {k.name for k in lp.kernels} == {kernel}, (kernel, [k.name for k in lp.kernels])
            if lp.reducer is not None and schedule == "gpipe":
                lp.reducer.bucket_bytes = 64
            x, y = _data(dt)
            lp.forward_backward(x, y)            # twice: the second step reuses buffers and groups
            loss = lp.forward_backward(x, y)
            val_loss, acc = lp.evaluate(x, y)
            buckets = lp.reducer.buckets if lp.reducer is not None else 0
            results[(D, P, schedule, m, dtype)] = (loss, val_loss, acc, local_grads(lp.model),
                                                   layout.position(comm.rank), lp.partition.bounds, buckets)
    return results


def serial(dtype):
    """(loss, accuracy, gradients by name) of the independent reference, in float64 from the
    `dtype` model's initial values and data."""
    params = {n: t.detach().to(torch.float64)
              for n, t in build_model(SPEC, seed=2, dtype=getattr(torch, dtype)).state_dict().items()}
    x, y = _data(getattr(torch, dtype))
    kw = dict(T=SPEC.T, activation=SPEC.activation)
    loss, grads = reference.value_and_grad(params, x.to(torch.float64), y, **kw)
    with torch.no_grad():
        acc = float((reference.forward(params, x.to(torch.float64), **kw).argmax(1) == y).double().mean())
    return loss, acc, grads


def close(got, want, rtol, what):
    err, atol = float((got.to(want.dtype) - want).abs().max()), rtol * float(want.abs().max())
    assert err <= atol, f"{what}: max error {err:.3g} > {atol:.3g} = {rtol:g} * max|ref|"


def check_mesh_results(ranks, world):
    """Every rank's loss, evaluation and gradients against the reference; every replica covers
    every block once and every shared parameter."""
    ref = {d: serial(d) for d in RTOL}
    for D, P in SHAPES[world]:
        for schedule, m, dtype in CASES:
            ref_loss, ref_acc, ref_grads = ref[dtype]
            rtol = RTOL[dtype]
            covered = {d: [] for d in range(D)}
            shared = {d: set() for d in range(D)}
            for rank, res in enumerate(ranks):
                loss, val_loss, acc, grads, (d, j), bounds, buckets = res[(D, P, schedule, m, dtype)]
                what = f"(D, P) = ({D}, {P}) {schedule} M={m} {dtype} rank {rank}"
                assert (d, j) == divmod(rank, P), what                     # world rank = d * P + j
                assert abs(loss - ref_loss) <= rtol * abs(ref_loss), (what, loss, ref_loss)
                assert abs(val_loss - ref_loss) <= rtol * abs(ref_loss), what
                assert acc == ref_acc, what
                assert (buckets > 1) == (D > 1 and schedule == "gpipe"), (what, buckets)
                for key, g in grads.items():
                    if isinstance(key, str):
                        close(g, ref_grads[key], rtol, f"{what} {key}")
                        shared[d].add(key)
                        continue
                    _, stage, first = key
                    for field, t in zip(("weight", "bias"), g):
                        close(t, ref_grads[f"chunks.{stage}.{field}"][first:first + t.shape[0]], rtol,
                              f"{what} stage {stage} rows {first}+{t.shape[0]} {field}")
                    covered[d] += [(stage, k) for k in range(first, first + g[0].shape[0])]
            for d in range(D):
                assert sorted(covered[d]) == sorted(ALL_BLOCKS) and shared[d] == SHARED, (D, P, d)


def test_batch_shares_are_tensor_split():
    for rows in (1, 7, 13, 2000):
        for replicas in (1, 2, 3, 4, 8):
            parts = torch.arange(rows).tensor_split(replicas)
            for d, part in enumerate(parts):
                a, b = batch_share(rows, replicas, d)
                assert part.tolist() == list(range(a, b))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world,transfer,streams", [(2, "rendezvous", "rank"), (4, "buffered", "pair"),
                                                    (4, "rendezvous", "rank"), (8, "rendezvous", "pair"),
                                                    (8, "buffered", "rank")])
def test_mesh_under_nccl_semantics(world, transfer, streams):
    """The gradient all-reduces run on the data group, the pipeline on the layer group's direction
    groups: with per-rank streams (collectives and point-to-point of a communicator on one stream)
    and rendezvous sends nothing can wait on the other (a deadlock would be a CommTimeout here)."""
    ranks = run_model(grads_worker, world, transfer=transfer, streams=streams, timeout=60)
    check_mesh_results(ranks, world)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kernel", ["torch", "fused"])
def test_mesh_kernels_equal_the_reference(kernel):
    """``--kernel torch`` and ``fused`` (the numba chunk kernel, its weight gradients through the
    deferred sink) on (D, P) = (2, 1) and (1, 2): loss and every gradient equal the reference."""
    ranks = run_model(grads_worker, 2, transfer="rendezvous", streams="rank", timeout=120, kernel=kernel)
    check_mesh_results(ranks, 2)


def _level_worker(comm, dtype):
    """One ``Level.gradient`` on each (D, P) of this world: its objective (data loss + Tikhonov) and
    the collectives this rank posted on its layer group and on its data group meanwhile."""
    out = {}
    for D, P in SHAPES[comm.size]:
        layout = plan_mesh([SPEC.total_blocks], comm.size, D).levels[-1]
        layer, data = MeshGroups(comm).of(layout)
        lp = LayerParallel(build_model(SPEC, seed=2, dtype=dtype), layer, "1f1b", 3, layout.partition,
                           data=data, world_rank=comm.rank)
        level = Level(lp, 0.25, 0.5, "euclidean", 1.0, level_optimizer("sgd", 0.1))
        groups = {"layer": layer, "data": data}
        before = {k: g._group.coll_count[g.rank] for k, g in groups.items() if g is not None}
        loss, _ = level.gradient(_data(dtype), 0)
        out[(D, P)] = (loss, {k: groups[k]._group.coll_count[groups[k].rank] - n for k, n in before.items()})
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_level_gradient_is_one_collective_per_group(world, dtype):
    """The last rank's loss rides in the data group's gradient bucket, and the Tikhonov term and
    non-finite flag in the layer group's all-reduce that brings the loss from the last rank: one
    collective per group and gradient (a broadcast and two all-reduces more before), and the
    objective of the serial level (float32: the loss summed in the bucket's dtype)."""
    dt = getattr(torch, dtype)
    ranks = run_model(_level_worker, world, dt, transfer="rendezvous", streams="rank", timeout=60)
    serial_level = Level(LayerParallel(build_model(SPEC, seed=2, dtype=dt), SelfComm()), 0.25, 0.5,
                         "euclidean", 1.0, level_optimizer("sgd", 0.1))
    want, _ = serial_level.gradient(_data(dt), 0)
    for D, P in SHAPES[world]:
        for rank, res in enumerate(ranks):
            loss, posted = res[(D, P)]
            assert loss == pytest.approx(want, rel=RTOL[dtype]), (D, P, rank)
            assert posted.get("layer", 0) == (1 if P > 1 else 0), (D, P, rank, posted)
            assert posted.get("data", 0) == (1 if D > 1 else 0), (D, P, rank, posted)


def _reducer_worker(comm, bucket_bytes):
    params = [torch.nn.Parameter(torch.zeros(n, dtype=torch.float32)) for n in (3, 2)]
    for k, p in enumerate(params):
        p.grad = torch.full_like(p, float(comm.rank + 1 + k))
    loss = torch.tensor(0.1 * (comm.rank + 1) + 1e-9, dtype=torch.float64)     # not a float32 number
    reducer = GradientReducer(comm, bucket_bytes)
    reducer.begin()
    reducer.ready(params[:1])
    reducer.flush(params, extra=loss)
    reducer.wait()
    return [p.grad.tolist() for p in params], float(loss), reducer.buckets


@pytest.mark.parametrize("bucket_bytes,buckets", [(1 << 20, 1), (1, 3)])
def test_the_reducer_sums_the_extra_value_with_the_last_bucket(bucket_bytes, buckets):
    """The loss rides in the last open bucket, in that bucket's dtype (float32 here); when every
    gradient's bucket has started already, it goes alone, in its own dtype."""
    ranks = run_model(_reducer_worker, 2, bucket_bytes, transfer="rendezvous", streams="rank", timeout=30)
    for grads, loss, n in ranks:
        assert grads == [[3.0] * 3, [5.0] * 2] and n == buckets
        parts = [torch.tensor(0.1 * r + 1e-9, dtype=torch.float64) for r in (1, 2)]
        want = float(sum(parts)) if buckets == 3 else float(sum(t.float() for t in parts))
        assert loss == pytest.approx(want, rel=1e-15, abs=0), (loss, want)
