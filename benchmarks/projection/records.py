"""The projection's records. Field names are the keys of the planner's records, so results.json
keeps the layout it had before the harness and older files load unchanged."""
from __future__ import annotations

from dataclasses import dataclass, field

from benchmarks.harness import Machine


@dataclass
class Pick:
    """One layout the planner ranked (a subset of its record)."""
    data_parallel: int
    layer_ranks: int
    microbatches: int
    coarse_layout: str | None
    predicted_step_seconds: float
    predicted_cycle_seconds: float
    memory_bytes_per_rank: float

    def seconds(self, levels: int) -> float:
        """The predicted time of the method: one V-cycle (levels > 1) or one GD step."""
        return self.predicted_cycle_seconds if levels > 1 else self.predicted_step_seconds


@dataclass
class Point:
    """The best layouts at N ranks: overall, pure data parallel (P = 1), pure layer parallel
    (D = 1), and for V-cycles the best with gathered and with replicated coarse levels; None where
    nothing fits in memory. `error`: no layout exists at all (the sweep stops there)."""
    n: int = 0
    candidates: int = 0
    best: Pick | None = None
    dp: Pick | None = None
    lp: Pick | None = None
    largest_fitting_replica: int | None = None
    gather: Pick | None = None
    replicate: Pick | None = None
    error: str | None = None
    seconds_to_plan: float = 0.0


@dataclass
class Series:
    profile: str                 # cpu | gpu
    workload: str
    scaling: str                 # strong | weak
    levels: int                  # 1: GD; 8: V-cycle
    points: list[Point] = field(default_factory=list)

    def planned(self) -> list[Point]:
        """The points where some layout fits."""
        return [p for p in self.points if p.error is None and p.best is not None]


@dataclass
class ProjectionConfig:
    quick: bool = False
    blocks: list[int] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    conv: bool = True


@dataclass
class ProjectionResults:
    ranks: list[int]
    series: list[Series] = field(default_factory=list)
    seconds: float = 0.0                         # planning time of the sweep
    config: ProjectionConfig | None = None       # None: written before the harness
    meta: Machine | None = None


@dataclass
class Summary:
    """One series at its largest N: speedup / efficiency of the best layout, and where layer
    parallelism (P > 1) beats pure data parallelism (N, DP time / best time; inf: DP does not fit)."""
    series: Series
    n: int
    best: Pick
    t1: float
    tn: float
    speedup: float | None
    efficiency: float
    lp_wins: list[tuple[int, float]]
    dp_fits_at: list[int]
