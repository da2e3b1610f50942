"""``parml reproduce``: the paper's Tables 1 and 2 and the §4.5 sensitivity study, rerun with parml.

Gaedke-Merzhäuser et al. report, for ODE ResNets with K = 2048 blocks trained by MG/OPT:

- Table 1: V-cycles, cost per V-cycle U_c (eq. 10) and total cost U = V-cycles x U_c to reach the
  target validation accuracy, for L = 1, 2, 4, 6, 8 levels, on co-centric circles (width 3,
  lr 0.1, β 1e-4, full-batch GD, target 1.0) and MNIST (width 10, lr 0.01, β 1e-5, mini-batches
  of 1000, target 0.93);
- Table 2: six level-optimizer setups of the 8-level method on circles;
- §4.5: U(L=1) / U(L=8) on circles over the 3 x 3 grid lr ∈ {0.05, 0.1, 0.5} x β ∈ {1e-3, 1e-4, 1e-5}
  (paper: 3.54 on average, relative standard deviation 8.02 %).

Every run is one ``TrainConfig`` passed to ``parml.train.train`` on the communicator of
``make_communicator("auto")``, so the same command also runs layer-parallel under torchrun or
mpirun; only rank 0 writes and prints. Seed s sets everything random in a run, exactly as
``parml train --seed s`` does: the initialization, the circles draw / MNIST split and the
mini-batch order.

Results (under ``--out``): ``<mode>.md`` (the table), ``<mode>.json`` (every number, per seed),
``<mode>-cycles.png`` and ``<mode>-work-units.png`` (loss and validation accuracy of the first seed
against V-cycles and against work units, one curve per setup: the paper's Figure 5), and one run
folder per training run under ``runs/``.
"""
from __future__ import annotations

import os

from ..comm import make_communicator
from .paper import PAPER_SENSITIVITY, PAPER_TABLE1, PAPER_TABLE2, TASK_SETUP, THRESHOLDS
from .plan import Plan, ReproduceError, Row, build_plan, sensitivity_rows, table1_rows, table2_rows
from .render import (first_reach, load_results, reach_table, relative_u, render_markdown, sensitivity_summary,
                     table1_ratio, to_json, write_outputs)
from .run import run_plan


def reproduce(mode: str, task: str = "circles", seeds: int | None = None, quick: bool = False,
              out: str = os.path.join("runs", "reproduce"), data_dir: str | None = None,
              max_cycles: int | None = None, target_accuracy: float | None = None, progress: bool = True,
              levels=None, comm=None, command: str = "", max_work_units: float | None = None,
              reuse: bool = False, overwrite: bool = False) -> dict:
    """Plan, run on `comm` (default: ``make_communicator("auto")``, closed at the end), write on rank 0."""
    plan = build_plan(mode, task, seeds, quick, max_cycles, target_accuracy, data_dir, levels,
                      max_work_units=max_work_units)
    own = comm is None
    if own:
        comm = make_communicator("auto")
    try:
        if comm.rank == 0 and progress:
            print(f"parml reproduce {plan.name}: {len(plan.rows)} setups x {len(plan.seeds)} seeds, "
                  f"K={plan.base['blocks']}, {comm.size} rank(s) [{comm.backend}] -> {out}", flush=True)
        results = run_plan(plan, comm, out, progress, echo=lambda s: print(s, flush=True), reuse=reuse,
                           overwrite=overwrite)
        if comm.rank == 0:
            results["files"] = write_outputs(results, out, command)
        return results
    finally:
        if own:
            comm.close()


__all__ = ["PAPER_TABLE1", "PAPER_TABLE2", "PAPER_SENSITIVITY", "TASK_SETUP", "ReproduceError", "Row", "Plan",
           "build_plan", "run_plan", "reproduce", "render_markdown", "to_json", "write_outputs",
           "table1_rows", "table2_rows", "sensitivity_rows", "table1_ratio", "sensitivity_summary",
           "relative_u", "load_results", "reach_table", "first_reach", "THRESHOLDS"]
