"""The training loop: build the hierarchy on the communicator, run V-cycles, validate, stop.

The same function runs on one process or layer-parallel on many; only rank 0 writes and prints.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import torch

from .config import ConfigError, TrainConfig
from .data import Dataset, batches, load_dataset
from .hierarchy import level_specs
from .mgopt import Level, NonFiniteError, VCycle
from .model import build_model
from .parallel.executor import LayerParallel
from .parallel.agglomerate import Mover
from .parallel.layout import (LayoutError, Partition, check_microbatches, describe_plan, partition_blocks,
                              plan_levels)
from .checkpoint import CheckpointError, load_latest, restore_optimizer, save as save_checkpoint
from .report import RunWriter, plot_run


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss); the message says where."""


def make_optimizer_factory(name: str, lr: float):
    if name == "sgd":
        return lambda ps: torch.optim.SGD(ps, lr=lr)
    if name == "momentum":
        return lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.9)
    return lambda ps: torch.optim.Adam(ps, lr=lr)


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
                                 device=device, weight_grads=cfg.weight_grads)
        h = sp.T / sp.stages[0].blocks
        weight = h if cfg.metric == "l2" else float(factor)
        levels.append(Level(executor, cfg.beta, weight, cfg.metric, sp.total_blocks / spec.total_blocks,
                            make_optimizer_factory(cfg.optimizer, cfg.lr), group, number=i + 1))
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


@dataclass
class Phase:
    """Where a training loop stands; shared by the cascade stages and the final training."""
    cycle: int = 0
    epoch: int = 0
    batch: int = 0          # next mini-batch within the epoch
    reached: bool = False
    record: dict = field(default_factory=dict)


def run_cycles(vcycle: VCycle, data: Dataset, cfg: TrainConfig, out: RunWriter, clock: float, max_cycles: int,
               lr_at=None, phase: str = "train", work_offset: float = 0.0, stop_at_target: bool = True,
               start: Phase | None = None, after_cycle=None) -> Phase:
    """V-cycles (or GD steps) on mini-batches or the full batch until the target or the budget.

    `lr_at(i)` sets every level optimizer's learning rate before step i (cosine restarts);
    `start` resumes at a saved position; `after_cycle(state)` runs after each logged cycle
    (checkpoints). Ranks outside the finest level's group (cascade stages) return at once.
    """
    state = start or Phase()
    finest = vcycle.levels[-1]
    if finest is None:
        return state
    n = data.x_train.shape[0]
    while state.cycle < max_cycles and not state.reached and (cfg.max_epochs is None or state.epoch < cfg.max_epochs):
        for b, idx in enumerate(batches(n, cfg.batch_size, cfg.seed, state.epoch)):
            if b < state.batch:
                continue
            state.batch = b + 1
            full = cfg.batch_size is None or idx.numel() == n
            batch = (data.x_train, data.y_train) if full else (data.x_train[idx], data.y_train[idx])
            if lr_at is not None:
                lr = lr_at(state.cycle)
                for lev in vcycle.levels:
                    if lev is not None:
                        for group in lev.optimizer.param_groups:
                            group["lr"] = lr
            _fault_hook(state.cycle + 1, vcycle)
            try:
                result = vcycle(batch, batch_id=0 if full else (state.epoch, state.cycle))
            except NonFiniteError as e:
                raise TrainingError(f"{e} in cycle {state.cycle + 1} ({phase})") from None
            state.cycle += 1
            # `loss` is the finest objective at the start of the cycle, i.e. after `work_units_start`
            rec = {"phase": phase, "cycle": state.cycle, "epoch": state.epoch, "loss": result.loss,
                   "work_units_start": work_offset + vcycle.work_units - result.work_units,
                   "work_units": work_offset + vcycle.work_units, "seconds": time.perf_counter() - clock,
                   "level_seconds": result.level_seconds}
            if lr_at is not None:
                rec["lr"] = lr
            if state.cycle % cfg.eval_every == 0 or state.cycle >= max_cycles:
                rec["val_loss"], rec["val_acc"] = finest.executor.evaluate(data.x_val, data.y_val)
                state.reached = stop_at_target and cfg.target_accuracy is not None and \
                    rec["val_acc"] >= cfg.target_accuracy - 1e-12
            state.record = rec
            out.log(rec)
            if after_cycle is not None:
                after_cycle(state)
            if state.reached or state.cycle >= max_cycles:
                break
        else:
            state.epoch, state.batch = state.epoch + 1, 0
    return state


def _fault_hook(cycle: int, vcycle: VCycle) -> None:
    """Test hook: PARML_TEST_FAULT="kind:cycle:rank" (kind nan | raise | kill) breaks one rank on
    purpose, so the tests can check that a failing or dying rank ends the whole job cleanly."""
    spec = os.environ.get("PARML_TEST_FAULT")
    if not spec:
        return
    kind, at, rank = spec.split(":")
    finest = vcycle.levels[-1]
    if int(at) != cycle or finest.comm.rank != int(rank):
        return
    if kind == "nan":
        with torch.no_grad():
            finest.params[0].view(-1)[0] = float("nan")
    elif kind == "raise":
        raise RuntimeError(f"injected failure at cycle {cycle}")
    elif kind == "kill":
        os.kill(os.getpid(), 9)


def _prepare(cfg: TrainConfig, comm, data: Dataset | None) -> Dataset:
    cfg.validate()
    data = data if data is not None else load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed,
                                                      flatten=cfg.arch != "conv")
    data = data.to(dtype=getattr(torch, cfg.dtype))
    try:
        check_microbatches(min(cfg.batch_size or data.x_train.shape[0], data.x_train.shape[0]), cfg.microbatches)
    except LayoutError as e:
        raise ConfigError(str(e)) from None
    torch.manual_seed(cfg.seed)
    return data


def train(cfg: TrainConfig, comm, data: Dataset | None = None) -> dict:
    """Run `cfg` on `comm`; returns the summary (also written to the run folder on rank 0)."""
    data = _prepare(cfg, comm, data)
    device = resolve_device(cfg, comm)
    folder = os.path.join(cfg.out, cfg.name)
    clock = time.perf_counter()
    init_state, cascade_units, cascade_log, resumed = None, 0.0, [], None
    if cfg.resume:
        resumed = _load_checkpoint(cfg, read_rows=comm.rank == 0)
        init_state, cascade_units = resumed["state"], resumed["manifest"]["cascade_work_units"]
        clock -= resumed["manifest"]["seconds"]
    out = RunWriter(folder, active=comm.rank == 0, progress=cfg.progress,
                    total=cfg.max_cycles + cfg.cascade * cfg.cascade_cycles,
                    keep_rows=None if resumed is None else resumed["rows"])
    if cfg.cascade and resumed is None:
        from .cascade import run_cascade
        init_state, cascade_units, cascade_log = run_cascade(cfg, comm, data, device, out, clock)
    vcycle = build_vcycle(cfg, data, comm, device, init_state=init_state)
    levels, plans = vcycle.levels, vcycle.plans
    if resumed is not None:
        _restore_levels(levels, resumed, comm)
    out.write_json("config.json", {**cfg.to_dict(), "world_size": comm.size, "comm_backend": comm.backend,
                                   "dataset_name": data.name, "cycle_resolved": str(cfg.setup),
                                   "work_units_per_cycle_eq10": cfg.setup.cost(), "cascade_stages": cascade_log,
                                   "plan": [{"level": p.level, "blocks": p.blocks, "ranks": p.ranks,
                                             "bounds": list(p.partition.bounds)} for p in plans]})
    out.print(f"parml: {data.name}, K={cfg.blocks}, width {cfg.width}, L={cfg.levels} {cfg.setup} "
              f"(eq. 10: {cfg.setup.cost():.2f} U/cycle), {comm.size} rank(s) [{comm.backend}], -> {folder}")
    if comm.size > 1:
        out.print(describe_plan(plans))
    if resumed is not None:
        out.print(f"resumed from {resumed['manifest']['folder']} at cycle {resumed['manifest']['cycle']}")
    lr_at = cosine_schedule(cfg.lr, cfg.lr_min, cfg.max_cycles) if cfg.lr_schedule == "cosine" else None
    saved = []

    def checkpoint(state: Phase):
        if cfg.checkpoint_every and state.cycle % cfg.checkpoint_every == 0:
            manifest = {"epoch": state.epoch, "batch": state.batch, "record": state.record,
                        "seconds": time.perf_counter() - clock, "cascade_work_units": cascade_units,
                        "level_stats": [[lev.stats.gradients, lev.stats.work_units, lev.stats.seconds]
                                        if lev else None for lev in levels]}
            saved.append(save_checkpoint(folder, comm, state.cycle, levels[-1].model, levels, manifest))

    start = None
    if resumed is not None:
        m = resumed["manifest"]
        start = Phase(cycle=m["cycle"], epoch=m["epoch"], batch=m["batch"], record=m["record"])
    try:
        state = run_cycles(vcycle, data, cfg, out, clock, cfg.max_cycles, lr_at, work_offset=cascade_units,
                           start=start, after_cycle=checkpoint)
    except TrainingError as e:
        out.close()
        kept = saved[-1] if saved else (resumed["manifest"]["folder"] if resumed else None)
        raise TrainingError(f"{e}; last good checkpoint: {kept or 'none (use --checkpoint-every N)'}") from None
    record = state.record
    summary = {"cycles": state.cycle, "epochs": state.epoch, "work_units": cascade_units + vcycle.work_units,
               "cascade_work_units": cascade_units,
               "seconds": time.perf_counter() - clock, "reached_target": state.reached,
               "final_loss": record.get("loss"), "val_acc": record.get("val_acc"),
               "val_loss": record.get("val_loss"),
               "level_seconds": [lev.stats.seconds if lev else 0.0 for lev in levels],
               "level_gradients": [lev.stats.gradients if lev else 0 for lev in levels], "folder": folder}
    out.write_json("summary.json", summary)
    out.close()
    final = levels[-1].executor.gather_state()
    if comm.rank == 0:
        torch.save(final, os.path.join(folder, "final.pt"))
        plot_run(folder, f"{data.name}, K={cfg.blocks}, L={cfg.levels} {cfg.setup}")
    status = "reached" if state.reached else "did not reach"
    out.print(f"{status} val acc {cfg.target_accuracy} after {state.cycle} cycles, {summary['work_units']:.1f} "
              f"work units, {summary['seconds']:.1f} s (val acc {record.get('val_acc', float('nan')):.4f})")
    summary["levels"] = levels
    return summary


def _load_checkpoint(cfg: TrainConfig, read_rows: bool) -> dict:
    from .report import read_metrics
    try:
        manifest, state, optimizers = load_latest(cfg.resume)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    try:
        rows = read_metrics(cfg.resume) if read_rows else []      # rank 0 rewrites the file
    except OSError:
        rows = []
    rows = [r for r in rows if r.get("phase") != "train" or r["cycle"] <= manifest["cycle"]]
    return {"manifest": manifest, "state": state, "optimizers": optimizers, "rows": rows}


def _restore_levels(levels, resumed, comm) -> None:
    """Counters from the manifest; level-optimizer states re-cut for this rank layout."""
    for lev, st in zip(levels, resumed["manifest"]["level_stats"]):
        if lev is not None and st is not None:
            lev.stats.gradients, lev.stats.work_units, lev.stats.seconds = st
    for lev, pieces in zip(levels, resumed["optimizers"]):
        if lev is not None:
            restore_optimizer(lev, pieces)


def cosine_schedule(lr_max: float, lr_min: float, steps: int):
    """Cosine annealing from lr_max to lr_min over `steps` (Chang et al.; restarted per stage)."""
    return lambda i: lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * min(i, steps) / steps))


def run_from_cli(cfg: TrainConfig, fail) -> dict | None:
    """`parml train`: make the communicator, check the world size, train; user errors -> `fail`."""
    from .comm import CommError, launcher_world_size, make_communicator
    from .data import DataError
    from .parallel.layout import check_world_size

    try:
        check_world_size(launcher_world_size(), cfg.ranks)
        partition_blocks(cfg.blocks, launcher_world_size(), align=2 ** (cfg.levels - 1))
    except LayoutError as e:
        fail(str(e))
    try:
        comm = make_communicator(cfg.backend, timeout=cfg.comm_timeout, device=cfg.device)
    except (ValueError, CommError) as e:
        fail(str(e))
    try:
        return train(cfg, comm)
    except (ConfigError, DataError, LayoutError) as e:
        fail(str(e))
    except TrainingError as e:
        fail(str(e), code=1)
    except CommError as e:
        comm.abort(f"rank {comm.rank}: {e}")
        fail(f"rank {comm.rank}: {e}", code=1)
    except KeyboardInterrupt:
        comm.abort("interrupted")
        raise
    except Exception as e:
        comm.abort(f"rank {comm.rank} failed: {type(e).__name__}: {e}")
        raise
    finally:
        comm.close()
