"""The Chang study's records (``benchmarks/chang_multilevel.py``)."""
from __future__ import annotations

from dataclasses import dataclass, field

from parml.multilevel.cascade import theoretical_saving

from benchmarks.harness import DataFolder, Machine
from benchmarks.multilevel_init import DOUBLINGS, CascadeRun

CHANNELS = (16, 32, 64)


@dataclass
class Setup:
    resolution: int
    channels: str
    lr: float
    n_train: int = 8000
    n_val: int = 2000
    head: str = "flatten"
    blocks: int = 16
    budget: int = 900
    batch_size: int = 100
    lr_min: float = 0.001
    beta: float = 1e-4
    eval_every: int = 50


@dataclass
class Config:
    dataset: str
    seeds: int
    setup: Setup
    quick: bool = False
    doublings: int = DOUBLINGS
    data: DataFolder | None = None


@dataclass
class Pair:
    seed: int
    acc_direct: float
    acc_multilevel: float
    acc_diff: float
    work_saved: float
    time_saved: float
    train_time_saved: float
    expected_saving: float | None
    step_ms: dict[int, float]
    direct_step_ms: float


@dataclass
class Analysis:
    theoretical_saving: float = theoretical_saving(DOUBLINGS)
    pairs: list[Pair] = field(default_factory=list)
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    equal_accuracy: bool = False
    n: int = 0


@dataclass
class Results:
    config: Config
    meta: Machine
    data_name: str = ""
    runs: list[CascadeRun] = field(default_factory=list)
    analysis: Analysis = field(default_factory=Analysis)
    gaps: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    theoretical_saving: dict[int, float] = field(default_factory=dict)
    channels: tuple[int, ...] = CHANNELS
    training_s: float = 0.0
