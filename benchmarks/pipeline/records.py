"""The pipeline study's records: what a launch is asked to do and what it measured."""
from __future__ import annotations

from dataclasses import dataclass, field

from benchmarks.harness import Machine


@dataclass
class ModelSize:
    width: int
    blocks: int
    batch: int
    label: str = ""
    in_features: int = 64
    classes: int = 10


@dataclass
class PipelineConfig:
    models: dict[str, ModelSize]
    P: list[int]
    microbatches: list[int]
    schedules: list[str]
    backends: list[str]
    warmup: int
    steps: int
    serial_steps: int
    quick: bool = False
    dtype: str = "float32"
    threads_per_rank: int = 1
    inline_ablation: bool = True
    device: str = "cpu"
    mpi_skipped: str | None = None        # why the mpi backend did not run
    kernel: str | None = None             # --kernel (None: results from before the option, torch chunks)


@dataclass
class StepJob:
    """The payload of one launch: every (model, schedule, M) on this launch's ranks."""
    backend: str                      # serial | gloo | nccl | mpi (the label of the rows)
    models: dict[str, ModelSize]
    microbatches: list[int]
    schedules: list[str]
    warmup: int
    steps: int
    device: str = "cpu"
    inline_ablation: bool = True
    torch_pipelining: bool = False
    latency_bytes: list[int] = field(default_factory=list)
    latency_reps: int = 200
    kernel: str = "auto"


@dataclass
class SerialStep:
    step_s: float
    steps_s: list[float]
    loss: float
    peak_saved_bytes: int


@dataclass
class BlockCost:
    fwd_bwd_s: float
    fwd_s: float
    gemm_gflops: float


@dataclass
class SerialModel:
    by_M: dict[int, SerialStep] = field(default_factory=dict)
    block_profile: dict[int, BlockCost] | None = None


@dataclass
class Serial:
    """One process, no communicator: the reference every step time is compared with."""
    models: dict[str, SerialModel] = field(default_factory=dict)
    dispatch_s: float | None = None       # one tiny eager op: the per-op floor


@dataclass
class RankTimes:
    """One rank, medians over the timed steps (``LayerParallel.times``). *send_s* (posting sends)
    and *loss_broadcast_s* (the final collective that brings the loss from the last rank) are parts of *wait_s*."""
    step_s: float
    compute_s: float
    wait_s: float
    other_s: float
    step_min_s: float
    peak_saved_bytes: int
    blocks: list[int]
    send_s: float | None = None
    loss_broadcast_s: float | None = None
    torch_peak_saved_bytes: int | None = None


@dataclass
class TorchRun:
    """torch.distributed.pipelining on the identical shards, alternating step by step with parml."""
    step_s: float | None = None
    step_min_s: float | None = None
    steps_s: list[float] = field(default_factory=list)
    loss: float | None = None
    loss_abs_diff: float | None = None
    grad_max_rel_diff: float | None = None
    peak_saved_bytes_max: int | None = None
    parml_over_torch_throughput: float | None = None    # torch median / parml median
    parml_over_torch_paired: float | None = None        # median of the step-by-step ratios
    error: str | None = None                            # why it did not run


@dataclass
class InlineRun:
    """The same executor with ``weight_grads="inline"`` (the ablation of the deferred weight gradients)."""
    step_s: float
    steps_s: list[float]
    deferred_over_inline_paired: float
    peak_saved_bytes_max: int


@dataclass
class Entry:
    """One configuration (model, backend, P, M, schedule) of a launch."""
    model: str
    backend: str
    P: int
    M: int
    schedule: str
    oversubscribed: bool
    step_s: float                 # median over steps of the slowest rank's time
    step_min_s: float
    steps_s: list[float]
    per_rank: list[RankTimes]
    busiest_compute_s: float
    efficiency: float             # busiest rank's compute / step time
    bound: float                  # M / (M + P - 1)
    eff_over_bound: float
    samples_per_s: float
    loss: float
    peak_saved_bytes_max: int
    torch: TorchRun | None = None
    inline: InlineRun | None = None
    kernels: list[str] | None = None  # the dense-chunk kernels rank 0's chunks ran (what --kernel auto chose)


@dataclass
class Latency:
    backend: str
    seconds: dict[int, float]     # message bytes -> one-way seconds (comm.send / recv, P = 2)


@dataclass
class RatioRow:
    model: str
    P: int
    M: int
    schedule: str
    oversubscribed: bool
    ratio: float
    paired_ratio: float


@dataclass
class EfficiencyRow:
    backend: str
    schedule: str
    efficiency: float
    bound: float
    eff_over_bound: float


@dataclass
class Goals:
    torch_ratio: list[RatioRow] = field(default_factory=list)
    efficiency: list[EfficiencyRow] = field(default_factory=list)
    torch_ratio_min_by_M_pipelined: dict[int, float] = field(default_factory=dict)
    torch_ratio_max_by_M_pipelined: dict[int, float] = field(default_factory=dict)
    torch_ratio_min_by_M_oversubscribed: dict[int, float] = field(default_factory=dict)
    torch_ratio_paired_median_pipelined: float | None = None
    torch_ratio_goal_met: bool = False
    deferred_over_inline_by_M: dict[int, list[float]] = field(default_factory=dict)
    inline_over_torch_by_M: dict[int, list[float]] = field(default_factory=dict)
    efficiency_goal_met: bool = False


@dataclass
class PipelineResults:
    config: PipelineConfig
    meta: Machine
    entries: list[Entry] = field(default_factory=list)
    serial: Serial | None = None
    latency: dict[str, dict[int, float]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    goals: Goals = field(default_factory=Goals)


def migrate(data: dict) -> dict:
    """Results written before the harness: per-rank send / broadcast times had other names, the
    machine's wall time was ``wall_s``."""
    for e in data.get("entries", []):
        for r in e.get("per_rank", []):
            r.setdefault("send_s", r.pop("other_isend_s", None))
            r.setdefault("loss_broadcast_s", r.pop("other_loss_broadcast_s", None))
    meta = data.get("meta", {})
    if "wall_s" in meta:
        meta.setdefault("elapsed_s", meta.pop("wall_s"))
    data.get("config", {}).setdefault("mpi_skipped", meta.pop("mpi_skipped", None))
    return data
