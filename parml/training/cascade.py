"""Running multilevel initialization (``multilevel.cascade``): each stage on as many layer ranks as
it has ``min_blocks_per_rank`` chunks for, laid out on the mesh like a coarse level
(``--coarse-layout``), prolongated onto the next stage's larger layout."""
from __future__ import annotations

import dataclasses

import torch

from ..multilevel.cascade import cascade_depths, cosine_schedule, prolongated_state
from .build import build_vcycle, plan_run
from .loop import run_cycles


def run_cascade(cfg, comm, data, device, out, clock, around_cycle=None):
    """Train the cascade stages; returns (full-depth initial state on every rank, work units
    in units of one full-depth gradient, per-stage log). `around_cycle`: see ``run_cycles``."""
    dtype = getattr(torch, cfg.dtype)
    spec = cfg.spec_for(data)
    state, units, log = None, 0.0, []
    P = comm.size // cfg.data_parallel
    for depth in cascade_depths(cfg.blocks, cfg.cascade):
        stage_cfg = dataclasses.replace(cfg, blocks=depth, levels=1, cycle=None, cascade=0)
        mesh = plan_run(stage_cfg, comm.size, data,
                        finest_ranks=max(1, min(P, depth // cfg.min_blocks_per_rank)))
        layout = mesh.levels[0]
        stage_state = None
        if state is not None and layout.position(comm.rank) is not None:
            stage_state = prolongated_state(spec, cfg.blocks, depth, state, cfg.cascade_interpolation, cfg.seed, dtype)
        vcycle = build_vcycle(stage_cfg, data, comm, device, init_state=stage_state, mesh=mesh)
        gathered, stage_units = None, 0.0
        if vcycle.levels[0] is not None:
            vcycle.levels[0].cost = depth / cfg.blocks
            lr_at = cosine_schedule(cfg.lr, cfg.lr_min, cfg.cascade_cycles)
            phase = run_cycles(vcycle, data, stage_cfg, out, clock, cfg.cascade_cycles, lr_at,
                               phase=f"cascade K={depth}", work_offset=units, stop_at_target=False,
                               around_cycle=around_cycle)
            gathered = vcycle.levels[0].executor.gather_state()
            stage_units = vcycle.work_units
            log.append({"blocks": depth, "ranks": layout.ranks, "replicas": layout.replicas, "cycles": phase.cycle,
                        "val_acc": phase.record.get("val_acc"), "work_units": stage_units})
        state = comm.broadcast_object(gathered, 0)
        units += comm.broadcast_object(stage_units, 0)
        out.print(f"cascade: {depth} blocks on {layout.ranks} layer rank(s) x {layout.replicas} replica(s), "
                  f"{cfg.cascade_cycles} steps, val acc {log[-1]['val_acc'] if log else float('nan'):.4f}")
    final = prolongated_state(spec, cfg.blocks, cfg.blocks, state, cfg.cascade_interpolation, cfg.seed, dtype)
    return final, units, comm.broadcast_object(log, 0)
