"""Run configuration: one dataclass whose fields are the options, validated in one place.

Each field carries its help text and, where it has a fixed set of values, the registry that owns
them (``choices``: the activations of ``model.steppers``, the schedules of ``parallel.schedule``,
...). The command line (``cli.py``) and TOML files (``--config``, every run folder's
``config.toml``) only fill the dataclass: the CLI builds its options from these fields, so a value
is declared once. Every check raises ``ConfigError`` with one line naming the option, its value
and what is allowed.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import sys
import typing
from dataclasses import dataclass

from .comm import BACKENDS, DEVICES
from .data import DATASETS
from .kernels import KERNELS
from .model import ACTIVATIONS, HEADS, INITS, NORMS, PROJECTIONS, STAGE_KINDS, STEPPERS, ModelSpec, StageSpec
from .multilevel.hierarchy import INTERPOLATIONS, METRICS, HierarchyError, level_specs
from .multilevel.cascade import LR_SCHEDULES
from .multilevel.mgopt import LEVEL_OPTIMIZERS, CycleError, CycleSetup
from .parallel.layout import COARSE_LAYOUTS
from .parallel.schedule import SCHEDULES
from .parallel.stage import WEIGHT_GRADS

if sys.version_info >= (3, 11):
    import tomllib
else:                                   # pragma: no cover - Python 3.10
    import tomli as tomllib

DTYPES = ("float32", "float64")
LAYOUTS = ("manual", "auto")
TENSORBOARD_MISSING = "--tensorboard needs the tensorboard package: pip install 'parml[tb]'"


class ConfigError(ValueError):
    """A bad option value; the message is the one line the user sees."""


def option(default, help: str, *, choices=None, short: str | None = None, runtime: bool = False):
    """A TrainConfig field: its default, help text, valid values (a registry's keys) and short flag.
    `runtime`: the option may change when a run is resumed (it does not change the iterates)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "short": short,
                                                        "runtime": runtime})


def flag(name: str) -> str:
    """The command-line spelling of a field: ``max_cycles`` -> ``--max-cycles``."""
    return "--" + name.replace("_", "-")


@dataclass
class TrainConfig:
    """Everything a training run needs. Defaults: the paper's circles setup (§4)."""
    # -- data and network
    dataset: str = option("circles", "Dataset (generated: circles, regression; files: mnist, fashion-mnist, "
                          "cifar10; scikit-learn: digits).", choices=tuple(DATASETS))
    data_dir: str | None = option(None, "Folder with the dataset's files (IDX / CIFAR binary); nothing downloads.")
    arch: str = option("dense", "dense: linear opening and blocks; conv: 3x3 conv stages with projections.",
                       choices=STAGE_KINDS)
    channels: str | None = option(None, "conv: channels per stage, e.g. 16,32,64; unset: one stage of --width.")
    projection: str = option("conv", "conv: downsampling between stages.", choices=PROJECTIONS)
    norm: str = option("none", "conv blocks: normalization.", choices=NORMS)
    head: str = option("pool", "conv: classifier input (pool: resolution independent; flatten: Haber et al.).",
                       choices=HEADS)
    blocks: int = option(2048, "Residual blocks (time steps) K on the finest level (per stage for conv).", short="-K")
    width: int = option(3, "State width v (3 for circles, 10 for MNIST in the paper).")
    T: float = option(1.0, "Final time; h = T / K.")
    activation: str = option("relu", "σ in F(y) = σ(W y + b).", choices=tuple(ACTIVATIONS))
    stepper: str = option("euler", "Time stepper of each block.", choices=tuple(STEPPERS))
    init: str = option("uniform", "Weights: uniform ±1/√fan_in | glorot (±√(6/(fan_in+fan_out)), the paper's "
                       "Keras default).", choices=INITS)
    # -- the multilevel method
    levels: int = option(8, "Levels of the hierarchy; 1 = plain (S)GD.", short="-L")
    cycle: str | None = option(None, "Steps per level, finest first, e.g. '[(1),1,2,{2}]' ((n): no "
                               "post-smoothing; {n}: coarsest). Default: the paper's setup for --levels.")
    optimizer: str = option("sgd", "Level optimizer.", choices=tuple(LEVEL_OPTIMIZERS))
    lr: float = option(0.1, "Learning rate of every level optimizer.")
    beta: float = option(1e-4, "Tikhonov weight β.")
    metric: str = option("l2", "l2: block steps in the L2(0,T) metric (gradient / h); euclidean: raw "
                         "parameters.", choices=METRICS)
    interpolation: str = option("constant", "Prolongation in time.", choices=INTERPOLATIONS)
    lr_schedule: str = option("constant", "cosine: anneal from --lr to --lr-min over --max-cycles.",
                              choices=LR_SCHEDULES)
    lr_min: float = option(0.001, "Final learning rate of cosine schedules.")
    cascade: int = option(0, "Multilevel initialization: train K/2^c, ..., K/2 blocks first (c doublings), "
                          "then K.")
    cascade_cycles: int = option(100, "Steps per cascade stage (cosine learning rate restarted each stage).")
    cascade_interpolation: str = option("constant", "constant: copy each block and halve h (Chang); linear in "
                                        "time (Haber).", choices=INTERPOLATIONS)
    batch_size: int | None = option(None, "Mini-batch size (multilevel SGD); default: the full batch.")
    seed: int = option(0, "Sets the initialization, the data draw / split and the batch order.")
    # -- budget and stopping
    target_accuracy: float | None = option(1.0, "Stop at this validation accuracy ('none': never).")
    max_cycles: int = option(2000, "V-cycle (or GD step) budget.", runtime=True)
    max_epochs: int | None = option(None, "Epoch budget (mini-batch runs).", runtime=True)
    dtype: str = option("float32", "Floating-point type of parameters and data.", choices=DTYPES)
    # -- run folder
    out: str = option("runs", "Parent folder of the run folder.")
    run_name: str | None = option(None, "Run folder name (default <dataset>-L<levels>-K<blocks>-s<seed>).")
    overwrite: bool = option(False, "Delete an existing run folder of the same name (checkpoints included) "
                             "and start anew.")
    resume: str | None = option(None, "Continue the run in this folder from its latest complete checkpoint (any "
                                "rank count); 'auto': the run folder of these options if it has a checkpoint, "
                                "else start.", runtime=True)
    checkpoint_every: int = option(0, "Write a checkpoint (per-rank shards + manifest) every n cycles; 0 = never.",
                                   runtime=True)
    keep_checkpoints: int = option(3, "Checkpoints kept: an older one is removed only once this many newer ones "
                                   "are written and verified (sizes and SHA-256 read back).", runtime=True)
    eval_every: int = option(1, "Validate every n cycles.", runtime=True)
    tensorboard: bool = option(False, "Also write the metrics as TensorBoard scalars to <run>/tensorboard "
                               "(pip install 'parml[tb]').", runtime=True)
    progress: bool = option(True, "Progress bar on rank 0.", runtime=True)
    # -- parallel execution
    backend: str = option("auto", "auto reads the launcher's variables (torchrun: torch, mpirun/srun: mpi).",
                          choices=BACKENDS, runtime=True)
    device: str = option("auto", "auto: cuda if available, else cpu.", choices=DEVICES, runtime=True)
    ranks: int | None = option(None, "Expected world size; must match the launcher's.", runtime=True)
    schedule: str = option("1f1b", "Pipeline schedule across ranks.", choices=tuple(sorted(SCHEDULES)))
    microbatches: int = option(1, "Micro-batches per step.", short="-M")
    weight_grads: str = option("auto", "deferred: a backward sends its adjoint first, then forms the dense "
                               "blocks' weight gradients in one batched matmul per chunk | inline | auto: "
                               "each kernel chooses (the fused CPU kernel inline up to width 8 and on the "
                               "first rank).",
                               choices=WEIGHT_GRADS, runtime=True)
    kernel: str = option("auto", "Dense chunks' forward/adjoint: fused where available, else torch.",
                         choices=KERNELS, runtime=True)
    min_blocks_per_rank: int = option(16, "A coarse level with fewer blocks per rank runs on fewer layer ranks, "
                                      "or with --coarse-layout redundant on the whole batch in every replica.")
    data_parallel: int = option(1, "Data replicas D: the world is D replicas x P = world/D layer ranks (world rank "
                                "= d*P + p); each replica runs its share of every batch, gradients are summed over "
                                "the replicas.", runtime=True)
    coarse_layout: str = option("gather", "A coarse level on P_l < P layer ranks: gather (the other ranks wait) | "
                                "replicate (P_l layer ranks x D*P/P_l replicas: every rank works) | redundant "
                                "(placed as replicate, also at P = 1 where a level has fewer than "
                                "--min-blocks-per-rank blocks per rank; every replica runs the whole batch, with no "
                                "gradient all-reduce).",
                                choices=COARSE_LAYOUTS, runtime=True)
    layout: str = option("manual", "manual: the layout options as given; auto: the layout --profile predicts "
                         "fastest (parml plan) sets --data-parallel, --microbatches, --schedule, --coarse-layout and "
                         "--min-blocks-per-rank.",
                         choices=LAYOUTS, runtime=True)
    profile: str | None = option(None, "Machine profile (JSON from parml calibrate) for --layout auto and parml plan "
                                 "[default: parml's reference CPU profile, with a note to calibrate].", runtime=True)
    comm_timeout: float = option(300.0, "Seconds before a blocked communication fails.", runtime=True)
    threads: int = option(1, "torch compute threads per rank (ranks are the parallelism; small blocks run best "
                          "on one).", runtime=True)

    @property
    def setup(self) -> CycleSetup:
        return CycleSetup.parse(self.cycle) if self.cycle else CycleSetup.default(self.levels)

    def model_spec(self, in_features: int, out_features: int, task: str, input_shape=None) -> ModelSpec:
        if self.arch == "dense":
            return ModelSpec(in_features, out_features, (StageSpec(self.width, self.blocks),),
                             self.T, self.activation, self.stepper, task, init=self.init)
        chans = [int(c) for c in self.channels.split(",")] if self.channels else [self.width]
        stages = tuple(StageSpec(c, self.blocks, "conv", 1 if i == 0 else 2) for i, c in enumerate(chans))
        if input_shape is None or len(input_shape) != 3:          # validation without data
            side = 2 ** (len(chans) - 1)
            input_shape, in_features = (1, side, side), side * side
        return ModelSpec(in_features, out_features, stages, self.T, self.activation, self.stepper, task,
                         tuple(input_shape), self.projection, self.norm, self.head, init=self.init)

    def spec_for(self, data) -> ModelSpec:
        """The network for a loaded ``data.Dataset``; a mismatch with the data is a ConfigError."""
        try:
            return self.model_spec(data.x_train[0].numel(), data.num_classes or data.y_train.shape[-1],
                                   data.task, data.input_shape)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    @property
    def name(self) -> str:
        return self.run_name or f"{self.dataset}-L{self.levels}-K{self.blocks}-s{self.seed}"

    @property
    def folder(self) -> str:
        return os.path.join(self.out, self.name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # -- files -------------------------------------------------------------------------------------
    def to_toml(self) -> str:
        """The options as TOML that ``--config`` replays exactly (None is written as "none")."""
        lines = ["# parml train --config <this file>: the options of this run"]
        for f in dataclasses.fields(self):
            if f.name not in ("resume", "overwrite"):          # how to start, not what the run is
                lines.append(f"{f.name} = {_toml_value(getattr(self, f.name))}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_options(cls, values: dict, source: str = "") -> "TrainConfig":
        """A config from option values (field names as keys), each converted to its field's type."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ConfigError(f"{source}unknown option(s) {', '.join(unknown)}; valid: see parml train --help")
        return cls(**{k: _convert(fields[k], v, source) for k, v in values.items()})

    @classmethod
    def load_toml(cls, path: str) -> dict:
        """The option values of a TOML file (top-level keys are field names, with - or _)."""
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"--config {path!r}: {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"--config {path!r} is not valid TOML: {e}") from None
        values = {k.replace("-", "_"): v for k, v in raw.items()}
        cls.from_options(values, f"--config {path!r}: ")      # unknown keys and wrong types fail here
        return values

    @classmethod
    def saved(cls, run_dir: str) -> dict:
        """The option values a run folder was started with (config.toml, or an older config.json)."""
        toml_path, json_path = os.path.join(run_dir, "config.toml"), os.path.join(run_dir, "config.json")
        if os.path.exists(toml_path):
            return cls.load_toml(toml_path)
        if os.path.exists(json_path):
            with open(json_path) as f:
                saved = json.load(f)
            names = {f.name for f in dataclasses.fields(cls)}
            return {k: v for k, v in saved.items() if k in names}
        raise ConfigError(f"--resume {run_dir!r}: no config.toml there (not a parml run folder)")

    @classmethod
    def resume_run(cls, run_dir: str, given: dict) -> "TrainConfig":
        """The saved run's config with the run-time options of `given` (command line / --config);
        an option that would change the iterates is a one-line error listing every such option."""
        saved = cls.from_options(cls.saved(run_dir))
        fields = {f.name: f for f in dataclasses.fields(cls)}
        changed = [k for k, v in given.items() if not fields[k].metadata["runtime"] and k not in ("out", "run_name")
                   and _convert(fields[k], v, "") != getattr(saved, k)]
        if changed:
            listing = ", ".join(f"{flag(k)} {_toml_value(getattr(saved, k))} -> "
                                f"{_toml_value(_convert(fields[k], given[k], ''))}"
                                for k in sorted(changed))
            raise ConfigError(f"--resume {run_dir!r}: options differ from the saved run ({listing}); only run-time "
                              f"options may change, or start a new run with another --run-name")
        for k, v in given.items():
            if fields[k].metadata["runtime"]:
                setattr(saved, k, _convert(fields[k], v, ""))
        saved.resume = run_dir
        where = os.path.abspath(run_dir)
        saved.out, saved.run_name = os.path.dirname(where), os.path.basename(where)
        saved.overwrite = False
        return saved

    # -- checks ------------------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Check every option that needs no data and no process group."""
        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)

        for f in dataclasses.fields(self):
            valid, value = f.metadata["choices"], getattr(self, f.name)
            if valid is not None and value is not None and (value.lower() if f.name == "schedule" else value) \
                    not in valid:
                raise ConfigError(f"{flag(f.name)} {value!r} is not one of: {', '.join(valid)}")
        at_least_one = ("blocks", "width", "max_cycles", "max_epochs", "batch_size", "microbatches", "eval_every",
                        "min_blocks_per_rank", "ranks", "data_parallel", "cascade_cycles", "threads",
                        "keep_checkpoints", "levels")
        for name in at_least_one:
            value = getattr(self, name)
            need(value is None or value >= 1, f"{flag(name)} {value} must be at least 1")
        for name in ("T", "lr", "comm_timeout"):
            need(getattr(self, name) > 0, f"{flag(name)} {getattr(self, name)} must be positive")
        for name in ("beta", "checkpoint_every", "cascade"):
            need(getattr(self, name) >= 0, f"{flag(name)} {getattr(self, name)} must be >= 0")
        need(self.target_accuracy is None or 0 < self.target_accuracy <= 1,
             f"--target-accuracy {self.target_accuracy} must be in (0, 1]")
        need(0 <= self.lr_min <= self.lr, f"--lr-min {self.lr_min} must be in [0, --lr {self.lr}]")
        need(self.blocks % 2 ** self.cascade == 0, f"--cascade {self.cascade} needs --blocks {self.blocks} "
             f"divisible by 2^{self.cascade} (each stage doubles the depth)")
        need(self.channels is None or all(c.strip().isdigit() and int(c) > 0 for c in self.channels.split(",")),
             f"--channels {self.channels!r} must be comma-separated positive integers, e.g. 16,32,64")
        need(self.resume in (None, "auto") or os.path.isdir(self.resume), f"--resume {self.resume!r} is not a "
             "run folder (or 'auto')")
        need(not self.tensorboard or importlib.util.find_spec("tensorboard") is not None, TENSORBOARD_MISSING)
        need(not (self.overwrite and self.resume), "--overwrite and --resume exclude each other: --overwrite "
             "deletes the run that --resume would continue")
        try:
            level_specs(self.model_spec(1, 1, "classification"), self.levels)
            self.setup.check(self.levels)
        except (HierarchyError, CycleError, ValueError) as e:
            raise ConfigError(str(e)) from None
        parent = os.path.abspath(self.out)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        need(os.access(parent, os.W_OK), f"--out {self.out!r} is not writable")
        return self


def runtime_options() -> tuple[str, ...]:
    """The options that may change when a run is resumed."""
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["runtime"])


def _toml_value(value) -> str:
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ('"nan"' if math.isnan(value) else f'"{value}"')
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value))


def field_type(f: dataclasses.Field) -> tuple[type, bool]:
    """(base type, optional) of a TrainConfig field from its annotation (str | None -> (str, True))."""
    hints = typing.get_type_hints(TrainConfig)
    tp = hints[f.name]
    args = typing.get_args(tp)
    if args:
        base = [a for a in args if a is not type(None)][0]
        return base, type(None) in args
    return tp, False


def _convert(f: dataclasses.Field, value, source: str):
    """`value` (from TOML, JSON or the command line) as the field's type; "none" for optional fields."""
    base, optional = field_type(f)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() == "none"):
        if optional:
            return None
        raise ConfigError(f"{source}{flag(f.name)} needs a value")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value.strip())
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        kind = {bool: "true or false", int: "an integer", float: "a number"}.get(base, "a string")
        raise ConfigError(f"{source}{flag(f.name)} {value!r} is not {kind}"
                          + (" (or 'none')" if optional else "")) from None
