"""The real layer-parallel code under NCCL's point-to-point semantics, in threads on CPU.

``nccl_model`` gives each rank a communicator that ignores tags, runs a pair's operations in
posting order on FIFO streams (one per pair, or one per rank with the collectives) and, in
rendezvous mode, completes a send only with its matching receive. The executor (GPipe, 1F1B,
P = 2..4, M = 1..8), the level movers and time halos, MG/OPT V-cycles with gathered coarse levels,
the cascade, checkpoints and evaluation must give the serial results on every rank in every mode
(tolerances: atol = rtol * max|ref|). A deadlock is a CommTimeout within the test, never a hang.
"""
import datetime
import functools

import pytest
import torch

from nccl_model import RankFailures, run_model
from parml.training.checkpoint import load_latest, save as save_checkpoint
from parml.comm import (CommError, CommTimeout, Communicator, MPIComm, SelfComm, TorchComm, nccl_device_for,
                        process_group_timeout)
from parml.comm.torch_backend import _TorchRequest
from parml.config import TrainConfig
from parml.data import load_dataset
from parml.multilevel.hierarchy import block_mask, level_specs, ordered_parameters
from parml.model import build_model
from parml.parallel.transfer import Mover, time_halos
from parml.parallel.executor import LayerParallel
from parml.parallel.layout import Partition, partition_blocks
from parml.parallel.schedule import SCHEDULES, OneFOneB, register_schedule
from parml.training.build import build_vcycle
import test_conv
from test_cascade import _cascade_worker
from test_parallel import RUNS, SPEC, _data, _local_grads, _run_cycles, _serial

torch.set_num_threads(1)

MODES = [(t, s) for t in ("buffered", "rendezvous") for s in ("pair", "rank")]
RTOL = 1e-10


def close(got, ref, rtol=RTOL, what=""):
    """assert_close with atol = rtol * max|ref| (per tensor)."""
    ref = torch.as_tensor(ref)
    got = torch.as_tensor(got, dtype=ref.dtype)
    atol = rtol * float(ref.abs().max()) if ref.numel() else 0.0
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def check_grads(grads, ref, rtol=RTOL):
    """`ref`: the reference gradients by parameter name, or a serial model holding them in .grad."""
    if not isinstance(ref, dict):
        ref = {name: p.grad for name, p in ref.named_parameters()}
    for key, g in grads.items():
        if isinstance(key, tuple):
            _, stage, first = key
            n = g[0].shape[0]
            close(g[0], ref[f"chunks.{stage}.weight"][first:first + n], rtol, f"{key} weight")
            close(g[1], ref[f"chunks.{stage}.bias"][first:first + n], rtol, f"{key} bias")
        else:
            close(g, ref[key], rtol, key)


# --- the executor -----------------------------------------------------------------------------------

def _step_worker(comm, schedule, m):
    lp = LayerParallel(build_model(SPEC, seed=2, dtype=torch.float64), comm, schedule, m)
    x, y = _data(torch.float64)
    lp.forward_backward(x, y)               # twice: the second step reuses buffers and groups
    loss = lp.forward_backward(x, y)
    val_loss, acc = lp.evaluate(x, y)
    return loss, val_loss, acc, _local_grads(lp.model), lp.gather_state()


@pytest.mark.parametrize("P", [2, 3, 4])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("transfer,streams", MODES)
def test_executor_equals_serial_under_nccl_semantics(transfer, streams, schedule, P):
    ref_loss, ref_acc, ref_grads = _serial(torch.float64)
    ref_state = build_model(SPEC, seed=2, dtype=torch.float64).state_dict()     # no step is taken
    for m in range(1, 9):
        ranks = run_model(_step_worker, P, schedule, m, transfer=transfer, streams=streams, timeout=10)
        # 2 steps x (states + adjoints) + one evaluation's states, on each of the P - 1 links
        assert run_model.last_messages == 5 * m * (P - 1)
        covered = set()
        for rank, (loss, val_loss, acc, grads, state) in enumerate(ranks):
            close(loss, ref_loss, what=f"M={m} rank {rank} loss")
            close(val_loss, ref_loss, what=f"M={m} rank {rank} evaluation loss")
            assert acc == ref_acc
            check_grads(grads, ref_grads)
            covered |= set(grads)
            assert (state is None) == (rank > 0)
        assert {k for k in covered if isinstance(k, str)} == {n for n in ref_grads if not n.startswith("chunks.")}
        assert sum(g[0].shape[0] for k, g in covered_grads(ranks).items()) == SPEC.total_blocks
        for name, t in ranks[0][4].items():        # the gathered model is the serial one
            close(t, ref_state[name], what=name)


def covered_grads(ranks):
    return {k: g for r in ranks for k, g in r[3].items() if isinstance(k, tuple)}


@pytest.mark.parametrize("transfer,streams", MODES)
def test_conv_executor_equals_serial_under_nccl_semantics(transfer, streams):
    """Conv states (the large messages of the issue) and projections between stages, P = 2 and 3."""
    serial = {n: test_conv._serial(n) for n in test_conv.SPECS}
    for P in (2, 3):
        ranks = run_model(test_conv._worker, P, transfer=transfer, streams=streams, timeout=10)
        for case in test_conv.CASES:
            ref_loss, ref_acc, ref_model = serial[case[0]]
            for res in ranks:
                loss, val_loss, acc, grads = res[case]
                close(loss, ref_loss, what=str(case))
                close(val_loss, ref_loss, what=str(case))
                assert acc == ref_acc
                check_grads(grads, ref_model)


def test_tagged_model_runs_the_gloo_path():
    """The same harness matching by tag (gloo/MPI semantics): early receives, one communicator."""
    ref_loss, _, ref_grads = _serial(torch.float64)
    for schedule in ("gpipe", "1f1b"):
        ranks = run_model(_step_worker, 3, schedule, 4, transfer="tagged", timeout=10)
        for loss, _, _, grads, _ in ranks:
            close(loss, ref_loss)
            check_grads(grads, ref_grads)


def _old_order_worker(comm, schedule, m, early, one_group=True):
    """Message orders the fix rules out: one communicator for both directions with receives posted
    early (gloo's order, the code before the fix) or lazily, or one group per direction with early
    receives. Each must deadlock under NCCL's rules in the mode given (as the issue found)."""
    lp = LayerParallel(build_model(SPEC, seed=2, dtype=torch.float64), comm, schedule, m)
    if one_group:
        lp.stage.states = lp.stage.adjoints = comm
    lp.stage.early_receives = early
    x, y = _data(torch.float64)
    return lp.forward_backward(x, y)


@pytest.mark.parametrize("schedule,P,m,early,one_group,transfer,streams", [
    ("gpipe", 2, 1, True, True, "buffered", "pair"),     # [recv adjoint 0, send state 0] on both sides
    ("1f1b", 2, 3, True, True, "buffered", "pair"),
    ("1f1b", 2, 2, False, True, "rendezvous", "pair"),   # 1F1B neighbours send in different orders
    ("1f1b", 3, 4, False, True, "rendezvous", "pair"),
    # per-direction groups alone are not enough where a rank's operations share one stream
    # (grouped operations): the middle rank's early receives block its sends
    ("1f1b", 3, 4, True, False, "buffered", "rank"),
])
def test_the_old_message_orders_deadlock_and_are_reported_fast(schedule, P, m, early, one_group, transfer,
                                                               streams):
    with pytest.raises(RankFailures) as info:
        run_model(_old_order_worker, P, schedule, m, early, one_group, transfer=transfer, streams=streams,
                  timeout=30)
    errors = info.value.errors
    assert len(errors) == P and all(isinstance(e, CommTimeout) for e in errors.values())
    assert "deadlock" in str(info.value) and "rank 0 waits at" in str(info.value)


def test_gloo_order_still_fine_where_tags_match():
    ranks = run_model(_old_order_worker, 2, "1f1b", 4, True, transfer="tagged", timeout=10)
    assert ranks[0] == pytest.approx(_serial(torch.float64)[0], rel=1e-10)


def test_reordered_schedule_is_rejected_before_any_message():
    """A 1F1B that receives two adjoints in swapped order runs on gloo (tags) but not on NCCL."""

    @register_schedule("swapped-test")
    class Swapped(OneFOneB):
        def stage_actions(self, stage, num_stages, num_microbatches):
            acts = super().stage_actions(stage, num_stages, num_microbatches)
            if stage == 0:
                i, j = (k for k, a in enumerate(acts) if a.kind == "B" and a.microbatch in (0, 1))
                acts[i], acts[j] = acts[j], acts[i]
            return acts

    def worker(comm):
        lp = LayerParallel(build_model(SPEC, seed=2, dtype=torch.float64), comm, "swapped-test", 4)
        return lp.forward_backward(*_data(torch.float64))

    try:
        ref_loss = _serial(torch.float64)[0]
        assert run_model(worker, 2, transfer="tagged")[1] == pytest.approx(ref_loss, rel=1e-10)
        with pytest.raises(RankFailures, match="cannot run on nccl-model: stage 1 sends adjoints to stage 0"):
            run_model(worker, 2, transfer="buffered")
    finally:
        SCHEDULES.pop("swapped-test")


def test_model_reports_swapped_messages():
    """Tags are checked at matching: on NCCL two swapped sends would silently exchange data."""

    def worker(comm):
        a = torch.full((3,), float(comm.rank))
        if comm.rank == 0:
            r1, r2 = comm.isend(a, 1, tag=5), comm.isend(a + 1, 1, tag=6)
            r1.wait(), r2.wait()
        else:
            b = torch.empty(3)
            comm.recv(b, 0, tag=6)

    with pytest.raises(RankFailures, match="tag 5 sent, tag 6 expected"):
        run_model(worker, 2, transfer="buffered", timeout=10)


def _pattern(comm, name):
    """Hand-built two-rank patterns whose fate under each rule is known."""
    peer = 1 - comm.rank
    a, b = torch.full((2,), float(comm.rank)), torch.empty(2)
    if name == "send-then-recv":          # both send first: needs buffering or tags
        s = comm.isend(a, peer, 0)
        comm.recv(b, peer, 0)
        s.wait()
    elif name == "recv-then-send":        # both post the receive first: its stream blocks the send
        r = comm.irecv(b, peer, 0)
        s = comm.isend(a, peer, 0)
        r.wait()
        s.wait()
    elif name == "send-before-collective":  # rank 0 sends, both meet in a barrier, rank 1 receives
        if comm.rank == 0:
            s = comm.isend(a, 1, 0)
            comm.barrier()
            s.wait()
        else:
            comm.barrier()
            comm.recv(b, 0, 0)
    return b.tolist()


@pytest.mark.parametrize("name,transfer,streams,ok", [
    ("send-then-recv", "tagged", "pair", True),
    ("send-then-recv", "buffered", "pair", True),
    ("send-then-recv", "rendezvous", "pair", False),
    ("recv-then-send", "tagged", "pair", True),
    ("recv-then-send", "buffered", "pair", False),
    ("recv-then-send", "rendezvous", "rank", False),
    ("send-before-collective", "rendezvous", "pair", True),    # collectives on their own stream
    ("send-before-collective", "buffered", "rank", True),
    ("send-before-collective", "rendezvous", "rank", False),   # the unmatched send blocks the barrier
])
def test_model_rules_on_hand_built_patterns(name, transfer, streams, ok):
    if ok:
        out = run_model(_pattern, 2, name, transfer=transfer, streams=streams, timeout=10)
        assert out[1] == [0.0, 0.0] and (name == "send-before-collective" or out[0] == [1.0, 1.0])
    else:
        with pytest.raises(RankFailures, match="deadlock"):
            run_model(_pattern, 2, name, transfer=transfer, streams=streams, timeout=10)


def test_model_times_out_where_a_rank_never_communicates():
    """A hang the deadlock detector cannot see (a rank busy elsewhere) still ends at the timeout."""
    import time

    def worker(comm):
        if comm.rank == 0:
            comm.recv(torch.empty(1), 1, 0)
        else:
            time.sleep(1.5)

    t0 = time.monotonic()
    with pytest.raises(RankFailures, match=r"recv #0 from rank 1 \(tag 0\) on world on rank 0 timed out after 0.5 s"):
        run_model(worker, 2, transfer="buffered", timeout=0.5)
    assert time.monotonic() - t0 < 10


# --- movers and time halos --------------------------------------------------------------------------

def _mover_worker(comm, spec, fine_bounds, coarse_ranks):
    """Gather a level's tensors onto `coarse_ranks` and scatter them back; time halos on the
    fine layout (which spans every rank of `comm`)."""
    full = build_model(spec, seed=3, dtype=torch.float64)
    src, dst = Partition(fine_bounds), partition_blocks(spec.total_blocks, coarse_ranks)
    me = comm.rank
    mine = [p.detach().clone() for p in ordered_parameters(full.shard(*src.range(me)))]
    like = [p.detach() for p in ordered_parameters(full.shard(*dst.range(me)))] if me < dst.ranks else None
    gathered = Mover(comm, spec, src, dst)(mine, like, 0)
    back = Mover(comm, spec, dst, src)(gathered, mine, 1)
    shard = full.shard(*src.range(me))
    halos = {kind: time_halos(shard, comm, mine, block_mask(shard), kind)[0]
             for kind in ("next_first", "previous_last")}
    return {"gathered": gathered, "back": back, "halos": halos}


def _expected_halos(full, src, rank):
    """The rows time_halos must fetch, read from the full model."""
    shard = full.shard(*src.range(rank))
    halos = {"next_first": [], "previous_last": []}
    for c in shard.block_chunks():
        whole = full.chunks[c.stage]
        ends, starts = c.first + c.num_blocks == whole.weight.shape[0], c.first == 0
        for t in (whole.weight, whole.bias):
            last = c.first + c.num_blocks
            halos["next_first"].append(None if ends else t[last:last + 1].detach())
            halos["previous_last"].append(None if starts else t[c.first - 1:c.first].detach())
    return halos


@pytest.mark.parametrize("transfer,streams", MODES)
@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_movers_and_time_halos_under_nccl_semantics(transfer, streams, kind):
    if kind == "dense":
        spec = level_specs(SPEC, 1)[0]
        # rank 1 of the last case lies inside stage 0: it sends and receives halo rows both ways
        cases = [((0, 3, 6, 8, 11), 2), ((0, 2, 5, 8, 11), 1), ((0, 5, 11), 2), ((0, 3, 7, 11), 3),
                 ((0, 2, 4, 8, 11), 2)]
    else:
        spec = test_conv.conv_spec(blocks=(4, 4, 2))
        cases = [((0, 3, 6, 8, 10), 2), ((0, 4, 10), 1), ((0, 2, 5, 10), 2)]
    full = build_model(spec, seed=3, dtype=torch.float64)
    for bounds, coarse_ranks in cases:
        P = len(bounds) - 1
        ranks = run_model(_mover_worker, P, spec, bounds, coarse_ranks,
                          transfer=transfer, streams=streams, timeout=10)
        src, dst = Partition(bounds), partition_blocks(spec.total_blocks, coarse_ranks)
        for r, res in enumerate(ranks):
            if r < coarse_ranks:
                want = ordered_parameters(full.shard(*dst.range(r)))
                assert len(res["gathered"]) == len(want)
                for a, b in zip(res["gathered"], want):
                    assert torch.equal(a, b.detach())
            else:
                assert res["gathered"] is None
            for a, b in zip(res["back"], ordered_parameters(full.shard(*src.range(r)))):
                assert torch.equal(a, b.detach())
            want = _expected_halos(full, src, r)
            for k in want:
                got = res["halos"][k]
                for a, b in zip(got, want[k] + [None] * (len(got) - len(want[k]))):
                    assert (a is None) == (b is None), (bounds, r, k)
                    if a is not None:
                        assert torch.equal(a, b)


# --- MG/OPT V-cycles, gathered coarse levels, the cascade, checkpoints --------------------------------

@functools.lru_cache(maxsize=None)
def _serial_cycles(key):
    return _run_cycles(SelfComm(), *key)


def _cycles_worker(comm, runs):
    return {key: _run_cycles(comm, *key) for key in runs}


@pytest.mark.parametrize("P,transfer,streams", [(4, "rendezvous", "pair"), (4, "buffered", "rank"),
                                                (2, "rendezvous", "rank"), (2, "buffered", "pair")])
def test_vcycles_with_gathered_levels_equal_serial(P, transfer, streams):
    """GD and 5 MG/OPT V-cycles (coarse levels gathered, linear transfers with time halos)."""
    runs = RUNS if P == 4 else [r for r in RUNS if r[0] > 1]
    ranks = run_model(_cycles_worker, P, runs, transfer=transfer, streams=streams, timeout=20)
    for key in runs:
        ref_losses, ref_state, ref_units, _ = _serial_cycles(key)
        losses, state, units, level_ranks = ranks[0][key]
        assert units == ref_units
        if key[4] > 1 and key[0] > 1:
            assert level_ranks[0] < P, level_ranks
        for a, b in zip(losses, ref_losses):
            close(a, b, 1e-9, f"{key}")
        assert state.keys() == ref_state.keys()
        for name in state:
            close(state[name], ref_state[name], 1e-9, f"{key} {name}")
        for other in ranks[1:]:
            assert other[key][1] is None and other[key][0] == losses


@pytest.mark.parametrize("transfer,streams", [("rendezvous", "pair"), ("buffered", "rank")])
def test_conv_vcycles_with_gathered_level_equal_serial(transfer, streams):
    """Conv MG/OPT (projections move between layouts when the coarse level is gathered)."""
    ranks = run_model(lambda comm: {k: test_conv._run_mgopt(comm, *k) for k in test_conv._mgopt_runs()}, 2,
                      transfer=transfer, streams=streams, timeout=20)
    for key in test_conv._mgopt_runs():
        ref_losses, ref_state, _ = test_conv._run_mgopt(SelfComm(), *key)
        losses, state, _ = ranks[0][key]
        for a, b in zip(losses, ref_losses):
            close(a, b, 1e-9, str(key))
        for name in state:
            close(state[name], ref_state[name], 1e-9, f"{key} {name}")


@pytest.mark.parametrize("transfer,streams", [("rendezvous", "pair"), ("rendezvous", "rank")])
def test_cascade_equals_serial(transfer, streams, tmp_path):
    ranks = run_model(_cascade_worker, 2, str(tmp_path / "par"), transfer=transfer, streams=streams, timeout=20)
    ref_loss, ref_units, ref_state = _cascade_worker(SelfComm(), str(tmp_path / "ser"))
    loss, units, state = ranks[0]
    close(loss, ref_loss, 1e-9, "loss")
    assert abs(units - ref_units) < 1e-12
    for name in ref_state:
        close(state[name], ref_state[name], 1e-9, name)


def _checkpoint_worker(comm, folder):
    data = load_dataset("circles", seed=0, n_train=40, n_val=8, dtype=torch.float64)
    cfg = TrainConfig(blocks=32, width=3, levels=3, dtype="float64", lr=0.1, beta=1e-3, microbatches=2,
                      schedule="1f1b", min_blocks_per_rank=8, optimizer="adam", progress=False)
    vcycle = build_vcycle(cfg, data, comm)
    for _ in range(2):
        vcycle((data.x_train, data.y_train))
    finest = vcycle.levels[-1]
    path = save_checkpoint(folder, comm, 2, finest.model, vcycle.levels, {"note": "model"})
    val = finest.executor.evaluate(data.x_val, data.y_val)
    return path, val, finest.executor.gather_state()


@pytest.mark.parametrize("transfer,streams", [("rendezvous", "pair"), ("buffered", "rank")])
def test_checkpoint_gathering_and_evaluation(transfer, streams, tmp_path):
    ranks = run_model(_checkpoint_worker, 4, str(tmp_path / "par"), transfer=transfer, streams=streams,
                      timeout=20)
    _, ref_val, ref_state = _checkpoint_worker(SelfComm(), str(tmp_path / "ser"))
    manifest, state, pieces = load_latest(str(tmp_path / "par"))
    ref_manifest, ref_ckpt, ref_pieces = load_latest(str(tmp_path / "ser"))
    assert manifest["ranks"] == 4 and manifest["cycle"] == 2
    for name in ref_state:
        close(state[name], ref_state[name], 1e-9, name)
        close(ranks[0][2][name], ref_state[name], 1e-9, name)
    for path, val, _ in ranks:
        close(val[0], ref_val[0], 1e-9, "val loss")
        assert val[1] == ref_val[1]
    # the Adam moments of every level, re-assembled by position, equal the serial ones
    for level, ref_level in zip(pieces, ref_pieces):
        mine = {(k, lo): st for k, lo, hi, st in level}
        for key, lo, hi, st in ref_level:
            if key[0] == "block":
                got = torch.cat([s["exp_avg"] for (k, _), s in sorted(mine.items(), key=lambda t: t[0][1])
                                 if k == key])
            else:
                got = mine[(key, 0)]["exp_avg"]
            close(got, st["exp_avg"], 1e-9, str(key))


# --- TorchComm's NCCL decisions, as pure functions (no GPU here) --------------------------------------

def test_nccl_process_group_timeout_exceeds_comm_timeout():
    """The watchdog (counting from when an operation is queued) must not fire before parml's own
    timeout (counting from when the host waits) with its one-line message."""
    for t in (0.5, 10, 60, 300, 3600):
        pg = process_group_timeout(t)
        assert pg >= 2 * t and pg >= t + 120
    comm = _fake_torch_comm("nccl", 7.0)
    assert comm._pg_timeout() == process_group_timeout(7.0) and comm.ordered_p2p
    gloo = _fake_torch_comm("gloo", 7.0)
    assert gloo._pg_timeout() == 7.0 and not gloo.ordered_p2p
    assert not SelfComm().ordered_p2p and not MPIComm.ordered_p2p


def test_nccl_placement_one_gpu_per_local_rank():
    assert nccl_device_for(0, 1, 1) == 0
    assert nccl_device_for(3, 4, 8) == 3
    assert nccl_device_for(1, None, 2) == 1
    for local_rank, local_size, gpus in ((0, 2, 1), (1, 2, 1), (5, 8, 4), (1, None, 1), (0, 1, 0)):
        with pytest.raises(CommError) as info:
            nccl_device_for(local_rank, local_size, gpus)
        msg = str(info.value)
        assert "\n" not in msg and "--backend mpi" in msg and f"{gpus} GPU(s)" in msg
    with pytest.raises(CommError, match=r"^--backend torch on --device cuda \(NCCL\) needs one GPU per local rank: "
                                        r"4 local ranks, 2 GPU\(s\); launch at most 2 ranks per node "
                                        r"\(torchrun --nproc_per_node 2\) or use --backend mpi"):
        nccl_device_for(0, 4, 2)


class _Work:
    def __init__(self, result=True):
        self.calls, self.result = [], result

    def wait(self, *args):
        self.calls.append(args)
        return self.result

    def is_completed(self):
        raise AssertionError("NCCL point-to-point waits must not poll on the host")


def _fake_torch_comm(backend, timeout):
    comm = TorchComm.__new__(TorchComm)
    Communicator.__init__(comm)
    comm.backend, comm.timeout, comm.rank, comm.size = backend, timeout, 0, 2
    return comm


def test_nccl_point_to_point_waits_are_stream_waits_and_collectives_are_bounded():
    comm = _fake_torch_comm("nccl", 5.0)
    for op in ("send", "recv"):
        work = _Work()
        _TorchRequest(comm, op, 1, 3, torch.zeros(2), work).wait()
        assert work.calls == [()]                 # work.wait() without a timeout: a stream wait
    work = _Work()
    _TorchRequest(comm, "collective", -1, 0, None, work, label="allreduce").wait()
    (limit,), = work.calls
    assert isinstance(limit, datetime.timedelta) and 0 < limit.total_seconds() <= 5.0
    with pytest.raises(CommTimeout, match=r"^\[nccl rank 0/2\] broadcast timed out after 5 s$"):
        _TorchRequest(comm, "collective", -1, 0, None, _Work(False), label="broadcast").wait()
    gloo = _fake_torch_comm("gloo", 5.0)
    work = _Work()
    _TorchRequest(gloo, "recv", 1, 3, torch.zeros(2), work).wait()
    assert isinstance(work.calls[0][0], datetime.timedelta)     # gloo keeps its bounded waits
