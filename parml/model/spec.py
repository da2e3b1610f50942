"""The architecture of an ODE ResNet, independent of its parameters: stages, widths, steppers."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .steppers import ACTIVATIONS, STEPPERS, choose

STAGE_KINDS = ("dense", "conv")
PROJECTIONS = ("conv", "avgpool")   # conv stages: strided 1x1 convolution | average pooling + 1x1
NORMS = ("none", "layer")           # conv blocks: no norm | per-sample norm over (C, H, W), no parameters
HEADS = ("pool", "flatten")         # conv head: global average pool + linear | linear on the flattened state
INITS = ("uniform", "glorot")       # weights U(±1/√fan_in) | Glorot uniform U(±√(6/(fan_in+fan_out))), Keras' default


@dataclass(frozen=True)
class StageSpec:
    """A run of residual blocks at one width: `blocks` time steps of size T / blocks.

    For a "conv" stage `width` is the number of channels and `stride` the downsampling factor of
    the projection that leads into the stage (1 for the first stage and for dense stages).
    """
    width: int
    blocks: int
    kind: str = "dense"
    stride: int = 1


@dataclass(frozen=True)
class ModelSpec:
    in_features: int
    out_features: int
    stages: tuple[StageSpec, ...] = (StageSpec(3, 2048),)
    T: float = 1.0
    activation: str = "relu"
    stepper: str = "euler"
    task: str = "classification"   # or "regression" (MSE)
    input_shape: tuple[int, ...] | None = None   # per-sample (C, H, W) of conv networks
    projection: str = "conv"       # conv networks: strided 1x1 conv | avgpool + 1x1 conv
    norm: str = "none"             # conv blocks: none | layer
    head: str = "pool"             # conv networks: pool (resolution independent) | flatten (Haber et al.)
    init: str = "uniform"          # weight initialization: uniform ±1/√fan_in | glorot (Keras default)

    def __post_init__(self):
        choose("activation", self.activation, ACTIVATIONS)
        choose("init", self.init, {k: k for k in INITS})
        choose("stepper", self.stepper, STEPPERS)
        if self.task not in ("classification", "regression"):
            raise ValueError(f"unknown task {self.task!r}; valid: classification, regression")
        if not self.stages or any(s.blocks < 1 or s.width < 1 for s in self.stages):
            raise ValueError("every stage needs at least one block and a positive width")
        for s in self.stages:
            choose("stage kind", s.kind, {k: k for k in STAGE_KINDS})
            if s.stride < 1:
                raise ValueError(f"--strides: stride {s.stride} must be at least 1")
        kinds = {s.kind for s in self.stages}
        if len(kinds) > 1:
            raise ValueError(f"--arch: stages mix kinds {sorted(kinds)}; every stage must be dense or every stage conv")
        if self.conv:
            self._check_conv()
        elif any(s.stride != 1 for s in self.stages):
            raise ValueError("--strides: dense stages cannot downsample (stride must be 1)")

    def _check_conv(self):
        choose("projection", self.projection, {k: k for k in PROJECTIONS})
        choose("norm", self.norm, {k: k for k in NORMS})
        choose("head", self.head, {k: k for k in HEADS})
        shape = self.input_shape
        if shape is None or len(shape) != 3 or any(int(d) < 1 for d in shape):
            raise ValueError(f"--arch conv needs the per-sample input shape (C, H, W), got input_shape={shape}")
        if math.prod(shape) != self.in_features:
            raise ValueError(f"--arch conv: input_shape {tuple(shape)} has {math.prod(shape)} values but the "
                             f"data has {self.in_features} features per sample")
        if self.stages[0].stride != 1:
            raise ValueError(f"--strides: the first stage cannot downsample (stride {self.stages[0].stride}); "
                             "the opening keeps the image size")
        h, w = shape[1], shape[2]
        for i, s in enumerate(self.stages[1:], start=1):
            if h % s.stride or w % s.stride:
                raise ValueError(f"--strides: stage {i} downsamples the {h}x{w} state of stage {i - 1} by "
                                 f"{s.stride}, which does not divide the image size")
            h, w = h // s.stride, w // s.stride

    @property
    def conv(self) -> bool:
        return self.stages[0].kind == "conv"

    @property
    def total_blocks(self) -> int:
        return sum(s.blocks for s in self.stages)

    def stage_state_shape(self, stage: int) -> tuple[int, ...]:
        """Per-sample shape of the states of `stage`: (width,) or (C, H, W)."""
        s = self.stages[stage]
        if not self.conv:
            return (s.width,)
        h, w = self.input_shape[1], self.input_shape[2]
        for t in self.stages[1:stage + 1]:
            h, w = h // t.stride, w // t.stride
        return (s.width, h, w)

    def coarsened(self, factor: int) -> "ModelSpec":
        """The same network with `factor` times fewer (and longer) steps in every stage."""
        return replace(self, stages=tuple(replace(s, blocks=s.blocks // factor) for s in self.stages))
