"""Command line: ``parml train``, ``parml info``.

The same command runs alone, under ``torchrun --nproc_per_node N`` or under ``mpirun -n N``: the
backend is read from the launcher's environment. User mistakes end with one line on stderr
(printed by rank 0 only) and exit code 2, before any process group exists where possible.
"""
from __future__ import annotations

import json
import os
import sys
import time

import click

from . import __version__
from .config import DTYPES, INTERPOLATIONS, METRICS, OPTIMIZERS, ConfigError, TrainConfig


def _rank0() -> bool:
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if var in os.environ:
            return os.environ[var] == "0"
    return True


def fail(message: str, code: int = 2):
    """One line on stderr (rank 0 only) and exit: no traceback for user mistakes."""
    if _rank0():
        click.echo(f"parml: error: {message}", err=True)
    from .comm import exit_process, launcher_world_size
    if launcher_world_size() > 1:
        if not _rank0():
            time.sleep(1.0)     # mpirun kills the job at the first non-zero exit: let rank 0 say why

        exit_process(code)      # skip gloo's teardown, which can turn exit code 2 into a crash
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="parml")
def main():
    """Layer-parallel, multilevel (MG/OPT) training of deep residual networks.

    A ResNet with K blocks is forward Euler on [0, T]: parml splits the blocks across ranks
    (torchrun or mpirun) and trains with MG/OPT V-cycles on networks coarsened in time.
    """


_D = TrainConfig()


@main.command(context_settings={"show_default": True})
@click.option("--dataset", default=_D.dataset, help="circles | regression | mnist | fashion-mnist | cifar10 | digits")
@click.option("--data-dir", default=None, help="Folder with the dataset's files (IDX / CIFAR binary); nothing downloads.")
@click.option("--arch", default=_D.arch, type=click.Choice(("dense", "conv")),
              help="dense: linear opening and blocks; conv: 3x3 conv stages with projections (image data).")
@click.option("--channels", default=None, help="conv: channels per stage, e.g. 16,32,64 (default --width).")
@click.option("--projection", default=_D.projection, type=click.Choice(("conv", "avgpool")),
              help="conv: downsampling between stages.")
@click.option("--norm", default=_D.norm, type=click.Choice(("none", "layer")), help="conv blocks: normalization.")
@click.option("--head", default=_D.head, type=click.Choice(("pool", "flatten")), help="conv: classifier input.")
@click.option("--blocks", "-K", type=int, default=_D.blocks, help="Residual blocks (time steps) on the finest level.")
@click.option("--width", type=int, default=_D.width, help="State width v.")
@click.option("--T", "T", type=float, default=_D.T, help="Final time; h = T / K.")
@click.option("--activation", default=_D.activation, help="relu | tanh")
@click.option("--stepper", default=_D.stepper, help="euler | rk2")
@click.option("--init", default=_D.init, help="Weight initialization: uniform (±1/√fan_in) | glorot "
              "(Glorot uniform, ±√(6/(fan_in+fan_out)), the paper's Keras default).")
@click.option("--levels", "-L", type=int, default=_D.levels, help="Levels of the hierarchy; 1 = plain (S)GD.")
@click.option("--cycle", default=None, help="Steps per level, finest first, e.g. '[(1),1,2,{2}]' "
              "((n): no post-smoothing; {n}: coarsest). Default: the paper's setup for --levels.")
@click.option("--optimizer", default=_D.optimizer, type=click.Choice(OPTIMIZERS), help="Level optimizer.")
@click.option("--lr", type=float, default=_D.lr, help="Learning rate of every level optimizer.")
@click.option("--beta", type=float, default=_D.beta, help="Tikhonov weight β.")
@click.option("--metric", default=_D.metric, type=click.Choice(METRICS),
              help="l2: block steps in the L2(0,T) metric (gradient / h); euclidean: raw parameters.")
@click.option("--interpolation", default=_D.interpolation, type=click.Choice(INTERPOLATIONS),
              help="Prolongation in time.")
@click.option("--lr-schedule", default=_D.lr_schedule, type=click.Choice(("constant", "cosine")),
              help="cosine: anneal from --lr to --lr-min over --max-cycles.")
@click.option("--lr-min", type=float, default=_D.lr_min, help="Final learning rate of cosine schedules.")
@click.option("--cascade", type=int, default=_D.cascade,
              help="Multilevel initialization: train K/2^c, ..., K/2 blocks first (c doublings), then K.")
@click.option("--cascade-cycles", type=int, default=_D.cascade_cycles,
              help="Steps per cascade stage (cosine learning rate restarted each stage).")
@click.option("--cascade-interpolation", default=_D.cascade_interpolation, type=click.Choice(INTERPOLATIONS),
              help="constant: copy each block and halve h (Chang); linear in time (Haber).")
@click.option("--batch-size", type=int, default=None, help="Mini-batch size (multilevel SGD); default full batch.")
@click.option("--seed", type=int, default=_D.seed)
@click.option("--target-accuracy", type=float, default=_D.target_accuracy, help="Stop at this validation accuracy.")
@click.option("--max-cycles", type=int, default=_D.max_cycles, help="V-cycle budget.")
@click.option("--max-epochs", type=int, default=None, help="Epoch budget (mini-batch runs).")
@click.option("--dtype", default=_D.dtype, type=click.Choice(DTYPES))
@click.option("--out", default=_D.out, help="Parent folder of the run folder.")
@click.option("--run-name", default=None, help="Run folder name (default <dataset>-L<levels>-K<blocks>-s<seed>).")
@click.option("--backend", default=_D.backend, help="auto | torch | mpi | self (auto reads the launcher's variables).")
@click.option("--device", default=_D.device, help="auto | cpu | cuda")
@click.option("--schedule", default=_D.schedule, help="Pipeline schedule across ranks: 1f1b | gpipe")
@click.option("--microbatches", "-M", type=int, default=_D.microbatches, help="Micro-batches per step.")
@click.option("--weight-grads", default=_D.weight_grads,
              help="deferred: a backward sends its adjoint first, then forms the dense blocks' weight "
                   "gradients in one batched matmul per chunk (faster) | inline: inside the backward.")
@click.option("--min-blocks-per-rank", type=int, default=_D.min_blocks_per_rank,
              help="A coarse level with fewer blocks per rank is gathered onto fewer ranks.")
@click.option("--ranks", type=int, default=None, help="Expected world size; must match the launcher's.")
@click.option("--comm-timeout", type=float, default=_D.comm_timeout, help="Seconds before a blocked communication fails.")
@click.option("--checkpoint-every", type=int, default=_D.checkpoint_every,
              help="Write a checkpoint (per-rank shards + manifest) every n cycles; 0 = never.")
@click.option("--resume", default=None, help="Continue the run in this folder from its latest complete checkpoint "
              "(any rank count); only --max-cycles and run-time options may change.")
@click.option("--eval-every", type=int, default=_D.eval_every, help="Validate every n cycles.")
@click.option("--threads", type=int, default=1, show_default=True,
              help="torch compute threads per rank (ranks are the parallelism; small blocks run best on one).")
@click.option("--progress/--no-progress", default=True, help="Progress bar on rank 0.")
def train(**options):
    """Train an ODE ResNet (default: the paper's circles setup, K=2048, 8 levels)."""
    from .training.trainer import run_from_cli
    threads = options.pop("threads")
    if threads < 1:
        fail(f"--threads {threads} must be at least 1")
    import torch
    torch.set_num_threads(threads)
    try:
        if options["resume"]:
            ctx = click.get_current_context()
            given = {k: v for k, v in options.items()
                     if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
            cfg = TrainConfig.from_run(options["resume"], given)
        else:
            cfg = TrainConfig(**options)
        cfg.validate()
    except ConfigError as e:
        fail(str(e))
    run_from_cli(cfg, fail)
    from .comm import exit_process, launcher_world_size
    if launcher_world_size() > 1:
        exit_process(0)


@main.command()
@click.option("--schedule", default=None, help="Print this schedule's action lists, e.g. 1f1b.")
@click.option("--stages", "-P", type=int, default=4, show_default=True)
@click.option("--microbatches", "-M", type=int, default=8, show_default=True)
def info(schedule, stages, microbatches):
    """Versions, available backends and devices, and what --backend auto would pick."""
    from .comm import describe_environment
    click.echo(json.dumps({"parml": __version__, **describe_environment()}, indent=2, default=str))
    if schedule:
        from .parallel.schedule import ScheduleError, dry_run, format_schedule, get_schedule
        try:
            acts = get_schedule(schedule).actions(stages, microbatches)
            steps = dry_run(acts, microbatches)
        except ScheduleError as e:
            fail(str(e))
        click.echo(format_schedule(acts))
        click.echo(f"{len(steps)} unit time steps (ideal 2(M+P-1) = {2 * (microbatches + stages - 1)})")


@main.command(context_settings={"show_default": True})
@click.argument("table")
@click.option("--task", default="circles", help="table1 only: circles | mnist.")
@click.option("--seeds", type=int, default=None, help="Seeds 0..N-1 per setup [default: 3; 2 with --quick].")
@click.option("--quick", is_flag=True, help="K = 128, 2 seeds, L = 1, 2, 4 (table1), capped V-cycles: a smoke run.")
@click.option("--out", default=os.path.join("benchmarks", "results", "reproduce"),
              help="Results folder (table, JSON, plots; run folders under runs/).")
@click.option("--data-dir", default=None, help="MNIST IDX folder [default: ../shared/data/mnist next to the repository].")
@click.option("--max-cycles", type=int, default=None, help="V-cycle budget per run [default: 3000; 600 with --quick].")
@click.option("--target-accuracy", type=float, default=None,
              help="Stop at this validation accuracy [default: the paper's, 1.0 circles / 0.93 MNIST].")
@click.option("--levels", default=None, help="table1 only: comma-separated subset of L = 1,2,4,6,8.")
@click.option("--max-work-units", type=float, default=None,
              help="Same work budget for every setup: V-cycles <= max-work-units / U_c (and <= --max-cycles).")
@click.option("--reuse", is_flag=True, help="Keep runs whose folder under OUT/runs already holds the same config's summary.")
@click.option("--threads", type=int, default=1, show_default=True,
              help="torch compute threads per rank (ranks are the parallelism; small blocks run best on one).")
@click.option("--progress/--no-progress", default=True, help="One line per finished run on rank 0.")
def reproduce(table, task, seeds, quick, out, data_dir, max_cycles, target_accuracy, levels, max_work_units, reuse,
              threads, progress):
    """Rerun the paper's TABLE: table1 (--task circles|mnist), table2 or sensitivity (§4.5).

    Writes TABLE.md, TABLE.json and loss/accuracy plots against V-cycles and work units to --out,
    and prints the table. Runs layer-parallel under torchrun / mpirun like `parml train`.
    """
    if threads < 1:
        fail(f"--threads {threads} must be at least 1")
    import torch
    torch.set_num_threads(threads)
    from .comm import CommError
    from .config import ConfigError
    from .data import DataError
    from .parallel.layout import LayoutError
    from .reproduce import ReproduceError, build_plan, reproduce as run
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
        result = run(table, task, seeds, quick, out, data_dir, max_cycles, target_accuracy, progress, ls,
                     command=command, max_work_units=max_work_units, reuse=reuse)
    except (ReproduceError, ConfigError, DataError, LayoutError) as e:
        fail(str(e))
    except CommError as e:
        fail(str(e), code=1)
    if "files" in result:
        click.echo(result["files"]["table"])


if __name__ == "__main__":
    main()
