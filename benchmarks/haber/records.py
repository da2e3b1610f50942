"""The Haber study's records (``benchmarks/haber_resolution.py``)."""
from __future__ import annotations

from dataclasses import dataclass, field

from benchmarks.harness import DataFolder, Machine

PAPER = {"restricted": 94.9, "restricted_unadapted": 84.1, "prolongated": 91.0, "prolongated_unadapted": 61.0,
         "fine_native": 98.18, "coarse_native": 98.28}
ROWS = [("28x28 net on 28x28 (native)", "fine_native"), ("14x14 net on 14x14 (native)", "coarse_native"),
        ("28x28 net on 14x14, Galerkin-restricted kernels", "restricted"),
        ("28x28 net on 14x14, unadapted kernels", "restricted_unadapted"),
        ("14x14 net on 28x28, prolongated kernels", "prolongated"),
        ("14x14 net on 28x28, unadapted kernels", "prolongated_unadapted"),
        ("14x14 net on unblurred 28x28, prolongated kernels", "prolongated_raw"),
        ("14x14 net on unblurred 28x28, unadapted kernels", "prolongated_unadapted_raw"),
        ("28x28 net on 14x14 images interpolated to 28x28 (reference)", "fine_on_interpolated")]


@dataclass
class Config:
    seeds: list[int]
    epochs: int
    lr: float
    blur: float
    pool: bool
    kernel_smoothness: float
    quick: bool = False
    data: DataFolder | None = None       # the MNIST folder by name and checksums


@dataclass
class SeedRun:
    seed: int
    accuracy_percent: dict[str, float]
    seconds: dict[str, float]            # training time of the 28x28 and the 14x14 network
    prolongation_gain: float             # ||G^-1 s|| / ||s|| over the 14x14 network's stencils
    data: str
    non_smooth_fraction: dict[str, float]


@dataclass
class Spread:
    mean: float
    min: float
    max: float


@dataclass
class Summary:
    """Over seeds: every accuracy's spread, and how many seeds the adapted kernels won."""
    accuracy: dict[str, Spread] = field(default_factory=dict)
    restricted_wins: int = 0
    prolongated_wins: int = 0
    prolongated_raw_wins: int = 0


@dataclass
class Results:
    config: Config
    meta: Machine = field(default_factory=Machine)
    spec_28: dict = field(default_factory=dict)
    paper_percent: dict[str, float] = field(default_factory=lambda: dict(PAPER))
    summary: Summary = field(default_factory=Summary)
    runs: list[SeedRun] = field(default_factory=list)
