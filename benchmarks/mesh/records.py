"""The mesh study's records: the plan, what each rank timed, and the medians per layout."""
from __future__ import annotations

from dataclasses import dataclass, field

from benchmarks.harness import DataFolder, Machine


@dataclass
class Layout:
    """D data replicas x P layer ranks; `coarse`: where coarse levels on fewer ranks go;
    `min_blocks`: --min-blocks-per-rank (None: the default)."""
    D: int
    P: int
    coarse: str = "gather"
    min_blocks: int | None = None

    @property
    def shape(self) -> str:
        return f"({self.D}, {self.P})"

    @property
    def label(self) -> str:
        return self.coarse if self.min_blocks is None else f"{self.coarse} <{self.min_blocks}"


@dataclass
class MeshConfig:
    blocks: int
    repeats: int
    steps: dict[str, int]                 # timed steps per workload (after `warm` untimed ones)
    warm: int
    workloads: list[str]
    layouts: dict[int, list[Layout]]      # launch size -> layouts, in the order of the first repeat
    target_runs: bool
    max_cycles: int
    launch_timeout: float
    quick: bool = False
    kernel: str | None = None             # --kernel (None: results from before the option: auto)
    data: DataFolder | None = None        # the MNIST folder by name and checksums


@dataclass
class MeshJob:
    """The payload of one launch: every layout of its size on every workload, `repeats` times."""
    workloads: list[str]
    layouts: list[Layout]
    blocks: int
    repeats: int
    steps: dict[str, int]
    warm: int
    target_runs: bool
    max_cycles: int
    kernel: str
    data_dir: str | None
    runs_dir: str


@dataclass
class StepRow:
    """One timed step / V-cycle on one rank."""
    wall: float                  # seconds (rank 0's ends with the loss broadcast: the ranks end together)
    cpu: float                   # time.process_time seconds
    blocked: float               # seconds blocked in communication (every communicator the rank holds)
    levels: list[float]          # seconds per level, coarsest first
    load: float                  # 1-minute load average


@dataclass
class Sample:
    """One (workload, layout, repeat) of a launch: every rank's rows (None: not in the layout)."""
    world: int
    workload: str
    layout: Layout
    repeat: int
    ranks: list[list[StepRow] | None] = field(default_factory=list)


@dataclass
class Target:
    """Training circles' V-cycle to validation accuracy 1.0 on one layout (rank 0's view)."""
    world: int                   # the launch's ranks
    layout: Layout
    repeat: int
    seconds: float               # wall seconds of ``train`` (in-run clock)
    train_s: float               # inside the V-cycle calls
    cycles: int
    reached: bool
    val_acc: float | None
    load: float


@dataclass
class LayoutRow:
    """Medians of one (workload, layout) over repeats and steps; efficiencies against (1, 1)."""
    workload: str
    layout: Layout
    wall: float
    cpu: float                   # summed over the ranks
    samples: int
    idle: list[float | None]     # blocked / wall per rank (None: the rank was not in the layout)
    load: float
    levels: list[float]          # per level, the slowest rank, coarsest first
    speedup: float | None = None
    wall_eff: float | None = None
    cpu_eff: float | None = None


@dataclass
class TargetRow:
    layout: Layout
    seconds: float               # median
    all_seconds: list[float]
    cycles: list[int]
    reached: bool
    load: float
    speedup: float | None = None  # one process's median seconds / this layout's


@dataclass
class World:
    """The analysis of one launch size."""
    ranks: int
    rows: list[LayoutRow] = field(default_factory=list)
    targets: list[TargetRow] = field(default_factory=list)


@dataclass
class MeshResults:
    config: MeshConfig
    meta: Machine
    samples: list[Sample] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    worlds: list[World] = field(default_factory=list)      # the analysis (from the samples when there are any)
    failures: list[str] = field(default_factory=list)

    def world(self, ranks: int) -> World | None:
        return next((w for w in self.worlds if w.ranks == ranks), None)
