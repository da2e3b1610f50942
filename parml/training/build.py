"""Building a run: the levels of the hierarchy on their rank groups, the movers between them,
the V-cycle and the level optimizers."""
from __future__ import annotations

import torch

from ..config import ConfigError, TrainConfig
from ..data import Dataset
from ..model import build_model
from ..multilevel.hierarchy import level_specs
from ..multilevel.mgopt import Level, VCycle, level_optimizer
from ..parallel.executor import LayerParallel
from ..parallel.layout import LayoutError, Partition, plan_levels
from ..parallel.transfer import Mover


def build_levels(cfg: TrainConfig, data: Dataset, comm, device=None, init_state: dict | None = None):
    """Levels 1..L (coarsest first) and the movers between them.

    Level l is a layer-parallel model on ranks 0..P_l-1 (``layout.plan_levels``); on ranks
    outside that group its entry is None. Returns (levels, movers, plans).
    """
    dtype = getattr(torch, cfg.dtype)
    spec = cfg.spec_for(data)
    specs = level_specs(spec, cfg.levels)
    try:
        plans = plan_levels([s.total_blocks for s in specs], comm.size, cfg.min_blocks_per_rank)
    except LayoutError as e:
        raise ConfigError(str(e)) from None
    groups = {comm.size: comm}
    for plan in plans:                      # collective on every rank, in the same order
        if plan.ranks not in groups:
            groups[plan.ranks] = comm.split(list(range(plan.ranks)))
    levels = []
    for i, (sp, plan) in enumerate(zip(specs, plans)):
        group = groups[plan.ranks]
        if group is None:
            levels.append(None)
            continue
        factor = 2 ** (cfg.levels - 1 - i)
        # every level is drawn from the same seed; coarse ones are overwritten by restriction
        model = build_model(sp, seed=cfg.seed, dtype=dtype)
        if init_state is not None and i == cfg.levels - 1:
            model.load_state_dict(init_state)
        executor = LayerParallel(model, group, cfg.schedule.lower(), cfg.microbatches, plan.partition,
                                 device=device, weight_grads=cfg.weight_grads, kernel=cfg.kernel)
        h = sp.T / sp.stages[0].blocks
        weight = h if cfg.metric == "l2" else float(factor)
        levels.append(Level(executor, cfg.beta, weight, cfg.metric, sp.total_blocks / spec.total_blocks,
                            level_optimizer(cfg.optimizer, cfg.lr), number=i + 1))
    movers = []
    for i in range(cfg.levels - 1):
        fine = Partition(tuple(b // 2 for b in plans[i + 1].partition.bounds))
        movers.append((Mover(comm, specs[i], fine, plans[i].partition),
                       Mover(comm, specs[i], plans[i].partition, fine)))
    return levels, movers, plans


def build_vcycle(cfg: TrainConfig, data: Dataset, comm, device=None, init_state: dict | None = None) -> VCycle:
    """The V-cycle of `cfg` over `comm`; ``vcycle.plans`` records where each level lives.
    `init_state`: the finest model's full state dict to start from (e.g. a cascade's result)."""
    levels, movers, plans = build_levels(cfg, data, comm, device, init_state)
    vcycle = VCycle(levels, cfg.setup, cfg.interpolation, movers)
    vcycle.plans = plans
    return vcycle


def resolve_device(cfg: TrainConfig, comm) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is available")
    if comm.device.type == "cuda" or cfg.device == "cuda":
        return comm.device if comm.device.type == "cuda" else torch.device("cuda")
    return torch.device("cpu")
