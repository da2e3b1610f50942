"""What the pipeline study measures with: peak saved activations, device-synchronised timers, the
serial step, per-block costs, torch.distributed.pipelining on the same shard, and ping-pong latency."""
from __future__ import annotations

import time
import weakref

import torch
import torch.nn.functional as tf

from parml.model import ModelSpec, StageSpec, build_model
from parml.parallel.timing import synchronize

from ..harness import median
from .records import BlockCost, ModelSize


class _Saved:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


class SavedTensorMeter:
    """Peak bytes of tensors autograd keeps for backward (distinct storages, parameters excluded)."""

    def __init__(self, params):
        self.exclude = {p.untyped_storage().data_ptr() for p in params}
        self.counts: dict[int, int] = {}
        self.live = 0
        self.peak = 0
        self._ctx = None

    def _release(self, key, nbytes):
        n = self.counts[key] - 1
        if n:
            self.counts[key] = n
        else:
            del self.counts[key]
            self.live -= nbytes

    def _pack(self, t):
        st = t.untyped_storage()
        key, nbytes = st.data_ptr(), st.nbytes()
        if nbytes == 0 or key in self.exclude:
            return t
        n = self.counts.get(key, 0)
        if n == 0:
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self.counts[key] = n + 1
        holder = _Saved(t)
        weakref.finalize(holder, self._release, key, nbytes)
        return holder

    @staticmethod
    def _unpack(h):
        return h.t if isinstance(h, _Saved) else h

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def make_model(m: ModelSize, device=torch.device("cpu")):
    """The full model (seed 0) and one batch, identical on every rank."""
    spec = ModelSpec(m.in_features, m.classes, (StageSpec(m.width, m.blocks),), activation="relu")
    model = build_model(spec, seed=0, dtype=torch.float32).to(device)
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(m.batch, m.in_features, generator=g, dtype=torch.float32)
    y = torch.randint(0, m.classes, (m.batch,), generator=g)
    return model, x.to(device), y.to(device)


def timed(device, fn, *args):
    """(seconds, result) of fn(*args), the device synchronised before and after."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn(*args)
    synchronize(device)
    return time.perf_counter() - t0, out


def serial_step(model, x, y, M):
    """One process, no communicator: M micro-batches with gradient accumulation."""
    for p in model.parameters():
        p.grad = None
    total = x.shape[0]
    loss = 0.0
    for xm, ym in zip(x.tensor_split(M), y.tensor_split(M)):
        lm = model.loss(model(xm), ym, reduction="sum") / total
        lm.backward()
        loss += float(lm.detach())
    return loss


def block_profile(width, batches, nblocks=64, reps=5) -> dict[int, BlockCost]:
    """Seconds per residual block (forward + backward, and forward alone) per micro-batch size."""
    spec = ModelSpec(width, 2, (StageSpec(width, nblocks),), activation="relu")
    chunk = build_model(spec, seed=0).block_chunks()[0]
    g = torch.Generator().manual_seed(0)
    out = {}
    for b in batches:
        z = torch.randn(b, width, generator=g, requires_grad=True)
        ts = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            chunk(z).sum().backward()
            ts.append(time.perf_counter() - t0)
        fwd = []
        with torch.no_grad():
            for _ in range(reps + 1):
                t0 = time.perf_counter()
                chunk(z)
                fwd.append(time.perf_counter() - t0)
        flops = 3 * 2 * b * width * width  # addmm forward + two GEMMs in backward
        t = median(ts[1:]) / nblocks
        out[b] = BlockCost(t, median(fwd[1:]) / nblocks, flops / t / 1e9)
    return out


def dispatch_cost(reps=2000) -> float:
    """Seconds of one tiny eager op (torch.add on 1-element tensors): the per-op floor."""
    a, b = torch.ones(1), torch.ones(1)
    for _ in range(100):
        torch.add(a, b)
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.add(a, b)
    return (time.perf_counter() - t0) / reps


class TorchPipe:
    """torch.distributed.pipelining on the same shard: one PipelineStage + one schedule."""

    def __init__(self, shard, rank, size, schedule, M, device):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
        self.shard, self.rank, self.size, self.device = shard, rank, size, device
        self.stage = PipelineStage(shard, rank, size, device)
        cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
        # mean cross-entropy per micro-batch, gradients divided by M (scale_grads): the same
        # mean-over-the-batch loss as parml's sum / batch for equal micro-batches
        self.sched = cls(self.stage, M, loss_fn=lambda out, tgt: tf.cross_entropy(out, tgt), scale_grads=True)
        self.loss = float("nan")

    def step(self, x, y):
        for p in self.shard.parameters():
            p.grad = None
        synchronize(self.device)
        t0 = time.perf_counter()
        first, last = self.rank == 0, self.rank == self.size - 1
        losses = [] if last else None
        args = (x,) if first else ()
        kw = {"target": y, "losses": losses} if last else {}
        self.sched.step(*args, return_outputs=False, **kw)
        synchronize(self.device)
        dt = time.perf_counter() - t0
        if last:
            self.loss = float(sum(float(v.detach()) for v in losses) / len(losses))
        return dt


def grad_diff(a_params, b_params) -> float:
    """Largest relative difference of two models' gradients (per tensor, relative to its max)."""
    worst = 0.0
    for a, b in zip(a_params, b_params):
        if a.grad is None or b.grad is None:
            continue
        scale = max(float(a.grad.abs().max()), 1e-30)
        worst = max(worst, float((a.grad - b.grad).abs().max()) / scale)
    return worst


def peak_saved(comm, params, step, *args) -> int:
    """Peak bytes autograd saves during one (untimed) `step(*args)`, all ranks starting together."""
    comm.barrier()
    with SavedTensorMeter(params) as meter:
        step(*args)
    return meter.peak


def ping_pong(comm, nbytes_list, reps=200) -> dict[int, float]:
    """One-way latency (s) of a parml comm.send/recv round trip between ranks 0 and 1."""
    out = {}
    for n in nbytes_list:
        buf = torch.zeros(max(n // 4, 1), dtype=torch.float32, device=comm.device)
        comm.barrier()
        t0 = time.perf_counter()
        if comm.rank < 2:
            peer = 1 - comm.rank
            for _ in range(reps):
                if comm.rank == 0:
                    comm.send(buf, peer, 7)
                    comm.recv(buf, peer, 7)
                else:
                    comm.recv(buf, peer, 7)
                    comm.send(buf, peer, 7)
        out[n] = (time.perf_counter() - t0) / (2 * reps)
    comm.barrier()
    return out
