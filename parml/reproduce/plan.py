"""Which runs a reproduction makes: one Row per table line (setup and paper numbers), a Plan of
rows x seeds with the options every run shares."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..data import default_mnist_dir
from ..multilevel.mgopt import CycleSetup
from .paper import (FULL, MODES, PAPER_METHOD, PAPER_SENSITIVITY, PAPER_TABLE1, PAPER_TABLE2, QUICK,
                    TABLE2_SWAPPED, TASK_SETUP, TASKS)


class ReproduceError(ValueError):
    """A bad option of ``parml reproduce``; the message is the one line the user sees."""


# --- the plan: which runs, with which paper numbers -----------------------------------------------

@dataclass(frozen=True)
class Row:
    """One line of a table: a setup (levels, cycle, lr, β) and what the paper reports for it."""
    key: str                      # unique within the mode, used in run names
    label: str                    # first column
    levels: int
    cycle: str
    lr: float
    beta: float
    paper_cycles: int | None = None
    paper_uc: float | None = None  # shown in the table (eq. (10) where the print disagrees)
    paper_u: float | None = None
    paper_uc_printed: float | None = None
    note: str = ""                # footnote marker

    @property
    def eq10(self) -> float:
        return CycleSetup.parse(self.cycle).cost()


@dataclass
class Plan:
    mode: str                     # table1 | table2 | sensitivity
    task: str
    rows: list[Row]
    seeds: list[int]
    base: dict                    # TrainConfig fields shared by every run
    quick: bool = False
    notes: list[str] = field(default_factory=list)
    max_work_units: float | None = None   # same work budget for every row: max_cycles <= W / U_c

    @property
    def name(self) -> str:
        return f"table1-{self.task}" if self.mode == "table1" else self.mode


def _fmt_beta(b: float) -> str:
    return f"{b:.0e}".replace("e-0", "e-")


def table1_rows(task: str, levels=None) -> list[Row]:
    s = TASK_SETUP[task]
    rows = []
    for L, (cycle, n, uc, u) in PAPER_TABLE1[task].items():
        if levels is None or L in levels:
            rows.append(Row(f"L{L}", f"{L} {cycle}", L, cycle, s["lr"], s["beta"], n, uc, u, uc))
    return rows


def table2_rows() -> list[Row]:
    s = TASK_SETUP["circles"]
    rows = []
    for i, (cycle, n, uc, u) in enumerate(PAPER_TABLE2):
        swapped = i in TABLE2_SWAPPED
        shown = round(CycleSetup.parse(cycle).cost(), 2) if swapped else uc
        rows.append(Row(f"r{i + 1}", f"8 {cycle}", 8, cycle, s["lr"], s["beta"], n, shown, u, uc,
                        "[a]" if swapped else ""))
    return rows


def sensitivity_rows() -> list[Row]:
    rows = []
    for lr in PAPER_SENSITIVITY["lrs"]:
        for beta in PAPER_SENSITIVITY["betas"]:
            for L, cycle in ((1, "[{1}]"), (8, PAPER_SENSITIVITY["cycle_L8"])):
                rows.append(Row(f"lr{lr:g}-b{_fmt_beta(beta)}-L{L}", f"α={lr:g}, β={_fmt_beta(beta)}: {L} {cycle}",
                                L, cycle, lr, beta))
    return rows


def build_plan(mode: str, task: str = "circles", seeds: int | None = None, quick: bool = False,
               max_cycles: int | None = None, target_accuracy: float | None = None,
               data_dir: str | None = None, levels=None, blocks: int | None = None,
               max_work_units: float | None = None) -> Plan:
    """Check the options and list the runs; raises ReproduceError with a one-line message."""
    if mode not in MODES:
        raise ReproduceError(f"unknown table {mode!r} (valid: {', '.join(MODES)})")
    if task not in TASKS:
        raise ReproduceError(f"--task {task!r} is not one of: {', '.join(TASKS)}")
    if mode != "table1" and task != "circles":
        raise ReproduceError(f"--task {task}: {mode} is the co-centric circles example only (paper §4.5)")
    if seeds is not None and seeds < 1:
        raise ReproduceError(f"--seeds {seeds} must be at least 1")
    if max_cycles is not None and max_cycles < 1:
        raise ReproduceError(f"--max-cycles {max_cycles} must be at least 1")
    if max_work_units is not None and not max_work_units > 0:
        raise ReproduceError(f"--max-work-units {max_work_units} must be positive")
    if target_accuracy is not None and not 0 < target_accuracy <= 1:
        raise ReproduceError(f"--target-accuracy {target_accuracy} must be in (0, 1]")
    if levels is not None:
        if mode != "table1":
            raise ReproduceError(f"--levels applies to table1 only, not {mode}")
        bad = [L for L in levels if L not in PAPER_TABLE1[task]]
        if bad or not levels:
            raise ReproduceError(f"--levels {','.join(map(str, levels)) or '(empty)'}: Table 1 has L = "
                                 f"{', '.join(map(str, PAPER_TABLE1[task]))}")
    sizes = QUICK if quick else FULL
    if mode == "table1":
        rows = table1_rows(task, levels if levels is not None else (QUICK["table1_levels"] if quick else None))
    elif mode == "table2":
        rows = table2_rows()
    else:
        rows = sensitivity_rows()
    setup = dict(TASK_SETUP[task])
    setup.pop("lr"), setup.pop("beta")
    if target_accuracy is not None:
        setup["target_accuracy"] = target_accuracy
    notes = []
    if task == "mnist":
        data_dir = data_dir or default_mnist_dir()
        if data_dir is None:
            raise ReproduceError("--data-dir is required for --task mnist (a folder with the MNIST IDX files)")
        setup["data_dir"] = data_dir
        notes.append("MNIST: the paper trains on the 60,000 training images and validates on the 10,000 "
                     "test images; here only the official test set (t10k) is available, so parml trains on a "
                     "seeded 8000-image split of it and validates on the other 2000 (the split follows the seed).")
    K = blocks or sizes["blocks"]
    base = {**setup, **PAPER_METHOD, "blocks": K, "max_cycles": max_cycles or sizes["max_cycles"], "eval_every": 1,
            "progress": False}
    if quick:
        notes.append(f"--quick: K = {K} instead of 2048, {len(rows)} setups, at most {base['max_cycles']} "
                     "V-cycles; the counts are not comparable with the paper's.")
    if max_work_units is not None:
        notes.append(f"Work budget: every run stops after at most {max_work_units:g} work units "
                     f"(V-cycles <= min({base['max_cycles']}, ⌈{max_work_units:g} / U_c⌉)).")
    n = seeds if seeds is not None else sizes["seeds"]
    return Plan(mode, task, rows, list(range(n)), base, quick, notes, max_work_units)


# --- running -----------------------------------------------------------------------------------------
