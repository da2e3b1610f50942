"""Multilevel initialization (cascadic / nested iteration): train shallow, prolongate, go deeper.

Stage i trains the network with K / 2^(c-i) blocks (plain GD/SGD, a cosine-annealed learning rate
restarted each stage as in Chang et al.), on as many ranks as it has `min_blocks_per_rank` chunks
for. Its parameters are then prolongated to twice the depth — each block copied and h halved
(Chang et al.), or linearly interpolated in time (Haber et al.) — and redistributed onto the
next stage's (larger) rank group. The last prolongation gives the initial parameters of the full
network, which ``train`` then trains with GD or MG/OPT.
"""
from __future__ import annotations

import dataclasses

import torch

from .hierarchy import prolongate_model
from .model import build_model


def cascade_depths(blocks: int, doublings: int) -> list[int]:
    """Depths of the cascade stages before the full network: K/2^c, ..., K/2."""
    return [blocks >> (doublings - i) for i in range(doublings)]


def theoretical_saving(doublings: int) -> float:
    """Chang et al.: time saved by k interpolations with an equal budget per stage,
    1 - (2^(k+1) - 1) / (2^k (k+1)), relative to training the full depth throughout."""
    k = doublings
    return 1 - (2 ** (k + 1) - 1) / (2 ** k * (k + 1))


def run_cascade(cfg, comm, data, device, out, clock):
    """Train the cascade stages; returns (full-depth initial state on every rank, work units
    in units of one full-depth gradient, per-stage log)."""
    from .train import build_vcycle, cosine_schedule, run_cycles

    dtype = getattr(torch, cfg.dtype)
    spec = cfg.spec_for(data)
    state, units, log = None, 0.0, []
    for depth in cascade_depths(cfg.blocks, cfg.cascade):
        ranks = max(1, min(comm.size, depth // cfg.min_blocks_per_rank))
        group = comm if ranks == comm.size else comm.split(list(range(ranks)))
        stage_cfg = dataclasses.replace(cfg, blocks=depth, levels=1, cycle=None, cascade=0)
        stage_state = None
        if group is not None:
            if state is not None:
                stage_state = _prolongated(spec, depth, state, cfg, dtype)
            vcycle = build_vcycle(stage_cfg, data, group, device, init_state=stage_state)
            vcycle.levels[0].cost = depth / cfg.blocks
            lr_at = cosine_schedule(cfg.lr, cfg.lr_min, cfg.cascade_cycles)
            phase = run_cycles(vcycle, data, stage_cfg, out, clock, cfg.cascade_cycles, lr_at,
                               phase=f"cascade K={depth}", work_offset=units, stop_at_target=False)
            gathered = vcycle.levels[0].executor.gather_state()
            stage_units = vcycle.work_units
            log.append({"blocks": depth, "ranks": ranks, "cycles": phase.cycle,
                        "val_acc": phase.record.get("val_acc"), "work_units": stage_units})
        else:
            gathered, stage_units = None, 0.0
        state = comm.broadcast_object(gathered, 0)
        units += comm.broadcast_object(stage_units, 0)
        out.print(f"cascade: {depth} blocks on {ranks} rank(s), {cfg.cascade_cycles} steps, "
                  f"val acc {log[-1]['val_acc'] if log else float('nan'):.4f}")
    return _prolongated(spec, cfg.blocks, state, cfg, dtype), units, comm.broadcast_object(log, 0)


def _prolongated(spec, depth, coarse_state, cfg, dtype):
    """The full state dict of the depth-`depth` network prolongated from the half-depth one
    (`depth` and ``cfg.blocks`` count blocks per stage: a conv network has several stages)."""
    coarse = build_model(spec.coarsened(cfg.blocks // (depth // 2)), seed=cfg.seed, dtype=dtype)
    coarse.load_state_dict(coarse_state)
    fine = build_model(spec.coarsened(cfg.blocks // depth), seed=cfg.seed, dtype=dtype)
    prolongate_model(coarse, fine, cfg.cascade_interpolation)
    return fine.state_dict()
