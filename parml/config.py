"""Run configuration: one dataclass, validated in one place; the CLI and files only fill it.

Every check raises ``ConfigError`` whose message is one line naming the option, its value and
what is allowed; the CLI prints it once (rank 0) and exits with code 2.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from .model import ACTIVATIONS, INITS, STEPPERS, ModelSpec, StageSpec
from .multilevel.hierarchy import INTERPOLATIONS, METRICS, HierarchyError, level_specs
from .multilevel.mgopt import CycleError, CycleSetup
from .parallel.schedule import SCHEDULES

OPTIMIZERS = ("sgd", "momentum", "adam")
DTYPES = ("float32", "float64")


class ConfigError(ValueError):
    """A bad option value; the message is the one line the user sees."""


@dataclass
class TrainConfig:
    """Everything a training run needs. Defaults: the paper's circles setup (§4)."""
    dataset: str = "circles"          # circles | regression | mnist | fashion-mnist | cifar10 | digits
    data_dir: str | None = None       # folder with IDX / CIFAR files (nothing downloads)
    arch: str = "dense"               # dense | conv (conv opening, conv stages with projections, pooled head)
    channels: str | None = None       # conv: channels per stage, e.g. "16,32,64" (default: --width)
    projection: str = "conv"          # conv: strided 1x1 conv | avgpool (+ 1x1 conv) between stages
    norm: str = "none"                # conv blocks: none | layer
    head: str = "pool"                # conv: pool | flatten
    blocks: int = 2048                # residual blocks (time steps) K on the finest level (per stage for conv)
    width: int = 3                    # state width v (3 for circles, 10 for MNIST in the paper)
    T: float = 1.0                    # final time; h = T / K
    activation: str = "relu"          # σ in F(y) = σ(W y + b)
    stepper: str = "euler"            # euler | rk2
    init: str = "uniform"             # weights: uniform ±1/√fan_in | glorot (Glorot uniform, the paper's Keras default)
    levels: int = 8                   # L; 1 is plain (S)GD
    cycle: str | None = None          # paper notation, finest first, e.g. "[(1),1,1,1,2,2,2,{2}]"
    optimizer: str = "sgd"            # level optimizer: sgd (Algorithm 3) | momentum | adam
    lr: float = 0.1
    beta: float = 1e-4                # Tikhonov weight β
    metric: str = "l2"                # l2: block steps in the L2(0,T) metric; euclidean: raw parameters
    interpolation: str = "constant"   # prolongation in time: constant (paper) | linear
    lr_schedule: str = "constant"     # constant | cosine (annealed to lr_min over max_cycles)
    lr_min: float = 0.001
    cascade: int = 0                  # multilevel initialization: train K/2^c, ..., K/2 first (c doublings)
    cascade_cycles: int = 100         # steps per cascade stage (cosine LR restarted each stage)
    cascade_interpolation: str = "constant"   # constant: copy each block (Chang) | linear (Haber)
    batch_size: int | None = None     # None = full batch (multilevel GD); else multilevel SGD
    seed: int = 0
    target_accuracy: float | None = 1.0   # stop at this validation accuracy (None: never)
    max_cycles: int = 2000            # V-cycles (= steps for L = 1) budget
    max_epochs: int | None = None     # mini-batch runs: epoch budget
    dtype: str = "float32"
    out: str = "runs"                 # parent folder of run folders
    run_name: str | None = None       # default: <dataset>-L<levels>-K<blocks>-s<seed>
    backend: str = "auto"             # auto | torch | mpi | self
    device: str = "auto"              # auto | cpu | cuda
    schedule: str = "1f1b"            # pipeline schedule across ranks
    microbatches: int = 1             # M
    weight_grads: str = "deferred"    # deferred (after the backward's adjoint is sent) | inline (in the backward)
    min_blocks_per_rank: int = 16     # a coarse level with fewer blocks per rank is gathered onto fewer ranks
    ranks: int | None = None          # expected world size; checked against the launcher's
    comm_timeout: float = 300.0       # seconds before a blocked communication fails
    checkpoint_every: int = 0         # cycles between checkpoints (0: none)
    resume: str | None = None         # run folder to continue from its latest complete checkpoint
    eval_every: int = 1               # validate every n cycles
    progress: bool = True

    @property
    def setup(self) -> CycleSetup:
        return CycleSetup.parse(self.cycle) if self.cycle else CycleSetup.default(self.levels)

    def model_spec(self, in_features: int, out_features: int, task: str, input_shape=None) -> ModelSpec:
        if self.arch == "dense":
            return ModelSpec(in_features, out_features, (StageSpec(self.width, self.blocks),),
                             self.T, self.activation, self.stepper, task, init=self.init)
        chans = [int(c) for c in self.channels.split(",")] if self.channels else [self.width]
        stages = tuple(StageSpec(c, self.blocks, "conv", 1 if i == 0 else 2) for i, c in enumerate(chans))
        if input_shape is None or len(input_shape) != 3:          # validation without data
            side = 2 ** (len(chans) - 1)
            input_shape, in_features = (1, side, side), side * side
        return ModelSpec(in_features, out_features, stages, self.T, self.activation, self.stepper, task,
                         tuple(input_shape), self.projection, self.norm, self.head, init=self.init)

    def spec_for(self, data) -> ModelSpec:
        """The network for a loaded ``data.Dataset``; a mismatch with the data is a ConfigError."""
        try:
            return self.model_spec(data.x_train[0].numel(), data.num_classes or data.y_train.shape[-1],
                                   data.task, data.input_shape)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    @property
    def name(self) -> str:
        return self.run_name or f"{self.dataset}-L{self.levels}-K{self.blocks}-s{self.seed}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # options that may differ when a run is resumed (they do not change the iterates)
    RESUMABLE = ("max_cycles", "max_epochs", "checkpoint_every", "comm_timeout", "progress", "backend",
                 "device", "ranks", "eval_every", "weight_grads")

    @classmethod
    def from_run(cls, run_dir: str, overrides: dict) -> "TrainConfig":
        """The configuration saved in `run_dir`, with the resumable `overrides`, set to resume it."""
        path = os.path.join(run_dir, "config.json")
        if not os.path.exists(path):
            raise ConfigError(f"--resume {run_dir!r}: no config.json there (not a parml run folder)")
        with open(path) as f:
            saved = json.load(f)
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in saved.items() if k in names})
        for k, v in overrides.items():
            if k in cls.RESUMABLE:
                setattr(cfg, k, v)
        cfg.resume = run_dir
        cfg.out, cfg.run_name = os.path.dirname(os.path.abspath(run_dir)), os.path.basename(os.path.abspath(run_dir))
        return cfg

    def validate(self) -> "TrainConfig":
        """Check every option that needs no data and no process group."""
        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)

        def choice(option, value, valid):
            need(value in valid, f"{option} {value!r} is not one of: {', '.join(valid)}")

        need(self.blocks >= 1, f"--blocks {self.blocks} must be at least 1")
        need(self.width >= 1, f"--width {self.width} must be at least 1")
        need(self.T > 0, f"--T {self.T} must be positive")
        need(self.lr > 0, f"--lr {self.lr} must be positive")
        need(self.beta >= 0, f"--beta {self.beta} must be >= 0")
        need(self.max_cycles >= 1, f"--max-cycles {self.max_cycles} must be at least 1")
        need(self.max_epochs is None or self.max_epochs >= 1, f"--max-epochs {self.max_epochs} must be at least 1")
        need(self.batch_size is None or self.batch_size >= 1, f"--batch-size {self.batch_size} must be at least 1")
        need(self.microbatches >= 1, f"--microbatches {self.microbatches} must be at least 1")
        need(self.checkpoint_every >= 0, f"--checkpoint-every {self.checkpoint_every} must be >= 0")
        need(self.resume is None or os.path.isdir(self.resume), f"--resume {self.resume!r} is not a run folder")
        need(self.eval_every >= 1, f"--eval-every {self.eval_every} must be at least 1")
        need(self.comm_timeout > 0, f"--comm-timeout {self.comm_timeout} must be positive")
        need(self.min_blocks_per_rank >= 1, f"--min-blocks-per-rank {self.min_blocks_per_rank} must be at least 1")
        need(self.ranks is None or self.ranks >= 1, f"--ranks {self.ranks} must be at least 1")
        need(self.target_accuracy is None or 0 < self.target_accuracy <= 1,
             f"--target-accuracy {self.target_accuracy} must be in (0, 1]")
        choice("--activation", self.activation, tuple(ACTIVATIONS))
        choice("--stepper", self.stepper, tuple(STEPPERS))
        choice("--init", self.init, INITS)
        choice("--optimizer", self.optimizer, OPTIMIZERS)
        choice("--metric", self.metric, METRICS)
        choice("--interpolation", self.interpolation, INTERPOLATIONS)
        choice("--cascade-interpolation", self.cascade_interpolation, INTERPOLATIONS)
        choice("--lr-schedule", self.lr_schedule, ("constant", "cosine"))
        need(0 <= self.lr_min <= self.lr, f"--lr-min {self.lr_min} must be in [0, --lr {self.lr}]")
        need(self.cascade >= 0, f"--cascade {self.cascade} must be >= 0")
        need(self.cascade_cycles >= 1, f"--cascade-cycles {self.cascade_cycles} must be at least 1")
        need(self.blocks % 2 ** self.cascade == 0,
             f"--cascade {self.cascade} needs --blocks {self.blocks} divisible by 2^{self.cascade} (each stage doubles the depth)")
        choice("--dtype", self.dtype, DTYPES)
        choice("--backend", self.backend, ("auto", "torch", "mpi", "self"))
        choice("--device", self.device, ("auto", "cpu", "cuda"))
        choice("--schedule", self.schedule.lower(), tuple(sorted(SCHEDULES)))
        choice("--weight-grads", self.weight_grads, ("deferred", "inline"))
        choice("--arch", self.arch, ("dense", "conv"))
        need(self.channels is None or all(c.strip().isdigit() and int(c) > 0 for c in self.channels.split(",")),
             f"--channels {self.channels!r} must be comma-separated positive integers, e.g. 16,32,64")
        choice("--projection", self.projection, ("conv", "avgpool"))
        choice("--norm", self.norm, ("none", "layer"))
        choice("--head", self.head, ("pool", "flatten"))
        try:
            level_specs(self.model_spec(1, 1, "classification"), self.levels)
            self.setup.check(self.levels)
        except (HierarchyError, CycleError, ValueError) as e:
            raise ConfigError(str(e)) from None
        parent = os.path.abspath(self.out)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        need(os.access(parent, os.W_OK), f"--out {self.out!r} is not writable")
        return self
