"""Building a run: the mesh and each level's layout on it, the levels on their rank groups, the
movers between them, the V-cycle and the level optimizers."""
from __future__ import annotations

import torch

from ..config import ConfigError, TrainConfig
from ..data import Dataset
from ..model import build_model
from ..multilevel.hierarchy import level_specs
from ..multilevel.mgopt import Level, VCycle, level_optimizer
from ..parallel.executor import LayerParallel
from ..parallel.layout import LayoutError, MeshPlan, plan_mesh
from ..parallel.mesh import MeshGroups
from ..parallel.transfer import Mover


def smallest_batch(n: int, batch_size: int | None) -> int:
    """The fewest samples any batch of an epoch has (``data.batches`` keeps the last partial batch)."""
    if batch_size is None or batch_size >= n:
        return n
    return n % batch_size or batch_size


def plan_run(cfg: TrainConfig, world: int, data: Dataset, finest_ranks: int | None = None) -> MeshPlan:
    """The mesh of `cfg` on `world` ranks for `data` with every check (``layout.plan_mesh``) as a
    ConfigError; `finest_ranks` caps the finest level's layer ranks (a cascade stage)."""
    specs = level_specs(cfg.spec_for(data), cfg.levels)
    n_train = data.x_train.shape[0]
    batch = smallest_batch(n_train, cfg.batch_size)
    name = "the full batch of" if cfg.batch_size is None or cfg.batch_size >= n_train else \
        "--batch-size" if batch == cfg.batch_size else \
        f"the last batch of an epoch ({n_train} samples, --batch-size {cfg.batch_size}):"
    try:
        return plan_mesh([s.total_blocks for s in specs], world, cfg.data_parallel, cfg.min_blocks_per_rank,
                         cfg.coarse_layout, batch, cfg.microbatches, finest_ranks, name)
    except LayoutError as e:
        raise ConfigError(str(e)) from None


def build_levels(cfg: TrainConfig, data: Dataset, comm, device=None, init_state: dict | None = None,
                 mesh: MeshPlan | None = None, groups: MeshGroups | None = None):
    """Levels 1..L (coarsest first) and the movers between them.

    Level l runs on its layout of the mesh (``layout.plan_mesh``): layer-parallel over its
    replica's layer group, gradients summed over its data group (a redundant level: the whole batch
    on every replica, no sums); on ranks outside the layout its entry is None. Returns (levels,
    movers, mesh). `groups`: where the sub-communicators are kept.
    """
    dtype = getattr(torch, cfg.dtype)
    spec = cfg.spec_for(data)
    specs = level_specs(spec, cfg.levels)
    mesh = mesh or plan_run(cfg, comm.size, data)
    groups = groups or MeshGroups(comm)
    levels = []
    for i, (sp, layout) in enumerate(zip(specs, mesh.levels)):
        layer, replicas = groups.of(layout)          # collective on every rank, in the same order
        if layer is None:
            levels.append(None)
            continue
        factor = 2 ** (cfg.levels - 1 - i)
        # every level is drawn from the same seed; coarse ones are overwritten by restriction
        model = build_model(sp, seed=cfg.seed, dtype=dtype)
        if init_state is not None and i == cfg.levels - 1:
            model.load_state_dict(init_state)
        executor = LayerParallel(model, layer, cfg.schedule.lower(), cfg.microbatches, layout.partition,
                                 device=device, weight_grads=cfg.weight_grads, kernel=cfg.kernel, data=replicas,
                                 world_rank=comm.rank, replica=layout.position(comm.rank)[0])
        h = sp.T / sp.stages[0].blocks
        weight = h if cfg.metric == "l2" else float(factor)
        levels.append(Level(executor, cfg.beta, weight, cfg.metric, sp.total_blocks / spec.total_blocks,
                            level_optimizer(cfg.optimizer, cfg.lr), number=i + 1))
    movers = []
    for i in range(cfg.levels - 1):
        fine = mesh.levels[i + 1].coarsened(2)       # the fine level's ranks, in coarse blocks
        movers.append((Mover(comm, specs[i], fine, mesh.levels[i]), Mover(comm, specs[i], mesh.levels[i], fine)))
    return levels, movers, mesh


def build_vcycle(cfg: TrainConfig, data: Dataset, comm, device=None, init_state: dict | None = None,
                 mesh: MeshPlan | None = None) -> VCycle:
    """The V-cycle of `cfg` over `comm`; ``vcycle.mesh`` records where each level lives (``plans``: its
    level layouts), ``vcycle.groups`` the rank's sub-communicators. `init_state`: the finest model's
    full state dict to start from (e.g. a cascade's result); `mesh`: another layout (a cascade stage)."""
    groups = MeshGroups(comm)
    levels, movers, mesh = build_levels(cfg, data, comm, device, init_state, mesh, groups)
    vcycle = VCycle(levels, cfg.setup, cfg.interpolation, movers)
    vcycle.mesh, vcycle.plans, vcycle.groups = mesh, mesh.levels, groups
    return vcycle


def resolve_device(cfg: TrainConfig, comm) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is available")
    if comm.device.type == "cuda" or cfg.device == "cuda":
        return comm.device if comm.device.type == "cuda" else torch.device("cuda")
    return torch.device("cpu")
