"""numba kernels for a chunk of stacked dense ODE blocks (Euler and midpoint RK2), CPU.

Layout: the batch is cut into tiles (``cpu.tile_size``); a tile runs through all K blocks with its
state held feature-major in small [v, tile] buffers (cache-resident), so every inner loop runs over
the samples of the tile with unit stride and LLVM vectorises it. The states kept for the adjoint
are stored feature-major too, Y[k, i, n] (n = sample, or for RK2 the column block (y', y)); the
deferred weight-gradient sink receives them as transposed views. Threads split the tiles
(``prange`` over ``nchunks`` contiguous runs of tiles); the inline weight gradients of run c go to
gwp[c] / gbp[c], summed by the caller.

What keeps the loops vectorised (each measured, 2-10x when missed):
- tile offsets are cast to uint64 inside the helpers: a signed index ``a[i, s0 + t]`` makes numba
  emit a negative-index wrap-around test that stops LLVM's vectoriser (per-row slices avoid it
  too, but their reference counting costs as much as the arithmetic at width 32);
- an in-place update names its buffer once (``_advance``, ``_activate_inplace``): two names for one
  buffer fail LLVM's runtime overlap check and the scalar loop runs;
- relu is x * (1 if x > 0 else 0), its adjoint λ * (1 if s > 0 else 0): LLVM vectorises that,
  not ``x if x > 0 else 0`` nor ``max``. It equals torch's relu except that -inf gives NaN, not 0
  (and an infinite adjoint times a zero mask NaN, not 0): states that are already infinite;
- fused passes: four inputs (or outputs) per pass over a row, the bias in the first pass, the
  state store in the update pass, so a width <= 4 costs one loop per row and operation.

Constants come in the array ``c`` = (h, h/2, 1, 0, 1/2, 2, tanh cut-off) of the working dtype so
that float32 stays float32 (a Python float literal would promote to float64).

Activation codes: 0 relu, 1 tanh, 2 sigmoid. Stepper codes: 0 Euler, 1 RK2.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, uint64

_FM = {"reassoc", "contract"}     # reassociation lets LLVM vectorise the batch sums; no NaN/inf assumptions
_OPTS = {"cache": True, "nogil": True, "fastmath": _FM}


@njit(**_OPTS)
def _affine(W, bias, k, src, s0, dst, d0, T):
    """dst[j, d0:d0+T] = b_k[j] + Σ_i W_k[j, i] src[i, s0:s0+T]  (z = W y + b for a tile).

    Four inputs per pass over the row (5 loads, 1 store per 4 FMA); the first pass also writes
    the bias, so a width <= 4 costs one loop per output row."""
    v = W.shape[1]
    su, du, n = uint64(s0), uint64(d0), uint64(T)
    for j in range(v):
        bj = bias[k, j]
        i = 0
        while i + 4 <= v:
            w0, w1, w2, w3 = W[k, j, i], W[k, j, i + 1], W[k, j, i + 2], W[k, j, i + 3]
            if i == 0:
                for t in range(n):
                    dst[j, du + t] = (bj + w0 * src[0, su + t] + w1 * src[1, su + t]
                                      + w2 * src[2, su + t] + w3 * src[3, su + t])
            else:
                for t in range(n):
                    dst[j, du + t] += (w0 * src[i, su + t] + w1 * src[i + 1, su + t]
                                       + w2 * src[i + 2, su + t] + w3 * src[i + 3, su + t])
            i += 4
        r = v - i
        if i == 0:          # v < 4: one pass, bias included
            if r == 3:
                w0, w1, w2 = W[k, j, 0], W[k, j, 1], W[k, j, 2]
                for t in range(n):
                    dst[j, du + t] = bj + w0 * src[0, su + t] + w1 * src[1, su + t] + w2 * src[2, su + t]
            elif r == 2:
                w0, w1 = W[k, j, 0], W[k, j, 1]
                for t in range(n):
                    dst[j, du + t] = bj + w0 * src[0, su + t] + w1 * src[1, su + t]
            else:
                w0 = W[k, j, 0]
                for t in range(n):
                    dst[j, du + t] = bj + w0 * src[0, su + t]
        elif r == 3:
            w0, w1, w2 = W[k, j, i], W[k, j, i + 1], W[k, j, i + 2]
            for t in range(n):
                dst[j, du + t] += w0 * src[i, su + t] + w1 * src[i + 1, su + t] + w2 * src[i + 2, su + t]
        elif r == 2:
            w0, w1 = W[k, j, i], W[k, j, i + 1]
            for t in range(n):
                dst[j, du + t] += w0 * src[i, su + t] + w1 * src[i + 1, su + t]
        elif r == 1:
            w0 = W[k, j, i]
            for t in range(n):
                dst[j, du + t] += w0 * src[i, su + t]


@njit(**_OPTS)
def _adjoint(W, k, scale, g, g0, dst, d0, T):
    """dst[i, d0:d0+T] += Σ_j (scale W_k[j, i]) g[j, g0:g0+T]  (λ += scale gᵀ W for a tile)."""
    v = W.shape[1]
    gu, du, n = uint64(g0), uint64(d0), uint64(T)
    for i in range(v):
        j = 0
        while j + 4 <= v:
            w0, w1 = scale * W[k, j, i], scale * W[k, j + 1, i]
            w2, w3 = scale * W[k, j + 2, i], scale * W[k, j + 3, i]
            for t in range(n):
                dst[i, du + t] += (w0 * g[j, gu + t] + w1 * g[j + 1, gu + t]
                                   + w2 * g[j + 2, gu + t] + w3 * g[j + 3, gu + t])
            j += 4
        r = v - j
        if r == 3:
            w0, w1, w2 = scale * W[k, j, i], scale * W[k, j + 1, i], scale * W[k, j + 2, i]
            for t in range(n):
                dst[i, du + t] += w0 * g[j, gu + t] + w1 * g[j + 1, gu + t] + w2 * g[j + 2, gu + t]
        elif r == 2:
            w0, w1 = scale * W[k, j, i], scale * W[k, j + 1, i]
            for t in range(n):
                dst[i, du + t] += w0 * g[j, gu + t] + w1 * g[j + 1, gu + t]
        elif r == 1:
            w0 = scale * W[k, j, i]
            for t in range(n):
                dst[i, du + t] += w0 * g[j, gu + t]


@njit(**_OPTS)
def _activate(act, z, z0, s, s0, v, T, c):
    """s = σ(z) on a tile (s not z: ``_activate_inplace``). tanh(x) = (e - 1) / (e + 1), e = exp(2x), on |x| <= 20
    (else ±1): libm's exp is ~4x faster than its tanh here; the error stays at the rounding level."""
    zero, one, two, big = c[3], c[2], c[5], c[6]
    zu, su, n = uint64(z0), uint64(s0), uint64(T)
    for j in range(v):
        if act == 0:
            for t in range(n):
                x = z[j, zu + t]
                s[j, su + t] = x * (one if x > zero else zero)
        elif act == 1:
            for t in range(n):
                x = z[j, zu + t]
                if x > big:
                    s[j, su + t] = one
                elif x < -big:
                    s[j, su + t] = -one
                else:
                    e = math.exp(two * x)
                    s[j, su + t] = (e - one) / (e + one)
        else:
            for t in range(n):
                s[j, su + t] = one / (one + math.exp(-z[j, zu + t]))


@njit(**_OPTS)
def _activate_inplace(act, z, v, T, c):
    """z = σ(z) on a local tile buffer. One array, not ``_activate(z, z)``: with two names for one
    buffer LLVM's runtime overlap check fails and the scalar loop runs (measured 2x)."""
    zero, one, two, big = c[3], c[2], c[5], c[6]
    n = uint64(T)
    for j in range(v):
        if act == 0:
            for t in range(n):
                x = z[j, t]
                z[j, t] = x * (one if x > zero else zero)
        elif act == 1:
            for t in range(n):
                x = z[j, t]
                if x > big:
                    z[j, t] = one
                elif x < -big:
                    z[j, t] = -one
                else:
                    e = math.exp(two * x)
                    z[j, t] = (e - one) / (e + one)
        else:
            for t in range(n):
                z[j, t] = one / (one + math.exp(-z[j, t]))


@njit(**_OPTS)
def _dact(act, s, s0, lam, l0, ga, a0, v, T, c):
    """ga = σ'(z) ⊙ λ from s = σ(z) (relu: s > 0; tanh: 1 - s²; sigmoid: s (1 - s))."""
    zero, one = c[3], c[2]
    su, lu, au, n = uint64(s0), uint64(l0), uint64(a0), uint64(T)
    for j in range(v):
        if act == 0:
            for t in range(n):
                ga[j, au + t] = lam[j, lu + t] * (one if s[j, su + t] > zero else zero)
        elif act == 1:
            for t in range(n):
                x = s[j, su + t]
                ga[j, au + t] = lam[j, lu + t] * (one - x * x)
        else:
            for t in range(n):
                x = s[j, su + t]
                ga[j, au + t] = lam[j, lu + t] * ((one - x) * x)


@njit(**_OPTS)
def _axpy(dst, d0, a, src, s0, v, T):
    """dst += a src on a tile."""
    du, su, n = uint64(d0), uint64(s0), uint64(T)
    for j in range(v):
        for t in range(n):
            dst[j, du + t] += a * src[j, su + t]


@njit(**_OPTS)
def _scale(dst, d0, a, v, T):
    du, n = uint64(d0), uint64(T)
    for j in range(v):
        for t in range(n):
            dst[j, du + t] *= a


@njit(**_OPTS)
def _fill(dst, d0, a, v, T):
    du, n = uint64(d0), uint64(T)
    for j in range(v):
        for t in range(n):
            dst[j, du + t] = a


@njit(**_OPTS)
def _copy(dst, d0, src, s0, v, T):
    du, su, n = uint64(d0), uint64(s0), uint64(T)
    for j in range(v):
        for t in range(n):
            dst[j, du + t] = src[j, su + t]


@njit(forceinline=True, **_OPTS)
def _dots(gw, k, j, i, g, gu, y, yu, n, m, total, scale, zero):
    """gw[k, j, i:i+m] += scale Σ_t g[j, t] y[i:i+m, t] in one pass over g's row (m <= 4); returns
    Σ_t g[j, t] when `total`, else 0. m and `total` are literals at every call, so each call is
    compiled with its guards folded: the hand-unrolled loop (up to four FMA streams), vectorised.
    Inlined by LLVM (``forceinline``), not in numba IR (``inline="always"``), whose copies of the
    array arguments cost reference-count calls per pass (measured: _outer 7 % slower at width 3)."""
    s = c0 = c1 = c2 = c3 = zero
    for t in range(n):
        x = g[j, gu + t]
        if total:
            s += x
        c0 += x * y[i, yu + t]
        if m > 1:
            c1 += x * y[i + 1, yu + t]
        if m > 2:
            c2 += x * y[i + 2, yu + t]
        if m > 3:
            c3 += x * y[i + 3, yu + t]
    gw[k, j, i] += scale * c0
    if m > 1:
        gw[k, j, i + 1] += scale * c1
    if m > 2:
        gw[k, j, i + 2] += scale * c2
    if m > 3:
        gw[k, j, i + 3] += scale * c3
    return s


@njit(**_OPTS)
def _outer(gw, gb, k, g, g0, y, y0, v, T, scale, zero):
    """gw[k] += scale Σ_t g[:, t] y[:, t]ᵀ,  gb[k] += scale Σ_t g[:, t]  (batch sums of a tile).

    Up to four dot products per pass over g's row (``_dots``), the bias sum in the first pass."""
    gu, yu, n = uint64(g0), uint64(y0), uint64(T)
    for j in range(v):
        acc = _dots(gw, k, j, 0, g, gu, y, yu, n, 4, True, scale, zero) if v >= 4 else zero
        i = 4 if v >= 4 else 0
        while i + 4 <= v:
            _dots(gw, k, j, i, g, gu, y, yu, n, 4, False, scale, zero)
            i += 4
        r = v - i                      # the remainder pass also sums, used only when it is the first (v < 4)
        rs = (_dots(gw, k, j, i, g, gu, y, yu, n, 3, True, scale, zero) if r == 3 else
              _dots(gw, k, j, i, g, gu, y, yu, n, 2, True, scale, zero) if r == 2 else
              _dots(gw, k, j, i, g, gu, y, yu, n, 1, True, scale, zero) if r == 1 else zero)
        gb[k, j] += scale * (rs if i == 0 else acc)


@njit(**_OPTS)
def _advance(y, a, s, s0, Yk, yo, v, T, store):
    """y += a s[:, s0:s0+T] on a local tile, also into Yk[:, yo:yo+T] when `store` (in place: one
    name per buffer, see ``_activate_inplace``)."""
    su, yu, n = uint64(s0), uint64(yo), uint64(T)
    for j in range(v):
        if store:
            for t in range(n):
                x = y[j, t] + a * s[j, su + t]
                y[j, t] = x
                Yk[j, yu + t] = x
        else:
            for t in range(n):
                y[j, t] += a * s[j, su + t]


@njit(**_OPTS)
def _update(dst, y, y0, a, s, s0, Yk, yo, v, T, store):
    """dst = y[:, y0:y0+T] + a s[:, s0:s0+T] on a tile (dst not y), also into Yk[:, yo:yo+T]
    when `store`."""
    iu, su, yu, n = uint64(y0), uint64(s0), uint64(yo), uint64(T)
    for j in range(v):
        if store:
            for t in range(n):
                x = y[j, iu + t] + a * s[j, su + t]
                dst[j, t] = x
                Yk[j, yu + t] = x
        else:
            for t in range(n):
                dst[j, t] = y[j, iu + t] + a * s[j, su + t]


@njit(**_OPTS)
def _load(dst, x, b0, v, T, tile, zero):
    """dst[:, :T] = x[b0:b0+T, :]ᵀ (a batch-major tile into a feature-major buffer); the padding
    columns [T, tile) of a last, short tile are zero (finite states, zero adjoints)."""
    for t in range(T):
        for i in range(v):
            dst[i, t] = x[b0 + t, i]
    for i in range(v):
        for t in range(T, tile):
            dst[i, t] = zero


@njit(**_OPTS)
def _store(out, src, b0, v, T):
    for t in range(T):
        for i in range(v):
            out[b0 + t, i] = src[i, t]


@njit(**_OPTS)
def padded(B, tile):
    """Columns of the stored states: the batch rounded up to whole tiles. Every loop then runs over
    a whole tile (a multiple of 32): no scalar remainder iterations, which cost 2/3 of a loop's
    time at batch 250 (the padding holds zero-adjoint samples, adding exact zeros to the sums)."""
    return (B + tile - 1) // tile * tile


@njit(**_OPTS)
def _stage(act, W, bias, k, src, z, Sk, b0, keep, c, v, T):
    """σ(W_k src + b_k) for a tile: into Sk[:, b0:] when `keep` (returned as (array, offset)), else
    in place in z."""
    _affine(W, bias, k, src, 0, z, 0, T)
    if keep:
        _activate(act, z, 0, Sk, b0, v, T, c)
        return Sk, b0
    _activate_inplace(act, z, v, T, c)
    return z, 0


@njit(**_OPTS)
def forward(x, W, bias, c, stepper, act, tile, lo, hi, out, Y, S):
    """Run x [B, v] through the K blocks; out [B, v] gets y_K. Tiles [lo, hi) of ``tile`` samples.

    P = ``padded(B, tile)``. Y [K, v, NY] receives y_k (Euler: NY = P); RK2 with NY = 2P stores
    (y'_k | y_k), with NY = P only y_k; an empty Y stores nothing (no adjoint to follow).
    S [K, ns, v, P] (ns = 1 Euler, 2 RK2) receives the stage activations σ(z) when S.shape[0] == K;
    with S empty the backward recomputes them.
    """
    B, v = x.shape
    K = W.shape[0]
    P = padded(B, tile)
    h, h2 = c[0], c[1]
    keep = S.shape[0] == K
    store = Y.shape[0] == K                   # Y empty: evaluation only, nothing kept
    split = store and Y.shape[2] == 2 * P     # RK2 with y' stored (deferred layout)
    y, z, yp, z2 = [np.empty((v, tile), W.dtype) for _ in range(4)]     # the tile's state and stage buffers
    for it in range(lo, hi):
        b0 = it * tile
        Tr = min(tile, B - b0)                # real samples; the loops run over the whole tile
        T = tile
        yo = P + b0 if split else b0          # where y_k goes in Y[k]
        _load(y, x, b0, v, Tr, tile, c[3])
        if store:
            _copy(Y[0], yo, y, 0, v, T)
        for k in range(K):
            nxt = store and k + 1 < K
            kn = k + 1 if nxt else k
            s1, o1 = _stage(act, W, bias, k, y, z, S[k, 0] if keep else z, b0, keep, c, v, T)
            if stepper == 0:
                _advance(y, h, s1, o1, Y[kn], yo, v, T, nxt)
            else:
                _update(yp, y, 0, h2, s1, o1, Y[k], b0, v, T, split)
                s2, o2 = _stage(act, W, bias, k, yp, z2, S[k, 1] if keep else z2, b0, keep, c, v, T)
                _advance(y, h, s2, o2, Y[kn], yo, v, T, nxt)
        _store(out, y, b0, v, Tr)


@njit(**_OPTS)
def _rk2_block(W, bias, k, Yk, y0, a1, o1, act, keep, split, deferred, S, G, gw, gb, lam, yp, s2, ga, g1, b0, P,
               v, T, c):
    """One RK2 block of ``backward`` on one tile: λ_k from λ_{k+1} (in ``lam``), the block's weight
    gradients into G[k] (deferred) or gw[k] / gb[k]."""
    h, h2, one, zero, half = c[0], c[1], c[2], c[3], c[4]
    # RK2: y' (stored or y + h/2 σ(z1)) and σ(z2)
    if split:
        _copy(yp, 0, Yk, b0, v, T)
    else:
        _update(yp, Yk, y0, h2, a1, o1, Yk, 0, v, T, False)
    if keep:
        a2, o2 = S[k, 1], b0
    else:
        _affine(W, bias, k, yp, 0, s2, 0, T)
        if act != 0:                     # relu: σ' from z2 itself
            _activate_inplace(act, s2, v, T, c)
        a2, o2 = s2, 0
    _dact(act, a2, o2, lam, 0, ga, 0, v, T, c)          # g2
    _fill(s2, 0, zero, v, T)                             # μ = h g2 W (s2 is free now)
    _adjoint(W, k, h, ga, 0, s2, 0, T)
    _dact(act, a1, o1, s2, 0, g1, 0, v, T, c)            # g1 = σ'(z1) ⊙ μ
    if deferred:
        _copy(G[k], b0, ga, 0, v, T)
        _copy(G[k], P + b0, g1, 0, v, T)
        _scale(G[k], P + b0, half, v, T)
    else:
        _outer(gw, gb, k, ga, 0, yp, 0, v, T, h, zero)
        _outer(gw, gb, k, g1, 0, Yk, y0, v, T, h2, zero)
    _axpy(lam, 0, one, s2, 0, v, T)                      # λ += μ
    _adjoint(W, k, h2, g1, 0, lam, 0, T)                 # λ += (h/2) g1 W


@njit(**_OPTS)
def backward(g, W, bias, c, stepper, act, tile, lo, hi, Y, S, gin, G, gw, gb):
    """Adjoint of ``forward``: gin [B, v] = dL/dx from g = dL/dy_K.

    Weight gradients: with G [K, v, NY] non-empty (deferred) the block adjoints are written there —
    Euler: G[k] = σ'(z_k) ⊙ λ_{k+1}; RK2: (g2 | g1 / 2) next to Y's (y' | y) — so that
    Σ_n G[k, :, n] Y[k, :, n]ᵀ times h is ∂W_k. Otherwise ∂W_k, ∂b_k of the tiles [lo, hi) are
    added to gw[k] / gb[k] (each tile's sums times h). RK2 adjoint (stage 2 then stage 1, same θ_k):
        g2 = σ'(z2) ⊙ λ,  μ = h g2 W,  g1 = σ'(z1) ⊙ μ,  λ <- λ + μ + (h/2) g1 W,
        ∂W += h (g2ᵀ y' + ½ g1ᵀ y),  ∂b += h (Σ g2 + ½ Σ g1).
    relu without kept activations uses z itself in σ' where σ(z) is not needed (z > 0 exactly
    where relu(z) > 0).
    """
    B, v = g.shape
    K = W.shape[0]
    P = padded(B, tile)
    h, zero = c[0], c[3]
    keep = S.shape[0] == K
    deferred = G.shape[0] == K
    split = Y.shape[2] == 2 * P
    lam, s1, s2, yp, ga, g1 = [np.empty((v, tile), W.dtype) for _ in range(6)]
    for it in range(lo, hi):
        b0 = it * tile
        Tr = min(tile, B - b0)
        T = tile
        y0 = P + b0 if split else b0
        _load(lam, g, b0, v, Tr, tile, zero)
        for k in range(K - 1, -1, -1):
            Yk = Y[k]
            # σ(z1) (Euler: the only stage), kept or recomputed
            if keep:
                a1, o1 = S[k, 0], b0
            else:
                _affine(W, bias, k, Yk, y0, s1, 0, T)
                if act != 0 or stepper == 1:     # Euler relu: σ' from z itself
                    _activate_inplace(act, s1, v, T, c)
                a1, o1 = s1, 0
            if stepper == 0:
                if deferred:
                    _dact(act, a1, o1, lam, 0, G[k], b0, v, T, c)
                    _adjoint(W, k, h, G[k], b0, lam, 0, T)
                else:
                    _dact(act, a1, o1, lam, 0, ga, 0, v, T, c)
                    _outer(gw, gb, k, ga, 0, Yk, y0, v, T, h, zero)
                    _adjoint(W, k, h, ga, 0, lam, 0, T)
                continue
            _rk2_block(W, bias, k, Yk, y0, a1, o1, act, keep, split, deferred, S, G, gw, gb, lam, yp, s2, ga,
                       g1, b0, P, v, T, c)
        _store(gin, lam, b0, v, Tr)


@njit(parallel=True, **_OPTS)
def forward_parallel(x, W, bias, c, stepper, act, tile, nchunks, out, Y, S):
    """``forward`` with the tiles split into ``nchunks`` contiguous runs, one per thread."""
    ntiles = (x.shape[0] + tile - 1) // tile
    for ch in prange(nchunks):
        forward(x, W, bias, c, stepper, act, tile, ch * ntiles // nchunks, (ch + 1) * ntiles // nchunks, out, Y, S)


@njit(parallel=True, **_OPTS)
def backward_parallel(g, W, bias, c, stepper, act, tile, nchunks, Y, S, gin, G, gwp, gbp):
    """``backward`` per thread run of tiles; run ch sums its weight gradients into gwp[ch], gbp[ch]."""
    ntiles = (g.shape[0] + tile - 1) // tile
    for ch in prange(nchunks):
        backward(g, W, bias, c, stepper, act, tile, ch * ntiles // nchunks, (ch + 1) * ntiles // nchunks,
                 Y, S, gin, G, gwp[ch], gbp[ch])
