"""A discrete-event replay of parml's own training step and V-cycle with a profile's costs.

Nothing here restates the pipeline or the cycle as formulas:

* a rank's program is built from the action list the executor runs (``programs``: the schedule's
  ``stage_actions``, the messages ``parallel.stage`` sends, the data group's gradient all-reduce,
  the layer group's all-reduce of the loss and Level.gradient's sums, ``transfer.Mover``'s pieces);
* the level sequence of a V-cycle is recorded by running the real ``mgopt.VCycle`` (Algorithm 1)
  on stand-in levels (``vcycle``), so its work units are eq. (10) by construction of the engine;
* level layouts come from ``parallel.layout.plan_mesh``, the plan the executor runs (``costs``);
* the engine (``engine``) runs the programs: exactly (max-plus, numba-compiled when large) or with
  processor sharing when ranks share cores (more ranks than ``profile.cores``, or other busy
  processes on a shared machine, ``Layout.background``).

This module gathers the public names of those parts; ``predict`` is the entry point.
"""
from .costs import (  # noqa: F401
    COARSE_LAYOUTS,
    DTYPE_BYTES,
    OPTIMIZER_STATES,
    Layout,
    LevelLayout,
    StageCost,
    Workload,
    kernel_name,
    level_layouts,
    level_specs_of,
    shard_parameters,
    shared_entries,
    state_elements,
)
from .engine import KINDS, Programs, Run, SimulationError, Span, run_exact  # noqa: F401
from .sharing import run_programs, run_shared  # noqa: F401
from .predict import Prediction, RankStats, predict, serial_prediction  # noqa: F401
from .programs import (  # noqa: F401
    Context,
    PhaseResult,
    exposed_seconds,
    gradient_programs,
    move_messages,
    simulate_gradient,
    simulate_move,
    simulate_update,
)
from .vcycle import cycle_trace  # noqa: F401
