"""``parml plan`` and ``parml train --layout auto``: a TrainConfig's workload ranked on a profile.

Options the user gave restrict the candidates (``-M 4`` plans only M = 4); the others are
searched. ``--layout auto`` applies the best candidate to the config: the data-parallel degree D
(P = world / D layer ranks), micro-batches, schedule, coarse layout and min-blocks-per-rank, the
options ``parallel.layout.plan_mesh`` turns into the mesh the executor runs (and the simulator
replays).
"""
from __future__ import annotations

import dataclasses
import os

from ..config import ConfigError, TrainConfig
from ..data import DataError, load_dataset
from ..parallel.layout import LayoutError
from .planner import DATASET_SHAPES, SCHEDULE_CHOICES, plan, workload_for
from .profile import Profile, ProfileError

# TrainConfig fields `parml plan` takes (the network, the batch, the cycle, the execution)
PLAN_FIELDS = ("dataset", "data_dir", "arch", "channels", "projection", "norm", "head", "blocks", "width", "T",
               "activation", "stepper", "levels", "cycle", "optimizer", "batch_size", "dtype", "backend", "device",
               "ranks", "schedule", "microbatches", "weight_grads", "min_blocks_per_rank", "profile",
               "data_parallel", "coarse_layout")
REFERENCE_PROFILE = os.path.join(os.path.dirname(__file__), "profiles", "reference_cpu.json")
FILE_DATASETS = ("mnist", "fashion-mnist", "cifar10")
LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE")


class PlanError(ValueError):
    """A plan that cannot be made; the message is one line."""


def plan_fields() -> tuple[str, ...]:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return tuple(n for n in PLAN_FIELDS if n in names)


def local_world_size(world: int) -> int:
    """Ranks on this node, as the launcher announced them (all of them without a launcher)."""
    for name in LOCAL_SIZE_VARS:
        try:
            n = int(os.environ[name])
        except (KeyError, ValueError):
            continue
        if n > 0:
            return min(n, world)
    return world


def n_train(cfg: TrainConfig) -> int | None:
    """Training samples when they decide the batch (full batch of a file dataset); else None."""
    if cfg.batch_size is not None or cfg.dataset not in FILE_DATASETS:
        return None
    try:
        return len(load_dataset(cfg.dataset, cfg.data_dir, cfg.seed).x_train)
    except DataError as e:
        raise PlanError(str(e)) from None


def load_profile(cfg: TrainConfig, device: str | None) -> Profile:
    """--profile, or without it the reference CPU profile shipped with parml (see profile_note)."""
    if not cfg.profile:
        return Profile.load(REFERENCE_PROFILE, device=device, option="the reference profile (no --profile)")
    return Profile.load(cfg.profile, device=device)


def profile_note(cfg: TrainConfig) -> str | None:
    """The line to print when predictions use the reference profile instead of this machine's."""
    if cfg.profile:
        return None
    return ("parml: no --profile: predictions use parml's reference CPU profile (another machine); for this "
            "machine's run: parml calibrate --out profile.json, then --profile profile.json")


def restrictions(cfg: TrainConfig, given) -> dict:
    """Candidate lists fixed by options the user gave."""
    out = {}
    if "microbatches" in given:
        out["microbatches"] = [cfg.microbatches]
    out["schedules"] = [cfg.schedule.lower()] if "schedule" in given else list(SCHEDULE_CHOICES)
    if "min_blocks_per_rank" in given:
        out["min_blocks"] = [cfg.min_blocks_per_rank]
    if "data_parallel" in given:
        out["data_parallel"] = [cfg.data_parallel]
    if "coarse_layout" in given:
        out["coarse_layouts"] = [cfg.coarse_layout]
    return out


def plan_config(cfg: TrainConfig, profile: Profile, ranks: int, given=(), ranks_per_node: int | None = None,
                background: float = 0.0, n: int | None = None) -> list[dict]:
    """Ranked records for `cfg` on `ranks` ranks (every D x P, M, schedule and coarse layout the
    options leave open)."""
    if cfg.dataset not in DATASET_SHAPES:
        raise PlanError(f"--dataset {cfg.dataset!r}: the planner knows {', '.join(DATASET_SHAPES)}")
    work = workload_for(cfg, n)
    opts = restrictions(cfg, given)
    backend = _backend(cfg, profile)
    return plan(work, ranks, profile, backend, ranks_per_node=ranks_per_node, background=background,
                weight_grads=cfg.weight_grads, **opts)


def _backend(cfg: TrainConfig, profile: Profile) -> str:
    name = {"torch": "gloo", "auto": None}.get(cfg.backend, cfg.backend)
    if name is None or name == "self":
        return next(iter(profile.comm), "gloo")
    return name


def apply(cfg: TrainConfig, record: dict) -> TrainConfig:
    """The config with the record's layout."""
    cfg.microbatches, cfg.schedule = record["microbatches"], record["schedule"]
    if record.get("min_blocks_per_rank") is not None:
        cfg.min_blocks_per_rank = record["min_blocks_per_rank"]
    cfg.data_parallel = record["data_parallel"]
    if record.get("coarse_layout") is not None:
        cfg.coarse_layout = record["coarse_layout"]
    return cfg


def describe(record: dict, levels: int) -> str:
    what = (f"D x P = {record['data_parallel']} x {record['layer_ranks']}, M = {record['microbatches']}, "
            f"{record['schedule']}")
    if levels > 1:
        what += f", {record['coarse_layout']} coarse levels, min-blocks-per-rank {record['min_blocks_per_rank']}"
    t = record["predicted_cycle_seconds"] if levels > 1 else record["predicted_step_seconds"]
    return (f"{what}: predicted {t:.4g} s per {'V-cycle' if levels > 1 else 'GD step'}, efficiency "
            f"{record['efficiency']:.2f}")


def auto_layout(cfg: TrainConfig, world: int, device: str, given=()) -> tuple[TrainConfig, dict]:
    """``--layout auto``: the best candidate on `world` ranks, applied to cfg (and checked again)."""
    prof = load_profile(cfg, device)
    try:
        recs = plan_config(cfg, prof, world, given, ranks_per_node=local_world_size(world), n=n_train(cfg))
    except (LayoutError, ProfileError) as e:
        raise PlanError(str(e)) from None
    return apply(cfg, recs[0]).validate(), recs[0]


def config_for_plan(values: dict) -> TrainConfig:
    """A validated TrainConfig from `parml plan`'s option values (no run folder is touched)."""
    cfg = TrainConfig.from_options(values)
    try:
        return cfg.validate()
    except ConfigError as e:
        if str(e).startswith("--out"):
            return cfg
        raise
