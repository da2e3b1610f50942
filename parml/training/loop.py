"""The training loop: V-cycles (or GD steps) on mini-batches or the full batch, validation,
the stopping rule, and the hooks run after each cycle."""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import torch

from ..config import TrainConfig
from ..data import Dataset, batches
from ..multilevel.mgopt import NonFiniteError, VCycle
from .report import RunWriter


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss); the message says where."""


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
               start: Phase | None = None, after_cycle=None, around_cycle=None) -> Phase:
    """V-cycles (or GD steps) on mini-batches or the full batch until the target or the budget.

    `lr_at(i)` sets every level optimizer's learning rate before step i (cosine restarts);
    `start` resumes at a saved position; `after_cycle(state)` runs after each logged cycle
    (checkpoints); `around_cycle(vcycle)`, a context manager, is entered around each V-cycle
    call alone, validation excluded (timers, profilers). Ranks outside the finest level's group
    (cascade stages) return at once.
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
                with around_cycle(vcycle) if around_cycle is not None else contextlib.nullcontext():
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
    purpose, so the tests can check that a failing or dying rank ends the whole job cleanly.
    With PARML_TEST_FAULT_ONCE=<file> the fault fires only if that file does not exist yet (the hook
    creates it), so a job restarted by its launcher (torchrun --max-restarts) runs on unharmed."""
    spec = os.environ.get("PARML_TEST_FAULT")
    if not spec:
        return
    kind, at, rank = spec.split(":")
    finest = vcycle.levels[-1]
    if int(at) != cycle or finest.executor.rank != int(rank):
        return
    marker = os.environ.get("PARML_TEST_FAULT_ONCE")
    if marker:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    if kind == "nan":
        with torch.no_grad():
            finest.params[0].view(-1)[0] = float("nan")
    elif kind == "raise":
        raise RuntimeError(f"injected failure at cycle {cycle}")
    elif kind == "kill":
        os.kill(os.getpid(), 9)
