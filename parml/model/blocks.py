"""The modules of an ODE ResNet: stacked block chunks (dense and conv), opening, projections, head.

Block parameters of a stage are stored stacked (``weight[K, v, v]``, ``bias[K, v]``) so that time
transfers are vectorised and a layer-parallel shard is a slice of the stack.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as tf
from torch import nn

from .spec import INITS
from .steppers import ACTIVATIONS, STEPPERS, choose


class BlockChunk(nn.Module):
    """Consecutive time steps [first, first + n) of one stage, parameters stacked along dim 0.

    F(y; W_k, b_k) = σ(W_k y + b_k) (paper eq. 4); each step advances y by the stepper with h.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, h: float, activation: str,
                 stepper: str, stage: int = 0, first: int = 0):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)
        self.h, self.stage, self.first = h, stage, first
        self.activation, self.stepper = activation, stepper
        self._sigma = ACTIVATIONS[activation]
        self._step = STEPPERS[stepper].step
        # a fused implementation of forward + adjoint, attached from outside (``parml.kernels``);
        # None: the reference step-by-step loop below, differentiated by autograd
        self.kernel = None

    @property
    def num_blocks(self) -> int:
        return self.weight.shape[0]

    def forward(self, y):
        if self.kernel is not None:
            return self.kernel(self, y)
        sigma, step, h = self._sigma, self._step, self.h
        for w, b in zip(self.weight.unbind(0), self.bias.unbind(0)):
            y = step(lambda z: sigma(torch.addmm(b, z, w.t())), y, h)
        return y

    def slice(self, start: int, stop: int) -> "BlockChunk":
        """A new chunk holding a copy of steps [start, stop) (local indices)."""
        return BlockChunk(self.weight.detach()[start:stop].clone(), self.bias.detach()[start:stop].clone(),
                          self.h, self.activation, self.stepper, self.stage, self.first + start)

    def extra_repr(self):
        return (f"stage={self.stage}, steps=[{self.first}, {self.first + self.num_blocks}), "
                f"width={self.weight.shape[-1]}, h={self.h:g}, {self.activation}, {self.stepper}")


class ConvBlockChunk(BlockChunk):
    """Conv steps: F(y; W_k, b_k) = σ(N(conv3x3(y; W_k)) + b_k) on [batch, C, H, W] states,
    ``weight[K, C, C, 3, 3]``, ``bias[K, C]``, zero padding (the image size is kept);
    N is the identity (norm "none") or a per-sample normalization over (C, H, W) (norm "layer")."""

    def __init__(self, weight, bias, h, activation, stepper, stage=0, first=0, norm="none"):
        super().__init__(weight, bias, h, activation, stepper, stage, first)
        self.norm = norm

    def forward(self, y):
        sigma, step, h = self._sigma, self._step, self.h
        if self.norm == "none":
            for w, b in zip(self.weight.unbind(0), self.bias.unbind(0)):
                y = step(lambda z: sigma(tf.conv2d(z, w, b, padding=1)), y, h)
            return y
        for w, b in zip(self.weight.unbind(0), self.bias.unbind(0)):
            def f(z):
                c = tf.conv2d(z, w, padding=1)
                return sigma(tf.layer_norm(c, c.shape[1:]) + b[:, None, None])
            y = step(f, y, h)
        return y

    def slice(self, start: int, stop: int) -> "ConvBlockChunk":
        return ConvBlockChunk(self.weight.detach()[start:stop].clone(), self.bias.detach()[start:stop].clone(),
                              self.h, self.activation, self.stepper, self.stage, self.first + start, self.norm)

    def extra_repr(self):
        return (f"stage={self.stage}, steps=[{self.first}, {self.first + self.num_blocks}), "
                f"channels={self.weight.shape[1]}, h={self.h:g}, {self.activation}, {self.stepper}, norm={self.norm}")


class ConvOpening(nn.Module):
    """3x3 convolution in_channels -> C_0 (no bias, zero padding); flattened inputs are reshaped."""

    def __init__(self, input_shape, channels, dtype):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.weight = nn.Parameter(torch.empty(channels, input_shape[0], 3, 3, dtype=dtype))

    def forward(self, x):
        if x.dim() == 2:
            x = x.reshape(x.shape[0], *self.input_shape)
        return tf.conv2d(x, self.weight, padding=1)


class ConvProjection(nn.Module):
    """Between stages: 1x1 convolution C_in -> C_out with stride s ("conv"), or s x s average
    pooling followed by the 1x1 convolution ("avgpool"). No bias."""

    def __init__(self, cin, cout, stride, mode, dtype):
        super().__init__()
        self.stride, self.mode = stride, mode
        self.weight = nn.Parameter(torch.empty(cout, cin, 1, 1, dtype=dtype))

    def forward(self, y):
        if self.mode == "avgpool":
            if self.stride > 1:
                y = tf.avg_pool2d(y, self.stride)
            return tf.conv2d(y, self.weight)
        return tf.conv2d(y, self.weight, stride=self.stride)

    def extra_repr(self):
        return f"{self.weight.shape[1]} -> {self.weight.shape[0]}, stride={self.stride}, {self.mode}"


class PooledHead(nn.Module):
    """Global average pooling over (H, W), then a linear map C -> out ("pool"), or a linear map
    of the flattened state C*H*W -> out ("flatten", Haber et al.'s classifier)."""

    def __init__(self, features, out_features, dtype, flatten=False):
        super().__init__()
        self.flatten = flatten
        self.weight = nn.Parameter(torch.empty(out_features, features, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype))

    def forward(self, y):
        return tf.linear(y.flatten(1) if self.flatten else y.mean(dim=(2, 3)), self.weight, self.bias)


def init_bound(fan_in: int, fan_out: int, init: str) -> float:
    """Half-width of the uniform weight distribution: 1/√fan_in, or Glorot's √(6/(fan_in+fan_out))
    (variance 2/(fan_in+fan_out); Keras' default, which the MG/OPT paper's code uses)."""
    if choose("init", init, {k: k for k in INITS}) == "glorot":
        return math.sqrt(6.0 / (fan_in + fan_out))
    return 1.0 / math.sqrt(fan_in)


def init_linear(lin: nn.Linear, g, init: str = "uniform"):
    bound = init_bound(lin.in_features, lin.out_features, init)
    with torch.no_grad():
        lin.weight.uniform_(-bound, bound, generator=g)
        if lin.bias is not None:
            lin.bias.zero_()


def init_uniform(t: torch.Tensor, fan_in: int, g, fan_out: int | None = None, init: str = "uniform"):
    """Fill `t` uniformly; fan_in / fan_out count the inputs / outputs of one weight (× kernel size for convs)."""
    bound = init_bound(fan_in, fan_in if fan_out is None else fan_out, init)
    with torch.no_grad():
        t.uniform_(-bound, bound, generator=g)
