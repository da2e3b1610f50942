"""Compute costs of this machine, timed through parml's own code (see ``calibrate``).

A ``parallel.stage.PipelineStage`` holding a shard of a ``model.build_model`` network runs
``forward`` / ``backward`` (and its deferred weight-gradient ``flush``) exactly as the executor
calls them, with a loopback communicator in place of the neighbours, for the first, a middle and
the last rank of a pipeline. Per-step bookkeeping is timed on ``mgopt.Level`` over a one-rank
``LayerParallel``. On a CPU the clock is the thread's CPU time, so that other processes on a
shared machine do not inflate the costs.
"""
from __future__ import annotations

import statistics
import time

import torch

from ..comm import SelfComm
from ..kernels import FUSED_INLINE_MAX_WIDTH, attach_kernels
from ..kernels.cpu import available as fused_available
from ..kernels.network import NetworkGradient, auto_network
from ..model import ModelSpec, StageSpec, build_model
from ..multilevel.hierarchy import IndexTransfers, prolongate, restrict_gradient, restrict_parameters
from ..multilevel.mgopt import Level, level_optimizer
from ..parallel.executor import LayerParallel
from ..parallel.stage import PipelineStage
from .profile import NETWORK_IO, Fit, KernelCost

KERNEL_FEATURES = ["1", "n", "n*b", "n*b*v*s", "n*b*v^2*s", "n*v^2"]
NETWORK_FEATURES = KERNEL_FEATURES + ["b"]     # the blocks, and the opening, head and loss per row
FIRST_FEATURES = ["1", "b*v*s", "b*i*v*s"]
LAST_FEATURES = ["1", "b*v*s", "b*o*v"]
PARAM_FEATURES = ["1", "p"]
WIDTH_FEATURES = ["1", "n", "n*b"]        # one width: per chunk, per block, per block and row
MAX_ELEMENTS = 6e8      # n·b·v² cap of one timed kernel call (keeps the full grid in minutes)


# --- timing helpers --------------------------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock(device):
    """The compute clock: this thread's CPU time on a CPU (one torch thread per rank), so that
    other processes on a shared machine do not inflate the costs; wall time on a GPU."""
    return time.perf_counter if device.type == "cuda" else time.thread_time


def _median_time(fn, device, min_time, max_reps):
    """Median of repeated timings of fn() (which returns a dict of parts), after one warm-up."""
    return _interleaved([fn], device, min_time, max_reps)[0]


def _interleaved(fns, device, min_time, max_reps, min_reps=5):
    """Per fn, the median of its parts over rounds that call every fn once in turn (so that
    the load of a shared machine drifts alike for all of them); one warm-up round first."""
    for fn in fns:
        fn()
    samples, spent, clock = [[] for _ in fns], 0.0, _clock(device)
    while True:
        for fn, acc in zip(fns, samples):
            _sync(device)
            t0 = clock()
            acc.append(fn())
            _sync(device)
            spent += clock() - t0
        n = len(samples[0])
        if n >= max_reps or (n >= min_reps and spent >= min_time * len(fns)):
            break
    return [{k: statistics.median(s[k] for s in acc) for k in acc[0]} for acc in samples]


class _Done:
    def wait(self):
        return None

    def done(self):
        return True


class LoopbackComm:
    """Stands in for a pipeline's neighbours: sends complete at once, receives yield random states."""

    def __init__(self, rank, size, device):
        self.rank, self.size, self.device = rank, size, device

    def isend(self, tensor, dst, tag=0):
        return _Done()

    def irecv(self, tensor, src, tag=0):
        tensor.normal_(0.0, 0.5)
        return _Done()

    def recv(self, tensor, src, tag=0):
        tensor.normal_(0.0, 0.5)


def _stage_timer(spec, role, n, rows, device, weight_grads, dtype=torch.float32):
    """fn() timing one micro-batch through a PipelineStage: F, B (adjoint), W (deferred flush),
    finish (writing .grad); role: first | middle | last of a 3-rank pipeline."""
    model = build_model(spec, seed=0, dtype=dtype)
    rank = {"first": 0, "middle": 1, "last": 2}[role]
    shard = model.shard(rank * n, (rank + 1) * n).to(device)
    attach_kernels(shard, "auto")           # the kernels LayerParallel attaches by default
    stage = PipelineStage(shard, LoopbackComm(rank, 3, device), device, weight_grads)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(rows, spec.in_features, generator=gen, dtype=dtype).to(device)
    if spec.conv:
        x = x.reshape(rows, *spec.input_shape)
    y = torch.randint(0, spec.out_features, (rows,), generator=gen).to(device)
    w_time, clock = [0.0], _clock(device)
    if stage.deferred is not None:
        flush = stage.deferred.flush

        def timed(m=None):
            _sync(device)
            t = clock()
            flush(m)
            _sync(device)
            w_time[0] += clock() - t
        stage.deferred.flush = timed

    def one():
        for p in shard.parameters():
            p.grad = None
        stage.begin_step()
        stage.post_receives([rows])
        stage.deferring(True)
        _sync(device)
        t0 = clock()
        stage.forward(0, x, y, rows)
        _sync(device)
        t1 = clock()
        w_time[0] = 0.0
        stage.backward(0)
        _sync(device)
        t2 = clock()
        w = w_time[0]
        stage.flush_weight_grads()
        _sync(device)
        t3 = clock()
        stage.deferring(False)
        stage.end_step()
        stage.finish_sends()
        return {"F": t1 - t0, "B": t2 - t1 - w, "W": w, "finish": t3 - t2}
    return one


def _dense_spec(width, blocks, in_features=8, out_features=4):
    return ModelSpec(in_features, out_features, (StageSpec(width, blocks),))


def _conv_spec(channels, side, blocks, in_channels=1, out_features=10):
    return ModelSpec(in_channels * side * side, out_features, (StageSpec(channels, blocks, "conv"),),
                     input_shape=(in_channels, side, side))


# --- compute ---------------------------------------------------------------------------------------

def measure_kernels(grid, device, log=print):
    """Dense kernels (deferred and inline weight gradients), the ends, and the finish step."""
    out, ends_pts = {}, {"first_F": ([], []), "first_B": ([], []), "last_F": ([], []), "last_B": ([], [])}
    finish_pts = ([], [])
    for wg, name in (("deferred", "dense"), ("inline", "dense-inline")):
        pts, F, B, W = [], [], [], []
        for v in grid["widths"]:
            for b in grid["rows"]:
                for n in grid["blocks"]:
                    if n * b * v * v > MAX_ELEMENTS:
                        continue
                    t = _median_time(_stage_timer(_dense_spec(v, 3 * n), "middle", n, b, device, wg), device,
                                     grid["min_time"], grid["max_reps"])
                    pts.append({"n": n, "b": b, "v": v, "s": 1})
                    F.append(t["F"])
                    B.append(t["B"])
                    W.append(t["W"])
                    if wg == "deferred":
                        finish_pts[0].append({"p": n * (v * v + v)})
                        finish_pts[1].append(t["finish"])
        kc = KernelCost(Fit.fitted(KERNEL_FEATURES, pts, F), Fit.fitted(KERNEL_FEATURES, pts, B),
                        Fit.fitted(KERNEL_FEATURES, pts, W) if wg == "deferred" else Fit.constant(0.0),
                        f"Euler dense blocks, --kernel auto, weight grads {wg}; PipelineStage middle rank",
                        [[p["n"], p["b"], p["v"], 1, f, b_, w] for p, f, b_, w in zip(pts, F, B, W)])
        out[name] = with_width_fits(kc, wg == "deferred")
        log(f"  kernel {name}: {len(pts)} points, F fit median/max rel. error "
            f"{kc.forward.median_rel_error:.1%}/{kc.forward.max_rel_error:.1%}, B "
            f"{kc.backward.median_rel_error:.1%}/{kc.backward.max_rel_error:.1%}")
    n = min(grid["blocks"])
    roles = ("middle", "first", "last")
    ends_scale = []
    ends_pts.update({f"{key}_manual": ([], []) for key in list(ends_pts)})
    for i_f, o_f in grid["ends_io"]:
        for v in grid["ends_widths"]:
            for b in grid["ends_rows"]:
                spec = _dense_spec(v, 3 * n, i_f, o_f)
                manual_ends = auto_network(spec, device.type) and v <= FUSED_INLINE_MAX_WIDTH and fused_available()[0]
                measured = _interleaved([_stage_timer(spec, r, n, b, device, "deferred") for r in roles], device,
                                        grid["min_time"], 3 * grid["max_reps"], 3 * 5)
                times = dict(zip(roles, measured))
                _add_ends(ends_pts, "", times, b, v, i_f, o_f, ends_scale)
                if manual_ends:        # the same shards without autograd (``PipelineStage.manual``)
                    measured = _interleaved([_stage_timer(spec, r, n, b, device, "inline") for r in roles],
                                            device, grid["min_time"], 3 * grid["max_reps"], 3 * 5)
                    _add_ends(ends_pts, "_manual", dict(zip(roles, measured)), b, v, i_f, o_f, ends_scale)
    ends = {}
    floor = statistics.median(ends_scale)   # errors relative to a rank's time, not to the difference
    for key, (pts, ys) in ends_pts.items():
        if pts:
            ends[key] = Fit.fitted(FIRST_FEATURES if key.startswith("first") else LAST_FEATURES, pts, ys, floor)
    finish = Fit.fitted(PARAM_FEATURES, *finish_pts)
    return out, ends, finish


def _network_timer(spec, rows, device):
    """fn() timing one ``NetworkGradient`` call (the whole model's loss and gradients on one rank)
    as ``LayerParallel`` makes it, or None where the model does not take that path."""
    model = build_model(spec, seed=0).to(device)
    network = NetworkGradient.build(model, attach_kernels(model, "auto"))
    if network is None:
        return None
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(rows, spec.in_features, generator=gen)
    y = torch.randint(0, spec.out_features, (rows,), generator=gen)
    clock = _clock(device)

    def one():
        t0 = clock()
        network.grad(x, y, rows)
        return {"F": clock() - t0}
    return one


def measure_network(grid, device, log=print) -> KernelCost | None:
    """The one-rank path of a whole dense model (``kernels.NetworkGradient``): loss and every
    gradient per call, stored as the forward of kernel "network" (no backward or weight parts);
    None where no measured width takes it (numba missing, a GPU, only wide blocks)."""
    pts, F = [], []
    for v in grid["widths"]:
        for b in grid["rows"]:
            for n in grid["blocks"]:
                if n * b * v * v > MAX_ELEMENTS:
                    continue
                fn = _network_timer(_dense_spec(v, n, *NETWORK_IO), b, device)
                if fn is None:
                    continue
                pts.append({"n": n, "b": b, "v": v, "s": 1})
                F.append(_median_time(fn, device, grid["min_time"], grid["max_reps"])["F"])
    if len(pts) < len(NETWORK_FEATURES):
        return None
    zero = Fit.constant(0.0)
    kc = KernelCost(Fit.fitted(NETWORK_FEATURES, pts, F), zero, zero,
                    "one rank, whole dense model: loss and gradients without autograd (kernels.NetworkGradient)",
                    [[p["n"], p["b"], p["v"], 1, f, 0.0, 0.0] for p, f in zip(pts, F)])
    kc = with_width_fits(kc, False)
    log(f"  kernel network: {len(pts)} points, fit median/max rel. error "
        f"{kc.forward.median_rel_error:.1%}/{kc.forward.max_rel_error:.1%}")
    return kc


def _add_ends(ends_pts, suffix, times, b, v, i_f, o_f, scale):
    """The first and last roles' extra time over the middle one: the opening, the head and loss."""
    for role, extra in (("first", {"i": i_f}), ("last", {"o": o_f})):
        for k in ("F", "B"):
            diff = times[role][k] - times["middle"][k]
            ends_pts[f"{role}_{k}{suffix}"][0].append({"b": b, "v": v, "s": 1, **extra})
            ends_pts[f"{role}_{k}{suffix}"][1].append(max(diff, 0.0))
            scale.append(times["middle"][k])


def with_width_fits(kc: KernelCost, weight: bool = True) -> KernelCost:
    """Add a fit per measured width (``KernelCost.by_width``) from the kernel's measured points."""
    widths = sorted({int(m[2]) for m in kc.measured})
    kc.by_width = {}
    for v in widths:
        rows = [m for m in kc.measured if int(m[2]) == v]
        if len(rows) < len(WIDTH_FEATURES):
            continue
        pts = [{"n": m[0], "b": m[1], "v": v, "s": m[3]} for m in rows]
        kc.by_width[str(v)] = [Fit.fitted(WIDTH_FEATURES, pts, [m[4 + k] for m in rows]) if k < 2 or weight
                               else Fit.constant(0.0) for k in range(3)]
    return kc


def measure_conv(grid, device, log=print):
    if not grid["conv"]:
        return None
    pts, F, B = [], [], []
    for c, side in grid["conv"]:
        for b in (16, 64):
            for n in (2, 6):
                t = _median_time(_stage_timer(_conv_spec(c, side, 3 * n), "middle", n, b, device, "deferred"),
                                 device, grid["min_time"], grid["max_reps"])
                pts.append({"n": n, "b": b, "v": c, "s": side * side})
                F.append(t["F"])
                B.append(t["B"] + t["W"])
    kc = KernelCost(Fit.fitted(KERNEL_FEATURES, pts, F), Fit.fitted(KERNEL_FEATURES, pts, B), Fit.constant(0.0),
                    "3x3 conv blocks (autograd), no norm; PipelineStage middle rank",
                    [[p["n"], p["b"], p["v"], p["s"], f, b_, 0.0] for p, f, b_ in zip(pts, F, B)])
    log(f"  kernel conv: {len(pts)} points, F fit median/max rel. error "
        f"{kc.forward.median_rel_error:.1%}/{kc.forward.max_rel_error:.1%}")
    return kc


def _level_timer(lev, ex, x, y, device):
    """fn() timing Level.gradient_vector beyond the stage's compute, the update after a cached gradient
    (Level.smooth), and one restriction / prolongation pass over the level's parameters."""
    ids, clock = iter(range(10 ** 9)), _clock(device)
    maps = None if lev.theta is None else IndexTransfers(
        [torch.empty(p.shape[0] // 2, *p.shape[1:]) if b else p for p, b in zip(lev.params, lev.mask)], lev.mask)

    def one():
        c0 = ex.stage.compute_seconds
        _sync(device)
        w0, t0 = time.perf_counter(), clock()
        bid = next(ids)
        lev.gradient_vector((x, y), bid)
        _sync(device)
        w1, t1 = time.perf_counter(), clock()
        lev.smooth(1, None, (x, y), bid)        # the gradient is cached: only the update runs
        _sync(device)
        t2 = clock()
        if maps is not None:                    # a CPU level: index maps on θ, as ``VCycle`` runs them
            rp = maps.restrict_parameters(lev.theta)
            maps.restrict_gradient(lev.theta)
            lev.add(maps.prolongate(rp * 0))
        else:
            vals = lev.values()
            rp = restrict_parameters(vals, lev.mask)
            restrict_gradient(vals, lev.mask)
            lev.add(prolongate([r * 0 for r in rp], lev.mask))
        _sync(device)
        t3 = clock()
        # the stage counts its compute in wall seconds: scale it to this clock
        inside = (ex.stage.compute_seconds - c0) * ((t1 - t0) / (w1 - w0) if w1 > w0 else 1.0)
        return {"grad": (t1 - t0) - inside, "update": t2 - t1, "transfer": (t3 - t2) / 3}
    return one


def measure_steps(grid, device, log=print):
    """Per gradient evaluation: Level.gradient_vector and the executor around the stage's compute; per
    optimizer update; per restriction/prolongation list (elementwise passes), against p."""
    pts, grad_t, upd_t, tr_t = [], [], [], []
    for v in grid["widths"][:3]:
        for K in (16, 128):
            spec = _dense_spec(v, K, 8, 4)
            model = build_model(spec, seed=0)
            ex = LayerParallel(model, SelfComm(device=device), "1f1b", 1, device=device)
            lev = Level(ex, 1e-4, 1.0 / K, "l2", 1.0, level_optimizer("sgd", 1e-3))
            x = torch.randn(64, 8).to(device)
            y = torch.randint(0, 4, (64,)).to(device)
            t = _median_time(_level_timer(lev, ex, x, y, device), device, grid["min_time"], grid["max_reps"])
            pts.append({"p": sum(p.numel() for p in model.parameters())})
            grad_t.append(max(t["grad"], 1e-7))
            upd_t.append(max(t["update"], 1e-7))
            tr_t.append(max(t["transfer"], 1e-7))
    return {"gradient": Fit.fitted(PARAM_FEATURES, pts, grad_t), "update": Fit.fitted(PARAM_FEATURES, pts, upd_t),
            "transfer": Fit.fitted(PARAM_FEATURES, pts, tr_t)}
