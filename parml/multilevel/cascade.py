"""Multilevel initialization (cascadic / nested iteration): the math of train shallow, prolongate,
go deeper. ``training.cascade`` runs the stages.

Stage i trains the network with K / 2^(c-i) blocks (plain GD/SGD, a cosine-annealed learning rate
restarted each stage as in Chang et al.), on as many ranks as it has `min_blocks_per_rank` chunks
for. Its parameters are then prolongated to twice the depth — each block copied and h halved
(Chang et al.), or linearly interpolated in time (Haber et al.) — and redistributed onto the
next stage's (larger) rank group. The last prolongation gives the initial parameters of the full
network, which ``train`` then trains with GD or MG/OPT.
"""
from __future__ import annotations

import math


from ..model import build_model
from .hierarchy import prolongate_model


def cascade_depths(blocks: int, doublings: int) -> list[int]:
    """Depths of the cascade stages before the full network: K/2^c, ..., K/2."""
    return [blocks >> (doublings - i) for i in range(doublings)]


def theoretical_saving(doublings: int) -> float:
    """Chang et al.: time saved by k interpolations with an equal budget per stage,
    1 - (2^(k+1) - 1) / (2^k (k+1)), relative to training the full depth throughout."""
    k = doublings
    return 1 - (2 ** (k + 1) - 1) / (2 ** k * (k + 1))


def prolongated_state(spec, blocks, depth, coarse_state, interpolation, seed, dtype):
    """The full state dict of the depth-`depth` network prolongated from the half-depth one
    (`depth` and `blocks`, the full depth, count blocks per stage: a conv network has several)."""
    coarse = build_model(spec.coarsened(blocks // (depth // 2)), seed=seed, dtype=dtype)
    coarse.load_state_dict(coarse_state)
    fine = build_model(spec.coarsened(blocks // depth), seed=seed, dtype=dtype)
    prolongate_model(coarse, fine, interpolation)
    return fine.state_dict()


def cosine_schedule(lr_max: float, lr_min: float, steps: int):
    """Cosine annealing from lr_max to lr_min over `steps` (Chang et al.; restarted per stage)."""
    return lambda i: lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * min(i, steps) / steps))


#: learning-rate schedules of a training run: name -> (lr_max, lr_min, steps) -> step -> lr, or None (constant)
LR_SCHEDULES = {"constant": None, "cosine": cosine_schedule}
