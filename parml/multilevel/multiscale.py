"""Multiscale in resolution (Haber et al.): conv kernels moved between image resolutions.

A 3x3 convolution is a discrete operator K_h(s_h) on a mesh of pixel size h. Given restriction R
(fine -> coarse image) and prolongation P (coarse -> fine), the coarse operator consistent with it
is the Galerkin product (paper eq. 8-9)

    K_H = R K_h P,

which for a stencil that does not vary over the image is again a 3x3 stencil s_H = G s_h, G a 9x9
matrix (per pair of channels). Prolongating a kernel solves the 9x9 system G s_h = s_H for s_h (G is
invertible for the transfers here, so ``restrict_kernel(prolongate_kernel(s)) == s``).

Transfers are vertex-centred: coarse pixel i sits on fine pixel 2i, P is bilinear interpolation
(1D weights 1/2, 1, 1/2) and R = P^T / 4 is full weighting (1D weights 1/4, 1/2, 1/4), both with the
zero padding of the network's convolutions. Pointwise pieces (biases, activations, 1x1
projections, the pooled head) do not depend on the resolution and are copied. A classifier on the
flattened final state (``head="flatten"``) is moved so that <W, y> is kept: W_H = P^T W = 4 R W
on restriction, W_h = R^T W_H = P W_H / 4 on prolongation (per class and channel, as images).

The Galerkin identity is exact per operator on states in the range of P, not for a chain of them:
R K2 K1 P - (R K2 P)(R K1 P) = R K2 (I - P R) K1 P. A moved network is therefore only as good as
its states are smooth on the coarse mesh (``benchmarks/haber_resolution.py`` measures this).
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as tf

from ..model import ModelSpec, ODEResNet, build_model

_P1 = (0.5, 1.0, 0.5)       # 1D prolongation weights
_R1 = (0.25, 0.5, 0.25)     # 1D full weighting = P^T / 2


def _kernel2d(w1, dtype, device=None):
    w = torch.tensor(w1, dtype=dtype, device=device)
    return torch.outer(w, w)


def restrict_image(y: torch.Tensor) -> torch.Tensor:
    """R: [n, C, H, W] -> [n, C, H/2, W/2] by full weighting (coarse pixel i = fine pixel 2i)."""
    if y.shape[-1] % 2 or y.shape[-2] % 2:
        raise ValueError(f"--resolution: a {y.shape[-2]}x{y.shape[-1]} image cannot be halved (size must be even)")
    c = y.shape[1]
    k = _kernel2d(_R1, y.dtype, y.device).expand(c, 1, 3, 3)
    return tf.conv2d(y, k, stride=2, padding=1, groups=c)


def prolongate_image(y: torch.Tensor) -> torch.Tensor:
    """P: [n, C, H, W] -> [n, C, 2H, 2W] by bilinear interpolation (R = P^T / 4)."""
    c = y.shape[1]
    k = _kernel2d(_P1, y.dtype, y.device).expand(c, 1, 3, 3)
    return tf.conv_transpose2d(y, k, stride=2, padding=1, output_padding=1, groups=c)


def gaussian_blur(y: torch.Tensor, sigma: float) -> torch.Tensor:
    """[n, C, H, W] convolved with a Gaussian of standard deviation `sigma` pixels (zero padding,
    radius 3 sigma): the paper smooths fine images this way before restricting them."""
    if sigma == 0:
        return y
    r = int(3 * sigma + 0.5)
    t = torch.arange(-r, r + 1, dtype=y.dtype, device=y.device)
    g = torch.exp(-t.square() / (2 * sigma ** 2))
    g = g / g.sum()
    c = y.shape[1]
    return tf.conv2d(y, torch.outer(g, g).expand(c, 1, 2 * r + 1, 2 * r + 1), padding=r, groups=c)


def galerkin_kernel(weight: torch.Tensor) -> torch.Tensor:
    """s_H with K_H(s_H) = R K_h(s_h) P, for 3x3 kernels ``weight[..., 3, 3]`` (any leading dims).

    Read off by applying R K_h P to a coarse unit impulse away from the boundary: the output at
    pixel c - d is the correlation stencil's entry d (translation invariance).
    """
    if weight.shape[-2:] != (3, 3):
        raise ValueError(f"galerkin_kernel needs 3x3 kernels, got {tuple(weight.shape[-2:])}")
    lead = weight.shape[:-2]
    w = weight.reshape(-1, 1, 3, 3)
    n, c = 7, 3
    delta = torch.zeros(1, 1, n, n, dtype=weight.dtype, device=weight.device)
    delta[0, 0, c, c] = 1
    fine = tf.conv2d(prolongate_image(delta), w, padding=1)            # [1, N, 2n, 2n]
    coarse = restrict_image(fine)[0]                                  # [N, n, n]
    stencil = coarse[:, c - 1:c + 2, c - 1:c + 2].flip(-1, -2)
    return stencil.reshape(*lead, 3, 3)


def galerkin_matrix(dtype=torch.float64) -> torch.Tensor:
    """G (9 x 9): vec(s_H) = G vec(s_h)."""
    eye = torch.eye(9, dtype=dtype).reshape(9, 3, 3)
    return galerkin_kernel(eye).reshape(9, 9).T


def restrict_kernel(weight: torch.Tensor) -> torch.Tensor:
    """Fine-resolution 3x3 kernels -> coarse-resolution kernels (Galerkin)."""
    return galerkin_kernel(weight)


def prolongation_matrix(dtype=torch.float64) -> torch.Tensor:
    """G^-1 (9 x 9): vec(s_h) = G^-1 vec(s_H), the solution of the paper's 9x9 system (G is invertible:
    eigenvalues 2^-(a+b), a, b = 0..2, so G^-1 scales a stencil's smoothest parts by 1 and its roughest by 16)."""
    return torch.linalg.inv(galerkin_matrix(torch.float64)).to(dtype)


def prolongate_kernel(weight: torch.Tensor) -> torch.Tensor:
    """Coarse-resolution 3x3 kernels -> the fine kernels whose Galerkin product they are."""
    if weight.shape[-2:] != (3, 3):
        raise ValueError(f"prolongate_kernel needs 3x3 kernels, got {tuple(weight.shape[-2:])}")
    if not torch.isfinite(weight).all():
        raise ValueError("prolongate_kernel: the kernels contain NaN or inf (did training diverge?)")
    flat = weight.detach().reshape(-1, 9).to(torch.float64)              # [N, 9]
    fine = flat @ prolongation_matrix(torch.float64).T
    return fine.reshape(weight.shape).to(weight.dtype)


# --- whole networks -------------------------------------------------------------------------------

def resolution_spec(spec: ModelSpec, factor: float) -> ModelSpec:
    """`spec` with the input image scaled by `factor` (2 or 1/2 here); the image size must stay whole
    and every stage's downsampling must still divide it (``ModelSpec`` checks)."""
    if not spec.conv:
        raise ValueError("--resolution needs a conv network (--arch conv)")
    c, h, w = spec.input_shape
    nh, nw = h * factor, w * factor
    if nh != int(nh) or nw != int(nw) or nh < 1 or nw < 1:
        raise ValueError(f"--resolution: a {h}x{w} image cannot be scaled by {factor:g} "
                         f"(the image size must be divisible by {round(1 / factor)})")
    shape = (c, int(nh), int(nw))
    return replace(spec, input_shape=shape, in_features=math.prod(shape))


def _transfer(model: ODEResNet, factor: float, op, adapt: bool) -> ODEResNet:
    spec = resolution_spec(model.spec, factor)
    dtype = next(model.parameters()).dtype
    out = build_model(spec, dtype=dtype)
    state = {}
    for name, value in model.state_dict().items():
        if adapt and value.dim() >= 4 and value.shape[-2:] == (3, 3):
            value = op(value.detach())
        state[name] = value
    if spec.head == "flatten":       # the classifier acts on images of the new size: always moved
        c, h, w = model.spec.stage_state_shape(len(spec.stages) - 1)
        img = state["head.weight"].reshape(-1, c, h, w)
        moved = 4 * restrict_image(img) if factor < 1 else prolongate_image(img) / 4
        state["head.weight"] = moved.reshape(img.shape[0], -1)
    out.load_state_dict(state)
    return out


def restrict_model(model: ODEResNet, adapt: bool = True) -> ODEResNet:
    """The network for images of half the size: every 3x3 kernel replaced by its Galerkin product
    (``adapt=False``: the same kernels, unadapted)."""
    return _transfer(model, 0.5, restrict_kernel, adapt)


def prolongate_model(model: ODEResNet, adapt: bool = True) -> ODEResNet:
    """The network for images of twice the size: every 3x3 kernel prolongated (``adapt=False``: copied)."""
    return _transfer(model, 2, prolongate_kernel, adapt)
