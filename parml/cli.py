"""Command line: ``parml train``, ``parml plan``, ``parml calibrate``, ``parml reproduce``, ``parml info``
(also ``python -m parml``).

The same command runs alone, under ``torchrun --nproc_per_node N`` or under ``mpirun -n N``: the
backend is read from the launcher's environment. ``train``'s options are made from the fields of
``TrainConfig`` (help, defaults and valid values declared once, there). Every user mistake —
a bad value, an unknown option, a value click cannot parse — ends with one line on stderr,
printed by rank 0 only, and exit code 2, before any process group exists where possible.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import sys
import time

import click
import torch

from . import __version__
from .comm import CommError, describe_environment, exit_process, launcher_rank, launcher_world_size
from .comm.environment import resolve_device
from .config import ConfigError, TrainConfig, field_type, flag
from .data import DataError, load_dataset
from .parallel.layout import LayoutError, describe_mesh
from .parallel.schedule import ScheduleError, dry_run, format_schedule, get_schedule
from .plan.auto import (PlanError, auto_layout, config_for_plan, describe, load_profile, n_train, plan_config,
                        plan_fields, profile_note)
from .plan.calibrate import calibrate as run_calibration
from .plan.planner import format_table, to_json
from .plan.profile import ProfileError
from .reproduce import ReproduceError, build_plan, reproduce as run_reproduction
from .training.build import plan_run, smallest_batch
from .training.trainer import resolve_options, run_from_cli


_SAID: list[str] = []     # rank 0's one error line, once it is out


def fail(message: str, code: int = 2, then=None):
    """One line on stderr (rank 0 only) and exit: no traceback for user mistakes. `then()` runs
    after the line is out and before the exit (ending the other ranks: an MPI abort ends this one)."""
    if launcher_rank() == 0:
        click.echo(f"parml: error: {message}", err=True)
        _SAID.append(message)
    if launcher_world_size() > 1:
        if launcher_rank() != 0:
            time.sleep(1.0)     # mpirun kills the job at the first non-zero exit: let rank 0 say why
        if then is not None:
            then()
        exit_process(code)      # skip gloo's teardown, which can turn exit code 2 into a crash
    if then is not None:
        then()
    sys.exit(code)


def stop_on_sigterm() -> None:
    """Under a launcher a SIGTERM is the launcher ending the job: torchrun sends it to the other
    ranks as soon as one fails (often before they notice the lost peer themselves), mpirun and Slurm
    on a failure or a cancel. Python's default would end the rank without a word. Rank 0 says so in
    one line, unless it has already said why, and every rank leaves at once: no MPI finalize and no
    gloo teardown, whose peers may be gone. The launcher's own report names the rank that failed."""
    def stop(signum, frame):
        if launcher_rank() == 0 and not _SAID:
            click.echo("parml: error: rank 0: stopped by the launcher (SIGTERM): it ends the job when a rank "
                       "fails or the job is cancelled, and its report names the rank", err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + signum)
    signal.signal(signal.SIGTERM, stop)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="parml")
def cli():
    """Layer-parallel, multilevel (MG/OPT) training of deep residual networks.

    A ResNet with K blocks is forward Euler on [0, T]: parml splits the blocks across ranks
    (torchrun or mpirun) and trains with MG/OPT V-cycles on networks coarsened in time.
    """


def _train_options(command, only=None):
    """One click option per TrainConfig field (or the fields named in `only`); default None = not
    given (TOML and defaults fill in)."""
    for f in reversed(dataclasses.fields(TrainConfig)):
        if only is not None and f.name not in only:
            continue
        base, _ = field_type(f)
        meta = f.metadata
        valid = f" [{' | '.join(meta['choices'])}]" if meta["choices"] else ""
        default = "" if f.default is None else f" [default: {str(f.default).lower() if base is bool else f.default}]"
        help_text = f"{meta['help']}{valid}{default}"
        names = [flag(f.name)] + ([meta["short"]] if meta["short"] else [])
        if base is bool:
            names = [f"{flag(f.name)}/--no-{f.name.replace('_', '-')}"]
            command = click.option(*names, f.name, default=None, help=help_text)(command)
        else:
            # values are parsed by TrainConfig, so every bad value gets the same one-line error
            metavar = {int: "INT", float: "FLOAT"}.get(base, "TEXT")
            command = click.option(*names, f.name, type=str, default=None, metavar=metavar, help=help_text)(command)
    return command


@cli.command(context_settings={"max_content_width": 110})
@click.option("--config", "config_file", default=None, metavar="TOML",
              help="Options from a TOML file (e.g. a run folder's config.toml); flags given here override it.")
@_train_options
def train(config_file, **options):
    """Train an ODE ResNet (default: the paper's circles setup, K=2048, 8 levels)."""
    given = {k: v for k, v in options.items() if v is not None}
    try:
        cfg = resolve_options(config_file, given)
    except ConfigError as e:
        fail(str(e))
    if cfg.layout == "auto" and not cfg.resume:
        try:
            cfg, best = auto_layout(cfg, launcher_world_size(), str(resolve_device(cfg.device)), given)
        except (PlanError, ProfileError, ConfigError) as e:
            fail(str(e))
        if launcher_rank() == 0:
            if profile_note(cfg):
                click.echo(profile_note(cfg), err=True)
            click.echo(f"parml: --layout auto ({cfg.profile or 'reference profile'}): {describe(best, cfg.levels)}")
    torch.set_num_threads(cfg.threads)
    if launcher_world_size() > 1:
        stop_on_sigterm()
    run_from_cli(cfg, fail)
    if launcher_world_size() > 1:
        exit_process(0)


@cli.command("plan", context_settings={"max_content_width": 110})
@click.option("--config", "config_file", default=None, metavar="TOML",
              help="Options from a TOML file; flags override it.")
@click.option("--ranks-per-node", type=int, default=None,
              help="Ranks per node [default: the profile's cores or GPUs per node]; more than that share them.")
@click.option("--background", type=float, default=0.0, show_default=True,
              help="Other busy processes per node (a shared machine), competing for its cores.")
@click.option("--json", "as_json", is_flag=True, help="Print the ranked candidates as a JSON list of objects.")
@click.option("--limit", type=int, default=20, show_default=True, help="Rows of the table (0: all).")
@functools.partial(_train_options, only=plan_fields())
def plan_command(config_file, ranks_per_node, background, as_json, limit, **options):
    """Rank the layouts of a training run by their predicted time on --ranks ranks.

    Candidates: every D x P = --ranks, micro-batches M, schedule, coarse layout and
    min-blocks-per-rank (options given here fix theirs). Predictions replay parml's own
    schedules and V-cycle on the profile's measured costs (see parml calibrate).
    """
    given = {k: v for k, v in options.items() if v is not None}
    try:
        values = TrainConfig.load_toml(config_file) if config_file else {}
        values.update(given)
        cfg = config_for_plan(values)
        if cfg.ranks is None:
            fail("--ranks is required: the number of ranks to plan for")
        if ranks_per_node is not None and ranks_per_node < 1:
            fail(f"--ranks-per-node {ranks_per_node} must be at least 1")
        if background < 0:
            fail(f"--background {background} must be >= 0")
        prof = load_profile(cfg, None if cfg.device == "auto" else str(cfg.device))
        recs = plan_config(cfg, prof, cfg.ranks, set(given), ranks_per_node, background, n=n_train(cfg))
    except (ConfigError, PlanError, ProfileError, LayoutError) as e:
        fail(str(e))
    if profile_note(cfg):
        click.echo(profile_note(cfg), err=True)
    click.echo(to_json(recs) if as_json else format_table(recs, limit or None))


@cli.command("calibrate")
@click.option("--device", default="cpu", show_default=True, help="cpu | cuda: the device type to measure.")
@click.option("--backend", default=None,
              help="Comma-separated: gloo, mpi, nccl; none: compute only [default: every one present].")
@click.option("--quick", is_flag=True, help="A small grid (seconds, for tests and a first look).")
@click.option("--out", default="profile.json", show_default=True, help="Where to write the profile (JSON).")
@click.option("--threads", type=int, default=1, show_default=True, help="torch threads per rank while timing.")
def calibrate_command(device, backend, quick, out, threads):
    """Measure this machine's compute and communication costs into a profile for parml plan."""
    if threads < 1:
        fail(f"--threads {threads} must be at least 1")
    try:
        backends = None if backend is None else [] if backend == "none" else backend.split(",")
        run_calibration(device, backends, out, quick, threads=threads)
    except ProfileError as e:
        fail(str(e))


@cli.command(context_settings={"max_content_width": 110})
@click.option("--mesh", "mesh", type=int, default=None, metavar="D",
              help="Print the mesh of the train options instead: D data replicas x P layer ranks (world = --ranks, "
                   "or D x -P), what each rank holds (blocks, batch rows) and every level's layout.")
@click.option("--stages", "-P", type=int, default=4, show_default=True,
              help="Layer ranks of --schedule's action lists (and of --mesh without --ranks).")
@click.option("--config", "config_file", default=None, metavar="TOML", help="Train options from a TOML file.")
@_train_options
def info(mesh, stages, config_file, **options):
    """Versions, available backends and devices, and what --backend auto would pick; with --schedule a
    schedule's action lists (-P stages, -M micro-batches, default 8); with --mesh D the run's mesh."""
    given = {k: v for k, v in options.items() if v is not None}
    if mesh is not None:
        _print_mesh(mesh, stages, config_file, given)
        return
    click.echo(json.dumps({"parml": __version__, **describe_environment()}, indent=2, default=str))
    schedule = given.get("schedule")
    if schedule:
        try:
            microbatches = int(given.get("microbatches", 8))
        except ValueError:
            fail(f"--microbatches {given['microbatches']!r} is not an integer")
        try:
            acts = get_schedule(schedule).actions(stages, microbatches)
            steps = dry_run(acts, microbatches)
        except ScheduleError as e:
            fail(str(e))
        click.echo(format_schedule(acts))
        click.echo(f"{len(steps)} unit time steps (ideal 2(M+P-1) = {2 * (microbatches + stages - 1)})")


def _print_mesh(data_parallel: int, stages: int, config_file: str | None, given: dict) -> None:
    """`parml info --mesh D`: the plan `parml train` prints at start, without any process group."""
    try:
        given["data_parallel"] = data_parallel
        given.setdefault("ranks", data_parallel * stages)
        cfg = resolve_options(config_file, given)
        data = load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed, flatten=cfg.arch != "conv")
        plan = plan_run(cfg, cfg.ranks, data)
    except (ConfigError, DataError, LayoutError) as e:
        fail(str(e))
    n = data.x_train.shape[0]
    batch, last = min(cfg.batch_size or n, n), smallest_batch(n, cfg.batch_size)
    tail = f" (the last of an epoch: {last})" if last != batch else ""
    click.echo(f"{data.name}, K={cfg.blocks}, L={cfg.levels}, batch {batch}{tail}, -M {cfg.microbatches}")
    click.echo(describe_mesh(plan, batch, cfg.microbatches))


@cli.command(context_settings={"show_default": True})
@click.argument("table")
@click.option("--task", default="circles", help="table1 only: circles | mnist.")
@click.option("--seeds", type=int, default=None, help="Seeds 0..N-1 per setup [default: 3; 2 with --quick].")
@click.option("--quick", is_flag=True, help="K = 128, 2 seeds, L = 1, 2, 4 (table1), capped V-cycles: a smoke run.")
@click.option("--out", default=os.path.join("runs", "reproduce"),
              help="Results folder (table, JSON, plots; run folders under OUT/runs). The committed results live "
                   "in benchmarks/results/reproduce: name it to update them.")
@click.option("--data-dir", default=None,
              help="MNIST IDX folder [default: ../shared/data/mnist next to the repository].")
@click.option("--max-cycles", type=int, default=None, help="V-cycle budget per run [default: 3000; 600 with --quick].")
@click.option("--target-accuracy", type=float, default=None,
              help="Stop at this validation accuracy [default: the paper's, 1.0 circles / 0.93 MNIST].")
@click.option("--levels", default=None, help="table1 only: comma-separated subset of L = 1,2,4,6,8.")
@click.option("--max-work-units", type=float, default=None,
              help="Same work budget for every setup: V-cycles <= max-work-units / U_c (and <= --max-cycles).")
@click.option("--reuse", is_flag=True,
              help="Keep runs whose folder under OUT/runs already holds the same config's summary.")
@click.option("--overwrite", is_flag=True, help="Replace run folders under OUT/runs that hold another config's run.")
@click.option("--threads", type=int, default=1, help="torch compute threads per rank.")
@click.option("--progress/--no-progress", default=True, help="One line per finished run on rank 0.")
def reproduce(table, task, seeds, quick, out, data_dir, max_cycles, target_accuracy, levels, max_work_units, reuse,
              overwrite, threads, progress):
    """Rerun the paper's TABLE: table1 (--task circles|mnist), table2 or sensitivity (§4.5).

    Writes TABLE.md, TABLE.json and loss/accuracy plots against V-cycles and work units to --out,
    and prints the table. Runs layer-parallel under torchrun / mpirun like `parml train`.
    """
    if threads < 1:
        fail(f"--threads {threads} must be at least 1")
    torch.set_num_threads(threads)
    try:
        ls = None
        if levels is not None:
            try:
                ls = [int(x) for x in levels.split(",") if x.strip()]
            except ValueError:
                fail(f"--levels {levels!r} must be comma-separated integers, e.g. 1,8")
        build_plan(table, task, seeds, quick, max_cycles, target_accuracy, data_dir, ls, max_work_units=max_work_units)
        given = [("--task", task if table == "table1" else None), ("--seeds", seeds), ("--quick", quick or None),
                 ("--max-cycles", max_cycles), ("--target-accuracy", target_accuracy), ("--levels", levels),
                 ("--max-work-units", max_work_units), ("--reuse", reuse or None)]
        command = " ".join(["parml reproduce", table] + [k if v is True else f"{k} {v}" for k, v in given
                                                          if v is not None])
        result = run_reproduction(table, task, seeds, quick, out, data_dir, max_cycles, target_accuracy, progress,
                                  ls, command=command, max_work_units=max_work_units, reuse=reuse,
                                  overwrite=overwrite)
    except (ReproduceError, ConfigError, DataError, LayoutError) as e:
        fail(str(e))
    except CommError as e:
        fail(str(e), code=1)
    if "files" in result:
        click.echo(result["files"]["table"])


def _one_line(e: click.ClickException) -> str:
    """click's usage error as parml's one line: the option, the value, what is allowed."""
    message = e.format_message().rstrip(".")
    ctx = getattr(e, "ctx", None)
    if ctx is not None and ctx.command is not None and ctx.info_name:
        return f"parml {ctx.info_name}: {message} (see parml {ctx.info_name} --help)"
    return f"{message} (see parml --help)"


def main(argv: list[str] | None = None) -> None:
    """The ``parml`` command: click errors become one line from rank 0, exit code 2."""
    try:
        cli.main(args=argv, prog_name="parml", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        fail("aborted", code=1)
    except click.ClickException as e:
        fail(_one_line(e), code=2)


if __name__ == "__main__":
    main()
