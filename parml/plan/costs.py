"""What is simulated and what it costs: the workload, a candidate layout, each level's layout
(``parallel.layout.plan_mesh``, the executor's own plan) and one layer rank's costs per
micro-batch from the profile's fits.

The mesh (issue 17): world = D data replicas × P layer ranks, world rank = d·P + s. Coarse levels
(``gather`` or ``replicate``) are placed by ``plan_mesh``; nothing here restates its rule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

from ..kernels import auto_defers, auto_fused
from ..kernels.cpu import keep_activations, segment_blocks, tile_size
from ..kernels.network import auto_network
from ..model import ModelSpec
from ..multilevel.hierarchy import level_specs
from ..multilevel.mgopt import CycleSetup
from ..parallel.layout import COARSE_LAYOUTS, Partition, plan_mesh  # noqa: F401 (COARSE_LAYOUTS: re-exported)
from .profile import NETWORK_IO, Profile

DTYPE_BYTES = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}
OPTIMIZER_STATES = {"sgd": 0, "momentum": 1, "adam": 2}


@dataclass
class Workload:
    """The training problem: the finest network, samples per step, the hierarchy and its cycle."""
    spec: ModelSpec
    batch: int
    levels: int = 1
    cycle: object = None            # mgopt.CycleSetup; None: CycleSetup.default(levels)
    dtype: str = "float32"
    optimizer: str = "sgd"

    @property
    def setup(self):
        return self.cycle if self.cycle is not None else CycleSetup.default(self.levels)

    @classmethod
    def from_config(cls, cfg, in_features: int, out_features: int, n_train: int, input_shape=None,
                    task: str = "classification") -> Workload:
        """From a ``TrainConfig`` and the dataset's sizes (no data is loaded)."""
        spec = cfg.model_spec(in_features, out_features, task, input_shape)
        batch = min(cfg.batch_size or n_train, n_train)
        return cls(spec, batch, cfg.levels, cfg.setup, cfg.dtype, cfg.optimizer)


@dataclass
class Layout:
    """One candidate: D data replicas × P layer ranks, M micro-batches, schedule, coarse layout."""
    data_parallel: int = 1
    layer_ranks: int = 1
    microbatches: int = 1
    schedule: str = "1f1b"
    coarse_layout: str = "gather"
    min_blocks_per_rank: int = 16
    weight_grads: str = "auto"
    backend: str = "gloo"
    ranks_per_node: int | None = None   # None: profile.cores (a full node, not oversubscribed)
    background: float = 0.0             # other processes busy on each node (a shared machine)

    @property
    def world(self) -> int:
        return self.data_parallel * self.layer_ranks


@dataclass(frozen=True)
class LevelLayout:
    """Where one level runs: `replicas` × partition.ranks layer ranks; world rank = d·stride + j."""
    level: int
    spec: ModelSpec
    partition: Partition
    replicas: int
    stride: int
    redundant: bool = False         # every replica runs the whole batch: no data-group all-reduce

    @property
    def ranks(self) -> int:
        return self.partition.ranks

    @property
    def shares(self) -> int:
        """Parts each batch is split into (``parallel.layout.LevelLayout.shares``)."""
        return 1 if self.redundant else self.replicas

    def world_rank(self, d, j) -> int:
        return d * self.stride + j

    def position(self, world_rank):
        d, j = divmod(world_rank, self.stride)
        if j >= self.ranks or d >= self.replicas:
            return None
        return d, j

    def members(self, world) -> list[tuple[int, int]]:
        """(world rank, layer rank) of this level's ranks among `world` (a range from 0)."""
        return _members(self.replicas, self.stride, self.ranks, len(world))


@lru_cache(maxsize=1024)
def _members(replicas, stride, ranks, n) -> list:
    return [(d * stride + j, j) for d in range(replicas) for j in range(ranks) if d * stride + j < n]


def _split_sizes(n: int, parts: int) -> list[int]:
    """Row counts of ``tensor_split(n, parts)``: the first n % parts get one more."""
    q, r = divmod(n, parts)
    return [q + 1 if i < r else q for i in range(parts)]


def level_specs_of(spec: ModelSpec, levels: int) -> list[ModelSpec]:
    return level_specs(spec, levels)


def level_layouts(work: Workload, layout: Layout) -> list[LevelLayout]:
    """Every level's layout (coarsest first): ``parallel.layout.plan_mesh``, the run's own rule."""
    specs = level_specs_of(work.spec, work.levels)
    mesh = plan_mesh([s.total_blocks for s in specs], layout.world, layout.data_parallel,
                     layout.min_blocks_per_rank, layout.coarse_layout, work.batch, layout.microbatches)
    return [LevelLayout(lv.level, sp, lv.partition, lv.replicas, lv.stride, lv.redundant)
            for lv, sp in zip(mesh.levels, specs)]


# --- per-rank costs --------------------------------------------------------------------------------

@lru_cache(maxsize=65536)
def _stage_ranges(spec: ModelSpec, a: int, b: int):
    """(stage index, blocks in [a, b) of that stage) for the stages the shard [a, b) touches."""
    out, offset = [], 0
    for i, s in enumerate(spec.stages):
        lo, hi = max(a, offset), min(b, offset + s.blocks)
        if lo < hi:
            out.append((i, hi - lo))
        offset += s.blocks
    return tuple(out)


def _stage_of_step(spec: ModelSpec, step: int) -> int:
    for i, s in enumerate(spec.stages):
        if step < s.blocks:
            return i
        step -= s.blocks
    return len(spec.stages) - 1


def _pixels(spec: ModelSpec, stage: int) -> int:
    shape = spec.stage_state_shape(stage)
    return math.prod(shape[1:]) if len(shape) > 1 else 1


def state_elements(spec: ModelSpec, boundary: int) -> int:
    """Per-sample elements of the state passed at global step `boundary` (model.state_shape)."""
    stage = _stage_of_step(spec, boundary)
    offset = sum(s.blocks for s in spec.stages[:stage])
    if boundary == offset and stage > 0:
        stage -= 1
    return math.prod(spec.stage_state_shape(stage))


def _block_row_elements(spec: ModelSpec, stage: int) -> int:
    v = spec.stages[stage].width
    return v * v * (9 if spec.conv else 1) + v


@lru_cache(maxsize=256)
def shared_entries(spec: ModelSpec) -> dict:
    """(cached: do not modify) Elements of each shared parameter and the global step whose owner holds it."""
    v0, vl = spec.stages[0].width, spec.stages[-1].width
    K = spec.total_blocks
    out = {}
    if spec.conv:
        out["opening.weight"] = (v0 * spec.input_shape[0] * 9, 0)
        feats = math.prod(spec.stage_state_shape(len(spec.stages) - 1)) if spec.head == "flatten" else vl
    else:
        out["opening.weight"] = (v0 * spec.in_features, 0)
        feats = vl
    offset = 0
    for i, s in enumerate(spec.stages):
        if i > 0:
            out[f"projections.{i}.weight"] = (spec.stages[i - 1].width * s.width, offset)
        offset += s.blocks
    out["head.weight"] = (spec.out_features * feats, K - 1)
    out["head.bias"] = (spec.out_features, K - 1)
    return out


@lru_cache(maxsize=65536)
def shard_parameters(spec: ModelSpec, a: int, b: int) -> int:
    """Parameter elements of shard [a, b) (blocks and the shared pieces that go with it)."""
    offset, total = 0, 0
    for i, s in enumerate(spec.stages):
        lo, hi = max(a, offset), min(b, offset + s.blocks)
        if lo < hi:
            total += (hi - lo) * _block_row_elements(spec, i)
        offset += s.blocks
    for n, owner in shared_entries(spec).values():
        if a <= owner < b:
            total += n
    return total


def kernel_name(spec: ModelSpec, weight_grads: str, device: str, width: int, waited: bool) -> str:
    """The profile's kernel for a chunk of `width` on a stage that a neighbour waits on (`waited`):
    deferred weight gradients ("dense") as ``PipelineStage`` routes them, else "dense-inline"."""
    if spec.conv:
        return "conv"
    if spec.stepper != "euler" or weight_grads == "inline":
        return "dense-inline"
    return "dense" if weight_grads == "deferred" or auto_defers(device, width, waited) else "dense-inline"


@dataclass
class StageCost:
    """One layer rank's costs per micro-batch of `rows`: forward, backward (adjoint), weight grads."""
    spec: ModelSpec
    a: int
    b: int
    profile: Profile
    weight_grads: str
    _memo: dict = field(default_factory=dict, repr=False)

    def _parts(self, rows):
        if rows not in self._memo:
            self._memo[rows] = self._compute(rows)
        return self._memo[rows]

    def kernels(self) -> list[str]:
        """The profile's kernel of each chunk of the stage (deferred or inline weight gradients)."""
        return [kernel_name(self.spec, self.weight_grads, self.profile.device, self.spec.stages[stage].width,
                            waited=self.a > 0) for stage, _ in _stage_ranges(self.spec, self.a, self.b)]

    @property
    def deferred(self) -> bool:
        """Some chunk forms its weight gradients after the backward (a W action per micro-batch)."""
        return "dense" in self.kernels()

    @property
    def manual(self) -> bool:
        """The stage trains without autograd (``PipelineStage.manual``): one narrow dense stage on the
        fused kernel whose weight gradients stay inline."""
        spec, device = self.spec, self.profile.device
        if self.weight_grads == "deferred" or not auto_network(spec, device):
            return False
        return self.weight_grads == "inline" or not auto_defers(device, spec.stages[0].width, self.a > 0)

    @property
    def network(self) -> bool:
        """One rank holds the whole model and computes it without autograd (``LayerParallel``'s
        ``NetworkGradient``), where the profile measured that path."""
        return ((self.a, self.b) == (0, self.spec.total_blocks) and "network" in self.profile.kernels
                and self.manual)

    def _compute(self, rows):
        prof, spec = self.profile, self.spec
        scale = 2.0 if spec.stepper == "rk2" else 1.0      # two F evaluations per step (estimate)
        if self.network:             # loss and every gradient in one call: all of it is the F row
            n, v = spec.total_blocks, spec.stages[0].width
            t = scale * prof.kernel("network").time(0, n=n, b=rows, v=v, s=1)
            # calibrated with NETWORK_IO inputs and outputs: the ends' fits say what other sizes add
            i, o = NETWORK_IO
            first, cal_first = ({"b": rows, "v": v, "s": 1, "i": k} for k in (spec.in_features, i))
            last, cal_last = ({"b": rows, "v": v, "s": 1, "o": k} for k in (spec.out_features, o))
            for k in ("F", "B"):
                t += prof.end_cost("first", k, True, **first) - prof.end_cost("first", k, True, **cal_first)
                t += prof.end_cost("last", k, True, **last) - prof.end_cost("last", k, True, **cal_last)
            return max(t, 0.0), 0.0, 0.0
        f = bw = w = 0.0
        for (stage, n), name in zip(_stage_ranges(spec, self.a, self.b), self.kernels()):
            kern = prof.kernel(name)
            x = {"n": n, "b": rows, "v": spec.stages[stage].width, "s": _pixels(spec, stage)}
            f += scale * kern.time(0, **x)
            bw += scale * kern.time(1, **x)
            w += scale * kern.time(2, **x)
        if self.a == 0:
            x = {"b": rows, "v": spec.stages[0].width, "s": _pixels(spec, 0),
                     "i": spec.input_shape[0] if spec.conv else spec.in_features}
            f += prof.end_cost("first", "F", self.manual, **x)
            bw += prof.end_cost("first", "B", self.manual, **x)
        if self.b == spec.total_blocks:
            last = len(spec.stages) - 1
            x = {"b": rows, "v": spec.stages[last].width, "s": _pixels(spec, last), "o": spec.out_features}
            f += prof.end_cost("last", "F", self.manual, **x)
            bw += prof.end_cost("last", "B", self.manual, **x)
        return f, bw, w

    def forward(self, rows):
        return self._parts(rows)[0]

    def backward(self, rows):
        return self._parts(rows)[1]

    def weight(self, rows):
        return self._parts(rows)[2]

    def activation_bytes(self, rows, dtype_bytes):
        """Saved states of one micro-batch and the adjoint buffer of B: y_k and σ_k per block and the
        blocks' adjoints, except where the fused CPU kernel (every dense width up to 16 under
        ``--kernel auto``) keeps its weight gradients inline: there no adjoints, σ_k only where
        ``cpu.keep_activations`` keeps it, and a chunk run in segments (``cpu.segment_blocks``)
        holds each segment's input and one segment's y_k, each state of the rows padded to whole
        tiles (``cpu.tile_size``), as ``cpu.ChunkRun`` stores them."""
        held = gas = 0
        for (stage, n), name in zip(_stage_ranges(self.spec, self.a, self.b), self.kernels()):
            per = rows * math.prod(self.spec.stage_state_shape(stage)) * dtype_bytes
            v = self.spec.stages[stage].width
            if name == "dense-inline" and auto_fused(self.profile.device, v):
                keep = keep_activations(self.spec.activation, v)
                tile = tile_size(v, rows, self.profile.threads, not keep) if rows else 1
                cols = -(-rows // tile) * tile
                per = cols * v * dtype_bytes
                seg = n if keep or self.profile.threads != 1 else segment_blocks(n, v, cols, dtype_bytes)
                held += (2 * n if keep else n if seg == n else -(-n // seg) + seg) * per
            else:               # and per-block adjoints for the weight gradients formed after B
                held += 2 * n * per
                gas += n * per
        return held, gas
