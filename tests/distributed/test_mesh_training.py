"""MG/OPT, the cascade and checkpoints on the data x layer mesh.

5 V-cycles with ``--coarse-layout gather``, ``replicate`` and ``redundant`` on (D, P) in {(2,1), (1,2), (2,2), (4,1),
(2,4)} give the iterates of the independent reference (``tests/reference.py``: Algorithm 1 with GD,
a plain loop network) to 1e-9 (float64), on gloo, MPI and the NCCL-semantics model; a run
checkpointed on (2,2) resumes on (1,2), then on (4,1), and ends where one uninterrupted process
does; the cascade on a mesh equals the serial cascade; bad meshes are one line and exit 2 before
any process group exists.
"""
import functools
import json
import os
import subprocess
import sys

import pytest
import torch

import reference
from multiproc import REPO_ROOT, base_env, run_ranks
from nccl_model import run_model
from parml.comm import SelfComm
from parml.config import TrainConfig
from parml.data import load_dataset
from parml.model import build_model
from parml.training.build import build_vcycle
from parml.training.trainer import train
from tests.distributed.test_mesh import check_mesh_results, grads_worker

torch.set_num_threads(1)

# (D, P, levels, micro-batches, schedule, min blocks per rank, coarse layout, interpolation); K = 32:
# min 8 on P = 2 puts the coarsest 8 blocks on 1 layer rank (gathered: P - 1 ranks of each replica
# wait; replicated: D * P replicas); min 4 on P = 4 puts it on 2 layer ranks (x 2 or x 4 replicas).
# Redundant: min 32 on P = 1 runs levels 1-2 on the whole batch in every replica; min 8 on P = 2 and
# min 4 on P = 4 run the coarsest level so, on 1 and 2 layer ranks.
RUNS = {
    2: [(2, 1, 3, 2, "1f1b", 8, "gather", "constant"), (1, 2, 3, 1, "gpipe", 8, "gather", "linear"),
        (1, 2, 3, 2, "1f1b", 8, "replicate", "constant"), (1, 2, 2, 1, "1f1b", 8, "replicate", "linear"),
        (2, 1, 3, 1, "1f1b", 32, "redundant", "linear")],
    4: [(2, 2, 3, 1, "1f1b", 8, "gather", "linear"), (2, 2, 3, 2, "gpipe", 8, "replicate", "constant"),
        (4, 1, 3, 1, "1f1b", 8, "replicate", "constant"), (2, 2, 3, 2, "1f1b", 8, "redundant", "constant")],
    8: [(2, 4, 3, 1, "1f1b", 4, "gather", "constant"), (2, 4, 3, 2, "gpipe", 4, "replicate", "linear"),
        (2, 4, 3, 1, "gpipe", 4, "redundant", "linear")],
}
SETUPS = {2: (((1, 0),), 2), 3: (((1, 0), (1, 1)), 2)}    # CycleSetup.default(L) in the reference's terms
CYCLES = 5


def _data():
    return load_dataset("circles", seed=0, n_train=40, n_val=8, dtype=torch.float64)


def _cfg(D, levels, m, schedule, mbpr, layout, interpolation, **kw):
    return TrainConfig(blocks=32, width=3, levels=levels, dtype="float64", lr=0.1, beta=1e-3, microbatches=m,
                       schedule=schedule, min_blocks_per_rank=mbpr, interpolation=interpolation,
                       data_parallel=D, coarse_layout=layout, progress=False, **kw)


def run_cycles(comm, key):
    D, P, levels, m, schedule, mbpr, layout, interpolation = key
    data = _data()
    vcycle = build_vcycle(_cfg(D, levels, m, schedule, mbpr, layout, interpolation), data, comm)
    losses = [vcycle((data.x_train, data.y_train)).loss for _ in range(CYCLES)]
    # per level: layer ranks, replicas, redundant, and whether this rank sums gradients over replicas
    shape = [(lv.ranks, lv.replicas, lv.redundant, lev is not None and lev.executor.data is not None)
             for lv, lev in zip(vcycle.plans, vcycle.levels)]
    val = vcycle.levels[-1].executor.evaluate(data.x_val, data.y_val)
    return losses, vcycle.levels[-1].executor.gather_state(), vcycle.work_units, shape, val


def cycles_worker(comm):
    return {key: run_cycles(comm, key) for key in RUNS[comm.size]}


@functools.cache
def reference_cycles(levels, interpolation):
    data = _data()
    theta = dict(build_model(TrainConfig(blocks=32, width=3).spec_for(data), seed=0, dtype=torch.float64)
                 .state_dict())
    mg = reference.MGOPT(32, *SETUPS[levels], interpolation, "l2", lr=0.1, beta=1e-3, activation="relu")
    batch, losses = (data.x_train, data.y_train), []
    for _ in range(CYCLES):
        losses.append(mg.loss(theta, batch))
        theta = mg.cycle(theta, batch)
    return losses, theta, mg.work


def close(got, want, rtol, what):
    err, atol = float((got - want).abs().max()), rtol * float(want.abs().max())
    assert err <= atol, f"{what}: max error {err:.3g} > {atol:.3g}"


def check_cycles(ranks, world):
    serial = {}
    for key in RUNS[world]:
        D, P, levels, _, _, _, layout, interpolation = key
        want_losses, want_state, want_units = reference_cycles(levels, interpolation)
        losses, state, units, shape, val = ranks[0][key]
        assert abs(units - want_units) <= 1e-12 * want_units, (key, units, want_units)
        for a, b in zip(losses, want_losses, strict=True):
            assert abs(a - b) <= 1e-9 * abs(b), (key, losses, want_losses)
        assert state.keys() == want_state.keys()
        for name in state:
            close(state[name], want_state[name], 1e-9, f"{key} {name}")
        coarse_ranks, coarse_replicas, _, _ = shape[0]
        if P > 1 and levels > 2:
            assert coarse_ranks < P, shape                     # the coarsest level really moved
            assert coarse_replicas == (D * P // coarse_ranks if layout != "gather" else D), shape
        # redundant: the coarse levels run on every replica (the finest never); no other layout has them
        assert [lv[2] for lv in shape] == ([True, P == 1, False] if layout == "redundant" else [False] * levels), \
            shape
        assert [lv[3] for lv in shape] == [lv[1] > 1 and not lv[2] for lv in shape], shape   # rank 0: who sums
        if key[2:] not in serial:
            serial[key[2:]] = run_cycles(SelfComm(), (1, 1) + key[2:])[4]
        for r, other in enumerate(ranks):
            assert other[key][0] == losses, (key, r)             # every rank knows the loss
            assert (other[key][1] is None) == (r > 0), (key, r)
            close(torch.tensor(other[key][4][0]), torch.tensor(serial[key[2:]][0]), 1e-9, f"{key} val loss")
            assert other[key][4][1] == serial[key[2:]][1]


SUB_LAUNCHES = {8: ([0, 1], [2, 3, 4, 5]), 4: ([0, 1],)}


def mesh_worker(comm):
    """On 8 ranks: the world-2 shapes on ranks 0-1 while the world-4 shapes run on ranks 2-5 (two
    sub-communicators standing for their own launches), then the world-8 shape on everyone; on 4
    ranks the world-2 shapes on ranks 0-1, then the world-4 shapes."""
    out = {}
    for sub in [comm.split(group) for group in SUB_LAUNCHES[comm.size]]:   # collective: every rank makes all
        if sub is not None:
            out[sub.size] = (sub.rank, {"grads": grads_worker(sub), "cycles": cycles_worker(sub)})
    out[comm.size] = (comm.rank, {"grads": grads_worker(comm), "cycles": cycles_worker(comm)})
    return out


@pytest.mark.timeout(400)
@pytest.mark.parametrize("backend,nprocs", [("gloo", 8), ("mpi", 4)])
def test_mesh_gradients_and_vcycles_equal_the_reference(backend, nprocs):
    """Every (D, P) of world sizes 2, 4 and 8 in one launch of 8 gloo ranks (those of 2 and 4 in one
    launch of 4 MPI ranks; the mesh code above the communicator is the same): loss and gradients
    (``test_mesh``) and 5 V-cycles with gathered and replicated coarse levels."""
    ranks = run_ranks("tests.distributed.test_mesh_training:mesh_worker", nprocs, backend, timeout=380)
    for world in [w for w in (2, 4, 8) if w <= nprocs]:
        results = dict(r[world] for r in ranks if world in r)
        assert sorted(results) == list(range(world))
        check_mesh_results([results[i]["grads"] for i in range(world)], world)
        check_cycles([results[i]["cycles"] for i in range(world)], world)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world,transfer,streams", [(2, "rendezvous", "rank"), (4, "rendezvous", "pair"),
                                                    (4, "buffered", "rank"), (8, "rendezvous", "rank")])
def test_vcycles_on_the_mesh_under_nccl_semantics(world, transfer, streams):
    check_cycles(run_model(cycles_worker, world, transfer=transfer, streams=streams, timeout=60), world)


# --- checkpoints across mesh shapes, and the cascade -------------------------------------------------

def _resume_cfg(folder, D, max_cycles, layout):
    base = dict(levels=3, blocks=32, width=3, dtype="float64", lr=0.05, beta=1e-3, optimizer="adam",
                min_blocks_per_rank=16, target_accuracy=None, progress=False, eval_every=1)
    if not os.path.exists(os.path.join(folder, "checkpoints")):
        return TrainConfig(**base, data_parallel=D, coarse_layout=layout, max_cycles=max_cycles,
                           checkpoint_every=2, out=os.path.dirname(folder), run_name=os.path.basename(folder))
    return TrainConfig.resume_run(folder, {"data_parallel": D, "coarse_layout": layout, "max_cycles": max_cycles})


def resume_worker(comm, folder, D, max_cycles, layout):
    summary = train(_resume_cfg(folder, D, max_cycles, layout), comm, _data())
    return summary["final_loss"], summary["levels"][-1].executor.gather_state(), summary["work_units"]


def _losses(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [row["loss"] for row in map(json.loads, f) if row.get("phase") == "train"]


@pytest.mark.timeout(300)
def test_checkpoints_resume_across_mesh_shapes(tmp_path):
    """(D, P) = (2, 2) replicated -> (1, 2) gathered -> (4, 1) with a redundant coarsest level, 2 Adam
    V-cycles each (the level optimizers' moments re-cut by position), versus 6 cycles on one process."""
    whole = resume_worker(SelfComm(), str(tmp_path / "whole"), 1, 6, "gather")
    folder = str(tmp_path / "cut")
    for world, D, cycles, layout in ((4, 2, 2, "replicate"), (2, 1, 4, "gather"), (4, 4, 6, "redundant")):
        ranks = run_ranks("tests.distributed.test_mesh_training:resume_worker", world, "gloo", timeout=120,
                          args={"folder": folder, "D": D, "max_cycles": cycles, "layout": layout})
    loss, state, units = ranks[0]
    assert abs(units - whole[2]) <= 1e-12 * whole[2]
    assert abs(loss - whole[0]) <= 1e-9 * abs(whole[0])
    for name in whole[1]:
        close(state[name], whole[1][name], 1e-9, name)
    want, got = _losses(str(tmp_path / "whole")), _losses(folder)
    assert len(got) == len(want) == 6
    for a, b in zip(got, want):
        assert abs(a - b) <= 1e-9 * abs(b), (got, want)
    manifest = json.load(open(os.path.join(folder, "checkpoints", "cycle-000006", "manifest.json")))
    assert sorted(manifest["files"]) == ["rank0.pt"]       # (4, 1): replica 0 alone writes, redundant levels too


def cascade_worker(comm, out, D, layout):
    data = _data()
    cfg = TrainConfig(blocks=32, width=3, levels=2, dtype="float64", lr=0.1, beta=1e-3, cascade=2, cascade_cycles=4,
                      max_cycles=3, min_blocks_per_rank=8, progress=False, target_accuracy=None, out=out,
                      run_name=f"c{comm.size}-{comm.rank}", data_parallel=D, coarse_layout=layout)
    summary = train(cfg, comm, data)
    return summary["final_loss"], summary["work_units"], summary["levels"][-1].executor.gather_state()


@pytest.mark.timeout(200)
@pytest.mark.parametrize("D,layout", [(2, "gather"), (2, "replicate"), (2, "redundant")])
def test_cascade_on_the_mesh_equals_serial(tmp_path, D, layout):
    """K = 8 on 1 layer rank -> 16 on 2 -> 32 with 2-level MG/OPT, on a 2 x 2 mesh."""
    ranks = run_model(cascade_worker, 4, str(tmp_path), D, layout, transfer="rendezvous", streams="rank", timeout=60)
    ref_loss, ref_units, ref_state = cascade_worker(SelfComm(), str(tmp_path), 1, "gather")
    loss, units, state = ranks[0]
    assert abs(loss - ref_loss) <= 1e-9 * abs(ref_loss) and abs(units - ref_units) < 1e-12
    for name in ref_state:
        close(state[name], ref_state[name], 1e-9, name)


# --- bad meshes: one line, exit 2, before any process group -----------------------------------------

@pytest.mark.parametrize("world,args,message", [
    (4, ["--data-parallel", "3"], "--data-parallel 3 does not divide the world size 4: use one of 1, 2, 4"),
    (8, ["-K", "8", "-L", "2"], "more layer ranks (8 = 8 ranks / --data-parallel 1) than the finest level's "
                                "8 blocks allow (4 pairs): use at most 4 ranks, a larger --data-parallel or "
                                "more --blocks"),
    (4, ["--data-parallel", "2", "--batch-size", "8", "-M", "8"],
     "--batch-size 8 is smaller than 2 data replicas x --microbatches 8: each micro-batch of each replica needs "
     "a sample; use batches of at least 16 samples"),
    (4, ["-M", "4", "--batch-size", "8", "--coarse-layout", "replicate", "-K", "64", "-L", "3"],
     "--batch-size 8 is smaller than 4 data replicas x --microbatches 4 (level 1 runs on 4 replicas with "
     "--coarse-layout replicate): each micro-batch of each replica needs a sample; use batches of at least "
     "16 samples"),
])
def test_bad_meshes_are_one_line_before_any_process_group(tmp_path, world, args, message):
    """Rank 0 of a torchrun-like launch whose store does not exist: any process group work would
    hang or fail otherwise; the check ends the rank first."""
    env = base_env({"RANK": "0", "WORLD_SIZE": str(world), "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": "9", "PARML_TEST_DEVICE": "cpu"})
    proc = subprocess.run([sys.executable, "-m", "parml.cli", "train", "--out", str(tmp_path), "--max-cycles", "1",
                           *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"parml: error: {message}"]
    assert not os.listdir(tmp_path)
