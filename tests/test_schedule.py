"""Pipeline schedules: structure, memory bound, dry-run completion and deadlock reports."""

import pytest

from parml.parallel.schedule import (
    SCHEDULES, Action, GPipe, OneFOneB, Schedule, ScheduleError, bubble_fraction, check_message_order,
    dry_run, format_schedule, format_timeline, get_schedule, max_in_flight, register_schedule, validate,
)

SIZES = [(P, M) for P in range(1, 6) for M in range(1, 10)]


def acts(*rows):
    """Build a schedule by hand from strings like "0F0 0F1 0B0 0B1"."""
    return [[Action.parse(t) for t in row.split()] for row in rows]


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("P,M", SIZES)
def test_schedules_complete_with_one_f_and_b_per_microbatch(name, P, M):
    actions = get_schedule(name).actions(P, M)
    assert len(actions) == P
    for s, row in enumerate(actions):
        assert all(a.stage == s for a in row)
        assert sorted(a.microbatch for a in row if a.kind == "F") == list(range(M))
        assert sorted(a.microbatch for a in row if a.kind == "B") == list(range(M))
    steps = dry_run(actions, M)
    assert sum(len(step) for step in steps) == 2 * M * P
    # Every action ran exactly once, and each stage's order is the scheduled one.
    for s in range(P):
        assert [a for step in steps for a in step if a.stage == s] == actions[s]
    # In lock-step rounds with unit costs both schedules reach the ideal pipeline length.
    assert len(steps) == 2 * (M + P - 1)


@pytest.mark.parametrize("P,M", SIZES)
def test_peak_in_flight(P, M):
    assert max_in_flight(OneFOneB().actions(P, M)) == [min(P - s, M) for s in range(P)]
    assert max_in_flight(GPipe().actions(P, M)) == [M] * P


def test_gpipe_order_and_1f1b_order():
    assert format_schedule(GPipe().actions(2, 2)) == "stage 0: 0F0 0F1 0B0 0B1\nstage 1: 1F0 1F1 1B0 1B1"
    assert [str(a) for a in OneFOneB().actions(4, 8)[0]] == (
        "0F0 0F1 0F2 0F3 0B0 0F4 0B1 0F5 0B2 0F6 0B3 0F7 0B4 0B5 0B6 0B7".split())
    assert [str(a) for a in OneFOneB().actions(4, 8)[3]] == (
        "3F0 3B0 3F1 3B1 3F2 3B2 3F3 3B3 3F4 3B4 3F5 3B5 3F6 3B6 3F7 3B7".split())


def test_gpipe_timeline_has_the_bubble():
    steps = dry_run(GPipe().actions(3, 2), 2)
    assert [[str(a) for a in step] for step in steps] == [
        ["0F0"], ["0F1", "1F0"], ["1F1", "2F0"], ["2F1"], ["2B0"], ["1B0", "2B1"],
        ["0B0", "1B1"], ["0B1"]]
    grid = format_timeline(steps, 3).splitlines()
    assert grid[0] == "stage 0: 0F0 0F1 ... ... ... ... 0B0 0B1"
    idle = sum(row.count("...") for row in grid)
    assert idle / (3 * len(steps)) == pytest.approx(bubble_fraction(3, 2))


def test_action_str_parse_round_trip():
    for a in [Action(0, "F", 1), Action(3, "B", 0), Action(12, "F", 34)]:
        assert Action.parse(str(a)) == a
    assert Action.parse("0F1") == Action(0, "F", 1)
    assert str(Action(2, "B", 7)) == "2B7"
    for bad in ["", "0X1", "F1", "0F", "-1F0", "0F1 0B1", "0f1", None]:
        with pytest.raises(ScheduleError):
            Action.parse(bad)
    with pytest.raises(ScheduleError, match="kind"):
        Action(0, "W", 0)


def test_get_schedule():
    assert isinstance(get_schedule("GPipe"), GPipe)
    assert isinstance(get_schedule("1F1B"), OneFOneB)
    assert get_schedule("1f1b").name == "1f1b"
    with pytest.raises(ScheduleError, match=r"^unknown schedule 'x'; valid: 1f1b, gpipe$"):
        get_schedule("x")


def test_register_schedule():
    @register_schedule("Reversed-Test")
    class Bad(Schedule):
        def stage_actions(self, stage, num_stages, num_microbatches):
            return GPipe().stage_actions(stage, num_stages, num_microbatches)[::-1]

    try:
        sched = get_schedule("reversed-test")
        assert sched.name == "reversed-test" and isinstance(sched, Bad)
        with pytest.raises(ScheduleError, match="before"):
            dry_run(sched.actions(2, 2), 2)
        with pytest.raises(ScheduleError, match="already registered"):
            register_schedule("gpipe")(Bad)
    finally:
        SCHEDULES.pop("reversed-test")


def test_bad_sizes_are_named():
    with pytest.raises(ScheduleError, match="num_stages must be an integer >= 1, got 0"):
        GPipe().actions(0, 4)
    with pytest.raises(ScheduleError, match="num_microbatches must be an integer >= 1, got -2"):
        OneFOneB().actions(2, -2)
    with pytest.raises(ScheduleError, match="num_microbatches"):
        bubble_fraction(2, 0)
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction(1, 5) == 0.0


def test_deadlock_names_blocked_actions():
    # Stage 0 runs B0 before F1, but stage 1 wants F1 before it can produce the adjoint of 0.
    actions = acts("0F0 0B0 0F1 0B1", "1F0 1F1 1B0 1B1")
    msg = ("schedule deadlocks: stage 0 waits at 0B0 for adjoint from stage 1; "
           "stage 1 waits at 1F1 for state from stage 0")
    with pytest.raises(ScheduleError) as info:
        dry_run(actions, 2)
    assert str(info.value) == msg


def test_messages_are_matched_by_tag_not_arrival_order():
    # Buffered sends keyed by (src, dst, tag): a stage may receive in another order than
    # its neighbour sends, as long as no cycle of waits forms (ordered=False: gloo, MPI).
    steps = dry_run(acts("0F0 0F1 0B1 0B0", "1F0 1F1 1B0 1B1"), 2, ordered=False)
    assert [[str(a) for a in step] for step in steps] == [
        ["0F0"], ["0F1", "1F0"], ["1F1"], ["1B0"], ["1B1"], ["0B1"], ["0B0"]]
    dry_run(acts("0F0 0F1 0F2 0B0 0B1 0B2", "1F1 1F0 1F2 1B0 1B1 1B2", "2F0 2F1 2F2 2B0 2B1 2B2"), 3,
            ordered=False)
    # Stage 0 runs B0 before F1, so the middle stage never gets state 1 and the last
    # stage starves behind it: every blocked stage is named.
    with pytest.raises(ScheduleError) as info:
        dry_run(acts("0F0 0B0 0F1 0B1", "1F0 1F1 1B1 1B0", "2F0 2F1 2B0 2B1"), 2, ordered=False)
    assert str(info.value) == (
        "schedule deadlocks: stage 0 waits at 0B0 for adjoint from stage 1; "
        "stage 1 waits at 1F1 for state from stage 0; stage 2 waits at 2F1 for state from stage 1")


def test_validation_rejects_malformed_schedules():
    with pytest.raises(ScheduleError, match="stage 0 runs 0B0 before 0F0"):
        dry_run(acts("0B0 0F0", "1F0 1B0"), 1)
    with pytest.raises(ScheduleError, match="stage 1 runs 1B1 before 1F1"):  # F1 missing
        dry_run(acts("0F0 0F1 0B0 0B1", "1F0 1B0 1B1"), 2)
    with pytest.raises(ScheduleError, match="^stage 1 is missing 1F1 1B1$"):
        dry_run(acts("0F0 0F1 0B0 0B1", "1F0 1B0"), 2)
    with pytest.raises(ScheduleError, match="^stage 0 is missing 0B1$"):
        dry_run(acts("0F0 0F1 0B0"), 2)
    with pytest.raises(ScheduleError, match="stage 1 runs 1B1 before 1F1"):
        dry_run(acts("0F0 0F1 0B0 0B1", "1F0 1B0 1B1 1F1"), 2)
    with pytest.raises(ScheduleError, match="action 0F0 is listed for stage 1"):
        dry_run(acts("0F0 0B0", "0F0 0B0"), 1)
    with pytest.raises(ScheduleError, match="appears twice"):
        dry_run(acts("0F0 0F0 0B0"), 1)
    with pytest.raises(ScheduleError, match="micro-batch 2 out of range 0..1"):
        dry_run(acts("0F0 0F1 0F2 0B0 0B1 0B2"), 2)
    with pytest.raises(ScheduleError, match="no stages"):
        validate([], 1)


# --- tag-blind transports (NCCL): every pair receives in the order the other side sends -----------

@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("P,M", SIZES)
def test_builtin_schedules_send_and_receive_in_the_same_order(name, P, M):
    actions = get_schedule(name).actions(P, M)
    check_message_order(actions)
    for s in range(P - 1):       # states s -> s+1 in F order, adjoints s+1 -> s in B order, per channel
        assert [a.microbatch for a in actions[s] if a.kind == "F"] == \
            [a.microbatch for a in actions[s + 1] if a.kind == "F"]
        assert [a.microbatch for a in actions[s + 1] if a.kind == "B"] == \
            [a.microbatch for a in actions[s] if a.kind == "B"]


def test_dry_run_catches_a_reordered_schedule():
    """Stage 0 takes the adjoints of micro-batches 0 and 1 in swapped order: fine where tags match
    (the tag-matching dry run completes), wrong on NCCL (it would get adjoint 0 for 1)."""
    good = OneFOneB().actions(3, 4)
    swapped = [list(row) for row in good]
    row = swapped[0]
    i, j = (k for k, a in enumerate(row) if a.kind == "B" and a.microbatch in (0, 1))
    row[i], row[j] = row[j], row[i]
    dry_run(swapped, 4, ordered=False)
    with pytest.raises(ScheduleError) as info:
        dry_run(swapped, 4)
    assert str(info.value) == (
        "stage 1 sends adjoints to stage 0 in micro-batch order [0, 1, 2, 3], but stage 0 receives them "
        "in order [1, 0, 2, 3]: message 0 would be micro-batch 0 where 1 is expected on a transport "
        "without tags (NCCL)")
    # states: the middle stage runs its forwards 1 and 2 in swapped order
    swapped = [list(row) for row in GPipe().actions(3, 3)]
    swapped[1][1], swapped[1][2] = swapped[1][2], swapped[1][1]
    with pytest.raises(ScheduleError, match=r"^stage 0 sends states to stage 1 in micro-batch order \[0, 1, 2\], "
                                            r"but stage 1 receives them in order \[0, 2, 1\]: message 1"):
        check_message_order(swapped)
    dry_run(good, 4)
