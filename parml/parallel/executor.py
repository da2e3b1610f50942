"""LayerParallel: an exact pipelined forward/backward of one model over the ranks of a communicator.

The blocks are partitioned (``layout.py``), each rank builds its ``PipelineStage`` and runs its
action list from the schedule (``schedule.py``). The batch is split into M micro-batches; each
micro-batch's loss is summed and divided by the full batch size, so the loss and every gradient
equal the single-process computation up to floating-point summation order.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..kernels import attach_kernels
from .layout import Partition, batch_share, check_microbatches, partition_blocks
from .schedule import ScheduleError, check_message_order, get_schedule
from .sharding import assemble_state, shard_state
from .replicas import GradientReducer
from .transfer import time_halos
from .stage import PipelineStage
from .timing import synchronize


@dataclass
class StepTimes:
    """Seconds of the last step on this rank: compute, blocked in communication, and the rest.
    ``sends`` (posting sends) and ``loss_broadcast`` (the final collective that brings the loss from
    the last rank, where the later ranks wait for rank 0's last backward) are parts of ``wait``,
    given on their own for benchmarks."""
    step: float = 0.0
    compute: float = 0.0
    wait: float = 0.0
    sends: float = 0.0
    loss_broadcast: float = 0.0

    @property
    def other(self) -> float:
        return max(self.step - self.compute - self.wait, 0.0)

    def accumulate(self, other: "StepTimes") -> None:
        """``self += other``, field by field in place: every gradient adds its step, and building a
        new object took ~8 µs of a ~200 µs coarse-level gradient."""
        self.step += other.step
        self.compute += other.compute
        self.wait += other.wait
        self.sends += other.sends
        self.loss_broadcast += other.loss_broadcast


class LayerParallel:
    """Run `model` (a full ``ODEResNet``, identical on every rank) layer-parallel over `comm`.

    Each rank keeps only its shard (``self.model``): the opening on rank 0, the head on the last
    rank. ``forward_backward(x, y)`` returns the loss on every rank and leaves each local
    parameter's exact gradient in ``.grad``.

    On a data x layer mesh `comm` is this replica's layer group and `data` this layer rank's data
    group (the same position in every replica): the replica runs its share of each batch
    (``layout.batch_share``) and the gradients are summed over `data` (``replicas.GradientReducer``),
    started as each chunk's gradients are final. `world_rank` names the rank in messages.
    `replica` is the rank's replica where it has no data group (a redundant level: every replica
    runs the whole batch); checkpoints and exports read replica 0.
    """

    def __init__(self, model, comm, schedule: str = "1f1b", microbatches: int = 1,
                 partition: Partition | None = None, device=None, weight_grads: str = "auto",
                 kernel: str = "auto", data=None, world_rank: int | None = None, replica: int = 0):
        self.comm = comm
        self.data = data if data is not None and data.size > 1 else None
        self._replica = replica
        self.world_rank = comm.rank if world_rank is None else world_rank
        self.schedule = get_schedule(schedule)
        self.microbatches = microbatches
        if microbatches < 1:
            check_microbatches(1, microbatches)
        self.partition = partition or partition_blocks(model.spec.total_blocks, comm.size)
        if self.partition.ranks != comm.size:
            raise ValueError(f"partition has {self.partition.ranks} ranks but the communicator {comm.size}")
        start, stop = self.partition.range(comm.rank)
        self.device = torch.device(device) if device is not None else comm.device
        self.model = (model if comm.size == 1 else model.shard(start, stop)).to(self.device)
        self.kernels = attach_kernels(self.model, kernel)
        self._params = list(self.model.parameters())   # walking the modules costs ~0.1 ms a step
        if getattr(comm, "ordered_p2p", False) and comm.size > 1:
            try:       # a tag-blind transport needs equal send and receive orders per direction
                check_message_order(self.schedule.actions(comm.size, microbatches))
            except ScheduleError as e:
                raise ScheduleError(f"--schedule {self.schedule.name} cannot run on {comm.backend}: {e}") from None
        self.stage = PipelineStage(self.model, comm, self.device, weight_grads)
        # one rank holding the whole dense model: the stage's loss and gradients without autograd
        # (``kernels.NetworkGradient``; not under a forced ``--weight-grads deferred``), for the whole
        # batch at once, into one flat buffer that the data group sums in one all-reduce
        self.network = self.stage.manual if comm.size == 1 else None
        self.reducer = GradientReducer(self.data) if self.data is not None and self.network is None else None
        self.times = StepTimes()          # the last step
        self.total = StepTimes()          # summed over every forward_backward

    @property
    def replica(self) -> int:
        """This rank's data replica (0 without data parallelism)."""
        return self.data.rank if self.data is not None else self._replica

    def _share(self, t: torch.Tensor) -> torch.Tensor:
        if self.data is None:
            return t
        a, b = batch_share(t.shape[0], self.data.size, self.data.rank)
        return t[a:b]

    # -- training
    def forward_backward(self, x, y) -> float:
        """Loss of the batch (mean over samples) on every rank; local gradients in ``.grad``."""
        return self.forward_backward_sum(x, y)[0]

    def forward_backward_sum(self, x, y, local=None) -> tuple[float, torch.Tensor | None]:
        """``forward_backward``, and `local()` — a float64 tensor of this rank's values, computed once
        its gradients are final — summed over the layer ranks in the collective that brings the loss
        from the last rank. So a step costs one collective per group: the data group's gradient
        sums (the loss riding in the last bucket) and the layer group's loss and sums. Where this rank
        holds the whole model, `local(flat)` also gets the summed gradients as one buffer (in
        ``network.layout`` order, the loss in its last entry)."""
        total = x.shape[0]
        x, y = self._share(x), self._share(y)
        check_microbatches(x.shape[0], self.microbatches)
        if self.network is not None:
            return self._network_step(x, y, total, local)
        for p in self._params:
            p.grad = None
        synchronize(self.device)              # CUDA: time this step's work only
        self.stage.collect_times()
        t0 = time.perf_counter()
        c0, w0, s0 = self.stage.compute_seconds, self.stage.wait_seconds, self.stage.send_seconds
        loss = self._pipeline(x.to(self.device), y.to(self.device), total)
        self.stage.finish_sends()
        synchronize(self.device)        # CUDA: the step's kernels are done (a no-op on CPU)
        t1 = time.perf_counter()
        if self.reducer is not None:
            self.reducer.wait()         # the gradient sums (and the loss's) over the data group
        t2 = time.perf_counter()
        mine = local() if local is not None else None
        t3 = time.perf_counter()
        value, sums = self._from_last(loss, mine)   # ranks wait here for rank 0's last backward
        t4 = time.perf_counter()
        self.stage.wait_seconds += (t2 - t1) + (t4 - t3)
        self.stage.collect_times()      # CUDA: compute and wait from events, not launch times
        self._record(StepTimes(t4 - t0, self.stage.compute_seconds - c0, self.stage.wait_seconds - w0,
                               self.stage.send_seconds - s0, t4 - t3))
        return value, sums

    def _network_step(self, x, y, total, local) -> tuple[float, torch.Tensor | None]:
        """``forward_backward_sum`` where this rank holds the whole model (``self.network``): one
        call for the loss and every gradient, then one all-reduce of it all over the data group.
        CPU only, so no device synchronization or events; the layer group is this rank alone."""
        t0 = time.perf_counter()
        loss, flat = self.network.grad(x, y, total, self.microbatches)
        t1 = time.perf_counter()
        if self.data is not None:          # the gradients and the loss, summed in place
            self.data.allreduce(flat)
            loss = float(flat.numpy()[-1])
        t2 = time.perf_counter()
        mine = local(flat) if local is not None else None
        t3 = time.perf_counter()
        self.stage.compute_seconds += t1 - t0
        self.stage.wait_seconds += t2 - t1
        self._record(StepTimes(t3 - t0, t1 - t0, t2 - t1))
        return loss, mine

    def _record(self, times: StepTimes) -> None:
        self.times = times
        self.total.accumulate(times)

    def _pipeline(self, x, y, total) -> torch.Tensor:
        """This rank's action list over the micro-batches of (x, y); starts the gradient sums."""
        xs, ys = x.tensor_split(self.microbatches), y.tensor_split(self.microbatches)
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self.stage.begin_step()
        self.stage.post_receives([x_m.shape[0] for x_m in xs])
        self.stage.deferring(True)
        reducer = self.reducer
        try:
            if reducer is not None:
                reducer.begin()
            for action in self.schedule.stage_actions(self.comm.rank, self.comm.size, self.microbatches):
                m = action.microbatch
                if action.kind == "F":
                    loss_m, _ = self.stage.forward(m, xs[m], ys[m], total)
                    if loss_m is not None:
                        loss += loss_m.detach()
                else:
                    self.stage.backward(m)
            # after the last adjoint went out; each chunk's sum starts once its gradients are final
            self.stage.flush_weight_grads(reducer.ready if reducer is not None else None)
            if reducer is not None:            # the last rank's share of the loss rides in the last bucket
                reducer.flush(self._params, loss if self.stage.last else None)
        except BaseException:
            if reducer is not None:
                reducer.discard()
            raise
        finally:
            self.stage.deferring(False)
            self.stage.end_step()
        return loss

    @torch.no_grad()
    def evaluate(self, x, y) -> tuple[float, float]:
        """(mean loss, accuracy) of the batch, known on every rank; accuracy is nan for regression."""
        total = x.shape[0]
        x, y = self._share(x).to(self.device), self._share(y).to(self.device)
        stats = torch.zeros(2, dtype=torch.float64, device=self.device)
        for m, (x_m, y_m) in enumerate(zip(x.tensor_split(self.microbatches), y.tensor_split(self.microbatches))):
            loss_m, out = self.stage.forward(m, x_m, y_m, total, train=False)
            if loss_m is not None:
                stats[0] += loss_m
                if self.model.spec.task == "classification":
                    stats[1] += (out.argmax(1) == y_m).sum()
        self.stage.finish_sends()
        if self.data is not None and self.stage.last:
            self.data.allreduce(stats)
        if self.comm.size > 1:
            self.comm.broadcast(stats, self.comm.size - 1)
        acc = float(stats[1]) / total if self.model.spec.task == "classification" else float("nan")
        return float(stats[0]), acc

    def _from_last(self, loss: torch.Tensor, mine: torch.Tensor | None) -> tuple[float, torch.Tensor | None]:
        """The last rank's loss and the sum of `mine` over the layer ranks: one all-reduce, to which
        the other ranks add their loss of 0 (exact), instead of a broadcast and an all-reduce."""
        if self.comm.size == 1:
            return float(loss), mine
        values = loss.reshape(1) if mine is None else torch.cat([loss.reshape(1), mine.to(torch.float64)])
        self.comm.allreduce(values)
        return float(values[0]), (None if mine is None else values[1:])

    # -- what a multilevel ``Level`` needs from its ranks (parml.multilevel never sees a communicator)
    @property
    def rank(self) -> int:
        """The world rank (messages name it)."""
        return self.world_rank

    def allgather_object(self, obj) -> list:
        return self.comm.allgather_object(obj)

    def time_halos(self, tensors, mask, kind):
        """The neighbouring ranks' rows the linear time stencil reads (``transfer.time_halos``);
        (None, None) on one rank, where every chunk holds its whole stage."""
        if self.comm.size == 1:
            return None, None
        return time_halos(self.model, self.comm, tensors, mask, kind)

    # -- export
    def gather_state(self) -> dict | None:
        """The full model's state dict on layer rank 0 of replica 0 (None elsewhere), e.g. for export."""
        if self.replica != 0:          # replicas hold the same shards (a whole layer group skips)
            return None
        mine = shard_state(self.model)
        parts = self.comm.allgather_object(mine) if self.comm.size > 1 else [mine]
        return assemble_state(parts) if self.comm.rank == 0 else None
