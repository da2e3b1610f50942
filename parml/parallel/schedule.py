"""Pipeline schedules as pure data, plus a one-process dry run that proves them.

A schedule says in which order each pipeline stage runs its forward (``F``)
and backward (``B``) passes over the M micro-batches of a training step.
Communication is implicit, so a schedule is a plain list that can be printed
and checked without any process group:

* ``F`` of micro-batch m on stage s > 0 first receives the state from stage
  s-1 (tag ``2m``); on s < P-1 it sends its output to stage s+1 afterwards.
* ``B`` of micro-batch m on stage s < P-1 first receives the adjoint from
  stage s+1 (tag ``2m+1``); on s > 0 it sends the input adjoint to stage s-1.

Sends are buffered (non-blocking) and only receives block, so the only way a
schedule can fail at run time is a cycle of stages waiting on each other's
receives; :func:`dry_run` finds such cycles before any rank starts.  Tags
exist only where the transport matches by tag (gloo, MPI); NCCL delivers a
pair's messages in posting order, so :func:`dry_run` also proves with
:func:`check_message_order` that each neighbour receives in the order the
other sends, per direction.  The split
between "what to run" (here) and "how to run it" (the stage executor) mirrors
``torch.distributed.pipelining``, and actions print the same way (``0F1``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import accumulate

__all__ = ["Action", "ScheduleError", "Schedule", "GPipe", "OneFOneB", "SCHEDULES", "get_schedule",
           "register_schedule", "validate", "check_message_order", "dry_run", "format_schedule", "format_timeline",
           "bubble_fraction", "max_in_flight"]


class ScheduleError(ValueError):
    """A schedule (or a request for one) that cannot run; the message is one line."""


_ACTION_RE = re.compile(r"(\d+)([FB])(\d+)")


@dataclass(frozen=True)
class Action:
    """One compute step: ``kind`` ("F" or "B") of ``microbatch`` on ``stage``."""

    stage: int
    kind: str
    microbatch: int

    def __post_init__(self):
        if self.kind not in ("F", "B"):
            raise ScheduleError(f"action kind must be 'F' or 'B', got {self.kind!r}")
        if self.stage < 0 or self.microbatch < 0:
            raise ScheduleError(f"action {self.stage}{self.kind}{self.microbatch} has a negative index")

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch}"

    @classmethod
    def parse(cls, text: str) -> "Action":
        """Inverse of ``str``: ``"0F1"`` -> ``Action(0, "F", 1)``."""
        m = _ACTION_RE.fullmatch(text.strip()) if isinstance(text, str) else None
        if m is None:
            raise ScheduleError(f"cannot parse action {text!r}; expected e.g. '0F1' (stage, F or B, micro-batch)")
        return cls(int(m.group(1)), m.group(2), int(m.group(3)))


def _check_sizes(num_stages: int, num_microbatches: int) -> None:
    for what, n in (("num_stages", num_stages), ("num_microbatches", num_microbatches)):
        if not isinstance(n, int) or n < 1:
            raise ScheduleError(f"{what} must be an integer >= 1, got {n!r}")


class Schedule:
    """Base class; a subclass only decides one stage's order of actions.

    Stages are generated independently because at run time each rank only
    needs its own list; :func:`dry_run` checks that the lists fit together.
    """

    name: str = ""

    def stage_actions(self, stage: int, num_stages: int, num_microbatches: int) -> list[Action]:
        raise NotImplementedError

    def actions(self, num_stages: int, num_microbatches: int) -> list[list[Action]]:
        """The action lists of all stages, indexed by stage."""
        _check_sizes(num_stages, num_microbatches)
        return [self.stage_actions(s, num_stages, num_microbatches) for s in range(num_stages)]


SCHEDULES: dict[str, type[Schedule]] = {}


def register_schedule(name: str):
    """Class decorator adding a schedule to :data:`SCHEDULES` under ``name`` (lower-cased)."""

    def deco(cls: type[Schedule]) -> type[Schedule]:
        key = name.lower()
        if SCHEDULES.get(key, cls) is not cls:
            raise ScheduleError(f"schedule name {key!r} is already registered to {SCHEDULES[key].__name__}")
        cls.name, SCHEDULES[key] = key, cls
        return cls
    return deco


def get_schedule(name: str) -> Schedule:
    """An instance of the schedule registered as ``name`` (case-insensitive)."""
    cls = SCHEDULES.get(str(name).lower())
    if cls is None:
        raise ScheduleError(f"unknown schedule {name!r}; valid: {', '.join(sorted(SCHEDULES))}")
    return cls()


@register_schedule("gpipe")
class GPipe(Schedule):
    """All forwards, then all backwards.

    Simple and always deadlock-free, but every stage holds the activations of
    all M micro-batches at once.  Backwards run in order 0..M-1 because that is
    the order in which the last stage produces the adjoints, so no stage waits
    on an adjoint that is queued behind another.
    """

    def stage_actions(self, stage, num_stages, num_microbatches):
        return ([Action(stage, "F", m) for m in range(num_microbatches)]
                + [Action(stage, "B", m) for m in range(num_microbatches)])


@register_schedule("1f1b")
class OneFOneB(Schedule):
    """Non-interleaved 1F1B (PipeDream-flush).

    Stage s runs ``min(P-s-1, M)`` warm-up forwards (just enough to keep the
    stages behind it busy until the first adjoint returns), then alternates one
    forward and one backward, then drains the remaining backwards.  The bubble
    equals GPipe's, but a stage never holds more than ``min(P-s, M)``
    micro-batches of activations instead of M.
    """

    def stage_actions(self, stage, num_stages, num_microbatches):
        warmup = min(num_stages - stage - 1, num_microbatches)
        out = [Action(stage, "F", m) for m in range(warmup)]
        for i in range(num_microbatches - warmup):
            out += [Action(stage, "F", warmup + i), Action(stage, "B", i)]
        out += [Action(stage, "B", m) for m in range(num_microbatches - warmup, num_microbatches)]
        return out


def validate(actions: list[list[Action]], num_microbatches: int) -> None:
    """Per-stage checks that need no simulation: right stage, each F and B once, F before B."""
    if not actions:
        raise ScheduleError("schedule has no stages")
    _check_sizes(len(actions), num_microbatches)
    for s, stage_list in enumerate(actions):
        seen: set[tuple[str, int]] = set()
        for a in stage_list:
            if a.stage != s:
                raise ScheduleError(f"action {a} is listed for stage {s}")
            if a.microbatch >= num_microbatches:
                raise ScheduleError(f"action {a} on stage {s}: micro-batch {a.microbatch} "
                                    f"out of range 0..{num_microbatches - 1}")
            if (a.kind, a.microbatch) in seen:
                raise ScheduleError(f"action {a} appears twice on stage {s}")
            if a.kind == "B" and ("F", a.microbatch) not in seen:
                raise ScheduleError(f"stage {s} runs {a} before {s}F{a.microbatch}")
            seen.add((a.kind, a.microbatch))
        missing = [str(Action(s, k, m)) for k in "FB" for m in range(num_microbatches) if (k, m) not in seen]
        if missing:
            raise ScheduleError(f"stage {s} is missing {' '.join(missing)}")


def _recv(a: Action, num_stages: int):
    """``(src, what)`` the action must receive before running, or None."""
    if a.kind == "F" and a.stage > 0:
        return a.stage - 1, "state"
    if a.kind == "B" and a.stage < num_stages - 1:
        return a.stage + 1, "adjoint"
    return None


def check_message_order(actions: list[list[Action]]) -> None:
    """Every neighbouring pair receives in the order the other side sends, per direction.

    States flow s -> s+1 in the order of the F actions, adjoints s+1 -> s in the order of the B
    actions; each direction has its own channel (its own communicator on NCCL). Equal orders mean
    that the k-th message of a channel is the k-th one expected, so tags never matter (NCCL has
    none); a mismatch is a :class:`ScheduleError` naming the pair and the first differing message.
    """
    for s in range(len(actions) - 1):
        for what, sender, receiver, kind in (("states", s, s + 1, "F"), ("adjoints", s + 1, s, "B")):
            sent = [a.microbatch for a in actions[sender] if a.kind == kind]
            expected = [a.microbatch for a in actions[receiver] if a.kind == kind]
            if sent != expected:
                k = next((i for i, (a, b) in enumerate(zip(sent, expected)) if a != b), min(len(sent), len(expected)))
                got = sent[k] if k < len(sent) else None
                want = expected[k] if k < len(expected) else None
                raise ScheduleError(
                    f"stage {sender} sends {what} to stage {receiver} in micro-batch order {sent}, but stage "
                    f"{receiver} receives them in order {expected}: message {k} would be micro-batch {got} "
                    f"where {want} is expected on a transport without tags (NCCL)")


def dry_run(actions: list[list[Action]], num_microbatches: int, ordered: bool = True) -> list[list[Action]]:
    """Simulate the schedule in one process and return its execution order.

    The simulation runs in lock-step rounds: in each round every stage runs its
    next action if that action's receive has been satisfied, with a message
    sent in one round deliverable from the next (unit cost per action and per
    hop).  A *time step* is one such round; the returned list holds, per round,
    the actions that ran concurrently.  With unit costs GPipe and 1F1B both take
    ``2*(M+P-1)`` steps, of which each stage is busy ``2*M``.  A round in which
    no stage can run while some still have work is a deadlock: it is reported
    as a :class:`ScheduleError` naming each blocked action and what it waits for.
    With ``ordered`` (the default) the schedule must also run on a tag-blind transport
    (:func:`check_message_order`); ``ordered=False`` matches messages by tag only.
    """
    validate(actions, num_microbatches)
    if ordered:
        check_message_order(actions)
    P, pos = len(actions), [0] * len(actions)
    mailbox: set[tuple[int, int, int]] = set()  # (src, dst, tag)
    steps: list[list[Action]] = []
    while any(pos[s] < len(actions[s]) for s in range(P)):
        ran, sent = [], []
        for s in range(P):
            if pos[s] == len(actions[s]):
                continue
            a, need = actions[s][pos[s]], _recv(actions[s][pos[s]], P)
            tag = 2 * a.microbatch + (a.kind == "B")
            if need is not None:
                if (need[0], s, tag) not in mailbox:
                    continue
                mailbox.remove((need[0], s, tag))
            dst = s + 1 if a.kind == "F" else s - 1
            if 0 <= dst < P:
                sent.append((s, dst, tag))
            ran.append(a)
            pos[s] += 1
        if not ran:
            blocked = [actions[s][pos[s]] for s in range(P) if pos[s] < len(actions[s])]
            waits = ["stage {0.stage} waits at {0} for {2} from stage {1}".format(a, *_recv(a, P)) for a in blocked]
            raise ScheduleError("schedule deadlocks: " + "; ".join(waits))
        mailbox.update(sent)
        steps.append(ran)
    return steps


def format_schedule(actions: list[list[Action]]) -> str:
    """One row per stage, actions in run order, columns aligned for reading."""
    width = max((len(str(a)) for row in actions for a in row), default=0)
    return "\n".join(f"stage {s}: " + " ".join(str(a).ljust(width) for a in row).rstrip()
                     for s, row in enumerate(actions))


def format_timeline(steps: list[list[Action]], num_stages: int) -> str:
    """Dry-run steps as a stage-by-time grid; ``.`` marks an idle (bubble) slot."""
    width = max((len(str(a)) for step in steps for a in step), default=1)
    rows = [["." * width] * len(steps) for _ in range(num_stages)]
    for t, step in enumerate(steps):
        for a in step:
            rows[a.stage][t] = str(a).ljust(width)
    return "\n".join(f"stage {s}: " + " ".join(r) for s, r in enumerate(rows))


def bubble_fraction(num_stages: int, num_microbatches: int) -> float:
    """Ideal idle fraction ``(P-1)/(M+P-1)`` of a flushed pipeline (GPipe and 1F1B alike)."""
    _check_sizes(num_stages, num_microbatches)
    return (num_stages - 1) / (num_microbatches + num_stages - 1)


def max_in_flight(actions: list[list[Action]]) -> list[int]:
    """Per stage, the peak number of micro-batches with activations held (F done, B not yet).

    It bounds a stage's activation memory: M for GPipe, ``min(P-s, M)`` for 1F1B."""
    return [max(accumulate((1 if a.kind == "F" else -1 for a in row), initial=0)) for row in actions]
