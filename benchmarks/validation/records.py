"""The plan-validation study's records. Field names follow the JSON the script wrote before it used
the harness (``validation.json``), so results of either layout load as ``ValResults``."""
from __future__ import annotations

from dataclasses import dataclass, field

from benchmarks.harness import DataFolder, Machine


@dataclass
class Case:
    """A network and batch to time: "random" data of the given shape, or a dataset's train split."""
    dataset: str
    in_features: int
    classes: int
    blocks: int
    width: int
    batch: int
    lr: float = 0.01


@dataclass
class Conf:
    """One configuration a launch times: one GD step (L = 1) or one V-cycle (L = 8)."""
    case: str
    levels: int
    D: int                       # data replicas (layer ranks P = world / D)
    M: int                       # micro-batches
    schedule: str = "1f1b"
    mbpr: int = 16               # --min-blocks-per-rank
    coarse: str = "gather"       # --coarse-layout
    steps: int = 5
    warmup: int = 1


@dataclass
class Measured(Conf):
    """A configuration as measured (the slowest rank's step, after a barrier) and as predicted."""
    world: int = 1
    step_s: float = 0.0                                        # median of steps_s
    steps_s: list[float] = field(default_factory=list)
    cpu_s: list[list[float]] = field(default_factory=list)     # per step, every rank's thread CPU seconds
    share: list[float] = field(default_factory=list)           # per step, the mean share of a core a rank got
    loadavg: list[float] = field(default_factory=list)
    background: float | None = None                            # other busy processes B (analysis)
    predicted_s: float | None = None                           # parml.plan's prediction at that B (analysis)


@dataclass
class ValJob:
    """The payload of one launch: its configurations in order (a case's in a row)."""
    cases: dict[str, Case]
    configs: list[Conf]
    data_dir: str | None = None


@dataclass
class Fastest:
    D: int
    M: int
    schedule: str
    mbpr: int
    step_s: float


@dataclass
class AutoChoice:
    """``--layout auto`` at 2 ranks for one case, and how it fared against the measured layouts."""
    case: str
    levels: int
    background: float
    D: int
    coarse: str | None           # None: one level (no coarse levels)
    M: int
    schedule: str
    mbpr: int
    predicted_s: float
    measured_s: float | None = None
    fastest_D1: Fastest | None = None
    fastest_any: Fastest | None = None
    over_fastest_D1: float | None = None
    over_fastest_any: float | None = None


@dataclass
class Errors:
    """|predicted / measured - 1| over a set of configurations."""
    n: int = 0
    median: float | None = None
    max: float | None = None
    within_15: int = 0
    within_30: int = 0


@dataclass
class ValResults:
    cases: dict[str, Case]
    results: list[Measured] = field(default_factory=list)
    started: str = ""                     # UTC
    finished: str = ""
    load_range: list[float] = field(default_factory=list)
    cores: int = 1                        # the profile's cores per node
    profile_note: str = ""
    quick: bool = False
    errors: Errors = field(default_factory=Errors)
    auto: list[AutoChoice] = field(default_factory=list)
    meta: Machine | None = None           # None: written before the harness
    data: DataFolder | None = None        # the MNIST folder by name and checksums
    failures: list[str] = field(default_factory=list)
    backend: str = "gloo"                 # the measured ranks' transport; the profile's costs of it
