"""``train``: one run from a TrainConfig on a communicator — data, cascade, levels, the loop,
checkpoints and the run folder; ``run_from_cli`` adds the communicator and the one-line errors.

The same function runs on one process or layer-parallel on many; only rank 0 writes and prints.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import time

import torch

from ..comm import CommError, CommTimeout, launcher_world_size, make_communicator
from ..config import ConfigError, TrainConfig
from ..data import DataError, Dataset, load_dataset
from ..kernels import FUSED_CPU, cpu
from ..multilevel.cascade import LR_SCHEDULES
from ..parallel.layout import LayoutError, check_world_size, describe_mesh
from .build import build_vcycle, plan_run, resolve_device, smallest_batch
from .cascade import run_cascade
from .checkpoint import CheckpointError, complete_checkpoints, last_complete, load_latest, restore_optimizer, \
    save as save_checkpoint
from .files import WriteError, agree, atomic_write, attempt, holds_files, torch_bytes
from .loop import Phase, TrainingError, run_cycles
from .report import RunWriter, plot_run, read_metrics


def _prepare(cfg: TrainConfig, world: int, data: Dataset | None) -> Dataset:
    """The dataset in the run's dtype, and every check of the mesh on `world` ranks (ConfigError)."""
    data = data if data is not None else load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed,
                                                      flatten=cfg.arch != "conv")
    data = data.to(dtype=getattr(torch, cfg.dtype))
    plan_run(cfg, world, data)
    torch.manual_seed(cfg.seed)
    return data


def resolve_options(config_file: str | None, given: dict) -> TrainConfig:
    """The run's options: a TOML file's (``--config``), then `given` (the command line) over them;
    ``--resume DIR`` takes the saved run's options and allows only run-time ones to change."""
    values = TrainConfig.load_toml(config_file) if config_file else {}
    values.update(given)
    if values.get("resume") not in (None, "auto", "none"):
        rest = {k: v for k, v in values.items() if k != "resume"}
        return TrainConfig.resume_run(values["resume"], rest).validate()
    return resolve_resume(TrainConfig.from_options(values).validate(), values)


def resolve_resume(cfg: TrainConfig, given: dict | None = None) -> TrainConfig:
    """``--resume auto``: continue this run's folder from its latest complete checkpoint if it has
    one, else start — so a job that a launcher restarts (torchrun --max-restarts) continues.
    A folder of the same run that died before its first checkpoint is started again."""
    if cfg.resume != "auto":
        return cfg
    given = {k: v for k, v in (given or {}).items() if k != "resume"}
    if complete_checkpoints(cfg.folder):
        return TrainConfig.resume_run(cfg.folder, given).validate()
    cfg.resume = None
    if holds_files(cfg.folder):
        try:
            TrainConfig.resume_run(cfg.folder, {k: getattr(cfg, k) for k in cfg.to_dict()})
            cfg.overwrite = True            # the same options: nothing of another run is lost
        except ConfigError:
            pass                            # another run's folder: claim_folder refuses it
    return cfg


def claim_folder(cfg: TrainConfig, comm) -> None:
    """No run's data is ever overwritten: a new run refuses an existing, non-empty run folder unless
    ``--overwrite`` (which deletes it first). Rank 0 decides for every rank."""
    problem = None
    if comm.rank == 0 and not cfg.resume and holds_files(cfg.folder):
        if cfg.overwrite:
            try:
                shutil.rmtree(cfg.folder)
            except OSError as e:
                problem = f"--overwrite: cannot delete {e.filename or cfg.folder}: {e.strerror or e}"
        else:
            problem = (f"run folder {cfg.folder} exists: continue it with --resume {cfg.folder}, start another "
                       f"with --run-name NAME, or delete it with --overwrite")
    problem = comm.broadcast_object(problem, 0)
    if problem:
        raise ConfigError(problem)


def train(cfg: TrainConfig, comm, data: Dataset | None = None, around_cycle=None) -> dict:
    """Run `cfg` on `comm`; returns the summary (also written to the run folder on rank 0).
    `around_cycle(vcycle)`: a context manager entered around every V-cycle / GD-step call,
    cascade stages included (``run_cycles``).
    A failed write raises WriteError naming the file, the OS error and the last complete checkpoint."""
    cfg = resolve_resume(cfg.validate())
    data = _prepare(cfg, comm.size, data)
    claim_folder(cfg, comm)
    try:
        return _train(cfg, comm, data, around_cycle)
    except WriteError as e:
        raise WriteError(f"{e}; last complete checkpoint: {last_complete(cfg.folder)}", e.collective) from None


def _train(cfg: TrainConfig, comm, data: Dataset, around_cycle=None) -> dict:
    run = _start(cfg, comm, data, around_cycle)
    vcycle, out, resumed = run["vcycle"], run["out"], run["resumed"]
    levels = vcycle.levels
    schedule = LR_SCHEDULES[cfg.lr_schedule]
    lr_at = schedule(cfg.lr, cfg.lr_min, cfg.max_cycles) if schedule is not None else None
    saved = []
    verified = set() if resumed is None else \
        {os.path.join(cfg.folder, "checkpoints", os.path.basename(resumed["manifest"]["folder"]))}

    def checkpoint(state: Phase):
        if cfg.checkpoint_every and state.cycle % cfg.checkpoint_every == 0:
            manifest = {"epoch": state.epoch, "batch": state.batch, "record": state.record,
                        "seconds": time.perf_counter() - run["clock"], "cascade_work_units": run["cascade_units"],
                        "level_stats": [[lev.stats.gradients, lev.stats.work_units, lev.stats.seconds]
                                        if lev else None for lev in levels]}
            saved.append(save_checkpoint(cfg.folder, comm, state.cycle, levels[-1].model, levels, manifest,
                                         keep=cfg.keep_checkpoints, verified=verified))

    start = None
    if resumed is not None:
        m = resumed["manifest"]
        start = Phase(cycle=m["cycle"], epoch=m["epoch"], batch=m["batch"], record=m["record"])
    try:
        state = run_cycles(vcycle, data, cfg, out, run["clock"], cfg.max_cycles, lr_at,
                           work_offset=run["cascade_units"], start=start, after_cycle=checkpoint,
                           around_cycle=around_cycle)
    except TrainingError as e:
        _close(out)
        kept = saved[-1] if saved else (resumed["manifest"]["folder"] if resumed else None)
        raise TrainingError(f"{e}; last good checkpoint: {kept or 'none (use --checkpoint-every N)'}") from None
    except WriteError:
        _close(out)
        raise
    return _finish(cfg, comm, data, run, state)


def _close(out: RunWriter) -> None:
    with contextlib.suppress(OSError, WriteError):
        out.close()


def _open_writer(cfg: TrainConfig, comm, resumed: dict | None) -> RunWriter:
    """Rank 0 opens the run folder and writes config.toml at once (``--resume auto`` recognises the
    run however early it is killed); a failed write ends every rank with the same line."""
    opened = []

    def open_files():
        total = cfg.max_cycles + cfg.cascade * cfg.cascade_cycles
        opened.append(RunWriter(cfg.folder, progress=cfg.progress, total=total, tensorboard=cfg.tensorboard,
                                keep_rows=None if resumed is None else resumed["rows"]))
        opened[0].write_text("config.toml", cfg.to_toml())

    agree(comm, attempt(open_files) if comm.rank == 0 else None)
    return opened[0] if opened else RunWriter(cfg.folder, active=False)


def _start(cfg: TrainConfig, comm, data: Dataset, around_cycle=None) -> dict:
    """The run folder's writer, the cascade (or the checkpoint to resume), the V-cycle on the ranks,
    config.toml / config.json, and the opening lines."""
    device = resolve_device(cfg, comm)
    clock = time.perf_counter()
    init_state, cascade_units, cascade_log, resumed = None, 0.0, [], None
    if cfg.resume:
        resumed = _load_checkpoint(cfg, read_rows=comm.rank == 0)
        init_state, cascade_units = resumed["state"], resumed["manifest"]["cascade_work_units"]
        clock -= resumed["manifest"]["seconds"]
    out = _open_writer(cfg, comm, resumed)
    if cfg.cascade and resumed is None:
        init_state, cascade_units, cascade_log = run_cascade(cfg, comm, data, device, out, clock, around_cycle)
    vcycle = build_vcycle(cfg, data, comm, device, init_state=init_state)
    if resumed is not None:
        _restore_levels(vcycle.levels, resumed, comm)
    plans = vcycle.plans
    info = {**cfg.to_dict(), "world_size": comm.size, "comm_backend": comm.backend, "dataset_name": data.name,
            "cycle_resolved": str(cfg.setup), "work_units_per_cycle_eq10": cfg.setup.cost(),
            "cascade_stages": cascade_log, "plan": [{"level": p.level, "blocks": p.blocks, "ranks": p.ranks,
                                                     "replicas": p.replicas, "stride": p.stride,
                                                     "redundant": p.redundant,
                                                     "bounds": list(p.partition.bounds)} for p in plans]}
    agree(comm, attempt(lambda: out.write_json("config.json", info)))
    out.print(f"parml: {data.name}, K={cfg.blocks}, width {cfg.width}, L={cfg.levels} {cfg.setup} "
              f"(eq. 10: {cfg.setup.cost():.2f} U/cycle), {comm.size} rank(s) [{comm.backend}], -> {cfg.folder}")
    if comm.size > 1:
        out.print(describe_mesh(vcycle.mesh, smallest_batch(data.x_train.shape[0], cfg.batch_size),
                                cfg.microbatches))
    if _compiles_fused_kernels(vcycle):
        out.print("parml: compiling the fused CPU kernels for this machine (the first run only, 10-40 s; "
                  "numba caches them)")
    if resumed is not None:
        out.print(f"resumed from {resumed['manifest']['folder']} at cycle {resumed['manifest']['cycle']}")
    return {"vcycle": vcycle, "out": out, "resumed": resumed, "clock": clock, "cascade_units": cascade_units}


def _compiles_fused_kernels(vcycle) -> bool:
    """Whether the first cycle will stop to compile the fused CPU kernels (said before it starts)."""
    kernels = [k for lev in vcycle.levels if lev is not None for k in lev.executor.kernels]
    return any(k.impl is FUSED_CPU for k in kernels) and cpu.needs_compile()


def _finish(cfg: TrainConfig, comm, data: Dataset, run: dict, state: Phase) -> dict:
    """summary.json, final.pt (the full model on rank 0), plot.png and the closing line."""
    vcycle, out, record = run["vcycle"], run["out"], state.record
    levels = vcycle.levels
    summary = {"cycles": state.cycle, "epochs": state.epoch,
               "work_units": run["cascade_units"] + vcycle.work_units, "cascade_work_units": run["cascade_units"],
               "seconds": time.perf_counter() - run["clock"], "reached_target": state.reached,
               "final_loss": record.get("loss"), "val_acc": record.get("val_acc"),
               "val_loss": record.get("val_loss"),
               "level_seconds": [lev.stats.seconds if lev else 0.0 for lev in levels],
               "level_gradients": [lev.stats.gradients if lev else 0 for lev in levels], "folder": cfg.folder}
    final = levels[-1].executor.gather_state()

    def write_results():
        out.write_json("summary.json", summary)
        out.close()
        atomic_write(os.path.join(cfg.folder, "final.pt"), torch_bytes(final))
        plot_run(cfg.folder, f"{data.name}, K={cfg.blocks}, L={cfg.levels} {cfg.setup}")

    agree(comm, attempt(write_results) if comm.rank == 0 else None)
    out.close()
    status = "stopped" if cfg.target_accuracy is None else \
        f"{'reached' if state.reached else 'did not reach'} val acc {cfg.target_accuracy}"
    out.print(f"{status} after {state.cycle} cycles, {summary['work_units']:.1f} "
              f"work units, {summary['seconds']:.1f} s (val acc {record.get('val_acc', float('nan')):.4f})")
    summary["levels"] = levels
    return summary


def _load_checkpoint(cfg: TrainConfig, read_rows: bool) -> dict:
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


def run_from_cli(cfg: TrainConfig, fail) -> dict | None:
    """`parml train`: check the world size and the mesh (before any process group), make the
    communicator, train; user errors -> `fail`."""
    data = None
    try:
        check_world_size(launcher_world_size(), cfg.ranks)
        data = _prepare(cfg, launcher_world_size(), None)
    except (LayoutError, ConfigError, DataError) as e:
        fail(str(e))
    try:
        comm = make_communicator(cfg.backend, timeout=cfg.comm_timeout, device=cfg.device)
    except (ValueError, CommError) as e:
        fail(str(e))
    try:
        return train(cfg, comm, data)
    except (ConfigError, DataError, LayoutError) as e:
        fail(str(e))
    except TrainingError as e:
        fail(str(e), code=1)
    except WriteError as e:
        # an error the ranks agreed on ends each of them; one only rank 0 saw must end the others
        message = str(e)
        fail(message, code=1, then=None if e.collective else lambda: comm.abort(message, quiet=True))
    except CommError as e:
        # rank 0 reports; another rank only a timeout (a peer that neither answered nor left): a
        # closed connection means a peer left, and that peer, rank 0 or the launcher says why
        message, loud = f"rank {comm.rank}: {e}", comm.rank != 0 and isinstance(e, CommTimeout)
        fail(message, code=1, then=lambda: comm.abort(message, quiet=not loud))
    except KeyboardInterrupt:
        comm.abort("interrupted")
        raise
    except Exception as e:
        comm.abort(f"rank {comm.rank} failed: {type(e).__name__}: {e}")
        raise
    finally:
        comm.close()
