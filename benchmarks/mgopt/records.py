"""The MG/OPT scaling study's records: the plan's runs, what each measured, the analysis."""
from __future__ import annotations

from dataclasses import dataclass, field

from benchmarks.harness import DataFolder, Machine, TrainRun


@dataclass
class Setup:
    """A dataset's training setup (the paper's Table 1 settings)."""
    dataset: str
    width: int
    lr: float
    beta: float
    batch_size: int | None
    target_accuracy: float
    thresholds: list[float]


@dataclass
class MgConfig:
    blocks: int
    seeds: int
    mnist_seeds: int
    datasets: list[str]
    P: list[int]
    circles_max_cycles: dict[int, int]
    mnist_work_budget: float
    mnist_eval_every: dict[int, int]
    launch_timeout: float
    quick: bool = False
    microbatches: int = 1
    metric: str = "l2"
    p2_backend: str = "torch"
    data: DataFolder | None = None          # the MNIST folder by name and checksums
    kernel: str | None = None               # --kernel (None: results from before the option, torch chunks)


@dataclass(kw_only=True)
class RunSpec:
    """One training run of the plan."""
    dataset: str
    seed: int
    levels: int
    cycle: str | None
    blocks: int
    width: int
    lr: float
    beta: float
    batch_size: int | None
    target_accuracy: float
    metric: str
    microbatches: int
    min_blocks_per_rank: int
    P: int
    variant: str                      # "default" | "min1" (every level on every rank)
    max_cycles: int
    eval_every: int
    key: str = ""
    kernel: str = "auto"


@dataclass
class MgJob:
    """The payload of one launch: every run of one world size, in order."""
    runs: list[RunSpec]
    data_dir: str | None
    runs_dir: str
    backend: str = "self"                 # TrainConfig's backend: self | torch | mpi
    comm_timeout: float = 600.0


@dataclass
class LevelTimes:
    """One level's executor on one rank, summed over the run (``LayerParallel.total``, ``Level.stats``)."""
    ranks: int
    fb_calls: int
    fb_s: float
    compute_s: float
    wait_s: float
    level_s: float
    gradients: int


@dataclass
class RankStats:
    """One rank over a run. *train_s*: inside the V-cycle / GD-step calls; *comm_wait_s*: blocked in
    any communicator during them; *other_s* = train − compute − wait; *rest_s* = train − compute − comm wait."""
    rank: int
    train_s: float
    calls: int
    compute_s: float
    wait_s: float
    other_s: float
    comm_wait_s: float
    rest_s: float
    levels: list[LevelTimes | None]


@dataclass
class LevelEfficiency:
    ranks: int
    fb_s: float
    compute_s: list[float]
    wait_s: list[float]
    efficiency: float | None          # busiest rank's compute / slowest rank's forward-backward time


@dataclass(kw_only=True)
class MgRun(TrainRun, RunSpec):
    """A run of the plan with what it measured (status: reached | budget | diverged)."""
    status: str = "reached"
    error: str | None = None
    backend: str = ""
    per_rank: list[RankStats] = field(default_factory=list)
    busiest_compute_s: float = 0.0
    efficiency: float | None = None
    bound: float = 1.0
    level_efficiency: list[LevelEfficiency] = field(default_factory=list)


@dataclass
class Threshold:
    work_L1: float | None
    work_L8: float | None
    seconds_L1: float | None
    seconds_L8: float | None
    reached_L1: int
    reached_L8: int
    n: int
    all_reached: bool
    budget_L1: float
    budget_L8: float


@dataclass
class SeedRatio:
    seed: int
    work_ratio: float
    wall_ratio: float
    train_ratio: float


@dataclass
class Ratio:
    """L = 1 against L = 8 on one dataset and P (means over seeds)."""
    seeds: list[int]
    all_reached: bool
    mean_L1: dict[str, float]
    mean_L8: dict[str, float]
    work_ratio: float
    wall_ratio: float
    train_ratio: float
    per_seed: list[SeedRatio]
    work_ratio_ci95: list[float] | None = None
    work_ratio_first3: float | None = None
    thresholds: dict[float, Threshold] = field(default_factory=dict)
    goal_work_met: bool | None = None
    goal_wall_met: bool | None = None


@dataclass
class Exactness:
    """P = 2 against P = 1, same configuration and seed."""
    dataset: str
    levels: int
    seed: int
    cycles: list[int]
    work_units: list[float]
    val_acc: list[float]
    final_loss_rel_diff: float
    equal: bool
    speedup_train: float
    speedup_wall: float


@dataclass
class Efficiency:
    efficiency: float
    bound: float
    train_s: float
    per_call_ms: float
    compute_s: list[float]
    wait_s: list[float]
    other_s: list[float]
    comm_wait_s: list[float]
    rest_s: list[float]
    n: int


@dataclass
class MinBlocksSide:
    cycles: float
    work_units: float
    seconds: float
    train_s: float
    efficiency: float
    seed: int | None = None               # None: the mean over seeds
    plan: list[int] = field(default_factory=list)
    level_seconds: list[float] = field(default_factory=list)
    val_acc: float | None = None


@dataclass
class MinBlocks:
    """Coarse levels gathered (16 blocks per rank at least) vs every level on both ranks (1)."""
    pairs: list[dict[int, MinBlocksSide]]
    mean: dict[int, MinBlocksSide]
    train_ratio_1_over_16: float


@dataclass
class Analysis:
    ratios: dict[str, Ratio] = field(default_factory=dict)             # "circles-P2"
    exactness: list[Exactness] = field(default_factory=list)
    efficiency: dict[str, dict[str, Efficiency]] = field(default_factory=dict)   # "circles-L8" -> "P2"
    min_blocks: MinBlocks | None = None


@dataclass
class MgResults:
    config: MgConfig
    meta: Machine
    runs: list[MgRun] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    analysis: Analysis = field(default_factory=Analysis)
