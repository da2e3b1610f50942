"""The fused CPU kernel as an autograd Function: one numba call per chunk forward and backward (a few
where a chunk runs in segments).

A chunk of K stacked dense blocks (Euler or midpoint RK2, relu / tanh / sigmoid, float32 / float64)
is one autograd node. The forward streams tiles of the batch through all K blocks (``_numba_dense``)
and keeps y_k (feature-major, [K, v, B]); the stage activations σ(z) are kept too, except for relu
at tiny widths, where recomputing z = W y + b in the backward is cheaper than the memory traffic
(``keep_activations``). Where the kept y_k would not fit the last-level cache, the chunk runs in
segments that keep only their inputs, and the backward reruns each before its adjoint
(``segment_blocks``). The backward returns the input adjoint and the weight gradients, either
inline (summed inside the kernel) or — with a deferred sink — as per-block adjoints handed to the
sink, which forms them with one batched matmul.

Deferred sink protocol (``model.DeferredWeightGrads`` satisfies it unchanged):
    buffer(like, blocks) -> a [blocks, *like.shape] tensor; the kernel also accepts the transposed
        views it hands back itself (recycled buffers), i.e. tensors whose transpose(1, 2) is
        contiguous, so the buffers live feature-major.
    add(chunk, ys, gas, h): ys, gas are [K, N, v] (views of feature-major storage) with
        ∂W_k = h Σ_n gas[k, n]ᵀ ys[k, n] and ∂b_k = h Σ_n gas[k, n]. Euler: N = P, (y_k, σ'⊙λ),
        P = the batch padded to whole tiles (padding samples have gas = 0: exact zeros in the sums).
        RK2: N = 2P, the two stage evaluations side by side, ys = (y'_k | y_k) and
        gas = (g2 | g1 / 2) — the ½ of the first stage's weight (h/2) is folded into gas (exact,
        a power of two), so flush's single bmm is right for both steppers.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch

ACTIVATION_CODES = {"relu": 0, "tanh": 1, "sigmoid": 2}
STEPPER_CODES = {"euler": 0, "rk2": 1}
DTYPES = (torch.float32, torch.float64)
NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


@functools.lru_cache(maxsize=1)
def _load_numba():
    """The compiled kernels module; raises ImportError (with the reason) where numba cannot load."""
    try:
        import numba  # noqa: F401

        from . import _numba_dense
    except Exception as e:   # ImportError, or numba refusing this numpy version
        first = str(e).splitlines()[0] if str(e) else ""
        raise ImportError(f"numba kernels cannot load ({type(e).__name__}: {first})") from e
    tolerate_cache_write_errors(_numba_dense)
    return _numba_dense


def tolerate_cache_write_errors(module) -> None:
    """numba writes its on-disk cache on a function's first compile, next to the module. A full disk
    or a file-size limit there must not fail a training step (the compiled code is already in
    memory; only the next process's start-up is slower), so failed cache writes are dropped."""
    for obj in vars(module).values():
        cache = getattr(obj, "_cache", None)
        save = getattr(cache, "save_overload", None)
        if save is not None and not getattr(save, "tolerant", False):
            cache.save_overload = _dropping_os_errors(save)


def _dropping_os_errors(save):
    def tolerant(sig, data):
        try:
            save(sig, data)
        except OSError:
            pass
    tolerant.tolerant = True
    return tolerant


def _cache_dir() -> Path:
    """Where numba writes the compiled kernels' cache (``cache=True``): beside the module."""
    return Path(__file__).resolve().parent / "__pycache__"


def needs_compile() -> bool:
    """Whether this process will compile the fused kernels rather than load them (10-40 s once per
    machine and dtype): numba's cache beside the module has no index yet, as in a fresh clone.
    False where unsure (the cache elsewhere, ``NUMBA_CACHE_DIR``, a read-only install)."""
    if os.environ.get("NUMBA_CACHE_DIR") or not os.access(_cache_dir().parent, os.W_OK):
        return False
    return not any(_cache_dir().glob("_numba_dense.*.nbi"))


def available() -> tuple[bool, str | None]:
    """(True, None) where the compiled kernels load, else (False, one-line reason)."""
    try:
        _load_numba()
    except ImportError as e:
        return False, str(e)
    return True, None


def tile_size(width: int, batch: int, threads: int = 1, recompute: bool = False) -> int:
    """Samples per tile. Each inner loop runs over a tile, and its fixed cost (set-up, overlap
    checks, remainder) is paid per block and tile, so tiles are as long as L2 allows: the six
    [v, tile] buffers of the backward within ~200 KiB, i.e. at most 8192 / v samples (power of
    two, 64..2048; measured at batch 2000: width 3 tile 2000 vs 256 1.6x, width 32 256 vs 32 1.6x).
    A backward that recomputes σ (`recompute`, ``keep_activations``) runs best on half that: chunk
    forward and backward from a cold cache, relu, batch 2000, width 3 6.9 → 6.3 ms (1024 blocks),
    width 8 9.7 → 8.0 ms (256 blocks); the circles V-cycle 75-76 → 69-71 ms. Where σ is stored
    the halved tile is slower (tanh, width 3: 30.9 → 33.5 ms; relu, width 12: 20.9 → 24.0 ms).
    The batch is split into equal tiles, at least one per thread, each a multiple of 32 samples
    (8-wide vectors, 4 in flight): the loops then have no scalar remainder (the last tile is padded)."""
    budget = 4096 if recompute else 8192
    cap = 1 << max(6, min(11, (budget // max(width, 1)).bit_length() - 1))
    ntiles = max((batch + cap - 1) // cap, min(threads, (batch + 31) // 32))
    per_tile = (batch + ntiles - 1) // ntiles
    return max(32, (per_tile + 31) // 32 * 32)


#: a chunk whose kept states y_k would exceed this is run in segments (``segment_blocks``)
SEGMENT_ABOVE_BYTES = 4 << 20
#: the states one segment keeps at a time
SEGMENT_BYTES = 3 << 20


def segment_blocks(blocks: int, width: int, columns: int, itemsize: int) -> int:
    """Blocks per segment of a chunk trained with its weight gradients inline and σ recomputed.

    The backward reads every y_k the forward stored. Past the last-level cache (32 MB here, shared
    by the cores) it reads them from memory: width 3, batch 2000, one thread, forward and backward
    of 512 blocks take 2.7 ms, of 1024 blocks 7.6 ms, of 2048 blocks 18.2 ms. So past
    ``SEGMENT_ABOVE_BYTES`` the forward keeps only each segment's input, and the backward reruns a
    segment (states of ~``SEGMENT_BYTES``, which stay in cache) before its adjoint: 2048 blocks
    13.2 ms (batch 1000: 7.2 → 5.9 ms), for one more forward's arithmetic.

    The threshold is well below the cache: in a V-cycle the other levels run between two gradients
    of a level and evict its buffers, so a whole chunk writes its states cold, and data replicas on
    the same chip share the cache. Width 3, circles V-cycle, 3 launches each: one process 75.7-79.2
    ms (16 MiB) against 74.2-76.2 ms (4 MiB), the (2, 1) mesh cycle 42.0-43.8 against 38.2-38.8 ms
    (fastest of 40). Repeating one chunk in a warm cache favours whole chunks up to ~12 MiB (512 x
    2000: 2.7 against 3.1 ms); a V-cycle does not. Returns `blocks` for no segments."""
    per_block = width * columns * itemsize
    if blocks * per_block <= SEGMENT_ABOVE_BYTES:
        return blocks
    return max(32, min(blocks, SEGMENT_BYTES // per_block))


def keep_activations(activation: str, width: int) -> bool:
    """Store σ(z) for the backward, or recompute z = W y + b there. tanh and sigmoid: store (exp
    costs more than reading). relu: recompute up to width 8, where the small matvec is cheaper than
    the memory traffic (step 1.29x faster at width 3, batch 2000; 1.1x at width 8, batch 1000);
    store above (1.1x the other way at width 32, batch 100; benchmarks/kernels.py, policy table)."""
    return activation != "relu" or width > 8


def _threads(ntiles: int) -> int:
    """Threads for this call: torch's setting (``--threads``), at most one per tile. numba's
    "workqueue" layer unless NUMBA_THREADING_LAYER says otherwise: it starts no second OpenMP
    runtime next to torch's, whose spinning threads would compete with torch's."""
    n = min(torch.get_num_threads(), ntiles)
    if n > 1:
        import numba
        if "NUMBA_THREADING_LAYER" not in os.environ and numba.config.THREADING_LAYER == "default":
            numba.config.THREADING_LAYER = "workqueue"   # read at the first parallel launch
        n = min(n, numba.config.NUMBA_NUM_THREADS)
        numba.set_num_threads(n)
    return max(n, 1)


class _BufferPool:
    """Recycled multi-MiB state buffers. A fresh allocation of that size is an mmap whose every
    4 KiB page faults (and is zeroed) on first touch: 30-50 % of a width-32 step when measured.
    A buffer goes back when its backward is done; at most ``limit`` per shape are held."""

    def __init__(self, limit: int = 8):
        self.limit = limit
        self._free: dict[tuple, list] = {}

    def take(self, shape, dtype) -> torch.Tensor:
        free = self._free.get((tuple(shape), dtype))
        return free.pop() if free else torch.empty(shape, dtype=dtype)

    def give(self, *tensors):
        for t in tensors:
            if t.numel() >= 4096:
                free = self._free.setdefault((tuple(t.shape), t.dtype), [])
                if len(free) < self.limit:
                    free.append(t)

    def clear(self):
        self._free.clear()


POOL = _BufferPool()


@functools.lru_cache(maxsize=64)
def _consts(h: float, dtype: torch.dtype):
    """(h, h/2, 1, 0, 1/2, 2, tanh cut-off) in the working dtype (shared by calls; never written)."""
    return torch.tensor([h, h / 2, 1.0, 0.0, 0.5, 2.0, 20.0], dtype=dtype).numpy()


def _feature_major(buf: torch.Tensor, K: int, v: int, n: int) -> torch.Tensor:
    """The [K, v, n] contiguous storage behind a sink buffer of shape [K, n, v]."""
    if buf.is_contiguous():
        return buf.view(K, v, n)
    t = buf.transpose(1, 2)
    if t.is_contiguous():
        return t
    raise RuntimeError("weight-gradient sink returned a buffer that is neither contiguous nor transposed-contiguous")


def _like(y: torch.Tensor, n: int, v: int) -> torch.Tensor:
    return y.new_empty(1, 1).expand(n, v)


@functools.cache
def _empty(ndim: int, dtype):
    """A shared empty array of `ndim` dims ("not stored" for the kernels; never written)."""
    return np.empty((0,) + (1,) * (ndim - 1), dtype)


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t if t.is_contiguous() else t.contiguous()


class ChunkRun:
    """One fused forward of a chunk of stacked dense blocks and, where it trains, its backward:
    numpy in and out, and the stored states the two share. ``FusedDense`` wraps it for autograd;
    ``network.NetworkGradient`` calls it directly, with no autograd around it.

    `x` is a [B, v] numpy array; `weight`, `bias` tensors; ``deferred`` (sink, chunk) or None."""

    def __init__(self, x, weight, bias, h, activation, stepper, train, deferred=None):
        nd = _load_numba()
        K, v = weight.shape[0], weight.shape[1]
        W, b = _contiguous(weight), _contiguous(bias)
        B, dt = x.shape[0], x.dtype.type
        rk2 = stepper == "rk2"
        act, step = ACTIVATION_CODES[activation], STEPPER_CODES[stepper]
        stores = keep_activations(activation, v)   # σ kept for a backward (else recomputed there)
        keep = train and stores
        tile = tile_size(v, B, torch.get_num_threads(), not stores)
        ntiles = (B + tile - 1) // tile
        P = ntiles * tile                          # stored columns: the batch padded to whole tiles
        n_y = 2 * P if (rk2 and deferred is not None) else P
        n = _threads(ntiles)
        seg = K
        if train and deferred is None and not keep and n == 1:
            seg = segment_blocks(K, v, n_y, weight.element_size())
        self.segments = [(k0, min(k0 + seg, K)) for k0 in range(0, K, seg)] if seg < K else None
        if not train or self.segments is not None:
            Y = None
        elif deferred is not None:
            Y = _feature_major(deferred[0].buffer(_like(weight, n_y, v), K), K, v, n_y)
        else:
            Y = POOL.take((K, v, n_y), weight.dtype)
        S = POOL.take((K, 1 + rk2, v, P), weight.dtype) if keep else None
        self.out = np.empty((B, v), dt)
        arrays = (W.numpy(), b.numpy(), _empty(3, dt) if Y is None else Y.numpy(),
                  _empty(4, dt) if S is None else S.numpy())
        c = _consts(h, weight.dtype)
        if self.segments is not None:
            # each segment's input is kept (the first copied: a pipeline may reuse its receive
            # buffer before this micro-batch's backward); the backward reruns the segment
            self.inputs, inp = [], x.copy()
            for k0, k1 in self.segments:
                self.inputs.append(inp)
                out = self.out if k1 == K else np.empty((B, v), dt)
                nd.forward(inp, arrays[0][k0:k1], arrays[1][k0:k1], c, step, act, tile, 0, ntiles, out,
                           arrays[2], arrays[3])
                inp = out
        elif n == 1:
            nd.forward(x, arrays[0], arrays[1], c, step, act, tile, 0, ntiles, self.out, arrays[2], arrays[3])
        else:
            nd.forward_parallel(x, arrays[0], arrays[1], c, step, act, tile, n, self.out, arrays[2], arrays[3])
        if train:
            self.keep = (W, b, Y, S)               # the tensors behind ``arrays``
            self.arrays, self.c = arrays, c
            self.meta = (h, act, step, tile, n_y, deferred)

    def _backward_segments(self, nd, g, gw, gb):
        """The backward of a segmented forward (``segment_blocks``), last segment first: rerun the
        segment from its kept input, storing its states in one recycled buffer that stays in cache,
        then its adjoint. Bitwise the unsegmented result: the same operations in the same order."""
        h, act, step, tile, n_y, _ = self.meta
        (W, _, _, _), (Wn, bn, _, Sn), c = self.keep, self.arrays, self.c
        B, v = g.shape
        K, dt = W.shape[0], g.dtype.type
        ntiles = (B + tile - 1) // tile
        if gw is None:
            gw, gb = np.zeros((K, v, v), dt), np.zeros((K, v), dt)
        seg = self.segments[0][1]
        Yseg = POOL.take((seg, v, n_y), W.dtype)
        Ys, scratch, empty = Yseg.numpy(), np.empty((B, v), dt), _empty(3, dt)
        lam = g
        for (k0, k1), inp in zip(reversed(self.segments), reversed(self.inputs)):
            Yk = Ys[:k1 - k0]
            nd.forward(inp, Wn[k0:k1], bn[k0:k1], c, step, act, tile, 0, ntiles, scratch, Yk, Sn)
            gin = np.empty((B, v), dt)
            nd.backward(lam, Wn[k0:k1], bn[k0:k1], c, step, act, tile, 0, ntiles, Yk, Sn, gin, empty,
                        gw[k0:k1], gb[k0:k1])
            lam = gin
        POOL.give(Yseg)
        del self.keep, self.arrays, self.inputs
        return lam, gw, gb

    def backward(self, g, gw=None, gb=None):
        """(gin, ∂W, ∂b) from g = dL/dy_K, numpy [B, v]; ∂W, ∂b are None where a deferred sink takes
        them. Inline, they are added to `gw`, `gb` where given (zeroed by the caller), else fresh."""
        nd = _load_numba()
        if self.segments is not None:
            return self._backward_segments(nd, g, gw, gb)
        h, act, step, tile, n_y, deferred = self.meta
        (W, _, Y, S), (Wn, bn, Yn, Sn), c = self.keep, self.arrays, self.c
        B, v = g.shape
        K, dt = W.shape[0], g.dtype.type
        gin = np.empty((B, v), dt)
        ntiles = (B + tile - 1) // tile
        n = _threads(ntiles)
        if deferred is not None:
            sink, chunk = deferred
            G = _feature_major(sink.buffer(_like(W, n_y, v), K), K, v, n_y)
            Gn, gwp, gbp = G.numpy(), np.empty((n, 0, 1, 1), dt), np.empty((n, 0, 1), dt)
        elif n == 1 and gw is not None:
            Gn, gwp, gbp = _empty(3, dt), gw[None], gb[None]
        else:
            Gn, gwp, gbp = _empty(3, dt), np.zeros((n, K, v, v), dt), np.zeros((n, K, v), dt)
        args = (g, Wn, bn, c, step, act, tile)
        if n == 1:
            nd.backward(*args, 0, ntiles, Yn, Sn, gin, Gn, gwp[0], gbp[0])
        else:
            nd.backward_parallel(*args, n, Yn, Sn, gin, Gn, gwp, gbp)
        del self.keep, self.arrays
        if S is not None:
            POOL.give(S)
        if deferred is not None:
            sink.add(chunk, Y.transpose(1, 2), G.transpose(1, 2), h)
            return gin, None, None
        POOL.give(Y)
        if gw is None:
            return gin, *((gwp[0], gbp[0]) if n == 1 else (gwp.sum(0), gbp.sum(0)))
        if n > 1:
            gw += gwp.sum(0)
            gb += gbp.sum(0)
        return gin, gw, gb


class FusedDense(torch.autograd.Function):
    """y_K of a chunk of stacked dense blocks, fused (``ChunkRun``); ``deferred`` is (sink, chunk)
    or None.

    Small arrays come from numpy (``torch.from_numpy``): a torch op costs ~10-20 µs of dispatch
    here, which at batch 250 was a tenth of the chunk's time."""

    @staticmethod
    def forward(ctx, y, weight, bias, h, activation, stepper, deferred):
        train = any(ctx.needs_input_grad[:3])
        run = ChunkRun(_contiguous(y).numpy(), weight, bias, h, activation, stepper, train, deferred)
        if train:
            ctx.save_for_backward(weight, bias)   # version checks: an in-place update before backward raises
            ctx.run = run
        return torch.from_numpy(run.out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        ctx.saved_tensors   # noqa: B018 - raises if weight/bias were modified in place
        gin, gw, gb = ctx.run.backward(_contiguous(g).numpy())
        del ctx.run
        if gw is None:
            return torch.from_numpy(gin), None, None, None, None, None, None
        return torch.from_numpy(gin), torch.from_numpy(gw), torch.from_numpy(gb), None, None, None, None


def fused_chunk(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, h: float, activation: str,
                stepper: str, deferred=None) -> torch.Tensor:
    """Run a chunk through the fused kernel (checks what the kernel supports, one line each)."""
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"fused kernel: activation {activation!r} not supported; valid: {', '.join(ACTIVATION_CODES)}")
    if stepper not in STEPPER_CODES:
        raise ValueError(f"fused kernel: stepper {stepper!r} not supported; valid: {', '.join(STEPPER_CODES)}")
    if weight.dtype not in DTYPES or y.dtype != weight.dtype:
        raise ValueError(f"fused kernel: dtype {y.dtype}/{weight.dtype} not supported; valid: float32, float64 "
                         "(same for state and weights)")
    if y.device.type != "cpu" or weight.device.type != "cpu":
        raise ValueError(f"fused CPU kernel: tensors on {y.device}, expected cpu")
    if y.dim() != 2 or y.shape[1] != weight.shape[-1]:
        raise ValueError(f"fused kernel: state of shape {tuple(y.shape)} does not fit width {weight.shape[-1]}")
    if not torch.is_grad_enabled():
        deferred = None
    return FusedDense.apply(y, weight, bias, float(h), activation, stepper, deferred)
