"""One launch of the pipeline-scaling benchmark (see ``pipeline_scaling.py``).

Usage: python benchmarks/_pipeline_worker.py JOB.json RESULT.json

``JOB.json`` says which backend this launch is ("serial", "gloo", "nccl" or "mpi"), the device
("cpu" or "cuda"), the models, the micro-batch counts, the schedules and how many warm-up and
timed steps to run.  Every rank
builds the same full model (``build_model`` with seed 0) and the same batch; rank 0 prints one
progress line per configuration and writes ``RESULT.json``.

* gloo / nccl / mpi: ``LayerParallel.forward_backward`` for every (schedule, M), and on gloo / nccl also
  ``torch.distributed.pipelining`` (``PipelineStage`` + ``ScheduleGPipe``/``Schedule1F1B``) on
  the identical shard (``model.shard(a, b)`` at parml's block boundaries).  parml and torch steps
  alternate, so both see the same machine load.  Before every timed step all ranks meet in a
  barrier; a step's time is the slowest rank's.
* serial: one process, no communicator: ``model(x_m)`` -> loss -> ``backward`` over the M
  micro-batches (gradient accumulation), plus a per-op profile of the residual block.

``comm.isend`` and ``comm.broadcast`` are wrapped with timers on this launch's communicator so
that the "other" time of ``LayerParallel.times`` can be split into posting sends, the final loss
broadcast and the rest.

On CUDA every timed step is bracketed by ``torch.cuda.synchronize``, so step times are device
times, and the per-rank compute / wait split of ``LayerParallel.times`` comes from CUDA events on
the compute stream (``parml.parallel.timing``): device time of the kernels and of the stalls on
receives and sends, not launch time, so efficiency is judged on device time.

Activation memory is measured in one extra (untimed) step per configuration with
``torch.autograd.graph.saved_tensors_hooks``: the live bytes of the distinct storages autograd
saved for backward (parameters excluded), tracked until autograd frees them; the peak is kept.
"""
from __future__ import annotations

import gc
import importlib
import json
import os
import statistics
import sys
import time
import weakref

os.environ.setdefault("OMP_NUM_THREADS", "1")

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402
import torch.nn.functional as tf  # noqa: E402

torch.set_num_threads(1)

from parml.model import ModelSpec, StageSpec, build_model  # noqa: E402


# --------------------------------------------------------------------------------------------
# measurement helpers
# --------------------------------------------------------------------------------------------

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


def med(xs):
    return float(statistics.median(xs)) if xs else float("nan")


def make_model(m: dict, device=torch.device("cpu")):
    spec = ModelSpec(m["in_features"], m["classes"], (StageSpec(m["width"], m["blocks"]),),
                     activation="relu")
    model = build_model(spec, seed=0, dtype=torch.float32).to(device)
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(m["batch"], m["in_features"], generator=g, dtype=torch.float32)
    y = torch.randint(0, m["classes"], (m["batch"],), generator=g)
    return model, x.to(device), y.to(device)


def synchronize(device: torch.device):
    """Wait for the device's queued kernels (a no-op on CPU), so that host timers see device time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, fn, *args):
    """(seconds, result) of fn(*args), the device synchronised before and after."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn(*args)
    synchronize(device)
    return time.perf_counter() - t0, out


def log(rank, text):
    if rank == 0:
        print(text, flush=True)


# --------------------------------------------------------------------------------------------
# serial (one process, no communicator)
# --------------------------------------------------------------------------------------------

def serial_step(model, x, y, M):
    for p in model.parameters():
        p.grad = None
    total = x.shape[0]
    loss = 0.0
    for xm, ym in zip(x.tensor_split(M), y.tensor_split(M)):
        lm = model.loss(model(xm), ym, reduction="sum") / total
        lm.backward()
        loss += float(lm.detach())
    return loss


def block_profile(width, batches, nblocks=64, reps=5):
    """Seconds per residual block (forward + backward) for each micro-batch size."""
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
        t = med(ts[1:]) / nblocks
        out[str(b)] = {"fwd_bwd_s": t, "fwd_s": med(fwd[1:]) / nblocks, "gemm_gflops": flops / t / 1e9}
    return out


def dispatch_cost(reps=2000):
    """Seconds of one tiny eager op (torch.add on 1-element tensors): the per-op floor."""
    a, b = torch.ones(1), torch.ones(1)
    for _ in range(100):
        torch.add(a, b)
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.add(a, b)
    return (time.perf_counter() - t0) / reps


def run_serial(job):
    device = torch.device(job.get("device", "cpu"))
    cpu = device.type == "cpu"
    out = {"models": {}, "dispatch_s": dispatch_cost() if cpu else None}
    for name, m in job["models"].items():
        model, x, y = make_model(m, device)
        res = {}
        for M in job["microbatches"]:
            for _ in range(job["warmup"]):
                serial_step(model, x, y, M)
            ts = []
            for _ in range(job["steps"]):
                dt, loss = timed(device, serial_step, model, x, y, M)
                ts.append(dt)
            with SavedTensorMeter(model.parameters()) as meter:
                serial_step(model, x, y, M)
            res[str(M)] = {"step_s": med(ts), "steps_s": ts, "loss": loss, "peak_saved_bytes": meter.peak}
            log(0, f"[serial] {name:8s} P=1 M={M:<2d} step {1e3 * med(ts):8.1f} ms  "
                   f"peak saved {meter.peak / 2**20:7.2f} MiB")
        mbs = sorted({m["batch"] // M for M in job["microbatches"]} | {m["batch"]})
        out["models"][name] = {"by_M": res, "block_profile": block_profile(m["width"], mbs) if cpu else None}
    return out


# --------------------------------------------------------------------------------------------
# layer-parallel (gloo / mpi)
# --------------------------------------------------------------------------------------------

class TorchPipe:
    """torch.distributed.pipelining on the same shard: one PipelineStage + one schedule."""

    def __init__(self, shard, rank, size, schedule, M, device):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
        self.shard, self.rank, self.size, self.device = shard, rank, size, device
        self.stage = PipelineStage(shard, rank, size, device)
        cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
        # mean cross-entropy per micro-batch, gradients divided by M (scale_grads): the same
        # mean-over-the-batch loss as parml's sum / batch for equal micro-batches
        self.sched = cls(self.stage, M, loss_fn=lambda out, tgt: tf.cross_entropy(out, tgt),
                         scale_grads=True)
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


def grad_diff(a_params, b_params):
    worst = 0.0
    for a, b in zip(a_params, b_params):
        if a.grad is None or b.grad is None:
            continue
        scale = max(float(a.grad.abs().max()), 1e-30)
        worst = max(worst, float((a.grad - b.grad).abs().max()) / scale)
    return worst


def peak_saved(comm, params, step, *args):
    """Peak bytes autograd saves during one (untimed) `step(*args)`, all ranks starting together."""
    comm.barrier()
    with SavedTensorMeter(params) as meter:
        step(*args)
    return meter.peak


def ping_pong(comm, nbytes_list, reps=200):
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
        out[str(n)] = (time.perf_counter() - t0) / (2 * reps)
    comm.barrier()
    return out


def run_parallel(job):
    from parml.comm import make_communicator
    from parml.parallel.executor import LayerParallel
    from parml.parallel.layout import partition_blocks

    kind = job["backend"]
    comm = make_communicator("mpi" if kind == "mpi" else "torch", timeout=job["comm_timeout"],
                             device=job.get("device", "cpu"))
    device = comm.device                     # cuda:LOCAL_RANK (modulo the GPUs) on a GPU node
    rank, P = comm.rank, comm.size
    # a rank of its own per core (CPU) or per GPU; else ranks time-slice and bubbles fill up
    units = torch.cuda.device_count() if device.type == "cuda" else (os.cpu_count() or 1)
    # split "other" further: seconds inside comm.isend (posting a send) and inside the loss
    # broadcast of LayerParallel (the last rank waits there for rank 0 to finish)
    spent = {"isend": 0.0, "broadcast": 0.0}

    def _timed(fn, key):
        def call(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t0
        return call

    channels = [comm]
    if comm.ordered_p2p and comm.size > 1:       # NCCL: the stages send on one group per direction
        from parml.parallel.stage import direction_groups
        channels += list(direction_groups(comm))
    for c in channels:
        c.isend = _timed(c.isend, "isend")
    comm.broadcast = _timed(comm.broadcast, "broadcast")
    torch_ok, torch_err = False, None
    if job["torch_pipelining"] and kind != "mpi":
        try:
            # not `import torch.distributed.pipelining`: that would make `torch` a local name of this
            # function, unbound where the CUDA path reads torch.cuda above
            importlib.import_module("torch.distributed.pipelining")
            torch_ok = True
        except Exception as exc:  # pragma: no cover - depends on the torch build
            torch_err = f"import failed: {exc}"
    out = {"backend": kind, "P": P, "models": {}, "torch_pipelining_error": torch_err}
    for name, m in job["models"].items():
        model, x, y = make_model(m, device)
        part = partition_blocks(model.spec.total_blocks, P)
        a, b = part.range(rank)
        entries = []
        for schedule in job["schedules"]:
            for M in job["microbatches"]:
                lp = LayerParallel(model, comm, schedule=schedule, microbatches=M)
                # ablation: the same executor computing weight gradients inside each backward
                ip = (LayerParallel(model, comm, schedule=schedule, microbatches=M, weight_grads="inline")
                      if job.get("inline_ablation") and kind != "mpi" else None)
                tp, tp_err = None, None
                if torch_ok:
                    if schedule == "1f1b" and M < P:
                        tp_err = f"Schedule1F1B needs M >= P (M={M}, P={P})"
                    else:
                        try:
                            tp = TorchPipe(model.shard(a, b).to(device), rank, P, schedule, M, device)
                        except Exception as exc:
                            tp_err = f"{type(exc).__name__}: {exc}"
                comm.barrier()
                for _ in range(job["warmup"]):
                    loss = lp.forward_backward(x, y)
                    if ip is not None:
                        comm.barrier()
                        ip.forward_backward(x, y)
                    if tp is not None:
                        comm.barrier()
                        tp.step(x, y)
                    comm.barrier()
                rows, ttimes, itimes = [], [], []
                for _ in range(job["steps"]):
                    comm.barrier()
                    i0, b0 = spent["isend"], spent["broadcast"]
                    dt, loss = timed(device, lp.forward_backward, x, y)
                    t = lp.times
                    step = t.step if device.type == "cpu" else dt
                    rows.append((step, t.compute, t.wait, max(step - t.compute - t.wait, 0.0),
                                 spent["isend"] - i0, spent["broadcast"] - b0))
                    if ip is not None:
                        comm.barrier()
                        dt, _ = timed(device, ip.forward_backward, x, y)
                        itimes.append(ip.times.step if device.type == "cpu" else dt)
                    if tp is not None:
                        comm.barrier()
                        ttimes.append(tp.step(x, y))
                gdiff = grad_diff(lp.model.parameters(), tp.shard.parameters()) if tp is not None else None
                peak = peak_saved(comm, lp.model.parameters(), lp.forward_backward, x, y)
                # deferred weight gradients keep a micro-batch's states until its weight gradients
                # are formed, right after its backward, plus one micro-batch's adjoints: count them too
                peak = max(peak, lp.stage.deferred.peak_bytes if lp.stage.deferred is not None else 0)
                ipeak = (peak_saved(comm, ip.model.parameters(), ip.forward_backward, x, y)
                         if ip is not None else None)
                tpeak = (peak_saved(comm, tp.shard.parameters(), tp.step, x, y)
                         if tp is not None else None)
                mine = {"rows": rows, "loss": loss, "peak": peak, "ttimes": ttimes, "itimes": itimes,
                        "ipeak": ipeak,
                        "tloss": tp.loss if tp is not None else None, "tpeak": tpeak, "gdiff": gdiff,
                        "bytes_sent": comm.bytes_sent, "range": [a, b]}
                allr = comm.allgather_object(mine)
                if rank == 0:
                    e = summarize(name, m, kind, P, schedule, M, allr, tp is not None, tp_err or torch_err,
                                  oversubscribed=P > units)
                    entries.append(e)
                    print(progress_line(e), flush=True)
                del lp, ip, tp
                gc.collect()  # drop the schedule's cycles while the process group is alive
        out["models"][name] = entries
    if P == 2 and job.get("latency_bytes"):
        lat = ping_pong(comm, job["latency_bytes"], job.get("latency_reps", 200))
        if rank == 0:
            out["latency_s"] = lat
            print(f"[{kind}] P=2 one-way latency (comm.send/recv): " +
                  ", ".join(f"{int(k)} B {1e6 * v:.0f} us" for k, v in lat.items()), flush=True)
    comm.barrier()
    comm.close()
    return out if rank == 0 else None


def summarize(name, m, kind, P, schedule, M, allr, have_torch, torch_err, oversubscribed=False):
    steps = len(allr[0]["rows"])
    step_each = [max(r["rows"][i][0] for r in allr) for i in range(steps)]
    step = med(step_each)
    per_rank = []
    for r in allr:
        rows = r["rows"]
        per_rank.append({"step_s": med([t[0] for t in rows]), "compute_s": med([t[1] for t in rows]),
                         "wait_s": med([t[2] for t in rows]), "other_s": med([t[3] for t in rows]),
                         "other_isend_s": med([t[4] for t in rows]),
                         "other_loss_broadcast_s": med([t[5] for t in rows]),
                         "step_min_s": min(t[0] for t in rows),
                         "peak_saved_bytes": r["peak"], "blocks": r["range"],
                         "torch_peak_saved_bytes": r["tpeak"]})
    busiest = max(p["compute_s"] for p in per_rank)
    bound = M / (M + P - 1)
    eff = busiest / step
    e = {"model": name, "backend": kind, "P": P, "M": M, "schedule": schedule,
         "oversubscribed": oversubscribed,
         "step_s": step, "step_min_s": min(step_each), "steps_s": step_each, "per_rank": per_rank,
         "busiest_compute_s": busiest, "efficiency": eff, "bound": bound, "eff_over_bound": eff / bound,
         "samples_per_s": m["batch"] / step, "loss": allr[-1]["loss"],
         "peak_saved_bytes_max": max(p["peak_saved_bytes"] for p in per_rank),
         "torch": None, "inline": None}
    if allr[0]["itimes"]:
        i_each = [max(r["itimes"][i] for r in allr) for i in range(steps)]
        e["inline"] = {"step_s": med(i_each), "steps_s": i_each,
                       "deferred_over_inline_paired": med([i / p for i, p in zip(i_each, step_each)]),
                       "peak_saved_bytes_max": max(r["ipeak"] for r in allr)}
    if have_torch:
        t_each = [max(r["ttimes"][i] for r in allr) for i in range(steps)]
        tstep = med(t_each)
        paired = med([t / p for t, p in zip(t_each, step_each)])
        e["torch"] = {"step_s": tstep, "step_min_s": min(t_each), "steps_s": t_each,
                      "loss": allr[-1]["tloss"], "parml_over_torch_paired": paired,
                      "loss_abs_diff": abs(allr[-1]["tloss"] - allr[-1]["loss"]),
                      "grad_max_rel_diff": max(r["gdiff"] for r in allr),
                      "peak_saved_bytes_max": max(r["tpeak"] for r in allr),
                      "parml_over_torch_throughput": tstep / step}
    elif torch_err:
        e["torch"] = {"error": torch_err}
    return e


def progress_line(e):
    ranks = " ".join(f"{1e3 * p['compute_s']:.0f}/{1e3 * p['wait_s']:.0f}/{1e3 * p['other_s']:.0f}"
                     for p in e["per_rank"])
    s = (f"[{e['backend']}] {e['model']:8s} P={e['P']}{'*' if e['oversubscribed'] else ' '} "
         f"M={e['M']:<2d} {e['schedule']:5s} step {1e3 * e['step_s']:8.1f} ms  eff {e['efficiency']:.3f} "
         f"(bound {e['bound']:.3f}, ratio {e['eff_over_bound']:.2f})  c/w/o ms {ranks}")
    if e.get("inline"):
        s += f"  | inline-W {1e3 * e['inline']['step_s']:.1f} ms"
    t = e.get("torch")
    if t and "step_s" in t:
        s += f"  | torch {1e3 * t['step_s']:8.1f} ms, parml/torch {t['parml_over_torch_throughput']:.2f}x"
    elif t and "error" in t:
        s += "  | torch n/a"
    return s


def main():
    job_path, result_path = sys.argv[1], sys.argv[2]
    with open(job_path) as f:
        job = json.load(f)
    torch.manual_seed(0)
    if job["backend"] == "serial":
        out = run_serial(job)
    else:
        out = run_parallel(job)
    if out is not None:
        tmp = result_path + ".part"
        with open(tmp, "w") as f:
            json.dump(out, f)
        os.replace(tmp, result_path)
    # skip interpreter teardown: a gloo process group can abort in its destructor at exit
    # ("terminate called without an active exception") after all work is done and written
    from parml.comm import exit_process
    exit_process(0)


if __name__ == "__main__":
    main()
